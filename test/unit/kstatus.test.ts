import { describe, expect, it } from 'vitest';
import type { VMMigrationStatus } from '../../src/api/types.js';
import { withKstatus } from '../../src/controller/kstatus.js';

const cond = (s: VMMigrationStatus, t: string) => s.conditions?.find((c) => c.type === t);

describe('kstatus conditions derived from the phase', () => {
  it('Running: Reconciling=True with the progress, Stalled=False', () => {
    const s = withKstatus({ phase: 'Running', observedGeneration: 3, progress: '2/7', message: 'moving 7 VM(s) to host02' });
    expect(cond(s, 'Reconciling')).toMatchObject({ status: 'True', reason: 'Running', message: 'Running: 2/7 VM(s) done; moving 7 VM(s) to host02', observedGeneration: 3 });
    expect(cond(s, 'Stalled')).toMatchObject({ status: 'False', observedGeneration: 3 });
  });

  it('Failed: Stalled=True with the Degraded reason, Reconciling=False', () => {
    const s = withKstatus({
      phase: 'Failed', observedGeneration: 1, message: 'unknown environment "x"',
      conditions: [{ type: 'Degraded', status: 'True', reason: 'InvalidReference', message: 'unknown environment "x"', lastTransitionTime: 't0' }],
    });
    expect(cond(s, 'Stalled')).toMatchObject({ status: 'True', reason: 'InvalidReference', message: 'unknown environment "x"' });
    expect(cond(s, 'Reconciling')?.status).toBe('False');
  });

  it('Succeeded: neither; Paused and Pending still reconcile', () => {
    expect(cond(withKstatus({ phase: 'Succeeded' }), 'Reconciling')?.status).toBe('False');
    expect(cond(withKstatus({ phase: 'Succeeded' }), 'Stalled')?.status).toBe('False');
    expect(cond(withKstatus({ phase: 'Paused' }), 'Reconciling')).toMatchObject({ status: 'True', reason: 'Paused' });
    expect(cond(withKstatus({ phase: 'Pending' }), 'Reconciling')).toMatchObject({ status: 'True', reason: 'Pending' });
  });

  it('keeps lastTransitionTime while the status stays, changes it on a transition; no phase → untouched', () => {
    const s = withKstatus({ phase: 'Running' }, new Date('2026-01-01T00:00:00Z'));
    withKstatus(s, new Date('2026-01-01T00:05:00Z'));
    expect(cond(s, 'Reconciling')?.lastTransitionTime).toBe('2026-01-01T00:00:00.000Z');
    s.phase = 'Succeeded';
    withKstatus(s, new Date('2026-01-01T00:09:00Z'));
    expect(cond(s, 'Reconciling')?.lastTransitionTime).toBe('2026-01-01T00:09:00.000Z');
    expect(cond(s, 'Stalled')?.lastTransitionTime).toBe('2026-01-01T00:00:00.000Z');
    expect(withKstatus({}).conditions).toBeUndefined();
  });

  it('a safety wait still reconciles, with the reason Progressing gives', () => {
    const s = withKstatus({
      phase: 'Running', waitingSince: '2026-01-01T00:00:00Z', progress: '3/7',
      conditions: [{ type: 'Progressing', status: 'False', reason: 'WaitingForQuorum', message: 'controller-2 NotReady', lastTransitionTime: 't' }],
    });
    expect(cond(s, 'Reconciling')).toMatchObject({ status: 'True', reason: 'WaitingForQuorum', message: 'waiting: controller-2 NotReady' });
    expect(cond(s, 'Stalled')?.status).toBe('False');
  });
});
