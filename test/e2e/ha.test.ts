/**
 * A whole rolling move of an HA student environment (beachhead, 3 workers, 3 controllers) with the student's
 * kubectl loop running through the beachhead's NGINX (issue 7). Real parts: etcd ×3 with client TLS, kube-apiserver
 * ×3, NGINX, sshd, QEMU, KWOK, the operator as a process, kubectl.
 *
 * 1. Load-balancer aware (forward, host01 → host02): 0 failed requests, and NGINX's own log shows no session sent
 *    to a stopped controller and no connect that failed over, while workers and controllers move (the student's
 *    latency is reported; BENCH_PARTS=ha measures it); etcd keeps quorum at every sample; never two controllers down together; each controller's
 *    time out of the load balancer measured from the NGINX configuration itself.
 * 2. Negative control + degraded quorum (back, host02 → host01, operator restarted without the load balancer in
 *    its inventory): controller-2's VM is stopped first; the first controller step waits with WaitingForQuorum
 *    naming it and nothing is stopped; once it runs again the move completes — and NGINX sends sessions to the
 *    stopped controllers during their moves (failed connects), which is what the test must be able to see.
 * The beachhead's own move interrupts the load balancer itself; it is measured and reported separately.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CoreV1Api, CustomObjectsApi } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { until } from '../world/until.js';
import { getVmm as getVmmOf } from '../world/vmm.js';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { Store } from '../../src/store/store.js';
import { sessionDuring, sessionFailedOver, type MemberStatus, type NginxSession } from '../world/haGuest.js';
import { startHaSandbox, type HaSandbox } from '../world/haSandbox.js';
import { KubectlStudent, summarize, type StudentSample } from '../world/haStudent.js';
import { REPO_ROOT, SECRET_NAMESPACE, type OperatorProcess } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';
import { cliArgs } from '../world/cli.js';

let sb: HaSandbox;
let operator: OperatorProcess | undefined;
const t0 = Date.now();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

beforeAll(async () => {
  sb = await startHaSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e-ha'), firstAddress: LOOPBACK.haHosts.first, addressBase: LOOPBACK.haGuest.first, log: (l) => console.log(`[ha] ${l}`) });
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
  console.log(`[ha] wall time of the HA e2e: ${((Date.now() - t0) / 1000).toFixed(0)} s`);
});

const getVmm = (name: string) => getVmmOf(sb, name);

async function apply(name: string, targetHost: string, opts: { precopy?: boolean; cancel?: string[]; bandwidthLimitMiBps?: number } = {}): Promise<void> {
  const body = {
    apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE },
    spec: {
      environments: [sb.environment.name], targetHost, strategy: 'Rolling', transfer: { precopy: opts.precopy ?? false, ...(opts.bandwidthLimitMiBps ? { bandwidthLimitMiBps: opts.bandwidthLimitMiBps } : {}) },
      shutdown: { powerdownTimeout: '1s' }, drain: { timeout: '2m' }, nodeReadyTimeout: '3m', ...(opts.cancel ? { cancel: opts.cancel } : {}),
    },
  };
  await sb.kc.makeApiClient(CustomObjectsApi).createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body });
}

async function succeeded(name: string): Promise<VMMigration> {
  return until(`${name} Succeeded`, 900_000, async () => {
    const o = await getVmm(name);
    if (o?.status?.phase === 'Failed') throw new Error(`${name} failed: ${JSON.stringify(o.status.conditions)} ${JSON.stringify(o.status.vms?.map((v) => [v.name, v.phase, v.message]))}`);
    return o?.status?.phase === 'Succeeded' ? o : undefined;
  });
}

/** Watchers: etcd status of every member and which controllers are down, sampled; NGINX's `down` flags. */
class Watchers {
  readonly etcd: { at: number; st: MemberStatus[] }[] = [];
  readonly lb: { at: number; down: string[] }[] = [];
  private running = true;
  private loops: Promise<void>[] = [];
  start(): this {
    this.loops.push((async () => {
      while (this.running) {
        this.etcd.push({ at: Date.now(), st: await sb.ha.etcdStatus() });
        await sleep(250);
      }
    })());
    this.loops.push((async () => {
      while (this.running) {
        const conf = await readFile(sb.ha.nginxConfigPath, 'utf8').catch(() => '');
        const down = [...conf.matchAll(/server (\S+):\d+[^;]* down;/g)].map((m) => sb.environment.vms.find((v) => v.address === m[1])?.name ?? m[1]!);
        this.lb.push({ at: Date.now(), down });
        await sleep(100);
      }
    })());
    return this;
  }
  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
  }
  /** samples in which no 2 members (a quorum of 3) answered and named the same leader */
  quorumLost(): { at: number; st: MemberStatus[] }[] {
    return this.etcd.filter((s) => {
      const votes = new Map<string, number>();
      for (const x of s.st) if (x.ok && x.leader && x.leader !== '0') votes.set(x.leader, (votes.get(x.leader) ?? 0) + 1);
      return Math.max(0, ...votes.values()) < 2;
    });
  }
  /** per controller: total seconds marked down in NGINX */
  outOfLb(): Record<string, number> {
    const out: Record<string, number> = {};
    for (let i = 1; i < this.lb.length; i++) {
      const dt = (this.lb[i]!.at - this.lb[i - 1]!.at) / 1000;
      for (const vm of this.lb[i - 1]!.down) out[vm] = (out[vm] ?? 0) + dt;
    }
    return out;
  }
}

/** Down windows per VM from the world's own transitions (running → frozen/off … → running). */
function downWindows(vm: string, from: number): { start: number; end: number }[] {
  const ts = sb.ha.transitions.filter((t) => t.vm === vm && t.at >= from);
  const out: { start: number; end: number }[] = [];
  let start: number | undefined;
  for (const t of ts) {
    if (t.state !== 'running' && start === undefined) start = t.at;
    if (t.state === 'running' && start !== undefined) {
      out.push({ start, end: t.at });
      start = undefined;
    }
  }
  if (start !== undefined) out.push({ start, end: Date.now() });
  return out;
}

const overlaps = (s: StudentSample, w: { start: number; end: number }) => s.at <= w.end && s.at + s.ms >= w.start;

/**
 * NGINX's own account of the move (its access log, test/world/haGuest.ts): sessions it tried to open to a
 * controller while that controller's VM was down, and sessions whose first connect failed (NGINX then
 * tries the next backend: the seed's 10 s hang) or that reached no backend at all. Unlike a client's
 * wall time this does not depend on how busy the machine is.
 */
async function nginxDuringMove(from: number, exclude: { start: number; end: number }[] = []): Promise<{ sessions: NginxSession[]; toStopped: NginxSession[]; failedOver: NginxSession[] }> {
  const sessions = (await sb.ha.nginxSessions()).filter((x) => x.end >= from && !exclude.some((w) => sessionDuring(x, w)));
  const toStopped = sessions.filter((x) =>
    CONTROLLERS.some((c) => x.upstreams.includes(`${sb.ha.addressOf(c)}:6443`) && downWindows(c, from).some((w) => sessionDuring(x, w))),
  );
  return { sessions, toStopped, failedOver: sessions.filter(sessionFailedOver) };
}
const brief = (xs: NginxSession[]) => xs.slice(0, 5).map((x) => `${new Date(x.start).toISOString()} +${x.end - x.start} ms ${x.status} via ${x.upstreams.join(' → ')}`);
const CONTROLLERS = ['controller-1', 'controller-2', 'controller-3'];

function maxControllersDown(from: number): number {
  let worst = 0;
  for (const t of sb.ha.transitions.filter((x) => x.at >= from)) {
    const down = CONTROLLERS.filter((c) => downWindows(c, from).some((w) => w.start <= t.at && w.end > t.at)).length;
    worst = Math.max(worst, down);
  }
  return worst;
}

describe('HA environment: rolling move with the student\'s kubectl through the beachhead', () => {
  it('load-balancer aware: 0 failed requests, NGINX sends no session to a stopped controller; etcd quorum kept; one controller down at a time', async () => {
    operator = await sb.startOperator({ loadBalancer: true, logFile: join(sb.dir, 'operator-lb.log') });
    const student = new KubectlStudent(sb.ha.kubeconfigPath, { cacheDir: join(sb.dir, 'kubectl-cache') });
    const watchers = new Watchers().start();
    await student.start();
    await sleep(2000);
    const from = Date.now();
    await apply('ha-forward', 'host02');
    const done = await succeeded('ha-forward');
    await sleep(2000);
    const samples = await student.stop();
    await watchers.stop();

    expect(done.status?.progress).toBe('7/7');
    const bh = downWindows('beachhead', from).map((w) => ({ start: w.start, end: w.end + 2000 }));
    expect(bh.length).toBe(1);
    const duringBeachhead = samples.filter((s) => bh.some((w) => overlaps(s, w)));
    const rest = samples.filter((s) => !bh.some((w) => overlaps(s, w)));
    const r = summarize(rest);
    const b = summarize(duringBeachhead);
    const lbOut = watchers.outOfLb();
    console.log(`[ha] LB aware, workers+controllers: sent ${r.sent}, failed ${r.failed}, p99 ${r.p99Ms} ms, worst ${r.worstMs} ms`);
    console.log(`[ha] beachhead (cold) down ${((bh[0]!.end - 2000 - bh[0]!.start) / 1000).toFixed(1)} s: sent ${b.sent}, failed ${b.failed}, worst ${b.worstMs} ms`);
    console.log(`[ha] out of the LB: ${Object.entries(lbOut).map(([k, v]) => `${k} ${v.toFixed(1)} s`).join(', ')}`);
    // to set beside the journal (`history ha-forward --db .sandbox/e2e-ha/operator.db`) when the bound is missed
    console.log(`[ha] slowest calls: ${[...rest].sort((x, y) => y.ms - x.ms).slice(0, 5).map((x) => `${x.op} at ${new Date(x.at).toISOString()} ${x.ms} ms`).join(', ')}`);
    const lb = await nginxDuringMove(from, bh);
    console.log(`[ha] NGINX sessions while workers and controllers moved: ${lb.sessions.length}, sent to a stopped controller ${lb.toStopped.length}, failed over or failed ${lb.failedOver.length}`);
    expect(r.errors).toEqual([]);
    // What LB awareness promises, from NGINX's own log: no session was sent to a stopped controller and no
    // connect failed over. The student's worst call is reported above, not asserted: it is a wall time on a
    // shared 2-core machine (fresh-clone runs: ~1 s when quiet, 2.4–3.1 s beside other test lanes, with
    // NGINX sending nothing to a stopped controller); the failure the LB step removes costs the 10 s
    // connect timeout, and BENCH_PARTS=ha measures the latency against a baseline.
    expect(brief(lb.toStopped), 'sessions NGINX sent to a stopped controller').toEqual([]);
    expect(brief(lb.failedOver), 'sessions whose connect failed over or failed').toEqual([]);
    expect(lb.sessions.length).toBeGreaterThan(50);
    expect(r.sent).toBeGreaterThan(50);
    expect(watchers.quorumLost().map((s) => JSON.stringify(s))).toEqual([]);
    expect(maxControllersDown(from)).toBe(1);
    // every controller went out of NGINX (and came back: nothing is down at the end)
    expect(Object.keys(lbOut).sort()).toEqual(CONTROLLERS);
    expect(watchers.lb.at(-1)?.down).toEqual([]);
    // etcd leadership was moved away first: in the last sample before each controller went down, every
    // member that answered named a leader other than that controller's member
    for (const c of CONTROLLERS) {
      for (const w of downWindows(c, from)) {
        const before = watchers.etcd.filter((x) => x.at < w.start).at(-1)!;
        // a member id never changes: taken from any sample in which the member answered (in the last one
        // before the stop it may not have — a status query timing out on a loaded machine failed a CI run)
        const mine = watchers.etcd.map((x) => x.st.find((m) => m.vm === c)?.memberId).find((id) => id !== undefined);
        expect(mine, `${c}'s etcd member id`).toBeDefined();
        const leaders = new Set(before.st.filter((x) => x.ok).map((x) => x.leader));
        expect([...leaders], `${c} led etcd when its VM went down`).not.toContain(mine);
      }
    }
    // and each controller's VM stopped only while it was out of the load balancer
    for (const c of CONTROLLERS) {
      for (const w of downWindows(c, from)) {
        const inLb = watchers.lb.filter((s) => s.at >= w.start && s.at <= w.end && !s.down.includes(c));
        expect(inLb.length, `${c} in the LB while down`).toBe(0);
      }
    }
    await operator.stop();
    operator = undefined;
  }, 1_200_000);

  it('negative control and degraded quorum: without LB awareness NGINX sends sessions to stopped controllers; a stopped member holds the first controller step', async () => {
    // A first test that failed an assertion left its LB-aware operator running: as the elected leader it
    // would run this migration with LB awareness, and the control would see no stall (a fresh-clone run).
    await operator?.stop();
    operator = await sb.startOperator({ loadBalancer: false, logFile: join(sb.dir, 'operator-nolb.log') });
    const env = sb.environment.name;
    const h02 = await sb.hypervisor('host02');
    const c2 = sb.environment.vms.find((v) => v.name === 'controller-2')!;
    const student = new KubectlStudent(sb.ha.kubeconfigPath, { cacheDir: join(sb.dir, 'kubectl-cache-2') });
    const from = Date.now();
    await h02.stopVm(env, c2, { powerdownTimeoutMs: 0 });
    await until('controller-2 off', 10_000, async () => (sb.ha.runState('controller-2') === 'off' ? true : undefined));
    await student.start();
    // only the controllers move here (the beachhead and workers are cancelled: the first test moved them,
    // BENCH_PARTS=ha measures the beachhead per strategy); they are what the negative control is about.
    // Cold, as the seed's runbook moved them: a pre-copy cut-over is short enough (worst 1.96 s in one
    // fresh-clone run once the operator started target VMs as the inventory says) that a student's few
    // requests in it may see no stall at all, which would prove nothing either way. Since TCP_NODELAY
    // a cold cut-over of these small disks is that short too (one fresh-clone run: no request slow or
    // failed), so the copy is capped at 1 MiB/s: each controller stays down a few seconds, as a real
    // disk's copy would keep it.
    await apply('ha-back', 'host01', { bandwidthLimitMiBps: 1, cancel: sb.environment.vms.filter((v) => v.role !== 'controller').map((v) => `${env}/${v.name}`) });

    const waiting = await until('WaitingForQuorum', 600_000, async () => {
      const o = await getVmm('ha-back');
      if (o?.status?.phase === 'Failed') throw new Error(`failed instead of waiting: ${JSON.stringify(o.status.conditions)}`);
      const c = o?.status?.conditions?.find((x) => x.type === 'Progressing');
      return c?.status === 'False' && c.reason === 'WaitingForQuorum' ? o : undefined;
    });
    const cond = waiting.status?.conditions?.find((c) => c.type === 'Progressing');
    expect(cond?.message).toMatch(/controller-2/);
    expect(cond?.message).not.toMatch(/PRIVATE KEY|BEGIN CERT/);
    // re-checked with backoff (2 s at first), not failed: more quorum checks are journaled while it waits.
    // The bound is far above the backoff and below the informer's 120 s relist, which once was the only
    // thing that woke a wait up (a status write's event cancelled the delayed re-queue).
    const quorumFails = async () => {
      const store = await Store.open(sb.dbPath);
      try {
        return (await store.journalEntries(waiting.metadata.uid, env, 'controller-1')).filter((e) => e.step === 'quorum' && e.event === 'fail').length;
      } finally {
        await store.close();
      }
    };
    await until('controller-1 quorum re-checked twice more', 60_000, async () => ((await quorumFails()) >= 3 ? true : undefined));
    // nothing stopped: controllers 1 and 3 still run, and their LB entries were never touched
    expect(sb.ha.runState('controller-1')).toBe('running');
    expect(sb.ha.runState('controller-3')).toBe('running');
    expect((await getVmm('ha-back'))?.status?.phase).toBe('Running');

    await h02.startVm(env, c2);
    // NGINX's passive check forgets controller-2's failures after fail_timeout; measure the operator's moves from there
    await sleep(11_000);
    const measureFrom = Date.now();
    const done = await succeeded('ha-back');
    expect(done.status?.waitingSince).toBeUndefined();
    await sleep(2000);
    const samples = await student.stop();
    const windows = CONTROLLERS.flatMap((c) => downWindows(c, measureFrom));
    expect(windows.length).toBeGreaterThanOrEqual(2);
    const during = samples.filter((s) => windows.some((w) => overlaps(s, w)));
    const s = summarize(during);
    const all = summarize(samples);
    // the cancelled beachhead never went down
    expect(downWindows('beachhead', from)).toEqual([]);
    expect(done.status?.vms?.find((v) => v.name === 'beachhead')).toMatchObject({ phase: 'Cancelled' });
    const lb = await nginxDuringMove(measureFrom);
    console.log(`[ha] LB awareness off, controller moves: sent ${s.sent}, failed ${s.failed}, slow(>2s) ${s.slow}, p99 ${s.p99Ms} ms, worst ${s.worstMs} ms; whole move: sent ${all.sent}, failed ${all.failed}, p99 ${all.p99Ms} ms, worst ${all.worstMs} ms`);
    console.log(`[ha] LB awareness off, NGINX: ${lb.sessions.length} sessions, sent to a stopped controller ${lb.toStopped.length}, failed over or failed ${lb.failedOver.length}: ${brief(lb.toStopped).join('; ')}`);
    // the disruption the LB step removes is real here: NGINX sent sessions to the stopped controllers (it
    // learns only from a failed connect). Whether the student's own few calls hit one is chance, so
    // their stalls are reported, not required.
    expect(lb.toStopped.length).toBeGreaterThan(0);
    expect(lb.failedOver.length).toBeGreaterThan(0);
    expect(maxControllersDown(from)).toBe(1);
    // the wait was announced as an Event, and the gauge of running migrations is back to 0
    const events = await sb.kc.makeApiClient(CoreV1Api).listNamespacedEvent({ namespace: SECRET_NAMESPACE, fieldSelector: 'involvedObject.name=ha-back' });
    expect(events.items.map((e) => e.reason)).toEqual(expect.arrayContaining(['WaitingForQuorum', 'Succeeded']));
    expect(await (await fetch(`${operator!.metricsUrl}/metrics`)).text()).toMatch(/^vmops_migrations_active 0$/m);
    // `history` reads the journal back: controller-1's quorum gate held, then passed, and its steps ran
    const { stdout } = await promisify(execFile)(process.execPath, cliArgs('history', 'ha-back', '--db', sb.dbPath), { cwd: REPO_ROOT });
    const at = stdout.indexOf(`${env}/controller-1`);
    const section = stdout.slice(at, stdout.indexOf(`${env}/controller-2`, at));
    expect(section).toMatch(/quorum +failed .*controller-2/);
    expect(section).toMatch(/quorum +done/);
    expect(section).toMatch(/start +done/);
  }, 1_200_000);
});
