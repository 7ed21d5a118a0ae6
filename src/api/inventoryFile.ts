import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { assertHostQemu, assertSafeName, assertSafePath, assertVmBoot, type EnvironmentSpec, type GuestControlPlaneSpec, type HostQemu, type HostSpec, type Inventory, type LoadBalancerSpec, type VMBoot, type VMFile, type VMRole, type VMSpec } from './inventory.js';

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
  const environments = arr(root.environments ?? [], `${source}: environments`).map((e, i) => parseEnvironment(e, `${source}: environments[${i}]`, hostNames));
  if (new Set(environments.map((e) => e.name)).size !== environments.length) throw new Error(`${source}: environment names must be unique`);
  return { hosts, environments };
}

function parseHost(v: unknown, at: string): HostSpec {
  const o = obj(v, at);
  const name = str(o.name, `${at}.name`);
  assertSafeName(`${at}.name`, name);
  const address = str(o.address, `${at}.address`);
  if (!/^[A-Za-z0-9.:-]+$/.test(address)) throw new Error(`${at}.address ${JSON.stringify(address)} is not a host name or IP address`);
  const hostKey = str(o.hostKey, `${at}.hostKey`).trim();
  if (!/^(ssh-ed25519|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|rsa-sha2-256|rsa-sha2-512|ssh-rsa) [A-Za-z0-9+/=]+( .*)?$/.test(hostKey)) {
    throw new Error(`${at}.hostKey must be an OpenSSH public key line ("ssh-ed25519 AAAA...")`);
  }
  const vmDir = str(o.vmDir, `${at}.vmDir`);
  assertSafePath(`${at}.vmDir`, vmDir);
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
  return host;
}

function parseEnvironment(v: unknown, at: string, hosts: Set<string>): EnvironmentSpec {
  const o = obj(v, at);
  const name = str(o.name, `${at}.name`);
  assertSafeName(`${at}.name`, name);
  const s = obj(o.kubeconfigSecret, `${at}.kubeconfigSecret`);
  const vms = arr(o.vms, `${at}.vms`).map((vm, i) => parseVm(vm, `${at}.vms[${i}]`, hosts));
  if (new Set(vms.map((v) => v.name)).size !== vms.length) throw new Error(`${at}: VM names must be unique`);
  const env: EnvironmentSpec = {
    name,
    kubeconfigSecret: { namespace: str(s.namespace, `${at}.kubeconfigSecret.namespace`), name: str(s.name, `${at}.kubeconfigSecret.name`), key: str(s.key ?? 'kubeconfig', `${at}.kubeconfigSecret.key`) },
    vms,
  };
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
    assertSafeName(`${at}.files[${i}].name`, fname);
    const kind = str(fo.kind ?? 'disk', `${at}.files[${i}].kind`);
    if (kind !== 'disk' && kind !== 'file') throw new Error(`${at}.files[${i}].kind must be disk or file`);
    const format = fo.format === undefined ? undefined : str(fo.format, `${at}.files[${i}].format`);
    if (format !== undefined && format !== 'qcow2' && format !== 'raw') throw new Error(`${at}.files[${i}].format must be qcow2 or raw`);
    return format ? { name: fname, kind, format } : { name: fname, kind };
  });
  const nodeName = str(o.nodeName ?? name, `${at}.nodeName`);
  const spec: VMSpec = { name, role, nodeName, host, memoryMiB: int(o.memoryMiB ?? 64, `${at}.memoryMiB`, 16, 1 << 20), cpus: int(o.cpus ?? 1, `${at}.cpus`, 1, 256), files };
  if (o.boot !== undefined) {
    const b = obj(o.boot, `${at}.boot`);
    const boot: VMBoot = { kernel: str(b.kernel, `${at}.boot.kernel`) };
    if (b.initrd !== undefined) boot.initrd = str(b.initrd, `${at}.boot.initrd`);
    if (b.append !== undefined) boot.append = str(b.append, `${at}.boot.append`);
    assertVmBoot(`${at}.boot`, boot, files);
    spec.boot = boot;
  }
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
