/**
 * The runner driving several environments at once, with the move itself replaced (the real moves
 * are proven in the integration and e2e tests): limits hold, summaries and the bounded VM list are
 * right, cancel / window / capacity waits behave.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { pino } from 'pino';
import { beforeEach, describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec } from '../../src/api/inventory.js';
import type { VMMigration, VMMigrationStatus } from '../../src/api/types.js';
import { runMigration, type RunnerDeps, type StatusSink } from '../../src/controller/migrationRunner.js';
import { MoveError, type MoveContext, type MoveResult } from '../../src/migrate/vmMove.js';
import type { HostCapacity } from '../../src/planner/placement.js';
import { HostReservations } from '../../src/migrate/reservations.js';
import { Store } from '../../src/store/store.js';

const log = pino({ level: 'silent' });
const GiB = 1024 ** 3;
const host = (name: string): HostSpec => ({ name, address: '127.0.0.2', port: 22, user: 'u', hostKey: 'ssh-ed25519 AAAA', vmDir: '/vms' });
const env = (name: string, at: string, vms = 3): EnvironmentSpec => ({
  name, kubeconfigSecret: { namespace: 'ns', name: `${name}-kc`, key: 'k' },
  vms: Array.from({ length: vms }, (_, i) => ({ name: `node-${i + 1}`, role: 'worker' as const, nodeName: `${name}-node-${i + 1}`, host: at, memoryMiB: 32, cpus: 1, files: [] })),
});
const roomy = (h: string): HostCapacity => ({ host: h, memTotalBytes: 64 * GiB, memAvailableBytes: 60 * GiB, cpus: 64, diskFreeBytes: 500 * GiB, environmentBytes: {} });

let store: Store;
let status: VMMigrationStatus;
let spec: VMMigration['spec'];
const sink = (initial: VMMigration): StatusSink => {
  status = structuredClone(initial.status ?? {});
  return { update: (m) => m(status), flush: async () => undefined, close: () => undefined, get current() { return status; } };
};
const vmm = (s: VMMigration['spec'], st?: VMMigrationStatus): VMMigration => ({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name: 'm', namespace: 'ns', uid: 'uid-1', generation: 1 }, spec: s, status: st });

/** records what runs concurrently */
function tracker(delayMs: (ctx: MoveContext) => number = () => 5) {
  const live = new Set<string>();
  const peaks = { vms: 0, perEnv: 0, perTarget: new Map<string, number>() };
  const order: string[] = [];
  const move = async (ctx: MoveContext): Promise<MoveResult> => {
    const key = `${ctx.environment.name}/${ctx.vm.name}`;
    live.add(key);
    order.push(key);
    peaks.vms = Math.max(peaks.vms, live.size);
    const envs = [...live].map((k) => k.split('/')[0]);
    peaks.perEnv = Math.max(peaks.perEnv, ...[...new Set(envs)].map((e) => envs.filter((x) => x === e).length));
    await new Promise((r) => setTimeout(r, delayMs(ctx)));
    live.delete(key);
    return { outage: undefined, nodeReadyMs: 1, bytes: 1, resumedFrom: 'cordon', mode: 'cold' };
  };
  return { move, peaks, order };
}

function deps(move: RunnerDeps['move'], over: Partial<RunnerDeps> = {}): RunnerDeps {
  const hv = { host: host('h1'), withLogger() { return this; } };
  return {
    kc: new KubeConfig(), store, log, events: { emit: () => undefined }, latest: () => vmm(spec),
    pool: { hypervisor: async () => hv as never, connectFresh: async () => { throw new Error('unused'); } },
    claimEnvironments: () => [], releaseEnvironments: () => undefined,
    statusSink: sink, openGuest: async () => ({}) as never, move,
    capacity: { host: async (h) => roomy(h.name), vmBytes: async () => 64 * 1048576 },
    ...over,
  };
}

beforeEach(async () => {
  store = await Store.open(':memory:');
  await store.loadInventory({ hosts: ['h1', 'h2', 'h3'].map(host), environments: ['a', 'b', 'c', 'd'].map((n) => env(n, 'h1')) });
});

describe('runner: a fleet evacuation', () => {
  it('moves 2 environments at a time, one VM per environment, targets chosen by the operator', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50 } };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
    expect(t.peaks.vms).toBe(2);
    expect(t.peaks.perEnv).toBe(1);
    expect(status.environments?.map((e) => [e.name, e.target, e.phase, `${e.vmsDone}/${e.vmsTotal}`])).toEqual([
      ['a', 'h2', 'Succeeded', '3/3'], ['b', 'h3', 'Succeeded', '3/3'], ['c', 'h2', 'Succeeded', '3/3'], ['d', 'h3', 'Succeeded', '3/3'],
    ]);
    expect(status.environments![0]!.reason).toMatch(/^best of 2 candidate\(s\); 1\/2 environments after; [\d.]+ GiB memory free after; 3\/256 vCPUs$/);
    expect(status.environmentProgress).toBe('4/4');
    expect(status.progress).toBe('12/12');
    expect(status.message).toBe('12 VM(s) moved (2 environment(s) to h2, 2 environment(s) to h3)');
    // each environment's VMs in plan order, and a started environment finished before a third began
    const firstOf = (e: string) => t.order.findIndex((k) => k.startsWith(`${e}/`));
    const lastOf = (e: string) => t.order.length - 1 - [...t.order].reverse().findIndex((k) => k.startsWith(`${e}/`));
    expect(firstOf('c')).toBeGreaterThan(Math.min(lastOf('a'), lastOf('b')));
  });

  it('with parallelism 1 it is the old one-after-another order', async () => {
    spec = { sourceHost: 'h1', placement: { maxEnvironmentsPercentPerHost: 50 } };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(t.peaks.vms).toBe(1);
    expect(t.order.map((k) => k.split('/')[0])).toEqual(['a', 'a', 'a', 'b', 'b', 'b', 'c', 'c', 'c', 'd', 'd', 'd']);
  });

  it('the disruption cap and the per-target inbound limit bound concurrency below the parallelism', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 4, maxDisruptedEnvironments: 3, hostLimits: { maxOutboundPerHost: 4, maxInboundPerHost: 1 }, placement: { maxEnvironmentsPercentPerHost: 50 } };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
    expect(t.peaks.vms).toBe(2); // two targets, one inbound each
  });

  it('dry run shows targets and reasons, moves nothing', async () => {
    spec = { sourceHost: 'h1', placement: { maxEnvironmentsPercentPerHost: 50 }, dryRun: true };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(t.order).toEqual([]);
    expect(status.phase).toBe('Succeeded');
    expect(status.message).toBe('dry run: 12 VM(s) of 4 environment(s) would move (2 environment(s) to h2, 2 environment(s) to h3)');
    expect(status.environments?.every((e) => e.phase === 'Pending' && e.reason.length > 0)).toBe(true);
  });

  it('no valid placement: Failed with NoPlacement naming what is short, nothing moved', async () => {
    spec = { sourceHost: 'h1' }; // 15% of 4 environments = 1 per host: h2 and h3 can take 2 of 4
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(t.order).toEqual([]);
    expect(status.phase).toBe('Failed');
    expect(status.conditions?.find((c) => c.type === 'Ready')).toMatchObject({ status: 'False', reason: 'NoPlacement' });
    expect(status.message).toContain('placement policy: it would hold 2 environments, at most 1 allowed (15% of 4)');
  });

  it('a cancelled environment is left where it is; the others move', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50 }, cancel: ['b'] };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(t.order.filter((k) => k.startsWith('b/'))).toEqual([]);
    expect(status.phase).toBe('Succeeded');
    expect(status.environments?.find((e) => e.name === 'b')).toMatchObject({ phase: 'Cancelled', vmsDone: 0 });
    expect(status.message).toContain('1 environment(s) cancelled: b');
    expect(status.environmentProgress).toBe('3/4');
  });

  it('cancel while running: the VM in flight finishes, nothing more of that environment starts', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50 } };
    const t = tracker((ctx) => (ctx.environment.name === 'a' && ctx.vm.name === 'node-1' ? 30 : 5));
    const d = deps(async (ctx) => {
      if (ctx.environment.name === 'a' && ctx.vm.name === 'node-1') spec = { ...spec, cancel: ['a'] };
      return t.move(ctx);
    });
    await runMigration(vmm(spec), d, new AbortController().signal);
    expect(t.order.filter((k) => k.startsWith('a/'))).toEqual(['a/node-1']);
    expect(status.environments?.find((e) => e.name === 'a')).toMatchObject({ phase: 'Cancelled', vmsDone: 1 });
  });

  it('a single cancelled VM is left where it is; the rest of its environment and the others move', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50 }, cancel: ['b/node-2'] };
    const t = tracker();
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(t.order).not.toContain('b/node-2');
    expect(t.order.filter((k) => k.startsWith('b/'))).toHaveLength(2);
    expect(status.phase).toBe('Succeeded');
    expect(status.vms?.find((v) => v.environment === 'b' && v.name === 'node-2')).toMatchObject({ phase: 'Cancelled', message: 'spec.cancel: left where it is' });
    expect(status.environments?.find((e) => e.name === 'b')).toMatchObject({ phase: 'Cancelled', vmsDone: 2 });
    expect(status.environments?.find((e) => e.name === 'b')?.message).toMatch(/node-2 left where it is/);
    expect(status.message).toContain('1 VM(s) cancelled: b/node-2');
    expect(status.message).not.toContain('environment(s) cancelled');
  });

  it('outside the window nothing stops; it waits with WaitingForWindow and starts once the window opens', async () => {
    const opens = new Date(Date.now() + 60_000).toISOString();
    spec = { sourceHost: 'h1', placement: { maxEnvironmentsPercentPerHost: 50 }, window: { notBefore: opens } };
    const t = tracker();
    const err = await runMigration(vmm(spec), deps(t.move), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect((err as { afterMs: number }).afterMs).toBeLessThanOrEqual(60_000);
    expect(t.order).toEqual([]);
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ status: 'False', reason: 'WaitingForWindow', message: `the window opens at ${opens.replace('Z', '').replace(/\.\d+$/, '')}.${opens.split('.')[1]}` });
  });

  it('a target without room for the next VM: that environment waits with the numbers, the others go on', async () => {
    spec = { sourceHost: 'h1', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50 } };
    const t = tracker();
    let reads = 0;
    const small: HostCapacity = { ...roomy('h3'), diskFreeBytes: 1.01 * GiB };
    // planning sees room everywhere; right before b's first VM h3 has filled up
    const err = await runMigration(vmm(spec), deps(t.move, { capacity: { host: async (h) => (h.name === 'h3' && ++reads > 1 ? small : roomy(h.name)), vmBytes: async () => 64 * 1048576 } }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(t.order.filter((k) => k.startsWith('b/') || k.startsWith('d/'))).toEqual([]);
    expect(t.order.filter((k) => k.startsWith('a/') || k.startsWith('c/'))).toHaveLength(6);
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ reason: 'WaitingForCapacity', message: 'h3 has no room for b/node-1: disk: 10.2 MiB free in the VM directory (after a 1.00 GiB reserve), 64.0 MiB needed' });
    expect(status.environments?.find((e) => e.name === 'b')).toMatchObject({ phase: 'Waiting' });
  });
});

describe('runner: room on the source for the verification scratch copy (pre-copy and live)', () => {
  it('a source without scratch space for the pre-pass: the VM waits with the numbers, nothing moves; a cold move does not need it', async () => {
    const tight: HostCapacity = { ...roomy('h1'), diskFreeBytes: 1.02 * GiB };
    const capacity = { host: async (h: HostSpec) => (h.name === 'h1' ? tight : roomy(h.name)), vmBytes: async () => 64 * 1048576 };
    spec = { environments: ['a'], targetHost: 'h2', transfer: { precopy: true } };
    const t = tracker();
    const err = await runMigration(vmm(spec), deps(t.move, { capacity }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(t.order).toEqual([]);
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({
      reason: 'WaitingForCapacity',
      message: 'h1 has no scratch space to verify a/node-1: 20.5 MiB free in the VM directory (after a 1.00 GiB reserve), 64.0 MiB needed (a temporary raw copy of the VM\'s data for the comparison while the guest runs)',
    });
    store = await Store.open(':memory:');
    await store.loadInventory({ hosts: ['h1', 'h2', 'h3'].map(host), environments: ['a'].map((n) => env(n, 'h1')) });
    spec = { environments: ['a'], targetHost: 'h2' };
    const cold = tracker();
    await runMigration(vmm(spec), deps(cold.move, { capacity }), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
    expect(cold.order).toHaveLength(3);
  });
});

describe('status at scale', () => {
  it('a 100-environment migration lists at most 50 VMs, keeps every environment summary', async () => {
    store = await Store.open(':memory:');
    const hosts = Array.from({ length: 10 }, (_, i) => host(`h${i + 1}`));
    const envs = Array.from({ length: 100 }, (_, i) => env(`s${String(i).padStart(3, '0')}`, `h${(i % 10) + 1}`, 7));
    await store.loadInventory({ hosts, environments: envs });
    spec = { environments: envs.map((e) => e.name), maxParallelEnvironments: 8, hostLimits: { maxOutboundPerHost: 4, maxInboundPerHost: 4 } };
    const t = tracker(() => 1);
    await runMigration(vmm(spec), deps(t.move), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
    expect(status.progress).toBe('700/700');
    expect(status.environmentProgress).toBe('100/100');
    expect(status.vms!.length).toBeLessThanOrEqual(50);
    expect(status.plan).toHaveLength(700);
    expect(Buffer.byteLength(JSON.stringify(status))).toBeLessThan(256 * 1024);
    expect(t.peaks.perEnv).toBe(1);
    expect(t.peaks.vms).toBeLessThanOrEqual(8);
  });
});

describe('runner: pre-copy mirrored ahead (pipelined environment)', () => {
  /**
   * A move that mirrors, waits for its turn if it has one, then is down for `downMs`. Its mirror is
   * ready once `mirrorsAtOnce` VMs of its environment have been mirroring at the same time (a barrier,
   * not a timer: the runner starting the next moves must not race a few milliseconds on a loaded
   * machine), or after 5 s, so that a runner that never mirrors ahead fails the peak's assertion
   * instead of hanging.
   */
  function pipelined(opts: { mirrorsAtOnce: number; downMs: number; failAt?: string }) {
    const down = new Map<string, number>();
    const mirroring = new Set<string>();
    const peaks = { downPerEnv: 0, mirroringPerEnv: 0 };
    const cutovers: string[] = [];
    const move = async (ctx: MoveContext): Promise<MoveResult> => {
      const env = ctx.environment.name;
      const key = `${env}/${ctx.vm.name}`;
      // what moveVm reports as its mirror begins: past its checks, its next VMs may mirror ahead
      ctx.observer.step('mirror', 'begin', {});
      mirroring.add(key);
      peaks.mirroringPerEnv = Math.max(peaks.mirroringPerEnv, [...mirroring].filter((k) => k.startsWith(`${env}/`)).length);
      for (const until = Date.now() + 5000; peaks.mirroringPerEnv < opts.mirrorsAtOnce && Date.now() < until; ) await new Promise((r) => setTimeout(r, 5));
      try {
        // what moveVm's `turn` step does: a withdrawn turn rolls back (mirror dropped), never disrupting
        await ctx.turn?.(ctx.signal);
      } catch (err) {
        mirroring.delete(key);
        throw Object.assign(new MoveError('turn', (err as Error).message, 'rolled-back'), { cause: err });
      }
      down.set(env, (down.get(env) ?? 0) + 1);
      peaks.downPerEnv = Math.max(peaks.downPerEnv, down.get(env)!);
      cutovers.push(key);
      await new Promise((r) => setTimeout(r, opts.downMs));
      down.set(env, down.get(env)! - 1);
      mirroring.delete(key);
      if (key === opts.failAt) throw new MoveError('verify', 'guest data differ', 'rolled-back');
      return { outage: undefined, nodeReadyMs: 1, bytes: 1, resumedFrom: 'mirror', mode: 'precopy' };
    };
    return { move, peaks, cutovers };
  }

  it('the next VMs mirror while one cuts over; still one VM of an environment down at a time, cut-overs in plan order', async () => {
    const run = async (mirrorAhead: number) => {
      spec = { environments: ['a'], targetHost: 'h2', transfer: { precopy: true, mirrorAhead }, hostLimits: { maxOutboundPerHost: 7, maxInboundPerHost: 7 } };
      const p = pipelined({ mirrorsAtOnce: mirrorAhead + 1, downMs: 10 });
      await runMigration(vmm(spec), deps(p.move), new AbortController().signal);
      expect(status.phase).toBe('Succeeded');
      expect(p.cutovers).toEqual(['a/node-1', 'a/node-2', 'a/node-3']);
      expect(p.peaks.downPerEnv).toBe(1);
      return { mirroring: p.peaks.mirroringPerEnv };
    };
    const serial = await run(0);
    store = await Store.open(':memory:');
    await store.loadInventory({ hosts: ['h1', 'h2', 'h3'].map(host), environments: ['a', 'b', 'c', 'd'].map((n) => env(n, 'h1')) });
    const whole = await run(2);
    expect(serial.mirroring).toBe(1);
    expect(whole.mirroring).toBe(3);
  });

  it('nothing mirrors ahead of a VM still at its checks: a quorum wait ends the run as a wait with no mirror started behind it', async () => {
    spec = { environments: ['a'], targetHost: 'h2', transfer: { precopy: true, mirrorAhead: 2 }, hostLimits: { maxOutboundPerHost: 7, maxInboundPerHost: 7 } };
    const started: string[] = [];
    const move = async (ctx: MoveContext): Promise<MoveResult> => {
      started.push(ctx.vm.name);
      await new Promise((r) => setTimeout(r, 30));
      throw new MoveError('quorum', 'controller-2 is NotReady', 'waiting', { safe: false, reason: 'WaitingForQuorum', message: 'controller-2 is NotReady' });
    };
    const err = await runMigration(vmm(spec), deps(move), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(started).toEqual(['node-1']);
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ reason: 'WaitingForQuorum' });
  });

  it('a failed cut-over withdraws the turns of the VMs mirroring ahead: they are not moved (Pending, mirror dropped) and nothing else starts', async () => {
    spec = { environments: ['a'], targetHost: 'h2', transfer: { precopy: true, mirrorAhead: 2 }, hostLimits: { maxOutboundPerHost: 7, maxInboundPerHost: 7 } };
    const p = pipelined({ mirrorsAtOnce: 3, downMs: 10, failAt: 'a/node-1' });
    await runMigration(vmm(spec), deps(p.move), new AbortController().signal);
    expect(status.phase).toBe('Failed');
    expect(p.cutovers).toEqual(['a/node-1']);
    expect(status.vms?.map((v) => [v.name, v.phase])).toEqual([['node-1', 'RolledBack'], ['node-2', 'Pending'], ['node-3', 'Pending']]);
    expect(status.vms?.find((v) => v.name === 'node-2')?.message).toMatch(/^not moved: not cut over: a\/node-1 failed at step verify: guest data differ .*; its mirror ahead was dropped, the VM never stopped$/);
    expect((await store.moves('uid-1')).map((m) => [m.vm, m.phase])).toEqual([['node-1', 'RolledBack'], ['node-2', 'Pending'], ['node-3', 'Pending']]);
  });
});

describe('runner: room promised to moves in flight (a reservation per move)', () => {
  it('two environments moving at once to one host: the second VM waits while the first holds the room it will fill, and goes once that move ended', async () => {
    // room for one 64 MiB VM above the 1 GiB reserve, not for two; the host reading does not change while the copies run
    const oneVm: HostCapacity = { ...roomy('h2'), diskFreeBytes: GiB + 100 * 1048576 };
    const capacity = { host: async (h: HostSpec) => (h.name === 'h2' ? oneVm : roomy(h.name)), vmBytes: async () => 64 * 1048576 };
    spec = { environments: ['a', 'b'], targetHost: 'h2', maxParallelEnvironments: 2, hostLimits: { maxInboundPerHost: 2 } };
    const t = tracker(() => 50);
    const end = await runMigration(vmm(spec), deps(t.move, { capacity, reservations: new HostReservations() }), new AbortController().signal);
    // before reservations both checks read the same free space and both copies started: 128 MiB into 100 MiB
    expect(t.peaks.vms).toBe(1);
    expect(['done', 'retry']).toContain(end.kind);
    expect(JSON.stringify(status.conditions)).toMatch(/h2 has no room for [ab]\/node-1: disk: 36\.0 MiB free/);
  });
});

describe('runner: every status it writes says which generation of the spec it acts on', () => {
  it('an edit during the run (generation 1 → 3): the run goes on with it, and the final status and every condition carry generation 3', async () => {
    spec = { environments: ['a'], targetHost: 'h2' };
    let generation = 1;
    const t = tracker((ctx) => {
      // the spec is edited while the VMs move (say a bandwidth limit, then a drain timeout)
      if (ctx.vm.name === 'node-2') generation = 3;
      return 5;
    });
    await runMigration(vmm(spec), deps(t.move, { latest: () => ({ ...vmm(spec), metadata: { ...vmm(spec).metadata, generation } }) }), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
    expect(status.observedGeneration).toBe(3);
    expect(status.conditions?.map((c) => [c.type, c.observedGeneration])).toEqual(status.conditions?.map((c) => [c.type, 3]));
  });

  it('each VM moves with the spec as it is when its turn comes (a limit edited mid-run applies to the next VM)', async () => {
    let limit = 10;
    spec = { environments: ['a'], targetHost: 'h2', transfer: { bandwidthLimitMiBps: 10 } };
    const seen: number[] = [];
    const move = async (ctx: MoveContext): Promise<MoveResult> => {
      seen.push((ctx.settings.bandwidthLimitBytesPerSec ?? 0) / 1048576);
      limit = 20;
      return { outage: undefined, nodeReadyMs: 1, bytes: 1, resumedFrom: 'cordon', mode: 'cold' };
    };
    await runMigration(vmm(spec), deps(move, { latest: () => vmm({ ...spec, transfer: { bandwidthLimitMiBps: limit } }) }), new AbortController().signal);
    expect(seen).toEqual([10, 20, 20]);
  });
});
