import { describe, expect, it } from 'vitest';
import type { PlanEntry } from '../../src/api/types.js';
import { nextMoves, windowState, type EnvironmentQueue, type FleetLimits, type ScheduleInput } from '../../src/migrate/fleet.js';

const VMS = ['beachhead', 'node-1', 'node-2', 'node-3', 'controller-1', 'controller-2', 'controller-3'];
function plan(envs: Array<{ env: string; from: string; to: string }>): PlanEntry[] {
  let order = 0;
  return envs.flatMap(({ env, from, to }) => VMS.map((vm) => ({ order: ++order, environment: env, vm, role: 'worker' as const, node: `${env}-${vm}`, from, to })));
}
function queues(entries: PlanEntry[], done: Set<PlanEntry> = new Set()): EnvironmentQueue[] {
  const envs = [...new Set(entries.map((e) => e.environment))];
  return envs.map((environment) => {
    const mine = entries.filter((e) => e.environment === environment);
    return { environment, pending: mine.filter((e) => !done.has(e)), started: mine.some((e) => done.has(e)) };
  });
}
const limits = (over: Partial<FleetLimits> = {}): FleetLimits => ({ maxParallelEnvironments: 2, maxDisruptedEnvironments: 2, maxOutboundPerHost: 4, maxInboundPerHost: 4, ...over });
const base = (entries: PlanEntry[], over: Partial<ScheduleInput> = {}): ScheduleInput => ({
  queues: queues(entries), inFlight: [], limits: limits(), cancelled: new Set(), window: { notBeforeMs: undefined, notAfterMs: undefined }, nowMs: 0, estimatedMoveMs: 0, ...over,
});

/** a seeded PRNG so the simulation is reproducible */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

describe('nextMoves: which environment may start its next VM', () => {
  it('starts the first VM of up to maxParallelEnvironments environments, in plan order', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }, { env: 'c', from: 'h1', to: 'h2' }]);
    const d = nextMoves(base(p));
    expect(d.start.map((e) => `${e.environment}/${e.vm}`)).toEqual(['a/beachhead', 'b/beachhead']);
    expect(d.waiting).toEqual([{ environment: 'c', reason: '2 environment(s) are moving, spec.maxParallelEnvironments is 2' }]);
  });

  it('finishes started environments before beginning new ones', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }, { env: 'c', from: 'h1', to: 'h2' }]);
    // a is half done and between VMs, b in flight: c must not start even though only one VM is in flight
    const done = new Set(p.filter((e) => e.environment === 'a').slice(0, 3));
    const bFirst = p.find((e) => e.environment === 'b')!;
    const d = nextMoves(base(p, { queues: queues(p, done), inFlight: [bFirst] }));
    expect(d.start.map((e) => `${e.environment}/${e.vm}`)).toEqual(['a/node-3']);
    expect(d.waiting.map((w) => w.environment)).toEqual(['c']);
  });

  it('an environment moving its last VM still counts against maxParallelEnvironments', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }]);
    const aLast = p.filter((e) => e.environment === 'a').at(-1)!;
    const done = new Set(p.filter((e) => e.environment === 'a' && e !== aLast));
    const d = nextMoves(base(p, { queues: queues(p, done).map((q) => (q.environment === 'a' ? { ...q, pending: [] } : q)), inFlight: [aLast], limits: limits({ maxParallelEnvironments: 1, maxDisruptedEnvironments: 5 }) }));
    expect(d.start).toEqual([]);
    expect(d.waiting).toEqual([{ environment: 'b', reason: '1 environment(s) are moving, spec.maxParallelEnvironments is 1' }]);
  });

  it('never starts a second VM of an environment with one in flight', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }]);
    const d = nextMoves(base(p, { inFlight: [p[0]!], limits: limits({ maxParallelEnvironments: 5, maxDisruptedEnvironments: 5 }) }));
    expect(d.start).toEqual([]);
  });

  it('honours the disruption cap separately from parallelism', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }, { env: 'c', from: 'h1', to: 'h2' }]);
    const d = nextMoves(base(p, { limits: limits({ maxParallelEnvironments: 3, maxDisruptedEnvironments: 1 }) }));
    expect(d.start.map((e) => e.environment)).toEqual(['a']);
    expect(d.waiting[0]!.reason).toBe('1 environment(s) have a VM down, spec.maxDisruptedEnvironments is 1');
  });

  it('honours per-host outbound and inbound limits', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h2' }, { env: 'c', from: 'h4', to: 'h3' }, { env: 'd', from: 'h1', to: 'h3' }]);
    const d = nextMoves(base(p, { limits: limits({ maxParallelEnvironments: 4, maxDisruptedEnvironments: 4, maxOutboundPerHost: 2, maxInboundPerHost: 1 }) }));
    expect(d.start.map((e) => e.environment)).toEqual(['a', 'c']);
    expect(d.waiting).toEqual([
      { environment: 'b', reason: 'h2 already receives 1 VM(s), spec.hostLimits.maxInboundPerHost is 1' },
      { environment: 'd', reason: 'h3 already receives 1 VM(s), spec.hostLimits.maxInboundPerHost is 1' },
    ]);
    const out = nextMoves(base(p, { limits: limits({ maxParallelEnvironments: 4, maxDisruptedEnvironments: 4, maxOutboundPerHost: 1 }) }));
    expect(out.start.map((e) => e.environment)).toEqual(['a', 'c']);
    expect(out.waiting[0]!.reason).toBe('h1 already sends 1 VM(s), spec.hostLimits.maxOutboundPerHost is 1');
  });

  it('skips cancelled environments', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }, { env: 'c', from: 'h1', to: 'h3' }]);
    const d = nextMoves(base(p, { cancelled: new Set(['b']) }));
    expect(d.start.map((e) => e.environment)).toEqual(['a', 'c']);
    expect(d.waiting).toEqual([]);
  });

  it('pre-copy mirrors up to mirrorAhead of an environment\'s next VMs behind the one moving; other environments\' next VMs come first for the host limits', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }]);
    const [a1, a2, a3, a4] = p.filter((e) => e.environment === 'a');
    // a/beachhead moving: a/node-1 and a/node-2 mirror ahead, b starts its first VM
    const d = nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(1), started: true } : q)), inFlight: [a1!], mirrorAhead: 2 }));
    expect(d.start.map((e) => `${e.environment}/${e.vm}`)).toEqual(['b/beachhead']);
    // h1 sends 4 then (maxOutboundPerHost 4): b's next VMs find no slot left
    expect(d.ahead.map((e) => `${e.environment}/${e.vm}`)).toEqual(['a/node-1', 'a/node-2']);
    expect(nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(1), started: true } : q)), inFlight: [a1!], mirrorAhead: 2, limits: limits({ maxOutboundPerHost: 6 }) })).ahead.map((e) => `${e.environment}/${e.vm}`))
      .toEqual(['a/node-1', 'a/node-2', 'b/node-1', 'b/node-2']);
    // the disruption cap counts environments: a's moves mirroring ahead do not keep b from starting
    const capped = nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(3), started: true } : q)), inFlight: [a1!, a2!, a3!], limits: limits({ maxDisruptedEnvironments: 2, maxOutboundPerHost: 6 }), mirrorAhead: 2 }));
    expect(capped.start.map((e) => e.vm)).toEqual(['beachhead']);
    expect(capped.ahead.map((e) => `${e.environment}/${e.vm}`)).toEqual(['b/node-1', 'b/node-2']);
    // mirrors are transfers: with 3 outbound from h1, b's first VM takes the last slot, nothing mirrors ahead
    const tight = nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(2), started: true } : q)), inFlight: [a1!, a2!], limits: limits({ maxOutboundPerHost: 3 }), mirrorAhead: 6 }));
    expect(tight.start.map((e) => `${e.environment}/${e.vm}`)).toEqual(['b/beachhead']);
    expect(tight.ahead).toEqual([]);
    // not behind a VM still at its checks (a quorum gate may end its run as a wait): only once it is underway
    const notYet = nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(1), started: true } : q)), inFlight: [a1!], mirrorAhead: 2, underway: new Set() }));
    expect(notYet.ahead).toEqual([]);
    expect(nextMoves(base(p, { queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(1), started: true } : q)), inFlight: [a1!], mirrorAhead: 2, underway: new Set(['a']) })).ahead.map((e) => e.vm)).toEqual(['node-1', 'node-2']);
    // nothing ahead without a VM of the environment moving, nor with mirrorAhead 0
    expect(nextMoves(base(p, { mirrorAhead: 2, limits: limits({ maxParallelEnvironments: 1 }) })).ahead.map((e) => e.vm)).toEqual(['node-1', 'node-2']);
    expect(nextMoves(base(p, { inFlight: [a4!], queues: queues(p).map((q) => (q.environment === 'a' ? { ...q, pending: q.pending.slice(4), started: true } : q)), mirrorAhead: 0 })).ahead).toEqual([]);
  });

  it('pre-copy starts before the window (warm migration: the flow holds the cut-over), never after it closed; cold waits', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }, { env: 'b', from: 'h1', to: 'h3' }, { env: 'c', from: 'h1', to: 'h2' }]);
    const opens = Date.parse('2026-11-27T06:00:00Z');
    const closed = { notBeforeMs: opens, notAfterMs: opens + 600_000 };
    const warm = nextMoves(base(p, { window: closed, nowMs: opens - 5000, warmBeforeWindow: true }));
    expect(warm.start.map((e) => `${e.environment}/${e.vm}`)).toEqual(['a/beachhead', 'b/beachhead']);
    expect(warm.windowMessage).toBeUndefined();
    expect(nextMoves(base(p, { window: closed, nowMs: opens - 5000 })).start).toEqual([]);
    const after = nextMoves(base(p, { window: closed, nowMs: opens + 600_001, warmBeforeWindow: true }));
    expect(after.start).toEqual([]);
    expect(after.windowMessage).toMatch(/the window closed at 2026-11-27T06:10:00.000Z/);
  });

  it('daily windows (UTC): open inside, the next opening otherwise, across midnight, and not past notAfter', () => {
    const day = Date.parse('2026-11-27T00:00:00Z');
    const at = (hhmm: string, plusDays = 0) => day + plusDays * 86_400_000 + (Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3, 5))) * 60_000;
    const nightly = { notBeforeMs: undefined, notAfterMs: undefined, daily: { startS: 22 * 3600, endS: 4 * 3600 } };
    expect(windowState(nightly, at('23:00'))).toEqual({ open: true });
    expect(windowState(nightly, at('03:00'))).toEqual({ open: true }); // yesterday's window, after midnight
    expect(windowState(nightly, at('12:00'))).toEqual({ open: false, reason: 'the daily window opens at 2026-11-27T22:00:00.000Z', opensAtMs: at('22:00') });
    // a 2-hour move at 03:00 would end after 04:00: the next window
    expect(windowState(nightly, at('03:00'), 7_200_000)).toEqual({ open: false, reason: 'a move takes about 7200 s and the daily window closes at 2026-11-27T04:00:00.000Z; the next opens at 2026-11-27T22:00:00.000Z', opensAtMs: at('22:00') });
    const lunch = { notBeforeMs: undefined, notAfterMs: undefined, daily: { startS: 12 * 3600, endS: 13 * 3600 } };
    expect(windowState(lunch, at('13:30'))).toMatchObject({ open: false, opensAtMs: at('12:00', 1) });
    expect(windowState(lunch, at('12:30'))).toEqual({ open: true });
    // the next opening after notAfter: never by itself
    const bounded = { ...lunch, notAfterMs: at('18:00') };
    expect(windowState(bounded, at('13:30'))).toEqual({ open: false, reason: 'the daily window opens at 2026-11-28T12:00:00.000Z, after spec.window.notAfter 2026-11-27T18:00:00.000Z; extend it to continue', opensAtMs: undefined });
  });

  it('keeps cutovers inside the window and says when it opens', () => {
    const p = plan([{ env: 'a', from: 'h1', to: 'h2' }]);
    const opens = Date.parse('2026-11-27T06:00:00Z');
    const before = nextMoves(base(p, { window: { notBeforeMs: opens, notAfterMs: undefined }, nowMs: opens - 5000 }));
    expect(before.start).toEqual([]);
    expect(before.windowReopensAtMs).toBe(opens);
    expect(before.windowMessage).toBe('the window opens at 2026-11-27T06:00:00.000Z');
    expect(nextMoves(base(p, { window: { notBeforeMs: opens, notAfterMs: undefined }, nowMs: opens })).start).toHaveLength(1);
    // a move expected to take 60 s does not start 30 s before the window closes
    const late = nextMoves(base(p, { window: { notBeforeMs: opens, notAfterMs: opens + 600_000 }, nowMs: opens + 570_000, estimatedMoveMs: 60_000 }));
    expect(late.start).toEqual([]);
    expect(late.windowMessage).toBe('a move takes about 60 s and the window closes at 2026-11-27T06:10:00.000Z; extend spec.window.notAfter to continue');
    expect(late.windowReopensAtMs).toBeUndefined();
    expect(windowState({ notBeforeMs: undefined, notAfterMs: opens }, opens + 1)).toEqual({ open: false, reason: 'the window closed at 2026-11-27T06:00:00.000Z; extend spec.window.notAfter to continue', opensAtMs: undefined });
  });

  it('simulated evacuation: every invariant holds at every instant and everything finishes', () => {
    const hosts = ['h2', 'h3', 'h4'];
    const p = plan(Array.from({ length: 12 }, (_, i) => ({ env: `e${String(i).padStart(2, '0')}`, from: i % 4 === 0 ? 'h5' : 'h1', to: hosts[i % 3]! })));
    for (const [par, dis, out, inb] of [[1, 1, 1, 1], [2, 2, 2, 2], [4, 3, 2, 1], [8, 8, 3, 3]] as const) {
      const lim = limits({ maxParallelEnvironments: par, maxDisruptedEnvironments: dis, maxOutboundPerHost: out, maxInboundPerHost: inb });
      const rand = rng(par * 31 + dis);
      const done = new Set<PlanEntry>();
      let flying: Array<{ e: PlanEntry; until: number }> = [];
      let now = 0;
      let peakEnvs = 0;
      const finishedEnvs: string[] = [];
      while (done.size < p.length) {
        const d = nextMoves({ ...base(p), queues: queues(p, done), inFlight: flying.map((f) => f.e), limits: lim, nowMs: now });
        for (const e of d.start) flying.push({ e, until: now + 1 + Math.floor(rand() * 10) });
        const envsInFlight = flying.map((f) => f.e.environment);
        expect(new Set(envsInFlight).size).toBe(envsInFlight.length); // one VM per environment
        expect(flying.length).toBeLessThanOrEqual(dis);
        for (const h of ['h1', 'h5']) expect(flying.filter((f) => f.e.from === h).length).toBeLessThanOrEqual(out);
        for (const h of hosts) expect(flying.filter((f) => f.e.to === h).length).toBeLessThanOrEqual(inb);
        const active = queues(p, done).filter((q) => envsInFlight.includes(q.environment) || (q.started && q.pending.length > 0)).length;
        expect(active).toBeLessThanOrEqual(par);
        peakEnvs = Math.max(peakEnvs, active);
        expect(flying.length).toBeGreaterThan(0); // never stuck
        now = Math.min(...flying.map((f) => f.until));
        for (const f of flying.filter((x) => x.until === now)) {
          done.add(f.e);
          if (p.filter((e) => e.environment === f.e.environment).every((e) => done.has(e))) finishedEnvs.push(f.e.environment);
        }
        flying = flying.filter((x) => x.until !== now);
      }
      expect(finishedEnvs).toHaveLength(12);
      // the parallelism allowed is really used (two source hosts, `out` moves each)
      expect(peakEnvs).toBeGreaterThanOrEqual(Math.min(par, dis, 2 * out));
    }
  });
});
