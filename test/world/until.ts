/** Polls `fn` every `intervalMs` until it returns something truthy; fails naming `what` after `timeoutMs`. */
export async function until<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined | false>, intervalMs = 200): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
