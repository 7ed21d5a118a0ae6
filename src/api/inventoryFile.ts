import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { posix } from 'node:path';
import { parse } from 'yaml';
import { assertHostQemu, assertSafeName, assertSafePath, assertVmBoot, assertVmDevices, qemuName, quoted, type EnvironmentSpec, type GuestControlPlaneSpec, type HostQemu, type HostSpec, type Inventory, type LoadBalancerSpec, type VMBoot, type VMFile, type VMNicModel, type VMRole, type VMSpec } from './inventory.js';

/**
 * Reads and validates the inventory YAML (format documented in README, "Inventory file").
 * Every error names the entry and field at fault.
 */
export function loadInventoryFile(path: string): Inventory {
  let doc: unknown;
  try {
    doc = parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`inventory ${path}: ${(err as Error).message}`);
  }
  return parseInventory(doc, path);
}

export function parseInventory(doc: unknown, source = 'inventory'): Inventory {
  const root = obj(doc, source);
  const hosts = arr(root.hosts, `${source}: hosts`).map((h, i) => parseHost(h, `${source}: hosts[${i}]`));
  const hostNames = new Set(hosts.map((h) => h.name));
  if (hostNames.size !== hosts.length) throw new Error(`${source}: host names must be unique`);
  checkDistinctHosts(hosts, source);
  const environments = arr(root.environments ?? [], `${source}: environments`).map((e, i) => parseEnvironment(e, `${source}: environments[${i}]`, hostNames));
  if (new Set(environments.map((e) => e.name)).size !== environments.length) throw new Error(`${source}: environment names must be unique`);
  checkQemuNames(environments, source);
  return { hosts, environments };
}

/**
 * Two inventory hosts that are one machine and one directory would make a "move" copy a VM onto
 * itself, and the rollback or cleanup then delete its only copy. The same address with overlapping
 * VM directories counts as the same place whatever the port (two sshd on one machine). Addresses are
 * compared as written (lower-cased): a DNS alias of another host's address is not detected.
 */
function checkDistinctHosts(hosts: HostSpec[], source: string): void {
  for (let i = 0; i < hosts.length; i++) {
    for (let j = 0; j < i; j++) {
      const a = hosts[i]!;
      const b = hosts[j]!;
      if (a.address.toLowerCase() !== b.address.toLowerCase()) continue;
      const what = `${source}: hosts[${i}] (${a.name}) and hosts[${j}] (${b.name})`;
      if (a.port === b.port) throw new Error(`${what} are the same SSH endpoint ${a.address}:${a.port}; one machine must be one inventory host`);
      const da = `${a.vmDir.replace(/\/+$/, '')}/`;
      const db = `${b.vmDir.replace(/\/+$/, '')}/`;
      if (da.startsWith(db) || db.startsWith(da)) {
        throw new Error(`${what} are on the same address ${a.address} and their VM directories overlap (${a.vmDir}, ${b.vmDir}); a move between them would copy VMs onto themselves`);
      }
    }
  }
}

/** QEMU's -name is how a VM's process is found (fencing, the test world's kubelets): it must be unique in the whole inventory. */
function checkQemuNames(environments: EnvironmentSpec[], source: string): void {
  const seen = new Map<string, string>();
  environments.forEach((e, i) =>
    e.vms.forEach((v, j) => {
      const q = qemuName(e.name, v.name);
      const at = `environments[${i}].vms[${j}] (${e.name}/${v.name})`;
      const other = seen.get(q);
      if (other) throw new Error(`${source}: ${at} and ${other} would both run as QEMU "${q}"; rename one`);
      seen.set(q, at);
      // a MAC is an identity on the L2 network the hosts' bridges share: two VMs must not claim one
      for (const n of v.nics ?? []) {
        const owner = seen.get(`mac ${n.mac}`);
        if (owner) throw new Error(`${source}: ${at} and ${owner} both have a NIC with MAC ${n.mac}`);
        seen.set(`mac ${n.mac}`, at);
      }
    }),
  );
}

/**
 * vmDir is where the operator creates and deletes whole directories: never the root, a system
 * directory or a shared top-level one, and written canonically (no ".", "..", "//").
 */
const SYSTEM_TREES = ['/etc', '/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32', '/boot', '/dev', '/proc', '/sys', '/run'];
const SHARED_TOP = ['/var', '/tmp', '/home', '/root', '/srv', '/opt', '/mnt', '/media', '/var/lib', '/var/tmp', '/usr/local'];

function checkVmDir(at: string, vmDir: string): void {
  assertSafePath(at, vmDir);
  const trimmed = vmDir.length > 1 ? vmDir.replace(/\/+$/, '') : vmDir;
  if (posix.normalize(trimmed) !== trimmed || trimmed.split('/').slice(1).some((s) => s === '' || s === '.' || s === '..')) {
    throw new Error(`${at} ${quoted(vmDir)} must be a canonical absolute path (no ".", ".." or empty segments)`);
  }
  if (trimmed === '/' || SHARED_TOP.includes(trimmed)) throw new Error(`${at} ${quoted(vmDir)} is a shared system directory; use a directory of its own, e.g. /srv/vms`);
  const tree = SYSTEM_TREES.find((t) => trimmed === t || trimmed.startsWith(`${t}/`));
  if (tree) throw new Error(`${at} ${quoted(vmDir)} is inside the system directory ${tree}; use a directory of its own, e.g. /srv/vms`);
}

const KEY_TYPES = ['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'ssh-rsa'];

/**
 * An OpenSSH public key line is "<type> <base64 blob> [comment]", and the blob itself starts with the
 * length-prefixed type string: a label that disagrees with its blob (or a blob that is no key) is a
 * copy-paste error that would otherwise only show up as a refused connection mid-migration.
 */
function checkHostKey(at: string, line: string): string {
  const m = /^(\S+) ([A-Za-z0-9+/]+={0,2})(?: [^\n\r]*)?$/.exec(line);
  if (!m || !KEY_TYPES.includes(m[1]!)) throw new Error(`${at} must be an OpenSSH public key line ("ssh-ed25519 AAAA..."), one of ${KEY_TYPES.join(', ')}`);
  const label = m[1]!;
  const blob = Buffer.from(m[2]!, 'base64');
  const len = blob.length >= 4 ? blob.readUInt32BE(0) : -1;
  const type = len > 0 && len <= 64 && blob.length > 4 + len ? blob.subarray(4, 4 + len).toString('latin1') : undefined;
  if (type === undefined || !KEY_TYPES.includes(type)) throw new Error(`${at}: the base64 part is not a valid SSH public key blob`);
  if (type !== label) throw new Error(`${at} says "${label}" but its key blob is a "${type}" key; copy the whole line from the host's /etc/ssh/ssh_host_*_key.pub`);
  return line;
}

/** RFC 1123 subdomain, as Kubernetes requires of node names. */
const DNS_SUBDOMAIN = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/;
/** RFC 1123 label, as Kubernetes requires of namespaces. */
const DNS_LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const SECRET_KEY = /^[-._a-zA-Z0-9]{1,253}$/;

function checkAddress(at: string, address: string): void {
  const hostname = address.length <= 253 && /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(address);
  if (!hostname && isIP(address) === 0) throw new Error(`${at} ${quoted(address)} is not a host name or IP address`);
}

/** Files the operator itself creates in a VM directory (qemuArgv, mirror, live, tunnel, source lock); an inventory file of that name would be overwritten or deleted. */
const RESERVED_FILES = new Set(['qemu.pid', 'qmp.sock', 'serial.log', 'nbd.sock', 'migrate.sock', 'guest-ran-here']);
const RESERVED_SUFFIXES = ['.partial', '.sock', '.pid', '.lock'];

function checkFileName(at: string, name: string): void {
  assertSafeName(at, name);
  if (RESERVED_FILES.has(name) || RESERVED_SUFFIXES.some((s) => name.endsWith(s))) {
    throw new Error(`${at} ${quoted(name)} is reserved for the operator's own files (${[...RESERVED_FILES].join(', ')}, *${RESERVED_SUFFIXES.join(', *')})`);
  }
}

function parseHost(v: unknown, at: string): HostSpec {
  const o = obj(v, at);
  const name = str(o.name, `${at}.name`);
  assertSafeName(`${at}.name`, name);
  const address = str(o.address, `${at}.address`);
  checkAddress(`${at}.address`, address);
  const hostKey = checkHostKey(`${at}.hostKey`, str(o.hostKey, `${at}.hostKey`).trim());
  const vmDir = str(o.vmDir, `${at}.vmDir`);
  checkVmDir(`${at}.vmDir`, vmDir);
  const user = str(o.user ?? 'root', `${at}.user`);
  assertSafeName(`${at}.user`, user);
  const host: HostSpec = { name, address, port: int(o.port ?? 22, `${at}.port`, 1, 65535), user, hostKey, vmDir };
  if (o.qemu !== undefined) {
    const q = obj(o.qemu, `${at}.qemu`);
    const qemu: HostQemu = {};
    if (q.binary !== undefined) qemu.binary = str(q.binary, `${at}.qemu.binary`);
    if (q.machine !== undefined) qemu.machine = str(q.machine, `${at}.qemu.machine`);
    if (q.accel !== undefined) qemu.accel = str(q.accel, `${at}.qemu.accel`) as HostQemu['accel'];
    assertHostQemu(`${at}.qemu`, qemu);
    host.qemu = qemu;
  }
  if (o.authorizedKeysFile !== undefined) {
    host.authorizedKeysFile = str(o.authorizedKeysFile, `${at}.authorizedKeysFile`);
    assertSafePath(`${at}.authorizedKeysFile`, host.authorizedKeysFile);
  }
  return host;
}

function parseEnvironment(v: unknown, at: string, hosts: Set<string>): EnvironmentSpec {
  const o = obj(v, at);
  const name = str(o.name, `${at}.name`);
  assertSafeName(`${at}.name`, name);
  const s = obj(o.kubeconfigSecret, `${at}.kubeconfigSecret`);
  const vms = arr(o.vms, `${at}.vms`).map((vm, i) => parseVm(vm, `${at}.vms[${i}]`, hosts));
  if (new Set(vms.map((v) => v.name)).size !== vms.length) throw new Error(`${at}: VM names must be unique`);
  vms.forEach((v, i) => {
    const j = vms.findIndex((w) => w.nodeName === v.nodeName);
    if (j < i) throw new Error(`${at}.vms[${i}].nodeName "${v.nodeName}" is already used by vms[${j}] (${vms[j]!.name}); each VM backs its own node`);
  });
  const secretNamespace = str(s.namespace, `${at}.kubeconfigSecret.namespace`);
  if (!DNS_LABEL.test(secretNamespace)) throw new Error(`${at}.kubeconfigSecret.namespace ${quoted(secretNamespace)} is not a valid namespace name`);
  const secretName = str(s.name, `${at}.kubeconfigSecret.name`);
  if (secretName.length > 253 || !DNS_SUBDOMAIN.test(secretName)) throw new Error(`${at}.kubeconfigSecret.name ${quoted(secretName)} is not a valid Secret name`);
  const secretKey = str(s.key ?? 'kubeconfig', `${at}.kubeconfigSecret.key`);
  if (!SECRET_KEY.test(secretKey)) throw new Error(`${at}.kubeconfigSecret.key ${quoted(secretKey)} is not a valid Secret key`);
  const env: EnvironmentSpec = { name, kubeconfigSecret: { namespace: secretNamespace, name: secretName, key: secretKey }, vms };
  return withGuestSafety(env, o, at);
}

/** The optional guest-safety parts of an environment (controlPlane, loadBalancer) and the VM addresses they need. */
function withGuestSafety(env: EnvironmentSpec, o: Record<string, unknown>, at: string): EnvironmentSpec {
  if (o.controlPlane !== undefined) env.controlPlane = parseControlPlane(o.controlPlane, `${at}.controlPlane`);
  if (o.loadBalancer !== undefined) env.loadBalancer = parseLoadBalancer(o.loadBalancer, `${at}.loadBalancer`);
  if (env.controlPlane || env.loadBalancer) {
    env.vms.forEach((vm, i) => {
      if (vm.role === 'controller' && !vm.address) throw new Error(`${at}.vms[${i}].address is required for a controller when controlPlane or loadBalancer is set`);
    });
  }
  return env;
}

function parseControlPlane(v: unknown, at: string): GuestControlPlaneSpec {
  const o = obj(v, at);
  const sec = obj(o.etcdClientSecret, `${at}.etcdClientSecret`);
  const ns = str(sec.namespace, `${at}.etcdClientSecret.namespace`);
  const name = str(sec.name, `${at}.etcdClientSecret.name`);
  assertSafeName(`${at}.etcdClientSecret.namespace`, ns);
  assertSafeName(`${at}.etcdClientSecret.name`, name);
  return { etcdPort: int(o.etcdPort ?? 2379, `${at}.etcdPort`, 1, 65535), apiServerPort: int(o.apiServerPort ?? 6443, `${at}.apiServerPort`, 1, 65535), etcdClientSecret: { namespace: ns, name } };
}

function parseLoadBalancer(v: unknown, at: string): LoadBalancerSpec {
  const o = obj(v, at);
  const kind = str(o.kind, `${at}.kind`);
  if (kind !== 'nginx') throw new Error(`${at}.kind must be nginx (the only load balancer kind supported)`);
  const ssh = parseHost({ ...o, name: 'load-balancer', vmDir: '/unused' }, at);
  const path = (key: string, dflt?: string): string | undefined => {
    const raw = o[key] ?? dflt;
    if (raw === undefined) return undefined;
    const p = str(raw, `${at}.${key}`);
    assertSafePath(`${at}.${key}`, p);
    return p;
  };
  const upstream = str(o.upstream, `${at}.upstream`);
  if (!/^[A-Za-z0-9_]{1,64}$/.test(upstream)) throw new Error(`${at}.upstream ${JSON.stringify(upstream)} is not an nginx upstream name (letters, digits, _)`);
  const lb: LoadBalancerSpec = {
    kind, address: ssh.address, port: ssh.port, user: ssh.user, hostKey: ssh.hostKey,
    configPath: path('configPath') ?? str(undefined, `${at}.configPath`), upstream,
    nginxBinary: path('nginxBinary', '/usr/sbin/nginx')!,
    drainTimeoutSeconds: int(o.drainTimeoutSeconds ?? 60, `${at}.drainTimeoutSeconds`, 1, 3600),
  };
  const mainConfig = path('mainConfig');
  const prefix = path('prefix');
  if (mainConfig) lb.mainConfig = mainConfig;
  if (prefix) lb.prefix = prefix;
  if (o.sourceAddress !== undefined) {
    const a = str(o.sourceAddress, `${at}.sourceAddress`);
    if (!/^[0-9a-fA-F.:]+$/.test(a)) throw new Error(`${at}.sourceAddress ${JSON.stringify(a)} is not an IP address`);
    lb.sourceAddress = a;
  }
  return lb;
}

const ROLES: VMRole[] = ['beachhead', 'controller', 'worker'];

function parseVm(v: unknown, at: string, hosts: Set<string>): VMSpec {
  const o = obj(v, at);
  const name = str(o.name, `${at}.name`);
  assertSafeName(`${at}.name`, name);
  const role = str(o.role, `${at}.role`) as VMRole;
  if (!ROLES.includes(role)) throw new Error(`${at}.role must be one of ${ROLES.join(', ')}`);
  const host = str(o.host, `${at}.host`);
  if (!hosts.has(host)) throw new Error(`${at}.host ${JSON.stringify(host)} is not a host of the inventory`);
  const files = arr(o.files, `${at}.files`).map((f, i): VMFile => {
    const fo = obj(f, `${at}.files[${i}]`);
    const fname = str(fo.name, `${at}.files[${i}].name`);
    checkFileName(`${at}.files[${i}].name`, fname);
    const kind = str(fo.kind ?? 'disk', `${at}.files[${i}].kind`);
    if (kind !== 'disk' && kind !== 'file') throw new Error(`${at}.files[${i}].kind must be disk or file`);
    // A disk's format is stated, never probed: a raw disk the guest wrote a qcow2 header into (naming a
    // backing file: another tenant's image, a host device) would otherwise be opened as that qcow2.
    if (kind === 'disk' && fo.format === undefined) throw new Error(`${at}.files[${i}].format is required for a disk (qcow2 or raw): QEMU must not guess it from the image's first bytes, which the guest writes`);
    const format = fo.format === undefined ? undefined : str(fo.format, `${at}.files[${i}].format`);
    if (format !== undefined && format !== 'qcow2' && format !== 'raw') throw new Error(`${at}.files[${i}].format must be qcow2 or raw`);
    if (format !== undefined && kind !== 'disk') throw new Error(`${at}.files[${i}].format is for disks only (kind: disk)`);
    return format ? { name: fname, kind, format } : { name: fname, kind };
  });
  files.forEach((f, i) => {
    if (files.findIndex((g) => g.name === f.name) < i) throw new Error(`${at}.files[${i}].name "${f.name}" appears twice in this VM`);
  });
  const nodeName = str(o.nodeName ?? name, `${at}.nodeName`);
  if (nodeName.length > 253 || !DNS_SUBDOMAIN.test(nodeName)) throw new Error(`${at}.nodeName ${quoted(nodeName)} is not a valid Kubernetes node name (lower-case RFC 1123 subdomain, at most 253 characters)`);
  const spec: VMSpec = { name, role, nodeName, host, memoryMiB: int(o.memoryMiB ?? 64, `${at}.memoryMiB`, 16, 1 << 20), cpus: int(o.cpus ?? 1, `${at}.cpus`, 1, 256), files };
  if (o.boot !== undefined) {
    const b = obj(o.boot, `${at}.boot`);
    const boot: VMBoot = { kernel: str(b.kernel, `${at}.boot.kernel`) };
    if (b.initrd !== undefined) boot.initrd = str(b.initrd, `${at}.boot.initrd`);
    if (b.append !== undefined) boot.append = str(b.append, `${at}.boot.append`);
    assertVmBoot(`${at}.boot`, boot, files);
    spec.boot = boot;
  }
  if (o.cpu !== undefined) {
    const c = obj(o.cpu, `${at}.cpu`);
    spec.cpu = { model: str(c.model, `${at}.cpu.model`) };
  }
  if (o.nics !== undefined) {
    spec.nics = arr(o.nics, `${at}.nics`).map((n, i) => {
      const no = obj(n, `${at}.nics[${i}]`);
      return { bridge: str(no.bridge, `${at}.nics[${i}].bridge`), mac: str(no.mac, `${at}.nics[${i}].mac`), model: str(no.model ?? 'virtio-net-pci', `${at}.nics[${i}].model`) as VMNicModel };
    });
  }
  assertVmDevices(at, spec);
  if (o.address !== undefined) {
    const address = str(o.address, `${at}.address`);
    if (!/^[0-9a-fA-F.:]+$/.test(address)) throw new Error(`${at}.address ${JSON.stringify(address)} is not an IP address`);
    spec.address = address;
  }
  return spec;
}

function obj(v: unknown, at: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${at} must be a mapping`);
  return v as Record<string, unknown>;
}
function arr(v: unknown, at: string): unknown[] {
  if (!Array.isArray(v)) throw new Error(`${at} must be a list`);
  return v;
}
function str(v: unknown, at: string): string {
  if (typeof v !== 'string' || v.length === 0) throw new Error(`${at} must be a non-empty string`);
  return v;
}
function int(v: unknown, at: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new Error(`${at} must be an integer between ${min} and ${max}`);
  return v;
}
