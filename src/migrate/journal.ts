/**
 * What one VM's journal says happened, folded once: every reader (the flow's resume, the fencing of a
 * halted source, release-source, the store's moves in flight, the outage of a resumed move) asks these
 * facts instead of walking the entries with its own reset rules. A rollback undoes what came before it:
 * the source runs again and is the VM's only copy.
 */
import { NOTHING_CHANGED_STEPS, type StepName } from './steps.js';

export interface JournalLine {
  step: string;
  event: string;
  /** ISO time the entry was written (the operator's clock) */
  at?: string;
}

export interface JournalFacts {
  /** a `start` began since the last rollback: the VM may have run on the target (rule 2) */
  targetRan: boolean;
  /** a `start` ended since the last rollback: the target ran the guest */
  targetStarted: boolean;
  /** the pre-copy mirror converged onto the target (`converge` ended) since the last mirror began */
  converged: boolean;
  /** our `stop` ended since the last rollback: a halted source is a cut-over in progress, not the student's doing */
  haltedForCutover: boolean;
  /** a step other than a check or a gate was journaled: the move touched the VM */
  touched: boolean;
  /** the move is over: its last entry is the end of the cleanup or of a rollback */
  settled: boolean;
  /** the edges of the outage since the last rollback (ms, the operator's clock): the last stop and start */
  outage: { stoppedAt?: number; haltedAt?: number; startingAt?: number; runningAt?: number };
}

export function journalFacts(entries: readonly JournalLine[]): JournalFacts {
  const f: JournalFacts = { targetRan: false, targetStarted: false, converged: false, haltedForCutover: false, touched: false, settled: false, outage: {} };
  for (const e of entries) {
    // a step this release does not know (an administrator's unlock, say) counts as touching: fail safe
    if (!NOTHING_CHANGED_STEPS.has(e.step as StepName)) f.touched = true;
    const begin = e.event === 'begin';
    const end = e.event === 'end';
    const at = e.at === undefined ? Number.NaN : Date.parse(e.at);
    const mark = (k: keyof JournalFacts['outage']) => { if (Number.isFinite(at)) f.outage[k] = at; };
    switch (e.step) {
      case 'rollback':
        Object.assign(f, { targetRan: false, targetStarted: false, converged: false, haltedForCutover: false, outage: {} });
        break;
      case 'mirror':
        if (begin) f.converged = false;
        break;
      case 'converge':
        if (end) f.converged = true;
        break;
      case 'stop':
        if (begin) mark('stoppedAt');
        if (end) {
          f.haltedForCutover = true;
          mark('haltedAt');
        }
        break;
      case 'start':
        if (begin) {
          f.targetRan = true;
          mark('startingAt');
        }
        if (end) {
          f.targetStarted = true;
          mark('runningAt');
        }
        break;
    }
  }
  const last = entries.at(-1);
  f.settled = last !== undefined && (last.step === 'cleanup' || last.step === 'rollback') && last.event === 'end';
  return f;
}
