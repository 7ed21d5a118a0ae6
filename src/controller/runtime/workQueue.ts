import { log as rootLog, type Logger } from '../../util/log.js';

/** What a handler may return: nothing (done), or a request to look at the key again later. */
export type HandlerResult = void | { requeueAfterMs?: number };

export type WorkHandler<K extends string> = (key: K, signal: AbortSignal) => Promise<HandlerResult>;

/** Optional observers; wire them to Prometheus with `workQueueMetricsHooks()` from src/metrics/metrics.ts. */
export interface WorkQueueMetricsHooks {
  /** number of keys ready to be processed (not counting delayed or in-flight ones) */
  depth?(n: number): void;
  /** an add() that was not deduplicated away */
  add?(): void;
  /** a rate-limited (failure) requeue */
  retry?(): void;
  /** time a key spent between being processed */
  processed?(durationSeconds: number, ok: boolean): void;
}

export interface WorkQueueOptions {
  /** name for logs */
  name?: string;
  /** number of keys processed in parallel (distinct keys only); default 1 */
  concurrency?: number;
  /** first failure delay; default 500 ms */
  baseDelayMs?: number;
  /** cap for the failure delay; default 300 000 ms */
  maxDelayMs?: number;
  /** 0..1: the failure delay is multiplied by a random factor in [1 - jitter, 1]; default 0 */
  jitter?: number;
  metrics?: WorkQueueMetricsHooks;
  logger?: Logger;
}

export interface ShutdownOptions {
  /** process keys that are already queued (not delayed ones) before stopping; default false */
  drain?: boolean;
  /** stop waiting for in-flight handlers after this long; default: wait forever */
  timeoutMs?: number;
}

/**
 * A deduplicating, rate-limited work queue with the semantics of client-go's workqueue:
 *  - a key added several times while waiting is processed once;
 *  - a key is never processed concurrently with itself: re-adding a key that is being processed
 *    marks it dirty and it is queued again when the current run finishes;
 *  - failures (handler throws, or addRateLimited) requeue with per-key exponential backoff,
 *    reset by forget() (done automatically after a successful run).
 */
export class WorkQueue<K extends string = string> {
  private readonly queue: K[] = [];
  /** keys that need processing: queued, or to be queued when their in-flight run finishes */
  private readonly dirty = new Set<K>();
  private readonly processing = new Set<K>();
  private readonly delayed = new Map<K, { readyAt: number; timer: NodeJS.Timeout }>();
  private readonly failures = new Map<K, number>();
  private readonly waiters: Array<() => void> = [];
  private readonly abort = new AbortController();
  private shuttingDown = false;
  private drainOnShutdown = false;
  private workers: Promise<void>[] = [];
  private running = false;

  private readonly concurrency: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly jitter: number;
  private readonly metrics: WorkQueueMetricsHooks;
  private readonly log: Logger;

  private stats = { adds: 0, retries: 0, processed: 0, failed: 0 };

  constructor(opts: WorkQueueOptions = {}) {
    this.concurrency = Math.max(1, Math.floor(opts.concurrency ?? 1));
    this.baseDelayMs = opts.baseDelayMs ?? 500;
    this.maxDelayMs = opts.maxDelayMs ?? 300_000;
    this.jitter = Math.min(1, Math.max(0, opts.jitter ?? 0));
    this.metrics = opts.metrics ?? {};
    this.log = (opts.logger ?? rootLog).child({ component: 'workqueue', queue: opts.name ?? 'default' });
  }

  /** Keys ready to be processed (excludes delayed and in-flight keys). */
  get length(): number {
    return this.queue.length;
  }

  /** Keys waiting for a delay (addAfter / addRateLimited) to expire. */
  get delayedCount(): number {
    return this.delayed.size;
  }

  get processingCount(): number {
    return this.processing.size;
  }

  get isShuttingDown(): boolean {
    return this.shuttingDown;
  }

  /** Counters since construction: adds (after dedupe), retries (rate-limited requeues), processed, failed. */
  get counters(): { adds: number; retries: number; processed: number; failed: number } {
    return { ...this.stats };
  }

  /** Number of failures recorded for the key since the last forget(). */
  numRequeues(key: K): number {
    return this.failures.get(key) ?? 0;
  }

  /** Queue a key now. No-op if it is already queued or after shutdown(). */
  add(key: K): void {
    if (this.shuttingDown) return;
    const d = this.delayed.get(key);
    if (d) {
      clearTimeout(d.timer);
      this.delayed.delete(key);
    }
    if (this.dirty.has(key)) return;
    this.dirty.add(key);
    this.stats.adds++;
    this.metrics.add?.();
    if (this.processing.has(key)) return; // requeued by done()
    this.queue.push(key);
    this.depthChanged();
    this.wakeOne();
  }

  /** Queue a key after `ms`. If the key is already waiting with an earlier deadline, the earlier one wins. */
  addAfter(key: K, ms: number): void {
    if (this.shuttingDown) return;
    if (!(ms > 0)) {
      this.add(key);
      return;
    }
    const readyAt = Date.now() + ms;
    const existing = this.delayed.get(key);
    if (existing) {
      if (existing.readyAt <= readyAt) return;
      clearTimeout(existing.timer);
    }
    const timer = setTimeout(() => {
      const cur = this.delayed.get(key);
      if (cur?.timer !== timer) return;
      this.delayed.delete(key);
      this.add(key);
    }, ms);
    this.delayed.set(key, { readyAt, timer });
  }

  /** Queue a key after its per-key exponential backoff delay and count a failure. */
  addRateLimited(key: K): void {
    if (this.shuttingDown) return;
    const n = this.failures.get(key) ?? 0;
    this.failures.set(key, n + 1);
    this.stats.retries++;
    this.metrics.retry?.();
    this.addAfter(key, this.backoffDelay(n));
  }

  /** The delay the n-th (0-based) consecutive failure gets. */
  backoffDelay(n: number): number {
    const exp = this.baseDelayMs * Math.pow(2, Math.min(n, 62));
    const capped = Math.min(this.maxDelayMs, exp);
    if (this.jitter === 0) return capped;
    return Math.round(capped * (1 - this.jitter * Math.random()));
  }

  /** Reset the key's failure count (its next failure gets the base delay again). */
  forget(key: K): void {
    this.failures.delete(key);
  }

  /**
   * Start `concurrency` workers calling `handler`. Resolves once shutdown() has completed.
   * Handler outcome: resolves → forget(key) and, if `requeueAfterMs` is given, addAfter(key, ms);
   * throws → addRateLimited(key). The signal is aborted when shutdown() begins.
   */
  run(handler: WorkHandler<K>): Promise<void> {
    if (this.running) throw new Error('WorkQueue.run() called twice');
    this.running = true;
    for (let i = 0; i < this.concurrency; i++) this.workers.push(this.worker(handler));
    return Promise.all(this.workers).then(() => undefined);
  }

  /**
   * Stop accepting keys, cancel delayed keys, abort the handlers' signal and wait for in-flight handlers.
   * Queued keys are dropped unless `drain` is set.
   */
  async shutdown(opts: ShutdownOptions = {}): Promise<void> {
    if (!this.shuttingDown) {
      this.shuttingDown = true;
      this.drainOnShutdown = opts.drain ?? false;
      for (const d of this.delayed.values()) clearTimeout(d.timer);
      this.delayed.clear();
      if (!this.drainOnShutdown) {
        for (const k of this.queue) this.dirty.delete(k);
        this.queue.length = 0;
        this.depthChanged();
      }
      if (!this.drainOnShutdown) this.abort.abort(new Error('work queue shutting down'));
      while (this.waiters.length > 0) this.waiters.shift()?.();
    }
    const all = this.running ? Promise.all(this.workers).then(() => undefined) : Promise.resolve();
    if (opts.timeoutMs === undefined) {
      await all;
      return;
    }
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      t = setTimeout(() => {
        this.log.warn({ inFlight: this.processing.size }, 'shutdown timed out waiting for in-flight work');
        resolve();
      }, opts.timeoutMs);
    });
    try {
      await Promise.race([all, timeout]);
    } finally {
      clearTimeout(t);
    }
  }

  /** Wait until nothing is queued, delayed or in flight (useful in tests). */
  async idle(pollMs = 5): Promise<void> {
    while (this.queue.length > 0 || this.processing.size > 0 || this.delayed.size > 0) {
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  private async worker(handler: WorkHandler<K>): Promise<void> {
    for (;;) {
      const key = await this.get();
      if (key === undefined) return;
      const started = performance.now();
      let ok = false;
      try {
        const res = await handler(key, this.abort.signal);
        ok = true;
        this.forget(key);
        this.stats.processed++;
        const after = res && typeof res === 'object' ? res.requeueAfterMs : undefined;
        if (after !== undefined && after >= 0) this.addAfter(key, after);
      } catch (err) {
        this.stats.failed++;
        if (!this.shuttingDown) {
          this.log.warn({ err, key, failures: (this.failures.get(key) ?? 0) + 1 }, 'handler failed; requeueing with backoff');
          this.addRateLimited(key);
        } else {
          this.log.debug({ err, key }, 'handler failed during shutdown');
        }
      } finally {
        this.metrics.processed?.((performance.now() - started) / 1000, ok);
        this.done(key);
      }
    }
  }

  private async get(): Promise<K | undefined> {
    for (;;) {
      if (this.shuttingDown && !this.drainOnShutdown) return undefined;
      const key = this.queue.shift();
      if (key !== undefined) {
        this.dirty.delete(key);
        this.processing.add(key);
        this.depthChanged();
        return key;
      }
      if (this.shuttingDown) return undefined;
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  private done(key: K): void {
    this.processing.delete(key);
    if (this.dirty.has(key)) {
      if (this.shuttingDown && !this.drainOnShutdown) {
        this.dirty.delete(key);
        return;
      }
      this.queue.push(key);
      this.depthChanged();
      this.wakeOne();
    }
  }

  private wakeOne(): void {
    this.waiters.shift()?.();
  }

  private depthChanged(): void {
    this.metrics.depth?.(this.queue.length);
  }
}
