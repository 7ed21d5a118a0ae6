import { assertHostQemu, assertSafeName, assertSafePath, assertVmBoot, assertVmDevices, qemuName, type HostQemu, type VMSpec } from '../api/inventory.js';

/** What a host runs when the inventory says nothing: a real hypervisor host has KVM. */
export const QEMU_DEFAULTS: Required<HostQemu> = { binary: 'qemu-system-x86_64', machine: 'pc', accel: 'kvm' };

export interface QemuArgvOptions {
  /** the host's QEMU settings (HostSpec.qemu); unset fields take QEMU_DEFAULTS */
  qemu?: HostQemu;
  /** add `-incoming defer`: QEMU waits (status inmigrate) for migrate-incoming */
  incomingDefer?: boolean;
  /** add `-S`: do not start the vCPUs by itself, not even after an incoming migration completed */
  paused?: boolean;
}

export function resolveHostQemu(q: HostQemu | undefined): Required<HostQemu> {
  return { ...QEMU_DEFAULTS, ...q };
}

/**
 * Why two hosts cannot live-migrate between each other, or undefined: the migration stream carries
 * device and CPU state that only the same machine type and accelerator on both ends can load.
 */
export function liveMigrationMismatch(source: HostQemu | undefined, target: HostQemu | undefined): string | undefined {
  const a = resolveHostQemu(source);
  const b = resolveHostQemu(target);
  if (a.machine !== b.machine) return `machine type differs (${a.machine} vs ${b.machine})`;
  if (a.accel !== b.accel) return `accelerator differs (${a.accel} vs ${b.accel})`;
  return undefined;
}

/**
 * The one QEMU command line for a VM (Hypervisor.startVm and the live-migration target both use it).
 * Serial ports: ttyS0 → serial.log (console), ttyS1 → heartbeat.sock, a unix socket server in the VM
 * directory for a guest agent's line protocol (the test guest's heartbeat; nothing listens = dropped).
 */
export function buildQemuArgv(dir: string, environment: string, vm: VMSpec, opts: QemuArgvOptions = {}): string[] {
  assertSafePath('VM directory', dir);
  if (!Number.isInteger(vm.memoryMiB) || vm.memoryMiB < 16) throw new Error(`VM ${vm.name}: invalid memoryMiB ${vm.memoryMiB}`);
  if (!Number.isInteger(vm.cpus) || vm.cpus < 1) throw new Error(`VM ${vm.name}: invalid cpus ${vm.cpus}`);
  const name = qemuName(environment, vm.name);
  assertSafeName('qemu name', name);
  assertHostQemu('host qemu', opts.qemu ?? {});
  const q = resolveHostQemu(opts.qemu);
  const argv = [
    q.binary,
    '-name',
    `${name},process=${name}`,
    '-machine',
    `${q.machine},accel=${q.accel}`,
    '-m',
    String(vm.memoryMiB),
    '-smp',
    String(vm.cpus),
    '-nodefaults',
    '-display',
    'none',
    '-serial',
    `file:${dir}/serial.log`,
    '-serial',
    `unix:${dir}/heartbeat.sock,server=on,wait=off`,
    '-qmp',
    `unix:${dir}/qmp.sock,server=on,wait=off`,
    // A second monitor for observers (the cloud's monitoring, the test world): QEMU serves one client per
    // monitor at a time, so a watcher on qmp.sock would hold off the operator exactly when it needs the VM.
    '-qmp',
    `unix:${dir}/qmp-observe.sock,server=on,wait=off`,
    '-pidfile',
    `${dir}/qemu.pid`,
    '-daemonize',
  ];
  if (vm.boot) {
    assertVmBoot(`VM ${vm.name} boot`, vm.boot, vm.files);
    argv.push('-kernel', `${dir}/${vm.boot.kernel}`);
    if (vm.boot.initrd) argv.push('-initrd', `${dir}/${vm.boot.initrd}`);
    if (vm.boot.append) argv.push('-append', vm.boot.append);
  }
  for (const f of vm.files) {
    if (f.kind !== 'disk') continue;
    assertSafeName('disk file', f.name);
    const fmt = diskFormat(f);
    argv.push('-drive', `file=${dir}/${f.name},format=${fmt},if=virtio`);
  }
  // The VM's own definition: its CPU model and its NICs on the host's bridges with their MACs, so the
  // same VM (the same identity on its network, the same CPU a live migration's target must match) runs
  // wherever it moves. -nodefaults above: nothing else is added.
  assertVmDevices(`VM ${vm.name}`, vm);
  if (vm.cpu) argv.push('-cpu', vm.cpu.model);
  for (const [i, n] of (vm.nics ?? []).entries()) argv.push('-netdev', `bridge,id=nic${i},br=${n.bridge}`, '-device', `${n.model},netdev=nic${i},mac=${n.mac}`);
  if (opts.paused) argv.push('-S');
  if (opts.incomingDefer) argv.push('-incoming', 'defer');
  return argv;
}

/** A disk's stated format; never guessed (QEMU's probe reads the guest-written first bytes). */
export function diskFormat(f: VMSpec['files'][number]): 'qcow2' | 'raw' {
  if (f.format === undefined) throw new Error(`disk ${f.name} has no format: the inventory must state qcow2 or raw`);
  if (f.format !== 'qcow2' && f.format !== 'raw') throw new Error(`disk ${f.name}: unsupported format ${String(f.format)}`);
  return f.format;
}
