/**
 * Two operator replicas, one store: two real operator processes with Lease
 * election against the real API server, sharing a private PostgreSQL (the
 * realistic two-replica deployment). The leader is SIGKILLed in the middle
 * of a VM move; the standby takes over when the Lease expires, resumes the
 * move from the journal and finishes. At no time do both act: every journal
 * entry names the replica that wrote it, and a watcher samples the QEMU
 * processes throughout — no VM is ever live twice.
 *
 * This is also the SIGKILL crash-resume scenario on PostgreSQL (the full
 * e2e runs on PostgreSQL with VMOPS_TEST_DB=postgres).
 */
import { CoordinationV1Api, type V1Lease, type V1Node } from '@kubernetes/client-node';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Store } from '../../src/store/store.js';
import { sha256File } from '../world/images.js';
import { REPO_ROOT, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { kubectlStdin, migrationManifest, waitVmm, watchSplitBrain } from '../world/vmm.js';
import { LOOPBACK } from '../world/loopback.js';
import { liveness } from '../world/budget.js';
import { until } from '../world/until.js';

// The elector's default Lease (src/controller/runtime/leaderElection.ts), which the operator runs with
// (retry period 2 s, jitter 1.2).
const LEASE_DURATION_S = 15;

let sb: Sandbox;
let a: OperatorProcess;
let b: OperatorProcess;

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e-failover'), environment: 'student-fo', firstAddress: LOOPBACK.failover.first, db: 'postgres', log: (l) => console.log(`[sandbox] ${l}`) });
  expect(sb.dbPath).toMatch(/^postgres:\/\//);
  a = await sb.startOperator({ logFile: join(sb.dir, 'operator-a.log') });
  await leaseHolder(a.identity, 60_000);
  b = await sb.startOperator({ logFile: join(sb.dir, 'operator-b.log') });
}, 900_000);

afterAll(async () => {
  await a?.stop();
  await b?.stop();
  await sb?.stop();
});

async function readLease(): Promise<V1Lease | undefined> {
  return sb.kc.makeApiClient(CoordinationV1Api).readNamespacedLease({ name: 'vm-migration-operator', namespace: 'vm-migration-system' }).catch(() => undefined);
}

/** Polls the operator's Lease until `identity` holds it; every record read on the way is appended to `seen`. */
async function leaseHolder(identity: string, budgetMs: number, seen: V1Lease[] = []): Promise<V1Lease> {
  return until(`${identity} holding the Lease`, budgetMs, async () => {
    const lease = await readLease();
    if (lease) seen.push(lease);
    return lease?.spec?.holderIdentity === identity ? lease : undefined;
  }, 100);
}

/** A Lease time (MicroTime, written by the holder) in ms since the epoch. */
function leaseMs(t: Date | string | undefined, what: string): number {
  const v = t === undefined ? NaN : new Date(t).getTime();
  if (!Number.isFinite(v)) throw new Error(`${what}: no timestamp (${String(t)})`);
  return v;
}

async function leaderGauge(p: OperatorProcess): Promise<string | undefined> {
  const text = await (await fetch(`${p.metricsUrl}/metrics`)).text();
  return /^vmops_leader_is_leader (\d)$/m.exec(text)?.[1];
}

describe('two operator replicas sharing one PostgreSQL store', () => {
  const WAITS = { midMove: 300_000, takeover: 60_000, done: 600_000 };
  it('the leader is SIGKILLed mid-move: the standby takes over within the Lease, resumes from the journal and finishes; never both act', async () => {
    expect(await leaderGauge(a)).toBe('1');
    expect(await leaderGauge(b)).toBe('0');
    const watcher = watchSplitBrain(sb.environment.name);
    try {
      const r = await kubectlStdin(sb, ['apply', '-f', '-'], migrationManifest('failover', { environments: [sb.environment.name], targetHost: 'host02', shutdown: { powerdownTimeout: '1s' } }));
      expect(r.code, r.stderr).toBe(0);

      let killedAt = '';
      const o = await waitVmm(sb, 'failover', 'two VMs moved and a third in stop/transfer/start', (x) => {
        const done = x?.status?.vms?.filter((v) => v.phase === 'Succeeded').length ?? 0;
        const inFlight = x?.status?.vms?.find((v) => v.phase === 'Running' && ['stop', 'transfer', 'start'].includes(v.step ?? ''));
        if (done >= 2 && inFlight) killedAt = `${inFlight.name}@${inFlight.step}`;
        return killedAt !== '';
      }, WAITS.midMove, 100);
      // the Lease's records from here on: A's renewals up to its death, then B's takeover
      const leases: V1Lease[] = [];
      const beforeKill = await readLease();
      if (beforeKill) leases.push(beforeKill);
      const samplesBeforeKill = watcher.sampled();
      a.child.kill('SIGKILL');
      const killTime = Date.now();
      await new Promise((res) => (a.child.exitCode !== null || a.child.signalCode !== null ? res(undefined) : a.child.once('exit', res)));
      const uid = o!.metadata.uid;
      const interruptedVm = killedAt.split('@')[0]!;

      // the first read after A's death shows its last renewal (nothing of A can renew any more), unless B already
      // holds the Lease — then the last record of A sampled before; either way never later than A's real last one
      const taken = await leaseHolder(b.identity, WAITS.takeover, leases);
      const samplesAtTakeover = watcher.sampled();
      const ofA = leases.filter((l) => l.spec?.holderIdentity === a.identity);
      expect(ofA.length, 'the Lease read while A held it').toBeGreaterThan(0);
      const lastOfA = ofA.at(-1)!;
      const lastRenewA = Math.max(...ofA.map((l) => leaseMs(l.spec?.renewTime, "A's renewTime")));
      const leaseS = lastOfA.spec?.leaseDurationSeconds ?? NaN;
      expect(leaseS, 'the operator runs with the elector\'s default Lease').toBe(LEASE_DURATION_S);
      const acquiredB = leaseMs(taken.spec?.acquireTime, "B's acquireTime");
      const takeoverMs = acquiredB - lastRenewA;
      console.log(`[e2e] leader ${a.identity} killed at ${killedAt}; ${b.identity} acquired the Lease ${(takeoverMs / 1000).toFixed(1)} s after A's last renewal (Lease timestamps; ${ofA.length} records of A read)`);
      // The API server's record of the handover: one transition, from A straight to B.
      expect(taken.spec?.leaseTransitions).toBe((lastOfA.spec?.leaseTransitions ?? 0) + 1);
      // Both ends are the electors' own Lease timestamps (A's renewTime, B's acquireTime), not the test's clock.
      // Safety: B did not take the Lease while A's could still have been valid — client-go's rule, a full Lease
      // duration after the last renewal B saw (A's true last renewal is this one or later, so this is exact).
      expect(takeoverMs, 'B waited out A\'s Lease').toBeGreaterThanOrEqual(leaseS * 1000);
      // Liveness of the mechanism: the standby checks every retry period (2 s × up to 1.2), so it takes over
      // ~15-20 s after the last renewal. Twice the Lease leaves a loaded machine room and is still far below
      // anything but the Lease's own expiry driving the takeover.
      expect(takeoverMs).toBeLessThanOrEqual(2 * leaseS * 1000);

      const done = await waitVmm(sb, 'failover', 'Succeeded/Failed', (x) => ['Succeeded', 'Failed'].includes(x?.status?.phase ?? ''), WAITS.done, 300);
      const samplesAtDone = watcher.sampled();
      expect(done!.status?.phase, `killed at ${killedAt}: ${JSON.stringify(done!.status?.vms)}`).toBe('Succeeded');
      expect(await leaderGauge(b)).toBe('1');

      // placement and data
      const h01 = await sb.hypervisor('host01');
      const h02 = await sb.hypervisor('host02');
      for (const vm of sb.environment.vms) {
        expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
        expect((await h01.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('absent');
        for (const f of vm.files) expect(await sha256File(`${h02.vmDir(sb.environment.name, vm)}/${f.name}`), `${vm.name}/${f.name}`).toBe(sb.checksums.get(`${vm.name}/${f.name}`));
      }
      expect(done!.status!.vms!.find((v) => v.name === interruptedVm)?.attempts).toBeGreaterThanOrEqual(2);
      const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
      for (const n of nodes.items) expect(n.spec?.unschedulable ?? false, n.metadata?.name).toBe(false);

      // Never both: a VM never had two live QEMUs, and the journal is A…A then B…B, B starting only after A died.
      const split = await watcher.stop();
      expect(split.samples).toBeGreaterThan(50);
      // the census covered every phase: A alone, the handover (A dead, Lease not yet B's), B resuming
      expect([samplesBeforeKill, samplesAtTakeover - samplesBeforeKill, samplesAtDone - samplesAtTakeover].every((n) => n > 0), `census samples per phase: ${samplesBeforeKill}/${samplesAtTakeover - samplesBeforeKill}/${samplesAtDone - samplesAtTakeover}`).toBe(true);
      expect(split.worst, `live on two hosts: ${split.offenders.join(', ')}`).toBe(1);
      const store = await Store.open(sb.dbPath);
      const journal = await store.journalEntries(uid);
      await store.close();
      const actors = journal.map((e) => e.actor);
      expect(new Set(actors)).toEqual(new Set([a.identity, b.identity]));
      const firstB = actors.indexOf(b.identity);
      expect(actors.slice(firstB).every((x) => x === b.identity), 'no entry by A after B began').toBe(true);
      const firstBAt = Date.parse(journal[firstB]!.at);
      expect(firstBAt, 'B acted only after A was killed').toBeGreaterThanOrEqual(killTime);
      // ...and only as the Lease's holder: its first entry after its acquireTime (both written by B)
      expect(firstBAt, 'B acted only once it held the Lease').toBeGreaterThanOrEqual(acquiredB);
      const ofVm = journal.filter((e) => e.vm === interruptedVm);
      const lastA = ofVm.filter((e) => e.actor === a.identity).at(-1)!;
      const firstBOfVm = ofVm.find((e) => e.actor === b.identity)!;
      expect(`${firstBOfVm.step}:${firstBOfVm.event}`, 'B resumes the interrupted move by locating the VM').toBe('precheck:begin');
      expect(ofVm.filter((e) => e.actor === b.identity).at(-1)).toMatchObject({ step: 'cleanup', event: 'end' });
      console.log(`[e2e] ${interruptedVm}: A's last entry ${lastA.step}:${lastA.event}; B resumed at ${journal[firstB]!.at} (${((firstBAt - acquiredB) / 1000).toFixed(1)} s after acquiring the Lease); ${split.samples} census samples, never two QEMUs for one VM`);
    } finally {
      await watcher.stop().catch(() => undefined);
    }
  }, liveness(Object.values(WAITS).reduce((x, y) => x + y) + 40_000));
});
