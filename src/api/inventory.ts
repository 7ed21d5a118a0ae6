/**
 * The cloud's inventory: hypervisor hosts, student environments and their VMs.
 * Loaded from a YAML file (see docs in README "Inventory file") into SQLite.
 */

export type VMRole = 'beachhead' | 'controller' | 'worker';

export interface HostSpec {
  /** inventory name, e.g. host01 */
  name: string;
  /** SSH address (IP or DNS name) */
  address: string;
  port: number;
  user: string;
  /** OpenSSH public host key line, e.g. "ssh-ed25519 AAAA..."; the connection is refused if the host presents another key */
  hostKey: string;
  /** absolute directory on the host holding VM directories: <vmDir>/<environment>/<vm>/ */
  vmDir: string;
  /** how VMs are run on this host; defaults in src/hosts/qemuArgv.ts (KVM) */
  qemu?: HostQemu;
  /**
   * the file this host's sshd reads `user`'s authorized keys from (default ~/.ssh/authorized_keys):
   * transfer mode Direct authorizes a per-copy key there for the copy's duration
   */
  authorizedKeysFile?: string;
}

/** QEMU on one host. Live migration needs the same accelerator and machine type on both ends. */
export interface HostQemu {
  /** qemu-system-* binary, a name on PATH or an absolute path (default qemu-system-x86_64) */
  binary?: string;
  /** -machine type (default pc) */
  machine?: string;
  accel?: 'kvm' | 'tcg';
}

/** Direct kernel boot: kernel and initrd are VM files (kind file), so they move and are verified with the VM. */
export interface VMBoot {
  kernel: string;
  initrd?: string;
  /** kernel command line */
  append?: string;
}

export interface VMFile {
  /** file name inside the VM directory, e.g. disk0.qcow2 */
  name: string;
  /** disk images are attached to QEMU; other files (firmware vars, seed) only move with the VM */
  kind: 'disk' | 'file';
  /** required for disks (the inventory parser refuses a disk without it): QEMU never probes a disk's format */
  format?: 'qcow2' | 'raw';
}

export interface VMSpec {
  /** VM name inside its environment: beachhead, controller-1, node-2 ... */
  name: string;
  role: VMRole;
  /** the guest-cluster node this VM backs */
  nodeName: string;
  /** host the VM currently runs on (inventory name) */
  host: string;
  memoryMiB: number;
  cpus: number;
  files: VMFile[];
  boot?: VMBoot;
  /** the VM's own address on its hypervisor's network: where a controller's etcd member and API server listen */
  address?: string;
  /** the CPU model the VM runs with (QEMU -cpu); a live migration's target must offer the same */
  cpu?: { model: string };
  /**
   * The VM's network interfaces: each on a host bridge of that name (present on every host the VM may
   * move to), with a fixed MAC, so a moved VM keeps its network identity. QEMU attaches them through
   * its bridge helper (-netdev bridge); see the inventory docs for the host's side.
   */
  nics?: VMNic[];
}

export interface VMNic {
  /** the host bridge (Linux interface name) the NIC is attached to, the same name on every host */
  bridge: string;
  /** unicast, lower-case, e.g. 52:54:00:12:34:56 */
  mac: string;
  /** the QEMU NIC device model */
  model: VMNicModel;
}

export const NIC_MODELS = ['virtio-net-pci', 'e1000', 'e1000e', 'rtl8139'] as const;
export type VMNicModel = (typeof NIC_MODELS)[number];

export interface EnvironmentSpec {
  name: string;
  /** Secret (in the operator's cluster) holding the guest cluster's kubeconfig */
  kubeconfigSecret: { namespace: string; name: string; key: string };
  vms: VMSpec[];
  /** how the operator asks the guest's etcd and API servers (quorum, leader transfer); see GuestControlPlaneSpec */
  controlPlane?: GuestControlPlaneSpec;
  /** the beachhead's load balancer in front of the controllers' API servers; without it controllers move unannounced to it */
  loadBalancer?: LoadBalancerSpec;
}

/**
 * The guest's stacked control plane: on every controller VM (at its `address`) an etcd member and an API server.
 * The operator reaches them through the SSH connection of the hypervisor hosting the VM (direct-tcpip), as
 * only the hypervisors are on the VMs' network.
 */
export interface GuestControlPlaneSpec {
  etcdPort: number;
  apiServerPort: number;
  /** Secret (operator's cluster) with the etcd client TLS material: keys ca.crt, tls.crt, tls.key */
  etcdClientSecret: { namespace: string; name: string };
}

/** A load balancer driven over SSH. Only `nginx` (a `stream` upstream) exists today; `kind` leaves room for others. */
export interface LoadBalancerSpec {
  kind: 'nginx';
  /** SSH endpoint of the machine running it (the beachhead), host key pinned like a hypervisor's */
  address: string;
  port: number;
  user: string;
  hostKey: string;
  /** file holding the `upstream` block; the SSH user must be able to replace it */
  configPath: string;
  /** name of the upstream whose `server` lines are the controllers' API servers (`<vm address>:<apiServerPort>`) */
  upstream: string;
  /** nginx binary and, when not the packaged defaults, its -c main config and -p prefix */
  nginxBinary: string;
  mainConfig?: string;
  prefix?: string;
  /** only connections from this local address count when waiting for a backend to drain (nginx `proxy_bind`) */
  sourceAddress?: string;
  /** how long to wait for connections to a removed backend to close */
  drainTimeoutSeconds: number;
}

export interface Inventory {
  hosts: HostSpec[];
  environments: EnvironmentSpec[];
}

/** Names that end up in file paths and QEMU arguments: a strict allow-list, so no shell or path injection is possible. */
export const SAFE_NAME = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;
export const SAFE_ABS_PATH = /^\/[A-Za-z0-9._/-]+$/;

/** A value quoted in an error message: bounded, so a hostile 300-character string is not echoed whole. */
export function quoted(value: string, max = 40): string {
  return JSON.stringify(value.length > max ? `${value.slice(0, max)}…` : value);
}

export function assertSafeName(kind: string, value: string): void {
  if (!SAFE_NAME.test(value) || value.includes('..')) {
    throw new Error(`${kind} ${quoted(value)} is not a valid name (at most 63 lower-case letters, digits, '.', '_', '-', starting and ending with a letter or digit)`);
  }
}

export function assertSafePath(kind: string, value: string): void {
  if (!SAFE_ABS_PATH.test(value) || value.split('/').includes('..')) {
    throw new Error(`${kind} ${quoted(value)} is not a valid absolute path`);
  }
}

export const QEMU_BINARY = /^(\/[A-Za-z0-9._/-]+\/)?qemu-system-[a-z0-9_]+$/;
export const QEMU_MACHINE = /^[a-z0-9][a-z0-9._-]{0,63}$/;
/** kernel command line: words of a conservative character set (no quotes, no shell or QEMU option syntax) */
export const KERNEL_APPEND = /^[A-Za-z0-9._=,:/+-]+( [A-Za-z0-9._=,:/+-]+)*$/;

export function assertHostQemu(kind: string, q: HostQemu): void {
  if (q.binary !== undefined && (!QEMU_BINARY.test(q.binary) || q.binary.split('/').includes('..'))) throw new Error(`${kind}.binary ${JSON.stringify(q.binary)} must be qemu-system-<arch> or an absolute path to it`);
  if (q.machine !== undefined && !QEMU_MACHINE.test(q.machine)) throw new Error(`${kind}.machine ${JSON.stringify(q.machine)} is not a QEMU machine type`);
  if (q.accel !== undefined && q.accel !== 'kvm' && q.accel !== 'tcg') throw new Error(`${kind}.accel must be kvm or tcg`);
}

export function assertVmBoot(kind: string, b: VMBoot, files: VMFile[]): void {
  for (const [field, name] of [['kernel', b.kernel], ['initrd', b.initrd]] as const) {
    if (name === undefined) continue;
    assertSafeName(`${kind}.${field}`, name);
    if (!files.some((f) => f.name === name && f.kind === 'file')) throw new Error(`${kind}.${field} ${JSON.stringify(name)} must be one of the VM's files (kind file), so it moves with the VM`);
  }
  if (b.append !== undefined && (b.append.length > 1024 || !KERNEL_APPEND.test(b.append))) throw new Error(`${kind}.append must be space-separated words of letters, digits and . _ = , : / + -`);
}

/** Linux interface names: 1–15 characters, no '/', no whitespace; kept to a conservative set. */
export const BRIDGE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/;
/** a unicast MAC address (the first octet's low bit clear), lower-case */
export const UNICAST_MAC = /^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$/;
/** QEMU -cpu: a model name, then optional +flag/-flag/flag=value features */
export const CPU_MODEL = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(,[+-]?[a-z0-9_.-]{1,32}(=[a-z0-9_.-]{1,32})?){0,32}$/;

/** The VM's CPU model and NICs are replayed into QEMU's argv: only validated tokens, never a string QEMU would parse further. */
export function assertVmDevices(kind: string, vm: Pick<VMSpec, 'cpu' | 'nics'>): void {
  if (vm.cpu !== undefined && !CPU_MODEL.test(vm.cpu.model)) throw new Error(`${kind}.cpu.model ${quoted(vm.cpu.model)} is not a QEMU CPU model (a name, then optional ,+flag ,-flag ,flag=value)`);
  const macs = new Set<string>();
  for (const [i, n] of (vm.nics ?? []).entries()) {
    if (!BRIDGE_NAME.test(n.bridge)) throw new Error(`${kind}.nics[${i}].bridge ${quoted(n.bridge)} is not a network interface name (1–15 letters, digits, '_', '.', '-')`);
    if (!UNICAST_MAC.test(n.mac)) throw new Error(`${kind}.nics[${i}].mac ${quoted(n.mac)} is not a unicast MAC address in lower case (like 52:54:00:12:34:56)`);
    if (!(NIC_MODELS as readonly string[]).includes(n.model)) throw new Error(`${kind}.nics[${i}].model must be one of ${NIC_MODELS.join(', ')}`);
    if (macs.has(n.mac)) throw new Error(`${kind}.nics[${i}].mac ${n.mac} appears twice in this VM`);
    macs.add(n.mac);
  }
}

/** Directory of one VM on a host. */
export function vmDirectory(host: HostSpec, environment: string, vm: string): string {
  assertSafePath('host vmDir', host.vmDir);
  assertSafeName('environment', environment);
  assertSafeName('vm', vm);
  return `${host.vmDir.replace(/\/+$/, '')}/${environment}/${vm}`;
}

/** QEMU's -name for a VM; unique on a host and what the process is found by. */
export function qemuName(environment: string, vm: string): string {
  return `${environment}.${vm}`;
}
