/**
 * A whole rolling move of an HA student environment (beachhead, 3 workers, 3 controllers) with the student's
 * kubectl loop running through the beachhead's NGINX (issue 7). Real parts: etcd ×3 with client TLS, kube-apiserver
 * ×3, NGINX, sshd, QEMU, KWOK, the operator as a process, kubectl.
 *
 * 1. Load-balancer aware (forward, host01 → host02): 0 failed requests, and NGINX's own log shows no session sent
 *    to a stopped controller and no connect that failed over, while workers and controllers move (the student's
 *    latency is reported; BENCH_PARTS=ha measures it); no etcd sample shows quorum lost (a member that did not
 *    answer is unknown; "lost" is confirmed by a second, patient round); no controller led etcd when its VM
 *    went dark (etcd's own answers after it); never two controllers down together; each controller's
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
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { until } from '../world/until.js';
import { getVmm as getVmmOf } from '../world/vmm.js';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { Store } from '../../src/store/store.js';
import { NGINX_DEFAULTS, sessionDuring, sessionFailedOver, type MemberStatus, type NginxSession, type QuorumSample } from '../world/haGuest.js';
import { startHaSandbox, type HaSandbox } from '../world/haSandbox.js';
import { KubectlStudent, summarize, type StudentSample } from '../world/haStudent.js';
import { REPO_ROOT, SECRET_NAMESPACE, type OperatorProcess } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';
import { cliArgs } from '../world/cli.js';
import { liveness } from '../world/budget.js';

let sb: HaSandbox;
let operator: OperatorProcess | undefined;
const t0 = Date.now();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** liveness budgets of this file's waits (unscaled; until() and liveness() scale them) */
const W = { move: 900_000, quorumWait: 300_000, recheck: 60_000, vmState: 60_000, student: 60_000, stop: 120_000 };
/** the negative control's copy cap, and the controllers' data: a capped copy keeps each down ≥ twice NGINX's connect timeout */
const CONTROL_MIBPS = 1;
const CONTROL_DENSE_MIB = 2 * NGINX_DEFAULTS.connectTimeoutSeconds * CONTROL_MIBPS;
/** a test's timeout: the sum of its waits, scaled like them, plus room for the calls between them */
const budget = (...waits: number[]) => liveness(waits.reduce((a, b) => a + b, 0) + 60_000);

beforeAll(async () => {
  // its own environment ("ha": QEMU names, the nftables table vmops_ha_ha) and addresses (LOOPBACK.ha*):
  // nothing shared with test/integration/guestHa.test.ts (environment "hag")
  sb = await startHaSandbox({
    dir: join(REPO_ROOT, '.sandbox', 'e2e-ha'), environment: 'ha', firstAddress: LOOPBACK.haHosts.first, addressBase: LOOPBACK.haGuest.first, log: (l) => console.log(`[ha] ${l}`),
    // The negative control moves the controllers with the copy capped at CONTROL_MIBPS: each stays down
    // for its data's copy. That must outlast NGINX's connect timeout with room to spare, or a session NGINX
    // sends to a stopped controller just waits for it to come back and no connect ever fails over (with
    // ~2 MiB of data the controllers were down 2–3 s and the control saw no failover: a run on 2026-12-07).
    controllerDisk: { sizeMiB: CONTROL_DENSE_MIB + 4, denseMiB: CONTROL_DENSE_MIB },
  });
}, liveness(900_000));

// A test that failed before stopping its operator must not leave it holding the Lease for the next one
// (as the elected leader it would run the next migration with its own inventory).
afterEach(async () => {
  await operator?.stop();
  operator = undefined;
});

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
  return until(`${name} Succeeded`, W.move, async () => {
    const o = await getVmm(name);
    if (o?.status?.phase === 'Failed') throw new Error(`${name} failed: ${JSON.stringify(o.status.conditions)} ${JSON.stringify(o.status.vms?.map((v) => [v.name, v.phase, v.message]))}`);
    return o?.status?.phase === 'Succeeded' ? o : undefined;
  });
}

/**
 * Watchers: etcd's quorum (each round of member answers judged, one that is not clearly held confirmed by
 * a second, patient round: test/world/haGuest.ts etcdQuorum) and NGINX's `down` flags, sampled until
 * stopped or their budget runs out.
 */
class Watchers {
  readonly etcd: QuorumSample[] = [];
  readonly lb: { at: number; down: string[] }[] = [];
  private running = true;
  private loops: Promise<void>[] = [];
  start(maxMs = liveness(W.move + 5 * W.student)): this {
    const deadline = Date.now() + maxMs;
    const going = () => this.running && Date.now() < deadline;
    this.loops.push((async () => {
      while (going()) {
        this.etcd.push(await sb.ha.etcdQuorum());
        await sleep(250);
      }
    })());
    this.loops.push((async () => {
      while (going()) {
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
  /** rounds in which etcd's members, asked twice, showed no majority for any leader */
  quorumLost(): QuorumSample[] {
    return this.etcd.filter((s) => s.verdict === 'lost');
  }
  /** every member answer of every round (first and confirming), in the order they came */
  answers(): MemberStatus[] {
    return this.etcd.flatMap((s) => [...s.st, ...(s.confirm ?? [])]).sort((a, b) => a.at - b.at);
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

/**
 * Down windows per VM from the world's own transitions (test/world/haGuest.ts downWindows): 'vm' while
 * the VM did not run (what must hold at every such moment is checked against it), 'dark' while its address
 * dropped every packet (a session sent to it then certainly hung).
 */
function downWindows(vm: string, from: number, kind: 'vm' | 'dark' = 'vm'): { start: number; end: number }[] {
  return sb.ha.downWindows(vm, from, kind);
}

const overlaps = (s: StudentSample, w: { start: number; end: number }) => s.at <= w.end && s.at + s.ms >= w.start;

/**
 * NGINX's own account of the move (its access log, test/world/haGuest.ts): sessions it tried to open to a
 * controller while that controller's VM was down, and sessions whose first connect failed (NGINX then
 * tries the next backend: the seed's 10 s hang) or that reached no backend at all. Unlike a client's
 * wall time this does not depend on how busy the machine is.
 */
async function nginxDuringMove(
  from: number,
  toStoppedMeans: 'open while it was down' | 'begun while it was dark',
  exclude: { start: number; end: number }[] = [],
): Promise<{ sessions: NginxSession[]; toStopped: NginxSession[]; failedOver: NginxSession[] }> {
  const sessions = (await sb.ha.nginxSessions()).filter((x) => x.end >= from && !exclude.some((w) => sessionDuring(x, w)));
  // 'open while it was down' (what no session of an LB-aware move may be): any session to the controller
  // overlapping a time its VM was not running. 'begun while it was dark' (what the negative control must
  // show): NGINX picked the controller for a new session while its address dropped every packet.
  const toStopped = sessions.filter((x) =>
    CONTROLLERS.some((c) => {
      const backend = `${sb.ha.addressOf(c)}:6443`;
      return toStoppedMeans === 'open while it was down'
        ? x.upstreams.includes(backend) && downWindows(c, from, 'vm').some((w) => sessionDuring(x, w))
        : x.upstreams[0] === backend && downWindows(c, from, 'dark').some((w) => x.start >= w.start && x.start <= w.end);
    }),
  );
  return { sessions, toStopped, failedOver: sessions.filter(sessionFailedOver) };
}
const brief = (xs: NginxSession[]) => xs.slice(0, 5).map((x) => `${new Date(x.start).toISOString()} +${x.end - x.start} ms ${x.status} via ${x.upstreams.join(' → ')}`);
const CONTROLLERS = ['controller-1', 'controller-2', 'controller-3'];

/** The operator's leaderMove steps of a migration, from its journal (operator clock: this machine's). */
async function leaderMoveWindows(uid: string): Promise<{ vm: string; start: number; end: number }[]> {
  const store = await Store.open(sb.dbPath);
  try {
    const rows = (await store.journalEntries(uid)).filter((e) => e.step === 'leaderMove');
    return rows.filter((e) => e.event === 'begin').map((b) => {
      const end = rows.find((e) => e.vm === b.vm && e.id > b.id && e.event !== 'begin');
      return { vm: b.vm, start: Date.parse(b.at), end: end ? Date.parse(end.at) : Date.now() };
    });
  } finally {
    await store.close();
  }
}

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
    let from = 0;
    let done: VMMigration;
    try {
      await student.start();
      await until('the student got answers through NGINX', W.student, async () => (student.samples.filter((x) => x.ok).length >= 2 ? true : undefined));
      from = Date.now();
      await apply('ha-forward', 'host02');
      done = await succeeded('ha-forward');
      // and the student's calls after the move (the beachhead's outage is reported with 2 s after it)
      const end = Date.now();
      await until('the student made 2 calls after the move', W.student, async () => (student.samples.filter((x) => x.at >= end).length >= 2 ? true : undefined));
    } finally {
      await student.stop();
      await watchers.stop();
    }
    const samples = student.samples;

    expect(done.status?.progress).toBe('7/7');
    const bh = downWindows('beachhead', from).map((w) => ({ start: w.start, end: w.end + 2000 }));
    expect(bh.length).toBe(1);
    const duringBeachhead = samples.filter((s) => bh.some((w) => overlaps(s, w)));
    const rest = samples.filter((s) => !bh.some((w) => overlaps(s, w)));
    const r = summarize(rest);
    const b = summarize(duringBeachhead);
    const lbOut = watchers.outOfLb();
    const unknown = watchers.etcd.filter((s) => s.verdict === 'unknown');
    console.log(`[ha] LB aware, workers+controllers: sent ${r.sent}, failed ${r.failed}, p99 ${r.p99Ms} ms, worst ${r.worstMs} ms`);
    console.log(`[ha] beachhead (cold) down ${((bh[0]!.end - 2000 - bh[0]!.start) / 1000).toFixed(1)} s: sent ${b.sent}, failed ${b.failed}, worst ${b.worstMs} ms`);
    console.log(`[ha] out of the LB: ${Object.entries(lbOut).map(([k, v]) => `${k} ${v.toFixed(1)} s`).join(', ')}`);
    console.log(`[ha] etcd rounds: ${watchers.etcd.length}, quorum held ${watchers.etcd.filter((s) => s.verdict === 'held').length}, unknown ${unknown.length} (a member did not answer), lost ${watchers.quorumLost().length}`);
    // to set beside the journal (`history ha-forward --db .sandbox/e2e-ha/operator.db`)
    console.log(`[ha] slowest calls: ${[...rest].sort((x, y) => y.ms - x.ms).slice(0, 5).map((x) => `${x.op} at ${new Date(x.at).toISOString()} ${x.ms} ms`).join(', ')}`);
    const lb = await nginxDuringMove(from, 'open while it was down', bh);
    console.log(`[ha] NGINX sessions while workers and controllers moved: ${lb.sessions.length}, sent to a stopped controller ${lb.toStopped.length}, failed over or failed ${lb.failedOver.length}`);
    // An etcd leadership transfer fails the writes in flight at that instant with "etcdserver: leader
    // changed", and kube-apiserver hands that to the client unretried (kubernetes/kubernetes#112152, open).
    // The operator must transfer leadership before it stops the leading controller (one transfer per
    // environment move), so such a call is the one failure the product cannot rule out: it must come
    // from etcd, inside a journaled leaderMove step. Any other failure is a failure of the move.
    const moves = await leaderMoveWindows(done.metadata.uid);
    const leaderChange = (x: StudentSample) => !x.ok && /etcdserver: leader changed/.test(x.error ?? '') && moves.some((w) => x.at <= w.end + 1000 && x.at + x.ms >= w.start);
    console.log(`[ha] etcd leadership moved ${moves.length} time(s); calls failed by it (etcdserver: leader changed): ${rest.filter(leaderChange).length}`);
    expect(summarize(rest.filter((x) => !leaderChange(x))).errors).toEqual([]);
    // What LB awareness promises, from NGINX's own log: no session was sent to a stopped controller and no
    // connect failed over. The student's worst call is reported above, not asserted: it is a wall time on a
    // shared 2-core machine (fresh-clone runs: ~1 s when quiet, 2.4–3.1 s beside other test lanes, with
    // NGINX sending nothing to a stopped controller); the failure the LB step removes costs the 10 s
    // connect timeout, and BENCH_PARTS=ha measures the latency against a baseline.
    expect(brief(lb.toStopped), 'sessions NGINX sent to a stopped controller').toEqual([]);
    expect(brief(lb.failedOver), 'sessions whose connect failed over or failed').toEqual([]);
    expect(lb.sessions.length).toBeGreaterThan(50);
    expect(r.sent).toBeGreaterThan(50);
    // etcd kept its quorum: no round in which the members' answers, asked twice, left no majority for a
    // leader (a member that did not answer is unknown, not missing); and the watch did see it held
    expect(watchers.quorumLost().map((s) => JSON.stringify(s))).toEqual([]);
    expect(watchers.etcd.some((s) => s.verdict === 'held')).toBe(true);
    expect(maxControllersDown(from)).toBe(1);
    // every controller went out of NGINX (and came back: nothing is down at the end)
    expect(Object.keys(lbOut).sort()).toEqual(CONTROLLERS);
    expect(watchers.lb.at(-1)?.down).toEqual([]);
    // etcd leadership was moved away first: once a controller's address had gone dark, no member named it
    // leader (the followers of a leader stopped while leading keep naming it until their election
    // timeout). Only answers as new as the newest term etcd had shown before the stop count: a member held
    // up (stalled) from before the transfer answers from its old term. Order from etcd's raft terms and
    // the world's own transitions, not from when the test's rounds happened to run.
    const answers = watchers.answers();
    for (const c of CONTROLLERS) {
      // a member id never changes: taken from any answer of that member
      const mine = answers.find((a) => a.vm === c && a.memberId)?.memberId;
      expect(mine, `${c}'s etcd member id`).toBeDefined();
      const vmDown = downWindows(c, from, 'vm');
      const dark = downWindows(c, from, 'dark');
      expect(dark.length).toBe(vmDown.length);
      dark.forEach((w, i) => {
        const termBefore = Math.max(0, ...answers.filter((a) => a.seen === 'answered' && a.at < vmDown[i]!.start).map((a) => a.raftTerm ?? 0));
        const namedIt = answers.filter((a) => a.seen === 'answered' && a.sentAt >= w.start && a.sentAt <= w.end && a.leader === mine && (a.raftTerm ?? 0) >= termBefore);
        expect(namedIt.map((a) => JSON.stringify(a)), `${c} led etcd when its VM went down`).toEqual([]);
      });
    }
    // and each controller's VM stopped only while it was out of the load balancer
    for (const c of CONTROLLERS) {
      for (const w of downWindows(c, from)) {
        const inLb = watchers.lb.filter((s) => s.at >= w.start && s.at <= w.end && !s.down.includes(c));
        expect(inLb.length, `${c} in the LB while down`).toBe(0);
      }
    }
  }, budget(W.student, W.move, W.student, W.stop));

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
    let measureFrom = 0;
    let done: VMMigration;
    try {
      await h02.stopVm(env, c2, { powerdownTimeoutMs: 0 });
      await until('controller-2 off', W.vmState, async () => (sb.ha.runState('controller-2') === 'off' ? true : undefined));
      await student.start();
      // only the controllers move here (the beachhead and workers are cancelled: the first test moved them,
      // BENCH_PARTS=ha measures the beachhead per strategy); they are what the negative control is about.
      // Cold, as the seed's runbook moved them: a pre-copy cut-over is short enough (worst 1.96 s in one
      // fresh-clone run once the operator started target VMs as the inventory says) that a student's few
      // requests in it may see no stall at all, which would prove nothing either way. Since TCP_NODELAY
      // a cold cut-over of these small disks is that short too (one fresh-clone run: no request slow or
      // failed), so the copy is capped at CONTROL_MIBPS: each controller stays down for its data's copy
      // (CONTROL_DENSE_MIB: twice NGINX's connect timeout), as a real disk's copy would keep it.
      await apply('ha-back', 'host01', { bandwidthLimitMiBps: CONTROL_MIBPS, cancel: sb.environment.vms.filter((v) => v.role !== 'controller').map((v) => `${env}/${v.name}`) });

      const waiting = await until('WaitingForQuorum', W.quorumWait, async () => {
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
      await until('controller-1 quorum re-checked twice more', W.recheck, async () => ((await quorumFails()) >= 3 ? true : undefined));
      // nothing stopped: controllers 1 and 3 still run, and their LB entries were never touched
      expect(sb.ha.runState('controller-1')).toBe('running');
      expect(sb.ha.runState('controller-3')).toBe('running');
      expect((await getVmm('ha-back'))?.status?.phase).toBe('Running');

      await h02.startVm(env, c2);
      // NGINX's passive check forgets controller-2's failures after its configured fail_timeout; measure the
      // operator's moves from there (a wait for NGINX's setting, not for something to happen)
      await sleep((NGINX_DEFAULTS.failTimeoutSeconds + 1) * 1000);
      measureFrom = Date.now();
      done = await succeeded('ha-back');
      const end = Date.now();
      await until('the student made 2 calls after the move', W.student, async () => (student.samples.filter((x) => x.at >= end).length >= 2 ? true : undefined));
    } finally {
      await student.stop();
    }
    expect(done.status?.waitingSince).toBeUndefined();
    const samples = student.samples;
    const windows = CONTROLLERS.flatMap((c) => downWindows(c, measureFrom));
    expect(windows.length).toBeGreaterThanOrEqual(2);
    const during = samples.filter((s) => windows.some((w) => overlaps(s, w)));
    const s = summarize(during);
    const all = summarize(samples);
    // the cancelled beachhead never went down
    expect(downWindows('beachhead', from)).toEqual([]);
    expect(done.status?.vms?.find((v) => v.name === 'beachhead')).toMatchObject({ phase: 'Cancelled' });
    const lb = await nginxDuringMove(measureFrom, 'begun while it was dark');
    console.log(`[ha] LB awareness off, controller moves: sent ${s.sent}, failed ${s.failed}, slow(>2s) ${s.slow}, p99 ${s.p99Ms} ms, worst ${s.worstMs} ms; whole move: sent ${all.sent}, failed ${all.failed}, p99 ${all.p99Ms} ms, worst ${all.worstMs} ms`);
    console.log(`[ha] LB awareness off, NGINX: ${lb.sessions.length} sessions, sent to a stopped controller ${lb.toStopped.length}, failed over or failed ${lb.failedOver.length}: ${brief(lb.toStopped).join('; ')}`);
    // the disruption the LB step removes is real here: NGINX picked stopped controllers for new sessions
    // (it learns only from a failed connect), and connects failed over after its connect timeout. Whether
    // the student's own few calls hit one is chance, so their stalls are reported, not required.
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
  }, budget(W.stop, W.vmState, W.quorumWait, W.recheck, NGINX_DEFAULTS.failTimeoutSeconds * 1000, W.move, W.student, W.stop));
});
