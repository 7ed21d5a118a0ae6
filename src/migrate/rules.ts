/**
 * Migration-level rules, kept out of the controller (which only maps them to Kubernetes): how a
 * move's outcome ends the migration, and how long a not-yet-safe verdict may hold it.
 */
import type { MoveOutcome } from './vmMove.js';

/** What the migration does after a VM move ended with this outcome. */
export type MigrationVerdict = 'continue' | 'wait' | 'fail' | 'handover';

export function afterMove(outcome: MoveOutcome | 'moved'): MigrationVerdict {
  switch (outcome) {
    case 'moved': return 'continue';
    // not safe yet: nothing was touched, check again later (until safetyWaitTimeout)
    case 'waiting': return 'wait';
    // stopped on purpose (leadership lost, shutdown): the next leader resumes from the journal
    case 'interrupted': return 'handover';
    // untouched, rolled back or stuck: terminal until the spec changes
    default: return 'fail';
  }
}

/**
 * A wait that began at `since`: fail once it has lasted `timeoutMs`, otherwise check again after a
 * backoff that grows with the time already waited (2 s … 30 s).
 */
export function safetyWait(sinceMs: number, nowMs: number, timeoutMs: number): { fail: true; waitedMs: number } | { fail: false; retryAfterMs: number } {
  const waitedMs = nowMs - sinceMs;
  if (waitedMs >= timeoutMs) return { fail: true, waitedMs };
  return { fail: false, retryAfterMs: Math.min(30_000, Math.max(2000, waitedMs / 4)) };
}
