/**
 * One vocabulary for a move: the step table (src/migrate/steps.ts STEP_TABLE) from which every list
 * of steps is derived, and the one fold of a VM's journal (src/migrate/journal.ts journalFacts) that
 * every reader asks.
 */
import { describe, expect, it } from 'vitest';
import { journalFacts, type JournalLine } from '../../src/migrate/journal.js';
import { changesSomething, NOTHING_CHANGED_STEPS, STEP_NAMES, STEP_TABLE } from '../../src/migrate/steps.js';

const j = (...lines: string[]): JournalLine[] => lines.map((l) => {
  const [step, event] = l.split(':');
  return { step: step!, event: event! };
});

describe('the step table', () => {
  it('names every step once, in flow order', () => {
    expect(STEP_NAMES).toEqual(['precheck', 'quorum', 'mirror', 'turn', 'window', 'cordon', 'drain', 'mirrorSync', 'leaderMove', 'lbOut', 'live', 'stop', 'converge',
      'fence', 'transfer', 'verify', 'start', 'nodeReady', 'memberHealthy', 'lbIn', 'uncordon', 'commit', 'cleanup', 'rollback']);
  });

  it('the steps that change nothing are the check and the gates; a name it does not know changes something', () => {
    expect([...NOTHING_CHANGED_STEPS]).toEqual(['precheck', 'quorum', 'turn', 'window']);
    expect(changesSomething('cordon')).toBe(true);
    expect(changesSomething('turn')).toBe(false);
    expect(STEP_NAMES.filter((n) => STEP_TABLE[n].planned)).toEqual(['turn', 'window']);
  });

  it('Event reasons: the effects a person follows, none for the checks and waits', () => {
    expect(Object.fromEntries(STEP_NAMES.filter((n) => STEP_TABLE[n].eventReason).map((n) => [n, STEP_TABLE[n].eventReason]))).toEqual({
      mirror: 'MirrorStarted', cordon: 'Cordoned', drain: 'Drained', leaderMove: 'LeaderMoved', lbOut: 'RemovedFromLoadBalancer', live: 'LiveMigrated',
      stop: 'VMStopped', fence: 'SourceFenced', transfer: 'FilesCopied', verify: 'CopyVerified', start: 'VMStarted', nodeReady: 'NodeReady',
      lbIn: 'AddedToLoadBalancer', uncordon: 'Uncordoned', cleanup: 'SourceCleaned', rollback: 'RolledBack',
    });
    for (const n of NOTHING_CHANGED_STEPS) expect(STEP_TABLE[n].eventReason).toBeUndefined();
  });
});

describe('journalFacts', () => {
  it('an empty journal, or one of checks and gates only, touched nothing', () => {
    expect(journalFacts([])).toMatchObject({ touched: false, settled: false, targetRan: false });
    expect(journalFacts(j('precheck:begin', 'precheck:end', 'quorum:begin', 'quorum:end', 'turn:begin')).touched).toBe(false);
    // an administrator's unlock (a step this table does not know) counts as touching: fail safe
    expect(journalFacts(j('precheck:begin', 'unlock:begin', 'unlock:end')).touched).toBe(true);
  });

  it('a cold move: halted for the cut-over after the stop ended, may have run once start began, ran once it ended, settled after the cleanup', () => {
    const lines = j('precheck:begin', 'precheck:end', 'cordon:begin', 'cordon:end', 'stop:begin', 'stop:end', 'transfer:begin', 'transfer:end', 'start:begin');
    expect(journalFacts(lines)).toMatchObject({ touched: true, haltedForCutover: true, targetRan: true, targetStarted: false, settled: false });
    expect(journalFacts([...lines, ...j('start:end', 'nodeReady:begin', 'nodeReady:end', 'cleanup:begin', 'cleanup:end')])).toMatchObject({ targetStarted: true, settled: true });
  });

  it('a rollback undoes what came before it; the move is settled when the rollback ended', () => {
    const f = journalFacts(j('cordon:begin', 'mirror:begin', 'converge:end', 'stop:end', 'start:begin', 'start:end', 'rollback:begin', 'rollback:end'));
    expect(f).toMatchObject({ touched: true, targetRan: false, targetStarted: false, converged: false, haltedForCutover: false, settled: true });
  });

  it('the mirror converged once converge ended; a new mirror starts over', () => {
    expect(journalFacts(j('mirror:begin', 'converge:begin', 'converge:end')).converged).toBe(true);
    expect(journalFacts(j('mirror:begin', 'converge:end', 'mirror:begin')).converged).toBe(false);
  });
});
