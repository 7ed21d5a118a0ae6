/**
 * Liveness budgets of the test world: how long a wait may take before the test gives up. They are not
 * properties — a test asserts what must be true, never how fast — so they may scale with one setting,
 * VMOPS_TIME_SCALE (scripts/torture.sh sets it with --slow); a property bound never uses this.
 *
 * Every wait that used more than half its budget is noted in VMOPS_BUDGET_REPORT (JSON lines), which
 * the torture run prints at its end: the waits that are closest to failing a loaded run.
 */
import { appendFileSync } from 'node:fs';

export const TIME_SCALE = Math.max(1, Number(process.env.VMOPS_TIME_SCALE ?? '1') || 1);

/** A liveness budget of `ms` on an unloaded machine, scaled for a slowed one. */
export function liveness(ms: number): number {
  return Math.round(ms * TIME_SCALE);
}

/** Records a finished wait that used more than half of its budget (no-op unless VMOPS_BUDGET_REPORT is set). */
export function noteWait(what: string, budgetMs: number, usedMs: number): void {
  const file = process.env.VMOPS_BUDGET_REPORT;
  if (!file || usedMs <= budgetMs / 2) return;
  const where = (new Error().stack ?? '').split('\n').find((l) => /\/test\/(integration|e2e)\//.test(l))?.trim().replace(/^at /, '') ?? '';
  try {
    appendFileSync(file, `${JSON.stringify({ what, budgetMs, usedMs: Math.round(usedMs), share: Math.round((usedMs / budgetMs) * 100) / 100, where })}\n`);
  } catch {
    // a report is best effort; the wait itself already decided
  }
}

/** Runs `wait` against a budget and notes its use (see noteWait); the budget itself is the caller's. */
export async function timed<T>(what: string, budgetMs: number, wait: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  try {
    return await wait();
  } finally {
    noteWait(what, budgetMs, performance.now() - t0);
  }
}
