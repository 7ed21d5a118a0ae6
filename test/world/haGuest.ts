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
import { liveness, noteWait } from './budget.js';

const execFileP = promisify(execFile);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export const ETCD_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
export const API_PORT = 6443;
export const LB_UPSTREAM = 'kube_apiservers';
/** The beachhead NGINX's passive check and timeouts, as the seed's team had them (HaGuestOptions.nginx overrides). */
export const NGINX_DEFAULTS = { maxFails: 1, failTimeoutSeconds: 10, connectTimeoutSeconds: 10, workerShutdownTimeoutSeconds: 3 } as const;
/**
 * etcd's raft timing in this world (its defaults, set explicitly): a follower that hears nothing from its
 * leader for an election timeout (randomized up to twice this) stops naming it and campaigns. A watch
 * after a leader's stop that covers twice this would see its followers lose their leader. Pre-vote (etcd's
 * default since 3.5, set explicitly): a member that was cut off for a while cannot unseat a leader that
 * a majority still follows when it comes back.
 */
export const ETCD_HEARTBEAT_MS = 100;
export const ETCD_ELECTION_TIMEOUT_MS = 1000;

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
  /** it answered with its status (seen: 'answered') */
  ok: boolean;
  memberId?: string;
  leader?: string;
  raftIndex?: number;
  raftTerm?: number;
  error?: string;
  /** the request went out / its answer (or the giving up) came, ms since the epoch (the test process's clock) */
  sentAt: number;
  at: number;
  /**
   * What the probe says about the member as a voter: 'answered' (its own view is in the other fields);
   * 'down' (its VM does not run, so it is not asked; or the request was refused or failed: it serves
   * nothing); 'unknown' (its VM runs but no answer came in time, even when asked again with time to
   * spare: a slow or stalled member, not a missing one — only a second signal may call it missing).
   */
  seen: 'answered' | 'down' | 'unknown';
}

/** Whether the members' answers show an etcd quorum with a leader. */
export type QuorumVerdict = 'held' | 'lost' | 'unknown';

/**
 * One round of status answers judged: 'held' when a majority of the members answered and named the same
 * leader; 'lost' when even counting every member that did not answer ('unknown') as a vote for the leader
 * most named, no majority is reached (members whose VM is down or that refused count as no vote); else
 * 'unknown'. A probe that did not answer never makes a round 'lost' by itself.
 */
export function quorumOf(st: MemberStatus[]): { verdict: QuorumVerdict; leader?: string; votes: number; unknown: number; majority: number } {
  const majority = Math.floor(st.length / 2) + 1;
  const votes = new Map<string, number>();
  for (const x of st) if (x.seen === 'answered' && x.leader && x.leader !== '0') votes.set(x.leader, (votes.get(x.leader) ?? 0) + 1);
  const [leader, best] = [...votes.entries()].sort((a, b) => b[1] - a[1])[0] ?? [undefined, 0];
  const unknown = st.filter((x) => x.seen === 'unknown').length;
  const verdict: QuorumVerdict = best >= majority ? 'held' : best + unknown < majority ? 'lost' : 'unknown';
  return { verdict, ...(verdict === 'held' ? { leader } : {}), votes: best, unknown, majority };
}

/** A quorum sample: a round of answers; one that is not 'held' is confirmed by a second round (`confirm`). */
export interface QuorumSample {
  /** when the round was sent */
  at: number;
  st: MemberStatus[];
  /** 'lost' only when the second round, every member asked with time to spare, showed no quorum either */
  verdict: QuorumVerdict;
  leader?: string;
  confirm?: MemberStatus[];
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
  /** what the world did, in order, each published once carried out (see RunTransition) */
  transitions: RunTransition[];
  /** periods in which `vm` did not run, from the transitions since `from` (see downWindows) */
  downWindows(vm: string, from: number, kind: 'vm' | 'dark'): { start: number; end: number }[];
  /**
   * Status of each member, asked directly from the test process: a member whose VM does not run is not
   * asked ('down'); one that does not answer within 1 s is asked again with 5 s (liveness budgets), or
   * with `patientMs` at once.
   */
  etcdStatus(opts?: { patientMs?: number }): Promise<MemberStatus[]>;
  /** one quorum sample (quorumOf), a round that is not 'held' confirmed by a second, patient round */
  etcdQuorum(): Promise<QuorumSample>;
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

/**
 * A VM's run state change as the world carried it out. `at`: when the world saw it (its observer's pass;
 * before it acted on it). `appliedAt`: when it had acted — for 'frozen'/'off' the VM's address drops every
 * packet and its services are frozen or gone; for 'running' its services run (or restart) and the drop is
 * removed. A transition is published (here and as runState) only once applied.
 */
export interface RunTransition {
  at: number;
  appliedAt: number;
  vm: string;
  state: VmRunState;
  /** acting on it failed (the world's log has the rest) */
  error?: string;
}

/**
 * Periods in which `vm` did not run, from `transitions` since `from` (a period still open ends now):
 * - 'vm': from the world seeing it stop running to seeing it run again — when it was down as a machine
 *   (its services are stopped within the period and started after it). What must be true of every
 *   moment a VM was down (nothing sent to it, out of the load balancer) is checked against this.
 * - 'dark': from its drop being in place (appliedAt) to the world seeing it run again (the drop goes only
 *   after that): every packet to its address was dropped throughout. A session sent to it then hung.
 */
export function downWindows(transitions: RunTransition[], vm: string, from: number, kind: 'vm' | 'dark'): { start: number; end: number }[] {
  const out: { start: number; end: number }[] = [];
  let start: number | undefined;
  for (const t of transitions.filter((x) => x.vm === vm && x.at >= from)) {
    if (t.state !== 'running' && start === undefined) start = kind === 'vm' ? t.at : t.appliedAt;
    if (t.state === 'running' && start !== undefined) {
      if (t.at > start) out.push({ start, end: t.at });
      start = undefined;
    }
  }
  if (start !== undefined) out.push({ start, end: Date.now() });
  return out;
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

/** A request that got no answer in time (as opposed to one that was refused or failed). */
class RequestTimeout extends Error {}

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
    req.on('timeout', () => req.destroy(new RequestTimeout(`no answer within ${timeoutMs} ms`)));
    req.on('error', rej);
    req.end(body === undefined ? undefined : payload);
  });
}

/**
 * nftables: one table per world with a set of "powered-off" addresses whose packets are dropped. The set is
 * kept here too: a table deleted under the world (scripts/reap.sh of another run on the same machine
 * deletes every vmops_* table) is put back whole — checked every second and on every change — and the
 * world's log says so.
 */
class AddressBlackhole {
  private readonly dark = new Set<string>();
  private queue: Promise<unknown> = Promise.resolve();
  private watchdog: NodeJS.Timeout | undefined;
  private closed = false;
  constructor(private readonly table: string, private readonly say: (line: string) => void) {}
  /** one nft operation at a time (the watchdog's repair must not interleave with a change) */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }
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
  private tableExists(): Promise<boolean> {
    return execFileP('nft', ['list', 'table', 'ip', this.table]).then(() => true, () => false);
  }
  private async write(): Promise<void> {
    await execFileP('nft', ['delete', 'table', 'ip', this.table]).catch(() => undefined);
    await this.nft(`table ip ${this.table} {
  set down { type ipv4_addr; ${this.dark.size ? `elements = { ${[...this.dark].join(', ')} }; ` : ''}}
  chain input { type filter hook input priority -10; policy accept; ip daddr @down drop; ip saddr @down drop; }
}
`);
  }
  private async repair(): Promise<void> {
    if (this.closed || (await this.tableExists())) return;
    this.say(`HA guest: nftables table ${this.table} was deleted under the world (another run's reaper?); putting it back with ${[...this.dark].join(', ') || 'no address'} dark`);
    await this.write();
  }
  async create(): Promise<void> {
    await this.serial(() => this.write());
    this.watchdog = setInterval(() => void this.serial(() => this.repair()).catch(() => undefined), 1000);
    this.watchdog.unref();
  }
  private change(op: 'add' | 'delete', address: string): Promise<void> {
    return this.serial(async () => {
      if (op === 'add') this.dark.add(address);
      else this.dark.delete(address);
      try {
        await execFileP('nft', [op, 'element', 'ip', this.table, 'down', `{ ${address} }`]);
      } catch (err) {
        if (this.closed || (await this.tableExists())) throw err;
        await this.repair();
      }
    });
  }
  async down(address: string): Promise<void> {
    await this.change('add', address);
  }
  async up(address: string): Promise<void> {
    await this.change('delete', address);
  }
  async destroy(): Promise<void> {
    this.closed = true;
    if (this.watchdog) clearInterval(this.watchdog);
    await this.serial(() => execFileP('nft', ['delete', 'table', 'ip', this.table]).then(() => undefined, () => undefined));
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
          `--heartbeat-interval=${ETCD_HEARTBEAT_MS}`, `--election-timeout=${ETCD_ELECTION_TIMEOUT_MS}`, '--pre-vote=true',
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
    const blackhole = new AddressBlackhole(`vmops_ha_${o.environment.replace(/[^a-z0-9]/g, '_')}`, say);
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
    const n = { ...NGINX_DEFAULTS, ...o.nginx };
    await writeFile(nginxMain, [
      '# the beachhead\'s load balancer (its own instance: prefix, pid and logs here)',
      'load_module /usr/lib/nginx/modules/ngx_stream_module.so;',
      'worker_processes 1;',
      `pid ${join(nginxPrefix, 'nginx.pid')};`,
      `error_log ${join(nginxPrefix, 'error.log')} warn;`,
      // after a reload, old workers close what they still hold: long-lived watches then move to the remaining backends
      `worker_shutdown_timeout ${n.workerShutdownTimeoutSeconds}s;`,
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
      `    proxy_connect_timeout ${n.connectTimeoutSeconds}s;`,
      '    proxy_timeout 10m;',
      `    proxy_bind ${lbAddress};`,
      '  }',
      '}',
      '',
    ].join('\n'));
    await writeFile(nginxUpstreams, [
      `upstream ${LB_UPSTREAM} {`,
      ...controllers.map((c) => `    server ${c.address}:${API_PORT} max_fails=${n.maxFails} fail_timeout=${n.failTimeoutSeconds}s;`),
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
    const transitions: RunTransition[] = [];
    const onChange = async (vmName: string, state: VmRunState, prev: VmRunState) => {
      const vm = vms.find((v) => v.name === vmName)!;
      const at = Date.now();
      say(`HA guest: ${vmName} ${prev} → ${state}`);
      const errors: string[] = [];
      // each effect is attempted whatever became of the one before: a drop that failed must not leave the
      // services of a stopped VM running (a restart would then find their ports taken)
      const attempt = async (what: string, fn: () => Promise<void> | void) => {
        try {
          await fn();
        } catch (err) {
          errors.push(`${what}: ${(err as Error).message}`);
        }
      };
      const svcs = vmSvcs.get(vmName) ?? [];
      if (state === 'running') {
        if (prev === 'frozen' && svcs.length) for (const s of svcs) signal(s, 'SIGCONT');
        else await attempt('starting its services', async () => void vmSvcs.set(vmName, await startServices(vm)));
        if (vm.address) await attempt('removing its drop', () => blackhole.up(vm.address!));
      } else {
        if (vm.address) await attempt('dropping its address', () => blackhole.down(vm.address!));
        if (state === 'frozen') for (const s of svcs) signal(s, 'SIGSTOP');
        else {
          for (const s of svcs) {
            s.stopped = true;
            signal(s, 'SIGKILL');
          }
          await Promise.all(svcs.map((s) => s.exited));
          vmSvcs.delete(vmName);
        }
      }
      // published once carried out: a test that reads "down since t" must not see traffic the drop did not
      // stop yet (the observer publishes the run state after this returns, too)
      const error = errors.join('; ');
      transitions.push({ at, appliedAt: Date.now(), vm: vmName, state, ...(error ? { error } : {}) });
      say(`HA guest: ${vmName} ${state} applied${error ? ` with errors: ${error}` : ''}`);
      if (error) throw new Error(`${vmName} ${state}: ${error}`);
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
      const sentAt = Date.now();
      try {
        const r = await postJson(`https://${c.address}:${ETCD_PORT}/v3/maintenance/status`, {}, etcdClient, timeoutMs);
        const j = JSON.parse(r.body) as { header?: { member_id?: string }; leader?: string; raftIndex?: string; raftTerm?: string };
        const ok = r.status === 200;
        return {
          vm: c.name, ok, memberId: j.header?.member_id, leader: j.leader, raftIndex: Number(j.raftIndex ?? 0), raftTerm: Number(j.raftTerm ?? 0),
          sentAt, at: Date.now(), seen: ok ? 'answered' : 'down', ...(ok ? {} : { error: `HTTP ${r.status}` }),
        };
      } catch (err) {
        const timedOut = err instanceof RequestTimeout;
        // no answer from a running VM's member: not known to be missing (a refusal or a failed request is an answer)
        return { vm: c.name, ok: false, error: (err as Error).message, sentAt, at: Date.now(), seen: timedOut && observer.state(c.name) === 'running' ? 'unknown' : 'down' };
      }
    };
    const notAsked = (c: (typeof controllers)[number]): MemberStatus => {
      const now = Date.now();
      return { vm: c.name, ok: false, error: `VM ${observer.state(c.name)}, not asked`, sentAt: now, at: now, seen: 'down' };
    };
    // A member whose VM runs but did not answer within 1 s is asked again with time to spare: on a loaded
    // machine a live member's reply can take longer, and the quorum checks would count it as a missing
    // vote. A member whose VM does not run cannot vote (its packets are dropped): it is not asked.
    const etcdStatus = async (opts: { patientMs?: number } = {}): Promise<MemberStatus[]> =>
      Promise.all(controllers.map(async (c): Promise<MemberStatus> => {
        if (observer.state(c.name) !== 'running') return notAsked(c);
        if (opts.patientMs) return memberStatus(c, opts.patientMs);
        const quick = await memberStatus(c, liveness(1000));
        return quick.seen !== 'unknown' ? quick : memberStatus(c, liveness(5000));
      }));
    const etcdQuorum = async (): Promise<QuorumSample> => {
      const at = Date.now();
      const st = await etcdStatus();
      const first = quorumOf(st);
      if (first.verdict === 'held') return { at, st, verdict: 'held', leader: first.leader! };
      // "lost" needs a second signal: every running member asked again, each with time to spare
      const confirm = await etcdStatus({ patientMs: liveness(5000) });
      const second = quorumOf(confirm);
      return { at, st, confirm, verdict: first.verdict === 'lost' && second.verdict === 'lost' ? 'lost' : 'unknown' };
    };

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
      const budget = liveness(timeoutMs);
      const t0 = performance.now();
      const deadline = Date.now() + budget;
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
        if (Date.now() > deadline) throw new Error(`HA guest not healthy after ${budget} ms: ${why}; logs under ${dir}\n${await diagnose()}`);
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
        if (!notReady.length) {
          noteWait('HA guest healthy', budget, performance.now() - t0);
          return;
        }
        if (Date.now() > deadline) throw new Error(`guest nodes not Ready after ${budget} ms: ${notReady.map((v) => v.nodeName).join(', ')}`);
        await sleep(500);
      }
    };

    return {
      environment, beachheadSsh, kubeconfigYaml, kubeconfigPath, kc, etcdClient, apiServerCa, addressOf, lbAddress,
      nginxConfigPath: nginxUpstreams,
      nginxSessions: async () => parseNginxSessions(await readFile(join(nginxPrefix, 'sessions.log'), 'utf8').catch(() => '')),
      runState: (vm) => (vms.find((v) => v.name === vm)?.role === 'worker' ? workersObserver.state(vm) : observer.state(vm)),
      transitions, downWindows: (vm, from, kind) => downWindows(transitions, vm, from, kind), etcdStatus, etcdQuorum, waitHealthy, bridge, stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * What a TCP connect to address:port gets within timeoutMs: 'connected', 'refused' (a reset: nothing
 * listens, the machine answered), another error code, or 'no answer' (neither: a dropped address, or a
 * powered-off machine). The verdict is taken only after the event loop has handled whatever arrived
 * meanwhile: a test process busy past the deadline does not turn a late-handled answer into 'no answer'.
 */
export function tcpProbe(address: string, port: number, timeoutMs: number): Promise<'connected' | 'refused' | 'no answer' | string> {
  return new Promise((res) => {
    const s = net.connect({ host: address, port });
    let settled = false;
    const done = (v: string) => {
      if (settled) return;
      settled = true;
      s.destroy();
      res(v);
    };
    s.once('connect', () => done('connected'));
    s.once('error', (err: NodeJS.ErrnoException) => done(err.code === 'ECONNREFUSED' ? 'refused' : (err.code ?? err.message)));
    // timers run before I/O in a loop turn: look again after the I/O phase before calling it no answer
    s.setTimeout(timeoutMs, () => setImmediate(() => done('no answer')));
  });
}

/** Whether something accepts TCP connections on address:port within timeoutMs (a dropped address: false). */
export async function tcpAnswers(address: string, port: number, timeoutMs: number): Promise<boolean> {
  return (await tcpProbe(address, port, timeoutMs)) === 'connected';
}
