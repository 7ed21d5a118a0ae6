/**
 * A student environment with a real, highly available control plane, separate from the management cluster:
 *
 * - per controller VM (address 127.0.0.<n>): an etcd member (client TLS, certificates from haPki.ts) and a
 *   kube-apiserver on that address using its local member (kubeadm's stacked topology);
 * - the beachhead (its own address): a real NGINX `stream` proxy over the three API servers, configured the
 *   way the seed's team had it (passive checks, proxy_connect_timeout 10s, max_fails/fail_timeout), started
 *   as its own instance (own prefix, config and pid file) and owned by the beachhead's SSH user; an sshd on
 *   the beachhead's address (test/world/hosts.ts) through which the operator edits and reloads it;
 * - kube-controller-manager, kube-scheduler and KWOK reach the guest API through the load balancer.
 *
 * Services follow their VM's *running* state (haVmState.ts): when the VM stops running, its address stops
 * answering — an nftables rule drops every packet to and from it, so new connections hang like those to a
 * powered-off machine — and its processes are frozen (SIGSTOP: paused VM) or, once the QEMU is gone, killed.
 * When it runs again the drop goes and the processes continue, or restart on their data. A member's data
 * lives under the VM's identity (<dir>/vmstate/<vm>/), not under a host: it stands for the VM's disk.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { chown, mkdir, readFile, writeFile, appendFile, chmod } from 'node:fs/promises';
import { appendFileSync, closeSync, openSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { request } from 'node:https';
import net from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import type { EnvironmentSpec, HostSpec, VMSpec } from '../../src/api/inventory.js';
import { ensureBinaries, KWOK_MANAGE_LABEL, KWOK_MANAGE_VALUE } from './controlPlane.js';
import { withRequestTimeout } from '../../src/guest/guestCluster.js';
import { createGuestNodes, VmLivenessBridge } from './guestCluster.js';
import { ensureHostUser, startHosts, type TestHosts } from './hosts.js';
import { createCa, pem } from './haPki.js';
import { VmRunStateObserver, type VmRunState } from './haVmState.js';

const execFileP = promisify(execFile);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export const ETCD_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
export const API_PORT = 6443;
export const LB_UPSTREAM = 'kube_apiservers';

export interface HaGuestOptions {
  dir: string;
  environment: string;
  /** host the VMs are registered on (inventory name) */
  host: string;
  /** last octet of 127.0.0.x: beachhead at base, controllers at base+1..3 (default 30) */
  addressBase?: number;
  /** VM files (disks) of every VM; default none (a diskless QEMU is a VM all the same) */
  files?: VMSpec['files'];
  /** workers to add (node-1..n) */
  workers?: number;
  /** NGINX's passive check and connect timeout, as the seed's team had them */
  nginx?: { maxFails?: number; failTimeoutSeconds?: number; connectTimeoutSeconds?: number; workerShutdownTimeoutSeconds?: number };
  /** the hypervisors' operator public key, authorized on the beachhead too */
  operatorPublicKey: string;
  log?: (line: string) => void;
}

export interface MemberStatus {
  vm: string;
  ok: boolean;
  memberId?: string;
  leader?: string;
  raftIndex?: number;
  error?: string;
}

export interface HaGuest {
  environment: EnvironmentSpec;
  /** the beachhead's sshd as the operator sees it */
  beachheadSsh: HostSpec;
  /** kubeconfig through the load balancer (what the student and the operator use) */
  kubeconfigYaml: string;
  kubeconfigPath: string;
  kc: KubeConfig;
  /** PEM etcd client material (what the environment's Secret holds: ca.crt, tls.crt, tls.key) */
  etcdClient: { ca: string; cert: string; key: string };
  /** CA of the API servers' serving certificates */
  apiServerCa: string;
  addressOf(vm: string): string;
  lbAddress: string;
  nginxConfigPath: string;
  /** the client sessions NGINX has logged so far (those still open are not in it yet) */
  nginxSessions(): Promise<NginxSession[]>;
  runState(vm: string): VmRunState;
  /** what the world did, in order: `<ms> <vm> <state>` */
  transitions: { at: number; vm: string; state: VmRunState }[];
  /** status of each member, asked directly from the test process (short timeout) */
  etcdStatus(): Promise<MemberStatus[]>;
  /** waits until every controller VM runs and its API server is ready, and the guest nodes are Ready */
  waitHealthy(timeoutMs?: number): Promise<void>;
  bridge: VmLivenessBridge;
  stop(): Promise<void>;
}

/** One client session through the beachhead's NGINX, from its access log. */
export interface NginxSession {
  /** ms since the epoch (the session's end minus its length) */
  start: number;
  end: number;
  /** 200: proxied; 502: no backend could be reached */
  status: number;
  /** the backends NGINX tried, in order (`address:port`); more than one means a connect failed */
  upstreams: string[];
}

/** The session was open at some time in `w`. */
export const sessionDuring = (x: NginxSession, w: { start: number; end: number }): boolean => x.start <= w.end && x.end >= w.start;

/** Its first connect failed (NGINX then tried the next backend: the seed's 10 s hang), or it reached no backend at all. */
export const sessionFailedOver = (x: NginxSession): boolean => x.status !== 200 || x.upstreams.length > 1;

/** Parses the `sessions` log format of the beachhead's NGINX (`$msec $session_time $status $upstream_addr`). */
export function parseNginxSessions(text: string): NginxSession[] {
  const out: NginxSession[] = [];
  for (const line of text.split('\n')) {
    const m = /^(\d+\.\d+) (\d+\.\d+) (\d{3}) (.*)$/.exec(line.trim());
    if (!m) continue;
    const end = Math.round(Number(m[1]) * 1000);
    out.push({ start: end - Math.round(Number(m[2]) * 1000), end, status: Number(m[3]), upstreams: m[4]!.split(', ').filter((u) => u !== '-') });
  }
  return out;
}

interface Svc {
  name: string;
  child: ChildProcess;
  exited: Promise<void>;
  /** killed on purpose: not restarted */
  stopped: boolean;
}

/** Signals the service's whole process group (NGINX master and workers). */
function signal(s: Svc, sig: NodeJS.Signals): void {
  try {
    if (s.child.pid) process.kill(-s.child.pid, sig);
  } catch {
    // already gone
  }
}

function postJson(url: string, body: unknown, tls: { ca: string; cert?: string; key?: string }, timeoutMs: number): Promise<{ status: number; body: string }> {
  return new Promise((res, rej) => {
    const payload = JSON.stringify(body);
    const req = request(url, { method: body === undefined ? 'GET' : 'POST', ca: tls.ca, cert: tls.cert, key: tls.key, agent: false, timeout: timeoutMs, headers: { 'content-type': 'application/json' } }, (r) => {
      let b = '';
      r.setEncoding('utf8');
      r.on('data', (d: string) => (b += d));
      r.on('end', () => res({ status: r.statusCode ?? 0, body: b }));
      r.on('error', rej);
    });
    req.on('timeout', () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)));
    req.on('error', rej);
    req.end(body === undefined ? undefined : payload);
  });
}

/** nftables: one table per world with a set of "powered-off" addresses whose packets are dropped. */
class AddressBlackhole {
  constructor(private readonly table: string) {}
  private nft(script: string): Promise<void> {
    return new Promise<void>((res, rej) => {
      const c = spawn('nft', ['-f', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let err = '';
      c.stderr.on('data', (d: Buffer) => (err += d.toString()));
      c.once('error', rej);
      c.once('exit', (code) => (code === 0 ? res() : rej(new Error(`nft: ${err}`))));
      c.stdin.end(script);
    });
  }
  async create(): Promise<void> {
    await this.destroy();
    await this.nft(`table ip ${this.table} {
  set down { type ipv4_addr; }
  chain input { type filter hook input priority -10; policy accept; ip daddr @down drop; ip saddr @down drop; }
}
`);
  }
  async down(address: string): Promise<void> {
    await execFileP('nft', ['add', 'element', 'ip', this.table, 'down', `{ ${address} }`]);
  }
  async up(address: string): Promise<void> {
    await execFileP('nft', ['delete', 'element', 'ip', this.table, 'down', `{ ${address} }`]);
  }
  async destroy(): Promise<void> {
    await execFileP('nft', ['delete', 'table', 'ip', this.table]).catch(() => undefined);
  }
}

function studentVms(o: HaGuestOptions, base: number): VMSpec[] {
  const files = o.files ?? [];
  const vm = (name: string, role: VMSpec['role'], address?: string): VMSpec => ({
    name, role, nodeName: `${o.environment}-${name}`, host: o.host, memoryMiB: 32, cpus: 1, files, ...(address ? { address } : {}),
  });
  return [
    vm('beachhead', 'beachhead', `127.0.0.${base}`),
    vm('controller-1', 'controller', `127.0.0.${base + 1}`),
    vm('controller-2', 'controller', `127.0.0.${base + 2}`),
    vm('controller-3', 'controller', `127.0.0.${base + 3}`),
    ...Array.from({ length: o.workers ?? 0 }, (_, i) => vm(`node-${i + 1}`, 'worker')),
  ];
}

export async function startHaGuest(o: HaGuestOptions): Promise<HaGuest> {
  const dir = resolve(o.dir);
  const base = o.addressBase ?? 30;
  await mkdir(dir, { recursive: true });
  // everything the world does goes to world.log too (failed runs are diagnosed from it)
  const say = (line: string) => {
    appendFileSync(join(dir, 'world.log'), `${new Date().toISOString()} ${line}\n`);
    o.log?.(line);
  };
  const binDir = await ensureBinaries();
  const cleanups: (() => Promise<void> | void)[] = [];
  let dropBlackhole: () => Promise<void> = async () => undefined;
  let stopObservers: () => Promise<void> = async () => undefined;
  const stop = async () => {
    await stopObservers().catch(() => undefined);
    await dropBlackhole().catch(() => undefined);
    for (const c of cleanups.reverse()) await Promise.resolve().then(c).catch(() => undefined);
    cleanups.length = 0;
  };
  try {
    const vms = studentVms(o, base);
    const controllers = vms.filter((v) => v.role === 'controller');
    const lbAddress = `127.0.0.${base}`;
    const addressOf = (vm: string) => {
      const a = vms.find((v) => v.name === vm)?.address;
      if (!a) throw new Error(`no address for ${vm}`);
      return a;
    };

    // ---- PKI --------------------------------------------------------------------------------------
    say('HA guest: certificates');
    const pki = join(dir, 'pki');
    const etcdCa = await createCa(join(pki, 'etcd'), 'etcd-ca');
    const kubeCa = await createCa(join(pki, 'kube'), 'kubernetes-ca');
    const etcdServer = new Map<string, { cert: string; key: string }>();
    const apiServing = new Map<string, { cert: string; key: string }>();
    for (const c of controllers) {
      etcdServer.set(c.name, await etcdCa.issue(`etcd-${c.name}`, { cn: c.nodeName, ips: [c.address!, '127.0.0.1'], usage: 'both' }));
      apiServing.set(c.name, await kubeCa.issue(`apiserver-${c.name}`, { cn: 'kube-apiserver', ips: [c.address!, lbAddress, '10.96.0.1'], dns: ['kubernetes', 'kubernetes.default', 'kubernetes.default.svc'], usage: 'server' }));
    }
    const etcdClientFiles = await etcdCa.issue('etcd-client', { cn: 'kube-apiserver-etcd-client', usage: 'client' });
    const etcdClient = { ca: await readFile(etcdCa.cert, 'utf8'), ...(await pem(etcdClientFiles)) };
    const apiServerCa = await readFile(kubeCa.cert, 'utf8');
    const sa = generateKeyPairSync('rsa', { modulusLength: 2048, publicKeyEncoding: { type: 'spki', format: 'pem' }, privateKeyEncoding: { type: 'pkcs1', format: 'pem' } });
    await writeFile(join(pki, 'sa.key'), sa.privateKey, { mode: 0o600 });
    await writeFile(join(pki, 'sa.pub'), sa.publicKey);
    const token = randomBytes(24).toString('hex');
    await writeFile(join(pki, 'tokens.csv'), `${token},admin,admin-uid,"system:masters"\n`, { mode: 0o600 });

    // ---- kubeconfig through the load balancer --------------------------------------------------------
    const server = `https://${lbAddress}:${API_PORT}`;
    const kubeconfigYaml = stringify({
      apiVersion: 'v1', kind: 'Config',
      clusters: [{ name: o.environment, cluster: { server, 'certificate-authority-data': Buffer.from(apiServerCa).toString('base64') } }],
      users: [{ name: 'admin', user: { token } }],
      contexts: [{ name: `admin@${o.environment}`, context: { cluster: o.environment, user: 'admin', namespace: 'default' } }],
      'current-context': `admin@${o.environment}`,
    });
    const kubeconfigPath = join(dir, 'guest.kubeconfig');
    await writeFile(kubeconfigPath, kubeconfigYaml, { mode: 0o600 });

    // ---- processes ----------------------------------------------------------------------------------
    const all = new Set<Svc>();
    /**
     * A service of a machine: restarted when it exits on its own while its machine runs (as systemd or the
     * kubelet restart a crashed etcd or static-pod API server), with the reason in world.log.
     */
    const spawnSvc = (name: string, bin: string, args: string[], logDir: string, user?: { uid: number; gid: number }): Svc => {
      const svc = { name, stopped: false } as Svc;
      const logPath = join(logDir, `${name}.log`);
      const launch = () => {
        const fd = openSync(logPath, 'a');
        // own process group: signals reach NGINX's workers too, as they would reach every process of a machine
        const child = spawn(bin, args, { stdio: ['ignore', fd, fd], cwd: logDir, detached: true, ...(user ?? {}) });
        closeSync(fd);
        svc.child = child;
        all.add(svc);
        // settles however the process ends, even one that never started ('error' without 'exit'): the
        // world's stop and a VM's power-off await it
        svc.exited = new Promise<void>((r) => {
          child.once('error', (err) => {
            if (child.pid === undefined) {
              all.delete(svc);
              r();
              say(`${name} did not start: ${err.message}`);
            }
          });
          child.once('exit', (code, sig) => {
            try {
              if (!svc.stopped) {
                const tail = readFileSync(logPath, 'utf8').split('\n').slice(-8).join('\n');
                say(`${logDir.split('/').slice(-2).join('/')}: ${name} exited (${code ?? sig}), restarting it; its log ends:\n${tail}`);
                setTimeout(() => {
                  if (!svc.stopped) launch();
                }, 1000);
              } else all.delete(svc);
            } finally {
              r();
            }
          });
        });
      };
      launch();
      return svc;
    };
    const killAll = () => {
      for (const s of all) {
        s.stopped = true;
        signal(s, 'SIGKILL');
      }
    };
    process.once('exit', killAll);
    cleanups.push(async () => {
      process.removeListener('exit', killAll);
      const waits = [...all].map((s) => s.exited);
      killAll();
      await Promise.all(waits);
    });


    const initialCluster = controllers.map((c) => `${c.nodeName}=http://${c.address}:${ETCD_PEER_PORT}`).join(',');
    const vmSvcs = new Map<string, Svc[]>();
    const vmState = (vm: string) => join(dir, 'vmstate', vm);

    const startServices = async (vm: VMSpec): Promise<Svc[]> => {
      const sdir = vmState(vm.name);
      await mkdir(sdir, { recursive: true });
      if (vm.role === 'controller') {
        const a = vm.address!;
        const s = etcdServer.get(vm.name)!;
        const etcd = spawnSvc('etcd', join(binDir, 'etcd'), [
          `--name=${vm.nodeName}`, `--data-dir=${join(sdir, 'etcd')}`,
          `--listen-client-urls=https://${a}:${ETCD_PORT}`, `--advertise-client-urls=https://${a}:${ETCD_PORT}`,
          `--listen-peer-urls=http://${a}:${ETCD_PEER_PORT}`, `--initial-advertise-peer-urls=http://${a}:${ETCD_PEER_PORT}`,
          `--initial-cluster=${initialCluster}`, '--initial-cluster-state=new', `--initial-cluster-token=${o.environment}`,
          `--cert-file=${s.cert}`, `--key-file=${s.key}`, `--trusted-ca-file=${etcdCa.cert}`, '--client-cert-auth',
          '--listen-metrics-urls=', '--unsafe-no-fsync', '--log-level=warn',
        ], sdir);
        const t = apiServing.get(vm.name)!;
        const api = spawnSvc('kube-apiserver', join(binDir, 'kube-apiserver'), [
          `--etcd-servers=https://${a}:${ETCD_PORT}`, `--etcd-cafile=${etcdCa.cert}`, `--etcd-certfile=${etcdClientFiles.cert}`, `--etcd-keyfile=${etcdClientFiles.key}`,
          `--bind-address=${a}`, `--advertise-address=${a}`, `--secure-port=${API_PORT}`,
          `--tls-cert-file=${t.cert}`, `--tls-private-key-file=${t.key}`,
          `--token-auth-file=${join(pki, 'tokens.csv')}`, '--authorization-mode=Node,RBAC',
          `--service-account-key-file=${join(pki, 'sa.pub')}`, `--service-account-signing-key-file=${join(pki, 'sa.key')}`,
          '--service-account-issuer=https://kubernetes.default.svc.cluster.local', '--service-cluster-ip-range=10.96.0.0/16',
          '--allow-privileged=true', '--endpoint-reconciler-type=none', '--profiling=false', `--cert-dir=${join(sdir, 'apiserver-certs')}`, '--v=1',
        ], sdir);
        return [etcd, api];
      }
      if (vm.role === 'beachhead') return [await startNginx()];
      return [];
    };

    // ---- beachhead: sshd + NGINX ------------------------------------------------------------------
    say('HA guest: beachhead sshd and NGINX');
    const beachheadHosts: TestHosts = await startHosts({ count: 1, baseDir: join(dir, 'beachhead'), firstAddress: base });
    cleanups.push(() => beachheadHosts.stop());
    const bh = beachheadHosts.hosts[0]!;
    const beachheadSsh: HostSpec = { ...bh, name: 'beachhead' };
    await appendFile(bh.authorizedKeysFile!, `${o.operatorPublicKey}\n`);
    const blackhole = new AddressBlackhole(`vmops_ha_${o.environment.replace(/[^a-z0-9]/g, '_')}`);
    await blackhole.create();
    // removed first on stop (see stop below) so nothing waits on a dropped address while shutting down
    dropBlackhole = () => blackhole.destroy();
    // Every VM (the beachhead's sshd is up now) address is "powered off" until its VM runs.
    for (const v of vms) if (v.address) await blackhole.down(v.address);
    const user = await ensureHostUser();
    const nginxPrefix = join(dir, 'beachhead', 'nginx');
    await mkdir(join(nginxPrefix, 'conf.d'), { recursive: true });
    const nginxMain = join(nginxPrefix, 'nginx.conf');
    const nginxUpstreams = join(nginxPrefix, 'conf.d', 'kube-apiserver.conf');
    const n = o.nginx ?? {};
    await writeFile(nginxMain, [
      '# the beachhead\'s load balancer (its own instance: prefix, pid and logs here)',
      'load_module /usr/lib/nginx/modules/ngx_stream_module.so;',
      'worker_processes 1;',
      `pid ${join(nginxPrefix, 'nginx.pid')};`,
      `error_log ${join(nginxPrefix, 'error.log')} warn;`,
      // after a reload, old workers close what they still hold: long-lived watches then move to the remaining backends
      `worker_shutdown_timeout ${n.workerShutdownTimeoutSeconds ?? 3}s;`,
      'events { worker_connections 1024; }',
      'stream {',
      `  include ${nginxUpstreams};`,
      // one line per client session, written when it ends: which backends NGINX tried (a failed
      // connect makes it try the next one) and how it ended (502: no backend reached)
      "  log_format sessions '$msec $session_time $status $upstream_addr';",
      `  access_log ${join(nginxPrefix, 'sessions.log')} sessions;`,
      '  server {',
      `    listen ${lbAddress}:${API_PORT};`,
      `    proxy_pass ${LB_UPSTREAM};`,
      `    proxy_connect_timeout ${n.connectTimeoutSeconds ?? 10}s;`,
      '    proxy_timeout 10m;',
      `    proxy_bind ${lbAddress};`,
      '  }',
      '}',
      '',
    ].join('\n'));
    await writeFile(nginxUpstreams, [
      `upstream ${LB_UPSTREAM} {`,
      ...controllers.map((c) => `    server ${c.address}:${API_PORT} max_fails=${n.maxFails ?? 1} fail_timeout=${n.failTimeoutSeconds ?? 10}s;`),
      '}',
      '',
    ].join('\n'));
    for (const p of [nginxPrefix, join(nginxPrefix, 'conf.d'), nginxMain, nginxUpstreams]) await chown(p, user.uid, user.gid);
    await chmod(nginxPrefix, 0o755);
    const startNginx = async (): Promise<Svc> => {
      const svc = spawnSvc('nginx', '/usr/sbin/nginx', ['-e', 'stderr', '-p', nginxPrefix, '-c', nginxMain, '-g', 'daemon off;'], join(dir, 'beachhead'), { uid: user.uid, gid: user.gid });
      return svc;
    };

    // ---- VMs' running state drives their services -----------------------------------------------------
    const transitions: HaGuest['transitions'] = [];
    const onChange = async (vmName: string, state: VmRunState, prev: VmRunState) => {
      const vm = vms.find((v) => v.name === vmName)!;
      transitions.push({ at: Date.now(), vm: vmName, state });
      say(`HA guest: ${vmName} ${prev} → ${state}`);
      const svcs = vmSvcs.get(vmName) ?? [];
      if (state === 'running') {
        if (prev === 'frozen' && svcs.length) for (const s of svcs) signal(s, 'SIGCONT');
        else vmSvcs.set(vmName, await startServices(vm));
        if (vm.address) await blackhole.up(vm.address);
        return;
      }
      if (vm.address) await blackhole.down(vm.address);
      if (state === 'frozen') for (const s of svcs) signal(s, 'SIGSTOP');
      else {
        for (const s of svcs) {
          s.stopped = true;
          signal(s, 'SIGKILL');
        }
        await Promise.all(svcs.map((s) => s.exited));
        vmSvcs.delete(vmName);
      }
    };
    const observer = new VmRunStateObserver(o.environment, vms.filter((v) => v.role !== 'worker').map((v) => v.name), {
      dirPrefix: '/',
      onChange,
      onError: (err) => say(`HA guest observer: ${(err as Error).message}`),
    });
    const workersObserver = new VmRunStateObserver(o.environment, vms.filter((v) => v.role === 'worker').map((v) => v.name), { dirPrefix: '/', onChange: async () => undefined, intervalMs: 300 });
    observer.start();
    workersObserver.start();
    // first on stop: nothing follows the VMs any more once the world is being taken apart
    stopObservers = async () => {
      await observer.stop();
      await workersObserver.stop();
    };

    // ---- guest components through the load balancer ---------------------------------------------------
    const compDir = join(dir, 'components');
    await mkdir(compDir, { recursive: true });
    spawnSvc('kube-controller-manager', join(binDir, 'kube-controller-manager'), [
      `--kubeconfig=${kubeconfigPath}`, '--leader-elect=false', '--secure-port=0', '--controllers=*', '--use-service-account-credentials=true',
      `--service-account-private-key-file=${join(pki, 'sa.key')}`, `--root-ca-file=${kubeCa.cert}`, '--node-monitor-grace-period=20s', '--node-monitor-period=1s', '--v=1',
    ], compDir);
    spawnSvc('kube-scheduler', join(binDir, 'kube-scheduler'), [`--kubeconfig=${kubeconfigPath}`, '--leader-elect=false', '--secure-port=0', '--v=1'], compDir);
    spawnSvc('kwok', join(binDir, 'kwok'), [
      `--kubeconfig=${kubeconfigPath}`, '--manage-all-nodes=false', `--manage-nodes-with-label-selector=${KWOK_MANAGE_LABEL}=${KWOK_MANAGE_VALUE}`,
      '--node-lease-duration-seconds=4', '--cidr=10.244.0.1/16', '--node-ip=127.0.0.1',
    ], compDir);

    const kc = new KubeConfig();
    kc.loadFromString(kubeconfigYaml);
    // through the LB, which the world powers off behind its blackhole: no request may wait forever (no watches use it)
    withRequestTimeout(kc, 10_000);
    const environment: EnvironmentSpec = {
      name: o.environment,
      kubeconfigSecret: { namespace: 'vm-migration-system', name: `${o.environment}-kubeconfig`, key: 'kubeconfig' },
      vms,
      controlPlane: { etcdPort: ETCD_PORT, apiServerPort: API_PORT, etcdClientSecret: { namespace: 'vm-migration-system', name: `${o.environment}-etcd-client` } },
      loadBalancer: {
        kind: 'nginx', address: beachheadSsh.address, port: beachheadSsh.port, user: beachheadSsh.user, hostKey: beachheadSsh.hostKey,
        configPath: nginxUpstreams, upstream: LB_UPSTREAM, nginxBinary: '/usr/sbin/nginx', mainConfig: nginxMain, prefix: nginxPrefix,
        sourceAddress: lbAddress, drainTimeoutSeconds: 30,
      },
    };
    const bridge = new VmLivenessBridge(kc, vms.map((v) => ({ nodeName: v.nodeName, qemuName: `${o.environment}.${v.name}` })), {
      live: async () => new Set([...observer.runningQemuNames(), ...workersObserver.runningQemuNames()]),
    });
    cleanups.push(() => bridge.stop());

    const memberStatus = async (c: (typeof controllers)[number], timeoutMs: number): Promise<MemberStatus> => {
      try {
        const r = await postJson(`https://${c.address}:${ETCD_PORT}/v3/maintenance/status`, {}, etcdClient, timeoutMs);
        const j = JSON.parse(r.body) as { header?: { member_id?: string }; leader?: string; raftIndex?: string };
        return { vm: c.name, ok: r.status === 200, memberId: j.header?.member_id, leader: j.leader, raftIndex: Number(j.raftIndex ?? 0) };
      } catch (err) {
        return { vm: c.name, ok: false, error: (err as Error).message };
      }
    };
    // A member whose VM runs but did not answer within 1 s is asked again with time to spare: on a loaded
    // machine a live member's reply can take longer, and the quorum checks would count it as a missing
    // vote. A stopped member's packets are dropped (blackhole), so it is not waited for twice.
    const etcdStatus = async (): Promise<MemberStatus[]> =>
      Promise.all(controllers.map(async (c): Promise<MemberStatus> => {
        const quick = await memberStatus(c, 1000);
        return quick.ok || observer.state(c.name) !== 'running' ? quick : memberStatus(c, 5000);
      }));

    const diagnose = async (): Promise<string> => {
      const tail = (f: string) => {
        try {
          return readFileSync(f, 'utf8').split('\n').slice(-15).join('\n');
        } catch {
          return '(none)';
        }
      };
      const nft = await execFileP('nft', ['list', 'ruleset']).then((r) => r.stdout, (e: Error) => e.message);
      const ss = await execFileP('ss', ['-Hltn']).then((r) => r.stdout.split('\n').filter((l) => l.includes('127.0.0.')).join('\n'), (e: Error) => e.message);
      return [`run states: ${vms.map((v) => `${v.name}=${observer.state(v.name)}`).join(' ')}`, `--- world.log\n${tail(join(dir, 'world.log'))}`,
        `--- nginx\n${tail(join(dir, 'beachhead', 'nginx.log'))}\n${tail(join(nginxPrefix, 'error.log'))}`, `--- nft\n${nft}`, `--- listening\n${ss}`].join('\n');
    };
    let nodesCreated = false;
    const waitHealthy = async (timeoutMs = 180_000) => {
      const deadline = Date.now() + timeoutMs;
      const check = async (): Promise<string | undefined> => {
        for (const c of controllers) if (observer.state(c.name) !== 'running') return `${c.name} not running`;
        for (const c of controllers) {
          const r = await postJson(`https://${c.address}:${API_PORT}/readyz`, undefined, { ca: apiServerCa }, 2000).catch((e: Error) => ({ status: 0, body: e.message }));
          if (r.status !== 200) return `API server of ${c.name}: ${r.status} ${r.body.slice(0, 200)}`;
        }
        const lb = await postJson(`${server}/readyz`, undefined, { ca: apiServerCa }, 2000).catch((e: Error) => ({ status: 0, body: e.message }));
        if (lb.status !== 200) return `load balancer: ${lb.status} ${lb.body.slice(0, 200)}`;
        return undefined;
      };
      for (;;) {
        const why = await check();
        if (!why) break;
        if (Date.now() > deadline) throw new Error(`HA guest not healthy after ${timeoutMs} ms: ${why}; logs under ${dir}\n${await diagnose()}`);
        await sleep(500);
      }
      if (!nodesCreated) {
        await createGuestNodes(kc, environment, { managed: false });
        bridge.start();
        nodesCreated = true;
      }
      for (;;) {
        const out = await execFileP('kubectl', ['--kubeconfig', kubeconfigPath, '--request-timeout=10s', 'get', 'nodes', '-o', 'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status} {end}'], { timeout: 20_000 }).then((r) => r.stdout, () => '');
        const notReady = vms.filter((v) => observer.state(v.name) === 'running' || workersObserver.state(v.name) === 'running').filter((v) => !out.includes(`${v.nodeName}=True`));
        if (!notReady.length) return;
        if (Date.now() > deadline) throw new Error(`guest nodes not Ready: ${notReady.map((v) => v.nodeName).join(', ')}`);
        await sleep(500);
      }
    };

    return {
      environment, beachheadSsh, kubeconfigYaml, kubeconfigPath, kc, etcdClient, apiServerCa, addressOf, lbAddress,
      nginxConfigPath: nginxUpstreams,
      nginxSessions: async () => parseNginxSessions(await readFile(join(nginxPrefix, 'sessions.log'), 'utf8').catch(() => '')),
      runState: (vm) => (vms.find((v) => v.name === vm)?.role === 'worker' ? workersObserver.state(vm) : observer.state(vm)),
      transitions, etcdStatus, waitHealthy, bridge, stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Whether something accepts TCP connections on address:port within timeoutMs (a dropped address: false). */
export function tcpAnswers(address: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((res) => {
    const s = net.connect({ host: address, port });
    const done = (v: boolean) => {
      s.destroy();
      res(v);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(timeoutMs, () => done(false));
  });
}
