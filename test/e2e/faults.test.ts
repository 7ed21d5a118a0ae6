/**
 * Fault-injection matrix on real parts (control plane + KWOK, sshd hosts, QEMU, the operator as a
 * child process): for each strategy, one VM is moved while the operator is killed with SIGKILL at
 * every step boundary of its move — as soon as the journal shows that step began — and restarted.
 * Kills inside a step are chosen by state, never by elapsed time: mid-copy once the target's
 * `.partial` holds data but less than the source's, mid-live once the source QEMU's own monitor shows
 * the live step's disk mirror copying or its migration active.
 * Observed from outside: the test reads the operator's journal (SQLite read-only through its WAL, or
 * PostgreSQL with VMOPS_TEST_DB=postgres) and never hooks into the operator. After every kill, while no operator runs, the VM must not be live on
 * both hosts; after the restart the migration must finish with the guest data unchanged, the VM
 * running on exactly one host and nothing left on the other.
 *
 * Every wait has a liveness deadline (test/world/budget.ts, scaled by VMOPS_TIME_SCALE); the operator
 * is restarted in a `finally` after every kill, and each case starts with one running.
 */
import { CustomObjectsApi, type V1Node } from '@kubernetes/client-node';
import BetterSqlite3 from 'better-sqlite3';
import pg from 'pg';
import { execFile } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { guestContentSha256 } from '../../src/hosts/qemuIncoming.js';
import { RAN_MARKER_FILE, type Hypervisor, type VmStatus } from '../../src/hosts/hypervisor.js';
import { QmpClient } from '../../src/hosts/qmp.js';
import { buildQemuArgv } from '../../src/hosts/qemuArgv.js';
import { liveness } from '../world/budget.js';
import { sha256File } from '../world/images.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';
import { until } from '../world/until.js';

const execFileP = promisify(execFile);
const ENV = 'student-f';
let sb: Sandbox | undefined;
let operator: OperatorProcess | undefined;
const t0 = Date.now();
const matrix: string[] = [];
/** the VMMigration of the case that runs: one a failed case left in flight is deleted before the next */
let current: string | undefined;

// Liveness budgets on an unloaded machine, scaled by VMOPS_TIME_SCALE (test/world/budget.ts; until()
// scales its own). None is a property: a case fails on the first one used up, naming what it waited for.
/** the journal reaches the next kill point (a step's begin, then for a mid-step kill the state it waits for), or the migration ends */
const POINT_MS = 90_000;
/** a SIGKILLed operator has exited */
const EXIT_MS = 10_000;
/** the hosts' probes answer after a kill (settledStatus) */
const SETTLE_MS = 15_000;
/** a restarted operator answers /readyz (test/world/sandbox.ts gives up after ~60 s), and what is read while none runs */
const RESTART_MS = 75_000;
/** after the last kill point: the migration reaches Succeeded or Failed */
const FINISH_MS = 300_000;
/** a case's own work: fingerprints before and after, creating the VMMigration, the checks at the end */
const FIXED_MS = 120_000;
/** one kill point: reach it (and its state), kill, let the probes settle, restart */
const KILL_MS = POINT_MS + EXIT_MS + SETTLE_MS + RESTART_MS;
/** a case's vitest timeout: the sum of its inner waits' budgets, scaled as they are */
const caseTimeout = (killPoints: number, extraMs = 0): number => liveness(FIXED_MS + killPoints * KILL_MS + FINISH_MS + extraMs);

const world = (): Sandbox => {
  if (!sb) throw new Error('the sandbox did not start');
  return sb;
};
const alive = (p: OperatorProcess | undefined): p is OperatorProcess => p !== undefined && p.child.exitCode === null && p.child.signalCode === null;

/** Starts the operator unless one runs. No leader election: a restarted operator starts at once instead of waiting out the killed one's Lease. */
async function ensureOperator(): Promise<void> {
  if (!alive(operator)) operator = await world().startOperator({ leaderElect: false });
}

/**
 * SIGKILLs the operator; `whileDown` runs while none runs. The operator is restarted in `finally`,
 * whatever `whileDown` says, so that a failed check fails this case only (with no operator, the next
 * case once waited out its whole timeout in a fresh-clone run). Never two at once: a process that
 * did not exit is not replaced.
 */
async function killOperator(whileDown: () => Promise<void>): Promise<void> {
  const killed = operator;
  try {
    if (!alive(killed)) throw new Error('no operator runs to be killed');
    killed.child.kill('SIGKILL');
    await until('the SIGKILLed operator exited', EXIT_MS, async () => !alive(killed), 20);
    await whileDown();
  } finally {
    await ensureOperator();
  }
}

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e-faults'), environment: ENV, vms: ['node-1'], firstAddress: LOOPBACK.faults.first, diskMiB: 16, workloadReplicas: 2, workloadMinAvailable: 0, log: (l) => console.log(`[sandbox] ${l}`) });
  await ensureOperator();
}, liveness(900_000));

// a case that failed before it restarted the operator leaves none: the next starts one
beforeEach(async () => {
  if (sb) await ensureOperator();
}, liveness(RESTART_MS));

// a case that failed mid-move leaves its VMMigration holding the environment: it is deleted (its move
// rolls back), so that the next case starts from a settled VM instead of waiting for the environment
afterEach(async () => {
  const name = current;
  current = undefined;
  if (!name || !sb) return;
  await ensureOperator();
  const o = await getVmm(name);
  if (!o || o.status?.phase === 'Succeeded' || o.status?.phase === 'Failed') return;
  console.log(`[faults] ${name} is still ${o.status?.phase ?? 'unstarted'}: deleting it (its move rolls back) before the next case`);
  await sb.kubectl(['delete', 'vmmigration', name, '-n', SECRET_NAMESPACE, '--wait=false']);
  await until(`${name} deleted, its move rolled back`, FINISH_MS, async () => (await getVmm(name)) === undefined, 500);
}, liveness(RESTART_MS + FINISH_MS + 30_000));

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
  console.log(`[faults] matrix:\n${matrix.join('\n')}`);
  console.log(`[faults] wall time ${((Date.now() - t0) / 1000).toFixed(0)} s`);
});

async function getVmm(name: string): Promise<VMMigration | undefined> {
  const api = world().kc.makeApiClient(CustomObjectsApi);
  return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name }).catch(() => undefined)) as VMMigration | undefined;
}

/**
 * The VM's status on a host once the probe can answer. A kill while the operator starts a QEMU with
 * -daemonize leaves, for a moment, the waiting parent and the daemon with the same argv: the probe
 * then refuses to answer (fencing fails closed, and a restarted operator retries), which is not a
 * "running" either. Seen in a fresh-clone run: a kill inside a live step landed there.
 */
async function settledStatus(hv: Hypervisor): Promise<VmStatus> {
  const vm = world().environment.vms[0]!;
  return until(`${hv.host.name}: the VM's status, once the probe can answer`, SETTLE_MS, async () => {
    try {
      return await hv.vmStatus(ENV, vm);
    } catch (err) {
      if (/cannot prove that VM .* is stopped: \d+ QEMU processes/.test((err as Error).message)) return undefined;
      throw err;
    }
  });
}

/** the guest executes there (a postmigrate source or a paused/incoming target holds it without running it) */
const runs = (s: { qmpStatus?: string }) => s.qmpStatus === 'running';
const mib = (bytes: number) => (bytes / 1048576).toFixed(2);

/** Guest-visible content of every disk and the bytes of every other file, on the host that has the VM. */
async function fingerprint(hostName: string): Promise<Record<string, string>> {
  const hv = await world().hypervisor(hostName);
  const vm = world().environment.vms[0]!;
  const dir = hv.vmDir(ENV, vm);
  const out: Record<string, string> = {};
  for (const f of vm.files) out[f.name] = f.kind === 'disk' ? await guestContentSha256(hv, `${dir}/${f.name}`, f.format ?? 'qcow2') : await sha256File(`${dir}/${f.name}`);
  return out;
}

/** Where the VM runs now and the other host: each case moves it from where the one before left it. */
async function placement(): Promise<{ from: string; to: string }> {
  const vm = world().environment.vms[0]!;
  const names = world().hosts.hosts.map((h) => h.name);
  const st = await Promise.all(names.map(async (n) => settledStatus(await world().hypervisor(n))));
  const on = names.filter((_, i) => runs(st[i]!));
  if (on.length !== 1 || names.length !== 2) throw new Error(`${vm.name} runs on ${on.length} hosts: ${names.map((n, i) => `${n} ${st[i]!.qmpStatus ?? st[i]!.state}`).join(', ')}`);
  return { from: on[0]!, to: names.find((n) => n !== on[0])! };
}

interface JournalRow { id: number; step: string; event: string; at: string }

/** A read-only look at the operator's journal, whichever store it runs on. */
async function openJournal(dbPath: string): Promise<{ rows(uid: string): Promise<JournalRow[]>; close(): Promise<void> }> {
  const sql = 'SELECT id, step, event, at FROM journal WHERE migration_uid = $uid ORDER BY id';
  if (dbPath.startsWith('postgres')) {
    const client = new pg.Client({ connectionString: dbPath });
    await client.connect();
    return {
      rows: async (uid) => (await client.query<JournalRow>(sql.replace('$uid', '$1'), [uid])).rows.map((r) => ({ ...r, id: Number(r.id) })),
      close: () => client.end(),
    };
  }
  const db = new BetterSqlite3(dbPath, { readonly: true, fileMustExist: true });
  const q = db.prepare(sql.replace('$uid', '?'));
  return { rows: async (uid) => q.all(uid) as JournalRow[], close: async () => void db.close() };
}

/** A state inside a step that a `step@mid` kill point waits for (read on the hosts, not in the operator). */
interface Midway {
  what: string;
  /** a description of the state once the step is there, else undefined */
  check(): Promise<string | undefined>;
  /** what the state is after the kill, read while no operator runs */
  afterKill(): Promise<string>;
  close(): void;
}

/**
 * Mid-copy (cold transfer): a `<file>.partial` in the target's VM directory (src/transfer/relay.ts:
 * created sparse at full size, data written into it, renamed at the commit) holds data, but fewer
 * bytes than the source file's data extents — what the relay sends (`qemu-img map -f raw`, as the
 * relay's probe). Hosts are local: both files are read through this machine's filesystem. Only a
 * partial written since the step began counts (its mtime, the kernel's clock, at or after the
 * journal's begin): a resumed copy starts over, and one a killed attempt left may still hold data.
 */
function midCopy(source: Hypervisor, target: Hypervisor, stepBeganAt: number): Midway {
  const vm = world().environment.vms[0]!;
  const [srcDir, dstDir] = [source.vmDir(ENV, vm), target.vmDir(ENV, vm)];
  const totals = new Map<string, Promise<number>>();
  const dataBytes = (file: string) => {
    if (!totals.has(file)) {
      totals.set(file, execFileP('qemu-img', ['map', '-U', '-f', 'raw', '--output=json', join(srcDir, file)]).then(({ stdout }) =>
        (JSON.parse(stdout) as Array<{ length: number; data: boolean }>).reduce((n, e) => n + (e.data ? e.length : 0), 0)));
    }
    return totals.get(file)!;
  };
  const written = (path: string, sinceMs = 0) => {
    try {
      const st = statSync(path);
      return st.mtimeMs >= sinceMs ? st.blocks * 512 : undefined;
    } catch {
      return undefined;
    }
  };
  let seen: string | undefined;
  return {
    what: `a .partial in ${target.host.name}'s VM directory holding data, but less than its source`,
    check: async () => {
      let files: string[] = [];
      try {
        files = existsSync(dstDir) ? readdirSync(dstDir) : [];
      } catch {
        // the directory is being made or removed: nothing to see yet
      }
      for (const p of files.filter((f) => f.endsWith('.partial'))) {
        // written since this step began: a partial an earlier, killed attempt left is not this copy
        const w = written(join(dstDir, p), stepBeganAt);
        const total = await dataBytes(p.slice(0, -'.partial'.length));
        if (w !== undefined && w > 0 && w < total) {
          seen = p;
          return `${p} ${mib(w)} of ${mib(total)} MiB written`;
        }
      }
      return undefined;
    },
    afterKill: async () => {
      const w = seen === undefined ? undefined : written(join(dstDir, seen));
      return w === undefined ? `${seen} gone` : `${seen} still there, not committed (${mib(w)} MiB written)`;
    },
    close: () => undefined,
  };
}

interface BlockJob { device: string; type: string; status: string }

/**
 * Mid live migration: on the source QEMU's second monitor (qmp-observe.sock; the operator holds
 * qmp.sock), a disk mirror of the live step (job id `live-<disk>`, src/transfer/live.ts) copying
 * (`running`, not yet READY) — the incoming QEMU waits on the target — or `query-migrate` active /
 * in pre-switchover. A mirror an earlier, killed attempt left behind is not `running` (its target is
 * gone with that operator's tunnel: it failed, or it sits `ready` beside an idle guest).
 */
async function midLive(source: Hypervisor): Promise<Midway> {
  const vm = world().environment.vms[0]!;
  const qmp = await QmpClient.open(connect(`${source.vmDir(ENV, vm)}/qmp-observe.sock`), { timeoutMs: liveness(10_000) });
  return {
    what: `${source.host.name}'s QEMU mid live migration (a live-* mirror copying, or query-migrate active)`,
    check: async () => {
      // a source that quit (the step ended, the fence ran) is not mid-way: the journal's end of the step says the rest
      const [all, mig] = await Promise.all([qmp.execute<BlockJob[]>('query-block-jobs'), qmp.execute<{ status?: string }>('query-migrate')]).catch(() => [[], {}] as [BlockJob[], { status?: string }]);
      const jobs = all.filter((j) => j.device.startsWith('live-'));
      // copying: the job runs and is not yet READY (its offset/len say nothing here: QEMU reports the
      // whole length at once and then copies, rate-limited, for seconds before READY)
      const copying = jobs.some((j) => j.type === 'mirror' && j.status === 'running');
      const migrating = mig.status === 'active' || mig.status === 'pre-switchover';
      if (!copying && !migrating) return undefined;
      return `${jobs.map((j) => `mirror ${j.device} ${j.status}`).join(', ') || 'no mirror'}; query-migrate ${mig.status ?? 'none'}`;
    },
    afterKill: async () => `source ${(await qmp.execute<{ status: string }>('query-status')).status}`,
    close: () => qmp.close(),
  };
}

/** `step@mid` kill points: the state inside that step the kill waits for */
const MIDWAY: Record<string, (h: { source: Hypervisor; target: Hypervisor; stepBeganAt: number }) => Promise<Midway>> = {
  transfer: async ({ source, target, stepBeganAt }) => midCopy(source, target, stepBeganAt),
  live: async ({ source }) => midLive(source),
};

interface Kill {
  step: string;
  /** for a `step@mid` point: the state the kill landed in, and after it */
  mid?: string;
  afterKill?: string;
  /** the journal's last row at the kill, `step:event` */
  journal: string;
}
const killText = (k: Kill) => `${k.mid ? `${k.step} mid-way (${k.mid}; after the kill: ${k.afterKill})` : k.step} (journal at the kill: ${k.journal})`;

interface Moved { uid: string; from: string; to: string; source: Hypervisor; target: Hypervisor }

/** A wait that ran out says where the migration stood. */
async function explained<T>(name: string, uid: string | undefined, journal: { rows(uid: string): Promise<JournalRow[]> } | undefined, wait: Promise<T>): Promise<T> {
  try {
    return await wait;
  } catch (err) {
    const last = uid && journal ? (await journal.rows(uid).catch(() => [])).at(-1) : undefined;
    const o = await getVmm(name);
    throw new Error(`${(err as Error).message} [journal at ${last ? `${last.step}:${last.event}` : '-'}; operator ${alive(operator) ? 'running' : 'down'}; status ${JSON.stringify(o?.status?.conditions ?? o?.status?.phase ?? null)}]`, { cause: err });
  }
}

/**
 * Moves the VM with `spec` from where it runs to the other host, SIGKILLing the operator as soon as
 * each of `killAt` begins — or, for `step@mid`, once that step's state in MIDWAY is seen (if the step
 * ends first, that point is reported as missed).
 */
async function moveWithKills(name: string, spec: Record<string, unknown>, killAt: string[], afterKills?: (m: Moved) => Promise<void>): Promise<Moved & { kills: Kill[]; skipped: string[]; missed: string[] }> {
  const sb = world();
  const vm = sb.environment.vms[0]!;
  const { from, to } = await placement();
  const before = await fingerprint(from);
  const started = Date.now();
  const api = sb.kc.makeApiClient(CustomObjectsApi);
  current = name;
  await api.createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name }, spec: { environments: [ENV], targetHost: to, shutdown: { powerdownTimeout: '1s' }, ...spec } } });
  const uid = await until(`${name}: its uid`, 30_000, async () => (await getVmm(name))?.metadata.uid, 50);
  const [source, target] = [await sb.hypervisor(from), await sb.hypervisor(to)];
  const journal = await openJournal(sb.dbPath);
  const kills: Kill[] = [];
  const missed: string[] = [];
  const skipped: string[] = [];
  try {
    let after = 0;
    const remaining = [...killAt];
    const stepOf = (k: string) => k.split('@')[0]!;
    while (remaining.length > 0) {
      const steps = remaining.map(stepOf);
      const next = await explained(name, uid, journal, until(`${name}: the journal reaches ${remaining[0]} (or a later one of ${remaining.join(', ')}), or the migration ends`, POINT_MS, async () => {
        const hit = (await journal.rows(uid)).find((r) => r.event === 'begin' && r.id > after && steps.includes(r.step));
        if (hit) return { hit };
        const phase = (await getVmm(name))?.status?.phase;
        return phase === 'Succeeded' || phase === 'Failed' ? { phase } : undefined;
      }, 20));
      if (!next.hit) {
        missed.push(...remaining.splice(0));
        break;
      }
      const hit = next.hit;
      const index = steps.indexOf(hit.step);
      const point = remaining[index]!;
      const midway = point.endsWith('@mid') ? MIDWAY[hit.step] : undefined;
      if (point.includes('@') && !midway) throw new Error(`kill point ${point}: no state is known inside ${hit.step}`);
      let probe: Midway | undefined;
      try {
        let mid: string | undefined;
        if (midway) {
          const p = (probe = await midway({ source, target, stepBeganAt: Date.parse(hit.at) }));
          const seen = await explained(name, uid, journal, until(`${name}: ${p.what}, or the end of ${hit.step}`, POINT_MS, async () => {
            const state = await p.check();
            if (state) return { state };
            return (await journal.rows(uid)).some((r) => r.id > hit.id && r.step === hit.step && r.event !== 'begin') ? { ended: true } : undefined;
          }, 20));
          if (!seen.state) {
            missed.push(`${point} (the step ended first)`);
            remaining.splice(0, index + 1);
            after = hit.id;
            continue;
          }
          mid = seen.state;
        }
        let both: VmStatus[] = [];
        await killOperator(async () => {
          // a kill point the resumed plan went past (e.g. no converge after a cold fallback) is reported, not waited for
          skipped.push(...remaining.splice(0, index));
          remaining.shift();
          const last = (await journal.rows(uid)).at(-1)!;
          after = last.id;
          kills.push({ step: hit.step, journal: `${last.step}:${last.event}`, ...(mid ? { mid, afterKill: await probe!.afterKill() } : {}) });
          // no operator runs now: fencing must already hold
          both = await Promise.all([settledStatus(source), settledStatus(target)]);
        });
        expect(both.length === 2 && runs(both[0]!) && runs(both[1]!), `${name}: running on both hosts after the kill at ${killText(kills.at(-1)!)}`).toBe(false);
      } finally {
        probe?.close();
      }
    }
  } finally {
    await journal.close();
  }
  await afterKills?.({ uid, from, to, source, target });
  const o = await explained(name, uid, undefined, until(`${name} finishes (Succeeded or Failed)`, FINISH_MS, async () => {
    const o = await getVmm(name);
    return o?.status?.phase === 'Succeeded' || o?.status?.phase === 'Failed' ? o : undefined;
  }, 300));
  const secs = ((Date.now() - started) / 1000).toFixed(0);
  const killed = kills.map(killText).join(', ');
  console.log(`[faults] ${name} (${from} → ${to}): ${o.status?.phase} after ${secs} s; killed at ${killed}; skipped ${skipped.join(', ') || '-'}; missed ${missed.join(', ') || '-'}`);
  let verdict = 'FAILED';
  try {
    expect(o.status?.phase, `${name} killed at ${killed}: ${JSON.stringify(o.status?.vms)}`).toBe('Succeeded');
    // exactly one host runs it, nothing is left on the other
    const [a, b] = await Promise.all([source.vmStatus(ENV, vm), target.vmStatus(ENV, vm)]);
    expect(a.state, `${name}: left on ${from}`).toBe('absent');
    expect(b.qmpStatus, `${name}: not running on ${to}`).toBe('running');
    // only the VM's own files and what its QEMU made: no partial disk, export socket, pidfile of a qemu-nbd
    // and the host's record that the guest ran from this directory (RAN_MARKER_FILE): it stays with the VM
    const allowed = new Set([...vm.files.map((f) => f.name), 'qemu.pid', 'qmp.sock', 'qmp-observe.sock', 'serial.log', 'heartbeat.sock', RAN_MARKER_FILE]);
    const entries = (await target.conn.execOk(['ls', '-A', target.vmDir(ENV, vm)])).toString().trim().split('\n');
    expect(entries.filter((f) => !allowed.has(f)), `${name}: stray files on ${to}`).toEqual([]);
    // [q]: the remote shell that runs pgrep carries the pattern in its own command line
    const nbd = await target.conn.exec(['pgrep', '-f', `[q]emu-nbd.*${target.vmDir(ENV, vm)}`]);
    expect(nbd.stdout.toString().trim(), `${name}: qemu-nbd left running on ${to}`).toBe('');
    expect(await fingerprint(to), `${name}: guest data changed`).toEqual(before);
    const node = JSON.parse((await sb.kubectl(['get', 'node', vm.nodeName, '-o', 'json'])).stdout) as V1Node;
    expect(node.spec?.unschedulable ?? false, `${name}: node left cordoned`).toBe(false);
    verdict = 'guest data + files equal; running on ' + to + ' only, nothing left on ' + from + ', no qemu-nbd, node schedulable';
  } finally {
    matrix.push(`| ${name} | SIGKILL at the begin of: ${killed}${skipped.length ? `; not in the resumed plan: ${skipped.join(', ')}` : ''}${missed.length ? `; never reached: ${missed.join(', ')}` : ''} | ${o.status?.phase} in ${secs} s, attempts ${o.status?.vms?.[0]?.attempts} | ${verdict} |`);
  }
  return { uid, from, to, source, target, kills, skipped, missed };
}

const COLD = ['precheck', 'cordon', 'drain', 'stop', 'fence', 'transfer', 'transfer@mid', 'start', 'nodeReady', 'uncordon', 'commit', 'cleanup'];
const PRECOPY = ['precheck', 'mirror', 'cordon', 'drain', 'mirrorSync', 'stop', 'converge', 'fence', 'transfer', 'verify', 'start', 'nodeReady', 'uncordon', 'commit', 'cleanup'];
const CUTOVER = ['fence', 'transfer', 'verify', 'start'];
const LIVE = ['precheck', 'live', 'live@mid', 'stop', 'fence', 'verify', 'start', 'nodeReady', 'uncordon', 'commit', 'cleanup'];

describe('SIGKILL at every step boundary, one VM, each strategy', () => {
  it('cold (Rolling): killed at each of its 11 steps and in the middle of the copy, resumes each time and finishes', async () => {
    // the copy is held to 2 MiB/s so that its middle (a .partial with some but not all of its data) lasts seconds
    const r = await moveWithKills('f-cold', { transfer: { bandwidthLimitMiBps: 2 } }, COLD);
    // killed mid-copy: the target's .partial held data, less than the source's, the journal still in the transfer
    // step, and the partial was not committed when no operator ran
    const k = r.kills.find((x) => x.step === 'transfer' && x.mid);
    expect(k, `killed mid-copy (kills: ${r.kills.map(killText).join(', ')}; missed: ${r.missed.join(', ')})`).toBeDefined();
    expect(k!.mid).toMatch(/\.partial [\d.]+ of [\d.]+ MiB written$/);
    expect(k!.journal).toBe('transfer:begin');
    expect(k!.afterKill).toMatch(/\.partial still there, not committed/);
  }, caseTimeout(COLD.length));

  it('pre-copy: killed at each of its 15 steps (after the kill at converge the rest runs cold, so verify is left to the next case)', async () => {
    await moveWithKills('f-precopy', { transfer: { precopy: true } }, PRECOPY);
  }, caseTimeout(PRECOPY.length));

  it('pre-copy after convergence: killed at fence, transfer, verify and start, the cutover resumes as pre-copy each time (verify is not skipped)', async () => {
    // the kills above before converge ended turn the rest into a cold move (nothing converged to trust); these come after it
    const r = await moveWithKills('f-precopy-cutover', { transfer: { precopy: true } }, CUTOVER);
    expect([...r.skipped, ...r.missed], 'every kill point of the cutover was hit').toEqual([]);
  }, caseTimeout(CUTOVER.length));

  it('live: killed at each of its 10 steps and in the middle of the live migration (handover, verify included)', async () => {
    // A per-host budget of 16 MiB/s gives the move 4 MiB/s (16 ÷ 2 outbound + 2 inbound slots) for its
    // disk mirror and its files, so the mirror copies (running, not READY) for seconds; the RAM (zero
    // pages) is not slowed: query-migrate is active for a few hundred ms only.
    const r = await moveWithKills('f-live', { strategy: 'LiveMigrate', hostLimits: { bandwidthMiBpsPerHost: 16 } }, LIVE);
    // killed mid-migration: QEMU on the source had the live step's mirror copying or its migration active,
    // the journal still in the live step
    const k = r.kills.find((x) => x.step === 'live' && x.mid);
    expect(k, `killed mid-migration (kills: ${r.kills.map(killText).join(', ')}; missed: ${r.missed.join(', ')})`).toBeDefined();
    expect(k!.mid).toMatch(/mirror live-\S+ running|query-migrate (active|pre-switchover)$/);
    expect(k!.journal).toBe('live:begin');
  }, caseTimeout(LIVE.length));
});

describe('warm migration: pre-copy before the window opens', () => {
  it('the mirror starts before the window opens with nothing disrupted; a SIGKILL while it waits resumes the wait; the cut-over comes after the window opened', async () => {
    // A window far beyond any run: the move mirrors and waits until the test opens the window by
    // patching the spec; the order is read from the journal's and the API server's times.
    const closed = new Date(Math.ceil((Date.now() + 24 * 3_600_000) / 1000) * 1000).toISOString();
    const vm = world().environment.vms[0]!;
    const opened: { at?: string; notBefore?: string } = {};
    const r = await moveWithKills('f-window', { transfer: { precopy: true }, window: { notBefore: closed } }, ['window'], async ({ uid, source, target }) => {
      // the restarted operator mirrors again and waits: its window step begun and not ended, the wait in status
      const journal = await openJournal(world().dbPath);
      let resumed: { rows: JournalRow[]; message: string };
      try {
        resumed = await explained('f-window', uid, journal, until('f-window: the restarted operator waits at its window step again', POINT_MS, async () => {
          const rows = await journal.rows(uid);
          const windows = rows.filter((j) => j.step === 'window');
          const waiting = (await getVmm('f-window'))?.status?.conditions?.find((c) => c.reason === 'WaitingForWindow');
          return windows.filter((j) => j.event === 'begin').length >= 2 && windows.at(-1)?.event === 'begin' && waiting ? { rows, message: waiting.message ?? '' } : undefined;
        }, 100));
      } finally {
        await journal.close();
      }
      // (was: the test's clock still before notBefore) the window was still closed: the wait names the
      // spec's notBefore, and nothing of the cut-over has begun
      expect(resumed.message).toMatch(/pre-copy mirror running, the VM undisturbed; the cut-over waits: the window opens at/);
      expect(resumed.message).toContain(closed);
      expect(resumed.rows.filter((j) => ['cordon', 'drain', 'mirrorSync', 'stop'].includes(j.step)).map((j) => `${j.step}:${j.event}`), 'cut-over begun while the window was closed').toEqual([]);
      // the mirror holds the VM's QMP monitor; its second monitor answers for the run state
      const qmp = await QmpClient.open(connect(`${source.vmDir(ENV, vm)}/qmp-observe.sock`), { timeoutMs: liveness(10_000) });
      try {
        expect((await qmp.execute<{ status: string }>('query-status')).status).toBe('running');
      } finally {
        qmp.close();
      }
      expect((await target.vmStatus(ENV, vm)).state).not.toMatch(/running|paused|other/);
      const node = JSON.parse((await world().kubectl(['get', 'node', vm.nodeName, '-o', 'json'])).stdout) as V1Node;
      expect(node.spec?.unschedulable ?? false).toBe(false);

      // Open the window. The operator reads spec.window when a run starts (settingsFrom in
      // src/controller/migrationRunner.ts; the window step sleeps on that copy), so a window edited while
      // a move waits is not seen by that run: the window is opened while no operator runs — a second
      // SIGKILL while the move waits — and the restarted operator starts with it. notBefore moves to
      // when the resumed wait began (past); the window opened when the API server took the patch.
      const notBefore = resumed.rows.filter((j) => j.step === 'window' && j.event === 'begin').at(-1)!.at;
      await killOperator(async () => {
        const [a, b] = await Promise.all([settledStatus(source), settledStatus(target)]);
        expect(runs(a) && runs(b), 'f-window: running on both hosts after the kill during the resumed wait').toBe(false);
        const patched = JSON.parse((await world().kubectl(['patch', 'vmmigration', 'f-window', '-n', SECRET_NAMESPACE, '--type=merge', '--field-manager=faults-window-opener', '-p', JSON.stringify({ spec: { window: { notBefore } } }), '-o', 'json', '--show-managed-fields'])).stdout) as { metadata: { managedFields?: Array<{ manager?: string; time?: string }> } };
        const at = patched.metadata.managedFields?.find((m) => m.manager === 'faults-window-opener')?.time;
        if (!at) throw new Error(`f-window: the patch left no managedFields time: ${JSON.stringify(patched.metadata.managedFields)}`);
        Object.assign(opened, { at, notBefore });
      });
    });
    expect([...r.skipped, ...r.missed]).toEqual([]);
    expect(opened.at, 'the window was opened').toBeDefined();
    // the API server's time of the patch (RFC 3339, whole seconds: at or before the patch itself)
    const openedAt = Date.parse(opened.at!);
    const journal = await openJournal(world().dbPath);
    try {
      const rows = await journal.rows(r.uid);
      const first = (step: string) => Date.parse(rows.find((j) => j.step === step && j.event === 'begin')!.at);
      console.log(`[faults] f-window: window opened by the patch at ${opened.at} (notBefore ${closed} → ${opened.notBefore}); mirror began ${((first('mirror') - openedAt) / 1000).toFixed(1)} s, cordon ${((first('cordon') - openedAt) / 1000).toFixed(1)} s, stop ${((first('stop') - openedAt) / 1000).toFixed(1)} s relative to it`);
      expect(first('mirror'), 'the mirror began before the window opened').toBeLessThan(openedAt);
      expect(first('cordon'), 'the cut-over (cordon) began after the window opened').toBeGreaterThanOrEqual(openedAt);
      expect(first('stop'), 'the VM stopped after the window opened').toBeGreaterThanOrEqual(openedAt);
    } finally {
      await journal.close();
    }
  }, caseTimeout(2, 30_000));
});

/** A VMMigration of the VM to `to`, cold, awaited to the end (no kills). */
async function migrate(name: string, to: string): Promise<VMMigration> {
  const api = world().kc.makeApiClient(CustomObjectsApi);
  current = name;
  await api.createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name }, spec: { environments: [ENV], targetHost: to, shutdown: { powerdownTimeout: '1s' } } } });
  return until(`${name} finishes (Succeeded or Failed)`, FINISH_MS, async () => {
    const o = await getVmm(name);
    return o?.status?.phase === 'Succeeded' || o?.status?.phase === 'Failed' ? o : undefined;
  }, 300);
}

/** Deletes every row the operator's store holds of a migration (journal, moves), whichever store it runs on; only while no operator runs. */
async function forgetMigration(uid: string): Promise<void> {
  const dbPath = world().dbPath;
  const tables = ['journal', 'vm_moves'];
  if (dbPath.startsWith('postgres')) {
    const client = new pg.Client({ connectionString: dbPath });
    await client.connect();
    try {
      for (const t of tables) await client.query(`DELETE FROM ${t} WHERE migration_uid = $1`, [uid]);
    } finally {
      await client.end();
    }
    return;
  }
  const db = new BetterSqlite3(dbPath, { fileMustExist: true });
  try {
    for (const t of tables) db.prepare(`DELETE FROM ${t} WHERE migration_uid = ?`).run(uid);
  } finally {
    db.close();
  }
}

/** The journal's steps of a migration, `step:event` in order. */
async function journalSteps(uid: string): Promise<string[]> {
  const journal = await openJournal(world().dbPath);
  try {
    return (await journal.rows(uid)).map((r) => `${r.step}:${r.event}`);
  } finally {
    await journal.close();
  }
}

describe('the only copy: nothing a fault or a lost database does deletes or overwrites the newest copy of a VM', () => {
  it('a partial live migration left its incoming QEMU on the target, and the source was stopped since: the source is copied again and its image goes only after the VM ran on the target', async () => {
    const { from, to } = await placement();
    const [source, target] = [await world().hypervisor(from), await world().hypervisor(to)];
    const vm = world().environment.vms[0]!;
    const [srcDir, dstDir] = [source.vmDir(ENV, vm), target.vmDir(ENV, vm)];
    // What a live abort that could not reach the target leaves (src/transfer/live.ts): the target's VM
    // directory with empty disks of the VM's size, and a QEMU waiting for a stream that never comes.
    await target.ensureCopyTarget(dstDir);
    for (const f of vm.files) {
      if (f.kind !== 'disk') continue;
      const info = JSON.parse((await source.conn.execOk(['qemu-img', 'info', '-U', '--output=json', `${srcDir}/${f.name}`])).toString()) as { 'virtual-size': number };
      await target.conn.execOk(['qemu-img', 'create', '-q', '-f', f.format ?? 'qcow2', `${dstDir}/${f.name}`, String(info['virtual-size'])]);
    }
    await target.conn.execOk(buildQemuArgv(dstDir, ENV, vm, { qemu: target.host.qemu, incomingDefer: true }), { timeoutMs: 60_000 });
    expect((await target.vmStatus(ENV, vm)).qmpStatus).toBe('inmigrate');
    // then the student powers the source off
    await source.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
    const before = await fingerprint(from);
    const o = await migrate('f-inmigrate', to);
    const steps = await journalSteps(o.metadata.uid);
    console.log(`[faults] f-inmigrate (${from} → ${to}): ${o.status?.phase}; journal ${steps.join(' ')}`);
    // before: the inmigrate QEMU counted as "running": nodeReady → commit → cleanup removed the source's
    // image, with no copy and no start — the VM's only copy gone, an empty disk on the target
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect(steps.indexOf('transfer:end'), 'the source was copied').toBeGreaterThanOrEqual(0);
    expect(steps.indexOf('start:end'), 'started on the target after the copy').toBeGreaterThan(steps.indexOf('transfer:end'));
    expect(steps.indexOf('cleanup:begin'), 'the source image went only after the start').toBeGreaterThan(steps.indexOf('start:end'));
    expect((await target.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    expect(await fingerprint(to), 'the guest data on the target is the source\'s').toEqual(before);
  }, caseTimeout(0));

  it('the VM ran on the target, then the operator\'s database was restored from a backup taken before the move: the target copy is started, never overwritten by the older source', async () => {
    const { from, to } = await placement();
    const target = await world().hypervisor(to);
    const vm = world().environment.vms[0]!;
    const api = world().kc.makeApiClient(CustomObjectsApi);
    current = 'f-restored';
    await api.createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'f-restored' }, spec: { environments: [ENV], targetHost: to, shutdown: { powerdownTimeout: '1s' } } } });
    const uid = await until('f-restored: its uid', 30_000, async () => (await getVmm('f-restored'))?.metadata.uid, 50);
    // the VM ran on the target: its node is being awaited there
    await until('f-restored: the VM started on the target (journal: nodeReady began)', FINISH_MS, async () => (await journalSteps(uid)).includes('nodeReady:begin'), 50);
    let afterRun: Record<string, string> = {};
    await killOperator(async () => {
      // the host goes down; what the guest wrote there is only on the target's disk
      await target.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
      const disk = vm.files.find((f) => f.kind === 'disk')!;
      await target.conn.execOk(['qemu-io', '-f', disk.format ?? 'qcow2', '-c', 'write -P 0x5a 1M 64k', `${target.vmDir(ENV, vm)}/${disk.name}`]);
      afterRun = await fingerprint(to);
      // and the operator's database comes back from a backup taken before the move: nothing of this
      // migration in it (the rows it holds of this migration are what such a backup lacks)
      await forgetMigration(uid);
    });
    const before = await fingerprint(from).catch(() => undefined);
    expect(afterRun, 'the target copy differs from the source').not.toEqual(before);
    const o = await until('f-restored finishes (Succeeded or Failed)', FINISH_MS, async () => {
      const x = await getVmm('f-restored');
      return x?.status?.phase === 'Succeeded' || x?.status?.phase === 'Failed' ? x : undefined;
    }, 300);
    const steps = await journalSteps(uid);
    console.log(`[faults] f-restored (${from} → ${to}): ${o.status?.phase}; journal after the restore ${steps.join(' ')}`);
    // before: both copies stopped, an empty journal → "source stopped" → a cold copy of the older
    // source over the target: every write the guest made on the target lost
    expect(steps.filter((s) => s.startsWith('transfer:')), 'nothing was copied over the target').toEqual([]);
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect((await target.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    expect(await fingerprint(to), 'the target kept what the guest wrote there').toEqual(afterRun);
  }, caseTimeout(1));
});
