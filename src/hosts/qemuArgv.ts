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

/**
 * Options of a QEMU command line that change nothing the guest sees or keeps: names, monitors,
 * consoles, the pidfile, how QEMU is run. A VM the cloud started with its own tooling may differ from
 * the operator's command line in these and still be the VM its inventory entry describes. (Serial
 * ports are the operator's own: a console and the heartbeat/observer socket, replaced on every host.)
 */
const HOST_LOCAL_OPTIONS = new Set([
  '-name', '-qmp', '-qmp-pretty', '-monitor', '-mon', '-chardev', '-serial', '-display', '-vnc', '-nographic', '-pidfile',
  '-daemonize', '-D', '-d', '-trace', '-msg', '-S', '-incoming', '-runas', '-sandbox', '-no-shutdown', '-action', '-nodefaults', '-uuid',
]);
/** Options that take no value. */
const FLAG_OPTIONS = new Set(['-daemonize', '-nographic', '-S', '-nodefaults', '-no-shutdown', '-enable-kvm', '-no-reboot', '-no-hpet', '-no-acpi', '-snapshot']);

/** A QEMU argv (argv[0] the binary) as its options, each with its value (undefined for a flag). */
export function qemuOptions(argv: readonly string[]): { option: string; value: string | undefined }[] {
  const out: { option: string; value: string | undefined }[] = [];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    const option = a.startsWith('--') ? a.slice(1) : a;
    if (!option.startsWith('-')) {
      out.push({ option: '(argument)', value: a });
      continue;
    }
    if (FLAG_OPTIONS.has(option) || i + 1 >= argv.length) out.push({ option, value: undefined });
    else out.push({ option, value: argv[++i] });
  }
  return out;
}

/** "64", "64M", "size=64M", "1G" → MiB (undefined when unreadable). */
function memoryMiB(v: string | undefined): number | undefined {
  const m = /(?:^|,)(?:size=)?(\d+)([MGT]?)(?:,|$)/i.exec(v ?? '');
  if (!m) return undefined;
  return Number(m[1]) * ({ '': 1, M: 1, G: 1024, T: 1024 * 1024 } as Record<string, number>)[m[2]!.toUpperCase()]!;
}
const smpCpus = (v: string | undefined) => /(?:^|,)(?:cpus=)?(\d+)(?:,|$)/.exec(v ?? '')?.[1];
const field = (v: string | undefined, key: string) => (v ?? '').split(',').find((p) => p.startsWith(`${key}=`))?.slice(key.length + 1);

/** What the guest sees of a command line, one comparable item per device or setting. */
function guestVisible(argv: readonly string[]): Set<string> {
  const items = new Set<string>();
  const opts = qemuOptions(argv);
  if (!opts.some((o) => o.option === '-nodefaults')) items.add("QEMU's default devices (no -nodefaults: a NIC, a VGA card, a CD-ROM, a floppy)");
  for (const { option, value } of opts) {
    if (HOST_LOCAL_OPTIONS.has(option)) continue;
    switch (option) {
      case '-m': items.add(`memory ${memoryMiB(value) ?? value} MiB`); break;
      case '-smp': items.add(`${smpCpus(value) ?? value} vCPU(s)`); break;
      case '-machine': case '-M': items.add(`machine ${(value ?? '').split(',')[0]}`); break;
      case '-cpu': items.add(`CPU model ${value}`); break;
      case '-kernel': case '-initrd': items.add(`${option.slice(1)} ${value}`); break;
      case '-append': items.add(`kernel command line "${value}"`); break;
      case '-drive': items.add(`disk ${field(value, 'file') ?? value}${field(value, 'format') ? ` (${field(value, 'format')})` : ''}${field(value, 'if') ? ` on ${field(value, 'if')}` : ''}`); break;
      case '-netdev': items.add(`network backend ${(value ?? '').split(',')[0]}${field(value, 'br') ? ` on bridge ${field(value, 'br')}` : ''}`); break;
      case '-device': {
        const model = (value ?? '').split(',')[0];
        const mac = field(value, 'mac');
        items.add(`device ${model}${mac ? ` with MAC ${mac}` : ''}`);
        break;
      }
      case '-enable-kvm': case '-accel': break; // the accelerator: the host's (readiness compares it for a live move)
      default: items.add(`${option}${value !== undefined ? ` ${value}` : ''}`);
    }
  }
  return items;
}

/**
 * What a running QEMU gives its guest that the VM's inventory definition does not (`extra`: it would
 * be lost on the target), and what the definition has that the running QEMU lacks (`missing`: the
 * guest would see a device appear or change). Both empty: the VM moves as the same VM.
 */
export function definitionDrift(running: readonly string[], defined: readonly string[]): { extra: string[]; missing: string[] } {
  const r = guestVisible(running);
  const d = guestVisible(defined);
  return { extra: [...r].filter((x) => !d.has(x)), missing: [...d].filter((x) => !r.has(x)) };
}
