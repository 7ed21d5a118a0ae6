import { liveness, noteWait } from './budget.js';

/**
 * Polls `fn` every `intervalMs` until it returns something truthy; fails naming `what` after the
 * liveness budget `timeoutMs` (scaled by VMOPS_TIME_SCALE, see budget.ts).
 */
export async function until<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined | false>, intervalMs = 200): Promise<T> {
  const budget = liveness(timeoutMs);
  const t0 = performance.now();
  const deadline = Date.now() + budget;
  for (;;) {
    const v = await fn();
    if (v) {
      noteWait(what, budget, performance.now() - t0);
      return v;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${budget} ms: ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
