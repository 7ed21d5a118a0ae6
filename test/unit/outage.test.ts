/**
 * The student's outage, the headline figure of a move (src/migrate/outage.ts): its edges and parts,
 * and how a move finds them — in this run, or in the journal of the run before it.
 */
import { describe, expect, it } from 'vitest';
import { journalFacts } from '../../src/migrate/journal.js';
import { outageOf } from '../../src/migrate/outage.js';
import { moveVm } from '../../src/migrate/vmMove.js';
import { context } from './moveDoubles.js';

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('outageOf', () => {
  it('a stopped guest: from the stop command to node Ready, in three contiguous parts; stop→start is the smaller share', () => {
    const o = outageOf({ mode: 'cold', stoppedAt: 1000, haltedAt: 3500, startingAt: 4700, runningAt: 5200, readyAt: 16_900 })!;
    expect(o).toEqual({ seconds: 15.9, until: 'NodeReady', startedAt: '1970-01-01T00:00:01.000Z', endedAt: '1970-01-01T00:00:16.900Z', shutdownSeconds: 2.5, copySeconds: 1.2, bootSeconds: 12.2, stopToStartSeconds: 4.2 });
    expect(o.shutdownSeconds! + o.copySeconds! + o.bootSeconds!).toBeCloseTo(o.seconds, 6);
  });

  it('a live move: the guest was paused, never stopped — its outage ends when it resumes', () => {
    expect(outageOf({ mode: 'live', stoppedAt: 1000, runningAt: 1230, readyAt: 9000 })).toEqual({ seconds: 0.23, until: 'GuestResumed', startedAt: '1970-01-01T00:00:01.000Z', endedAt: '1970-01-01T00:00:01.230Z', stopToStartSeconds: 0.23 });
  });

  it('a stopped guest whose node was never seen Ready has no outage figure, rather than the smaller stop→start in its place', () => {
    expect(outageOf({ mode: 'precopy', stoppedAt: 1000, haltedAt: 2000, runningAt: 3000 })).toBeUndefined();
  });
});

describe('the outage edges in the journal (journalFacts)', () => {
  const at = (ms: number) => new Date(ms).toISOString();
  it('takes the last stop and start since the last rollback', () => {
    const m = journalFacts([
      { step: 'stop', event: 'begin', at: at(100) }, { step: 'stop', event: 'end', at: at(200) },
      { step: 'rollback', event: 'begin', at: at(300) }, { step: 'rollback', event: 'end', at: at(400) },
      { step: 'stop', event: 'begin', at: at(1000) }, { step: 'stop', event: 'end', at: at(1500) },
      { step: 'start', event: 'begin', at: at(2000) }, { step: 'start', event: 'fail', at: at(2100) },
      { step: 'start', event: 'begin', at: at(2500) }, { step: 'start', event: 'end', at: at(2600) },
    ]).outage;
    expect(m).toEqual({ stoppedAt: 1000, haltedAt: 1500, startingAt: 2500, runningAt: 2600 });
  });
  it('a rollback after the stop forgets it', () => {
    expect(journalFacts([{ step: 'stop', event: 'begin', at: at(1) }, { step: 'rollback', event: 'begin', at: at(2) }]).outage).toEqual({});
  });
});

describe('a move reports the outage', () => {
  it('cold: the outage runs from the stop command to the node seen Ready, holds the boot, and is longer than stop→start', async () => {
    const { ctx, guest, source, target } = await context('running', 'absent');
    const at: Record<string, number> = {};
    const stop = source.stopVm;
    source.stopVm = async (...a) => { at.stopCalled = Date.now(); await pause(40); return stop(...a); };
    const start = target.startVm;
    target.startVm = async (...a) => { at.startCalled = Date.now(); return start(...a); };
    guest.waitNodeReady = async () => { await pause(60); at.readySeen = Date.now(); };
    const r = await moveVm(ctx);
    const o = r.outage!;
    expect(o.until).toBe('NodeReady');
    // its edges enclose what the student could not use: from before the stop reached QEMU to after the node was Ready
    expect(Date.parse(o.startedAt)).toBeLessThanOrEqual(at.stopCalled!);
    expect(Date.parse(o.endedAt)).toBeGreaterThanOrEqual(at.readySeen!);
    // the boot is from the target QEMU's launch to node Ready; the parts add up to the whole
    expect(Date.parse(o.endedAt) - o.bootSeconds! * 1000).toBeLessThanOrEqual(at.startCalled! + 1);
    expect(o.shutdownSeconds! + o.copySeconds! + o.bootSeconds!).toBeCloseTo(o.seconds, 2);
    expect(o.seconds).toBeGreaterThan(o.stopToStartSeconds);
  });

  it('resumed after the stop: the outage runs from the stop the journal holds, through the time no operator ran', async () => {
    const { ctx, store } = await context('stopped', 'running');
    const j = (step: string, event: 'begin' | 'end') => store.journal('uid', 'e', 'controller-1', step, event);
    await j('stop', 'begin');
    await j('stop', 'end');
    await j('start', 'begin');
    await j('start', 'end');
    const stopJournaled = (await store.journalEntries('uid')).find((e) => e.step === 'stop' && e.event === 'begin')!.at;
    await pause(20); // the operator was down here
    const resumed = Date.now();
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('nodeReady');
    expect(r.outage).toMatchObject({ until: 'NodeReady', startedAt: stopJournaled });
    expect(Date.parse(r.outage!.endedAt)).toBeGreaterThanOrEqual(resumed);
  });

  it('a VM that was already down when its move began (no stop anywhere) gets no outage figure', async () => {
    const { ctx } = await context('stopped', 'absent');
    const r = await moveVm(ctx);
    expect(r.outage).toBeUndefined();
  });
});
