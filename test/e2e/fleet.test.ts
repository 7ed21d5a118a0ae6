/**
 * Fleet evacuation end to end: 4 environments × 7 no-OS QEMU VMs on host01, evacuated by the real
 * operator onto targets it chooses (host02, host03) with maxParallelEnvironments 2 — watchers on the
 * guest nodes, checksums, placement policy. The same fleet moved at parallelism 1, 2 and 4 side by
 * side (wall times, one VM per environment down) is the benchmark's business: BENCH_PARTS=fleet
 * npm run bench (bench/fleet.ts), on the same world (test/world/fleetWorld.ts).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFleetWorld, type FleetWorld } from '../world/fleetWorld.js';
import { SECRET_NAMESPACE } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';

let w: FleetWorld;

beforeAll(async () => {
  w = await startFleetWorld({ environments: ['fleet-a', 'fleet-b', 'fleet-c'], firstAddress: LOOPBACK.fleet.first });
}, 900_000);

afterAll(async () => {
  await w?.stop();
});

describe('fleet evacuation (3 × 7 VMs, real operator, real QEMU, real sshd, real kube-apiserver)', () => {
  it('evacuates host01 at parallelism 2 onto targets it chose, one VM per environment down, policy held, data intact', async () => {
    // guest VMs are 1-vCPU guests on a 2-core machine: the placement allows 16 vCPUs per CPU here
    // dry run first: the plan and the reasons, nothing moves
    const policy = { maxEnvironmentsPercentPerHost: 67, cpuOvercommitRatio: 16 };
    const dry = await w.migrate('evacuate-dry', { sourceHost: 'host01', maxParallelEnvironments: 2, placement: policy, dryRun: true });
    expect(dry.o.status?.environments?.map((e) => `${e.name}→${e.target}`)).toEqual(['fleet-a→host02', 'fleet-b→host03', 'fleet-c→host02']);
    for (const e of dry.o.status!.environments!) expect(e.reason).toMatch(/^best of 2 candidate\(s\); [12]\/2 environments after; .* memory free after; .* disk free after; \d+\/\d+ vCPUs(; not host0[23] \(placement policy: it would hold 3 environments, at most 2 allowed \(67% of 3\)\))?$/);
    for (const [, where] of await w.placement()) expect([...where]).toEqual(['host01']);

    const watch = await w.watchDisruption();
    // one VM is cancelled while the evacuation runs (fleet-c starts after a or b finished): it stays, the rest moves
    const p2 = await w.migrate('evacuate-p2', { sourceHost: 'host01', maxParallelEnvironments: 2, placement: policy }, {
      afterApply: async (kubectl) => {
        const r = await kubectl(['patch', 'vmm', 'evacuate-p2', '-n', SECRET_NAMESPACE, '--type', 'merge', '-p', JSON.stringify({ spec: { cancel: ['fleet-c/node-3'] } })]);
        expect(r.code, r.stderr).toBe(0);
      },
    });
    watch.stop();
    expect(watch.maxDownPerEnv()).toBe(1);
    expect(watch.maxEnvsDisrupted()).toBeLessThanOrEqual(2);
    expect(p2.o.status?.environmentProgress).toBe('2/3');
    expect(p2.o.status?.progress).toBe('20/21');
    expect(p2.o.status?.vms?.find((v) => v.environment === 'fleet-c' && v.name === 'node-3')).toMatchObject({ phase: 'Cancelled' });
    expect(p2.o.status?.environments?.find((e) => e.name === 'fleet-c')).toMatchObject({ phase: 'Cancelled', vmsDone: 6 });
    expect(p2.o.status?.message).toContain('1 VM(s) cancelled: fleet-c/node-3');
    // parallelism really happened: VM moves of two environments overlapped in time
    const spans = p2.o.status!.vms!.map((v) => ({ env: v.environment, a: Date.parse(v.startedAt!), b: Date.parse(v.finishedAt!) }));
    expect(spans.some((x) => spans.some((y) => y.env !== x.env && y.a < x.b && x.a < y.b))).toBe(true);
    // placement policy: 67% of 3 = at most 2 environments per host, each environment whole on one host, host01 empty
    const where = await w.placement();
    const perHost = new Map<string, number>();
    for (const [e, set] of where) {
      // the cancelled VM stayed on host01; everything else of its environment moved
      if (e === 'fleet-c') expect(set.has('host01') && set.size === 2, 'fleet-c: node-3 left on host01, the rest on one target').toBe(true);
      else expect(set.size, `${e} whole on one host`).toBe(1);
      const h = [...set].find((x) => x !== 'host01')!;
      expect(h).not.toBe('host01');
      perHost.set(h, (perHost.get(h) ?? 0) + 1);
    }
    expect([...perHost.values()].every((n) => n <= 2)).toBe(true);
    expect(await w.changedFiles()).toEqual([]);
    console.log(`[fleet e2e] evacuation of 3 × 7 VMs at parallelism 2: ${p2.seconds.toFixed(1)} s, environments disrupted at once ${watch.maxEnvsDisrupted()}, status writes ${watch.writes('evacuate-p2')} (${(watch.writes('evacuate-p2') / p2.seconds).toFixed(2)}/s)`);
  }, 3_000_000);
});
