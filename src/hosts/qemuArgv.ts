import { assertSafeName, assertSafePath, qemuName, type VMSpec } from '../api/inventory.js';

export interface QemuArgvOptions {
  /** add `-incoming defer`: QEMU waits (status inmigrate) for migrate-incoming */
  incomingDefer?: boolean;
  /** add `-S`: do not start the vCPUs by itself, not even after an incoming migration completed */
  paused?: boolean;
}

/** The one QEMU command line for a VM (Hypervisor.startVm and the live-migration target both use it). */
export function buildQemuArgv(dir: string, environment: string, vm: VMSpec, opts: QemuArgvOptions = {}): string[] {
  assertSafePath('VM directory', dir);
  if (!Number.isInteger(vm.memoryMiB) || vm.memoryMiB < 16) throw new Error(`VM ${vm.name}: invalid memoryMiB ${vm.memoryMiB}`);
  if (!Number.isInteger(vm.cpus) || vm.cpus < 1) throw new Error(`VM ${vm.name}: invalid cpus ${vm.cpus}`);
  const name = qemuName(environment, vm.name);
  assertSafeName('qemu name', name);
  const argv = [
    'qemu-system-x86_64',
    '-name',
    `${name},process=${name}`,
    '-machine',
    'pc,accel=tcg',
    '-m',
    String(vm.memoryMiB),
    '-smp',
    String(vm.cpus),
    '-nodefaults',
    '-display',
    'none',
    '-serial',
    `file:${dir}/serial.log`,
    '-qmp',
    `unix:${dir}/qmp.sock,server=on,wait=off`,
    '-pidfile',
    `${dir}/qemu.pid`,
    '-daemonize',
  ];
  for (const f of vm.files) {
    if (f.kind !== 'disk') continue;
    assertSafeName('disk file', f.name);
    const fmt = f.format ?? 'qcow2';
    if (fmt !== 'qcow2' && fmt !== 'raw') throw new Error(`disk ${f.name}: unsupported format ${String(fmt)}`);
    argv.push('-drive', `file=${dir}/${f.name},format=${fmt},if=virtio`);
  }
  if (opts.paused) argv.push('-S');
  if (opts.incomingDefer) argv.push('-incoming', 'defer');
  return argv;
}

