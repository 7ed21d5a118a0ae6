/** Token bucket on the operator's pipe: take(n) resolves once n bytes may pass at `bytesPerSecond`. */
export class TokenBucket {
  private tokens: number;
  private last = performance.now();

  constructor(
    readonly bytesPerSecond: number,
    /** bytes allowed in a burst; small, so short copies are limited too */
    readonly burst = Math.max(64 * 1024, Math.floor(bytesPerSecond / 20)),
  ) {
    if (!(bytesPerSecond > 0)) throw new Error(`invalid bandwidth limit ${bytesPerSecond}`);
    this.tokens = burst;
  }

  async take(n: number, signal?: AbortSignal): Promise<void> {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
    this.tokens -= n;
    if (this.tokens >= 0) return;
    const waitMs = (-this.tokens / this.bytesPerSecond) * 1000;
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(done, waitMs);
      function done(): void {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }
      function onAbort(): void {
        clearTimeout(t);
        reject(signal?.reason instanceof Error ? signal.reason : new Error('aborted'));
      }
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }
}

/**
 * One budget per host, shared by every copy in flight that leaves or arrives there: a copy takes
 * its bytes from its source's and its target's bucket, so the sum over a host's copies stays
 * within the budget (spec.hostLimits.bandwidthMiBpsPerHost).
 */
export class HostBandwidth {
  private readonly buckets = new Map<string, TokenBucket>();

  constructor(readonly bytesPerSecondPerHost: number) {}

  /** The buckets a copy from `source` to `target` draws from. */
  forCopy(source: string, target: string): TokenBucket[] {
    return [source, target].map((h) => {
      let b = this.buckets.get(h);
      if (!b) this.buckets.set(h, (b = new TokenBucket(this.bytesPerSecondPerHost)));
      return b;
    });
  }
}

/**
 * QEMU's own streams (pre-copy mirrors, the live disk mirror and RAM stream) go through the tunnel,
 * not the token buckets: each move gets a fixed share of the per-host budget, small enough that every
 * stream a host may carry at once (maxOutboundPerHost + maxInboundPerHost moves) fits in it together.
 */
export function qemuStreamShare(bytesPerSecondPerHost: number, maxOutboundPerHost: number, maxInboundPerHost: number): number {
  return Math.max(1, Math.floor(bytesPerSecondPerHost / Math.max(1, maxOutboundPerHost + maxInboundPerHost)));
}

/** Rate and ETA from progress samples over a sliding window (for status lines and the demo). */
export class RateMeter {
  private samples: Array<{ t: number; done: number }> = [];

  constructor(private readonly windowMs = 5000) {}

  update(done: number, now = Date.now()): void {
    this.samples.push({ t: now, done });
    while (this.samples.length > 2 && (this.samples[0] as { t: number }).t < now - this.windowMs) this.samples.shift();
  }

  /** bytes per second over the window; 0 until two samples exist */
  get bytesPerSecond(): number {
    const a = this.samples[0];
    const b = this.samples[this.samples.length - 1];
    if (!a || !b || b.t <= a.t) return 0;
    return Math.max(0, ((b.done - a.done) * 1000) / (b.t - a.t));
  }

  /** seconds left at the current rate; undefined while the rate is unknown */
  etaSeconds(total: number): number | undefined {
    const last = this.samples[this.samples.length - 1];
    const rate = this.bytesPerSecond;
    if (!last || rate <= 0) return undefined;
    return Math.max(0, (total - last.done) / rate);
  }
}
