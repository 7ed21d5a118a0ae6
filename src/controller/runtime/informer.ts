import {
  makeInformer,
  type Informer,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
  type ObjectCache,
} from '@kubernetes/client-node';
import { log as rootLog, type Logger } from '../../util/log.js';

/*
 * Why this wrapper exists — what client-node 1.4's ListWatch (dist/cache.js) does:
 *  - list failure → emits 'error' and stops for good (no retry);
 *  - watch request failure (connection refused, non-200, stream 'error', network reset) → 'error', stops;
 *  - watch stream ending cleanly (server timeout) → 'connect' and re-watch from the last resourceVersion;
 *  - 410 Gone (HTTP status or ERROR event) → relist, re-watch;
 *  - other ERROR events in the stream are ignored;
 *  - Watch.watch() has no client-side timeout (the AbortSignal.timeout it creates is overwritten), and
 *    ListWatch never sends timeoutSeconds, so a half-open TCP connection stalls the informer silently;
 *  - stop() aborts the request, which surfaces as an 'error' (AbortError) callback; a stop() while the
 *    watch fetch is still pending cannot abort it (the request handle is not stored yet).
 *
 * Design: each (re)start creates a fresh ListWatch ("generation"); callbacks from older generations are
 * ignored (and stop the stale ListWatch again). This wrapper owns the cache that handlers see, so a restart
 * re-lists and emits only real differences (add / update / delete) instead of re-adding everything.
 * The watch path gets `timeoutSeconds` so a healthy, quiet watch reconnects regularly (a 'connect'
 * counts as activity); the watchdog restarts the informer if nothing happened for `watchdogTimeoutMs`.
 * A periodic relist re-delivers every object as an update (resync) and repairs missed events; missed
 * events on two consecutive relists restart the watch.
 */

export type InformerEvent = 'add' | 'update' | 'delete';
export type InformerHandler<T> = (obj: T, old?: T) => void;
export type ListFn<T extends KubernetesObject> = () => Promise<KubernetesListObject<T>>;
export type InformerFactory<T extends KubernetesObject> = (
  kc: KubeConfig,
  path: string,
  listFn: ListFn<T>,
  labelSelector?: string,
) => Informer<T> & Partial<ObjectCache<T>>;

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
  /** 0..1, fraction of the delay randomly removed */
  jitter?: number;
}

export interface ResilientInformerOptions<T extends KubernetesObject> {
  kubeConfig: KubeConfig;
  /** watch path, e.g. /apis/vmops.dev/v1alpha1/namespaces/ns/vmmigrations or /api/v1/configmaps */
  path: string;
  /** list function, e.g. () => customApi.listNamespacedCustomObject({group, version, namespace, plural}) */
  list: ListFn<T>;
  labelSelector?: string;
  /** for logs */
  name?: string;
  /** server-side watch timeout; the watch reconnects after it (counts as activity). Default 60, 0 = don't set */
  watchTimeoutSeconds?: number;
  /** restart when the watch has shown no activity (event, connect, list) for this long. Default 2.5 × watch timeout (150 s); 0 = off */
  watchdogTimeoutMs?: number;
  /** full relist + resync period. Default 120 000; 0 = off */
  relistIntervalMs?: number;
  /** restart backoff after errors. Default 1 s doubling up to 60 s with 20 % jitter */
  backoff?: BackoffOptions;
  /** a generation that lived this long before failing resets the backoff. Default 60 000 */
  stableAfterMs?: number;
  /** called on every restart (not the first start) with a reason: error | stalled | missed-events | flapping */
  onRestart?: (reason: string) => void;
  logger?: Logger;
  /** replaces client-node's makeInformer (tests) */
  informerFactory?: InformerFactory<T>;
}

export interface InformerStatus {
  synced: boolean;
  /** the current generation listed successfully and has not failed since */
  watching: boolean;
  restarts: number;
  errors: number;
  relists: number;
  missedEvents: number;
  consecutiveFailures: number;
  /** ms since the last watch activity */
  lastActivityAgoMs: number;
  lastError?: string;
}

interface Entry<T> {
  obj: T;
  /** value of the write sequence when this entry was last written */
  seq: number;
}

type Inner<T extends KubernetesObject> = Informer<T> & Partial<ObjectCache<T>>;

export function objectKey(obj: KubernetesObject): string {
  const ns = obj.metadata?.namespace;
  const name = obj.metadata?.name ?? '';
  return ns ? `${ns}/${name}` : name;
}

function errText(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n')[0] ?? err.name;
  return String(err);
}

export class ResilientInformer<T extends KubernetesObject> {
  private readonly opts: ResilientInformerOptions<T>;
  private readonly log: Logger;
  private readonly handlers: Record<InformerEvent, Array<InformerHandler<T>>> = { add: [], update: [], delete: [] };
  private readonly errorHandlers: Array<(err: unknown) => void> = [];
  private readonly syncWaiters: Array<() => void> = [];

  private readonly cache = new Map<string, Entry<T>>();
  /** monotonically increasing write counter used to order cache writes against list snapshots */
  private seq = 0;
  private listsInFlight = 0;
  /** keys deleted while a list was in flight → seq of the deletion */
  private readonly tombstones = new Map<string, number>();
  /** objects a generation's list returned: ListWatch re-delivers them as 'add' after we reconciled them */
  private listed = new WeakSet<object>();

  private gen = 0;
  private inner?: Inner<T>;
  private genStartedAt = 0;
  private genListed = false;
  private connectTimes: number[] = [];

  private started = false;
  private stopped = false;
  private synced = false;
  private restartTimer?: NodeJS.Timeout;
  private watchdogTimer?: NodeJS.Timeout;
  private relistTimer?: NodeJS.Timeout;
  private relistRunning = false;
  private consecutiveDriftRelists = 0;

  private lastActivity = Date.now();
  private failures = 0;
  private counters = { restarts: 0, errors: 0, relists: 0, missedEvents: 0 };
  private lastError?: string;

  private readonly watchPath: string;
  private readonly watchdogTimeoutMs: number;
  private readonly relistIntervalMs: number;
  private readonly stableAfterMs: number;
  private readonly backoff: Required<BackoffOptions>;

  constructor(opts: ResilientInformerOptions<T>) {
    this.opts = opts;
    this.log = (opts.logger ?? rootLog).child({ component: 'informer', informer: opts.name ?? opts.path });
    const watchTimeout = opts.watchTimeoutSeconds ?? 60;
    this.watchPath =
      watchTimeout > 0 && !/[?&]timeoutSeconds=/.test(opts.path)
        ? `${opts.path}${opts.path.includes('?') ? '&' : '?'}timeoutSeconds=${Math.floor(watchTimeout)}`
        : opts.path;
    this.watchdogTimeoutMs = opts.watchdogTimeoutMs ?? Math.max(watchTimeout, 60) * 2500;
    this.relistIntervalMs = opts.relistIntervalMs ?? 120_000;
    this.stableAfterMs = opts.stableAfterMs ?? 60_000;
    this.backoff = {
      initialMs: opts.backoff?.initialMs ?? 1000,
      maxMs: opts.backoff?.maxMs ?? 60_000,
      factor: opts.backoff?.factor ?? 2,
      jitter: Math.min(1, Math.max(0, opts.backoff?.jitter ?? 0.2)),
    };
  }

  on(event: InformerEvent, handler: InformerHandler<T>): void;
  on(event: 'error', handler: (err: unknown) => void): void;
  on(event: InformerEvent | 'error', handler: InformerHandler<T> | ((err: unknown) => void)): void {
    if (event === 'error') this.errorHandlers.push(handler as (err: unknown) => void);
    else this.handlers[event].push(handler as InformerHandler<T>);
  }

  /** Start listing and watching. Returns immediately; use waitForSync() to wait for the first list. */
  start(): void {
    if (this.started) return;
    this.started = true;
    this.stopped = false;
    this.startGeneration();
    if (this.watchdogTimeoutMs > 0) {
      const every = Math.max(50, Math.min(5000, Math.floor(this.watchdogTimeoutMs / 4)));
      this.watchdogTimer = setInterval(() => this.checkWatchdog(), every);
      this.watchdogTimer.unref?.();
    }
    if (this.relistIntervalMs > 0) {
      this.relistTimer = setInterval(() => void this.relist(), this.relistIntervalMs);
      this.relistTimer.unref?.();
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.restartTimer);
    clearInterval(this.watchdogTimer);
    clearInterval(this.relistTimer);
    this.restartTimer = this.watchdogTimer = this.relistTimer = undefined;
    this.gen++;
    const inner = this.inner;
    this.inner = undefined;
    if (inner) await this.stopInner(inner);
    while (this.syncWaiters.length) this.syncWaiters.shift()?.();
  }

  /** True once the first list has been delivered to the handlers. */
  get hasSynced(): boolean {
    return this.synced;
  }

  /** Resolves when synced (true), or false on timeout / stop. */
  waitForSync(timeoutMs?: number): Promise<boolean> {
    if (this.synced) return Promise.resolve(true);
    if (this.stopped) return Promise.resolve(false);
    return new Promise((resolve) => {
      let t: NodeJS.Timeout | undefined;
      const done = () => {
        clearTimeout(t);
        resolve(this.synced);
      };
      this.syncWaiters.push(done);
      if (timeoutMs !== undefined) {
        t = setTimeout(() => {
          const i = this.syncWaiters.indexOf(done);
          if (i >= 0) this.syncWaiters.splice(i, 1);
          resolve(this.synced);
        }, timeoutMs);
      }
    });
  }

  /** Objects in the cache, optionally of one namespace. */
  list(namespace?: string): T[] {
    const out: T[] = [];
    for (const e of this.cache.values()) {
      if (namespace === undefined || (e.obj.metadata?.namespace ?? '') === namespace) out.push(e.obj);
    }
    return out;
  }

  get(name: string, namespace?: string): T | undefined {
    return this.cache.get(namespace ? `${namespace}/${name}` : name)?.obj;
  }

  get restarts(): number {
    return this.counters.restarts;
  }

  status(): InformerStatus {
    return {
      synced: this.synced,
      watching: this.genListed && !this.restartTimer,
      restarts: this.counters.restarts,
      errors: this.counters.errors,
      relists: this.counters.relists,
      missedEvents: this.counters.missedEvents,
      consecutiveFailures: this.failures,
      lastActivityAgoMs: Date.now() - this.lastActivity,
      ...(this.lastError !== undefined ? { lastError: this.lastError } : {}),
    };
  }

  /** Force a restart now (e.g. after credentials were rotated). */
  restart(reason = 'manual'): void {
    if (this.stopped || !this.started) return;
    this.restartNow(reason);
  }

  /** Run one relist + resync now (normally periodic). Resolves to the number of missed events repaired. */
  async relist(): Promise<number> {
    if (this.stopped || !this.started || this.relistRunning) return 0;
    this.relistRunning = true;
    const startSeq = this.seq;
    this.listsInFlight++;
    try {
      const list = await this.opts.list();
      if (this.stopped) return 0;
      const drift = this.reconcile(list.items ?? [], startSeq, true);
      this.counters.relists++;
      if (drift > 0) {
        this.counters.missedEvents += drift;
        this.consecutiveDriftRelists++;
        this.log.warn({ drift, consecutive: this.consecutiveDriftRelists }, 'relist found changes the watch did not deliver');
        if (this.consecutiveDriftRelists >= 2) {
          this.consecutiveDriftRelists = 0;
          this.restartNow('missed-events');
        }
      } else {
        this.consecutiveDriftRelists = 0;
      }
      if (!this.synced) this.markSynced();
      return drift;
    } catch (err) {
      this.log.warn({ err: errText(err) }, 'periodic relist failed');
      this.emitError(err);
      return 0;
    } finally {
      this.listsInFlight--;
      if (this.listsInFlight === 0) this.tombstones.clear();
      this.relistRunning = false;
    }
  }

  // ---------------------------------------------------------------------------------------------

  private startGeneration(): void {
    const g = ++this.gen;
    this.genStartedAt = Date.now();
    this.genListed = false;
    this.connectTimes = [];
    this.lastActivity = Date.now();
    const factory: InformerFactory<T> = this.opts.informerFactory ?? makeInformer;
    let inner: Inner<T>;
    try {
      inner = factory(this.opts.kubeConfig, this.watchPath, () => this.listForGeneration(g), this.opts.labelSelector);
    } catch (err) {
      this.onInnerError(g, err);
      return;
    }
    this.inner = inner;
    inner.on('add', (o: T) => this.onWatchEvent(g, inner, 'upsert', o));
    inner.on('update', (o: T) => this.onWatchEvent(g, inner, 'upsert', o));
    inner.on('delete', (o: T) => this.onWatchEvent(g, inner, 'delete', o));
    inner.on('connect', () => this.onConnect(g, inner));
    inner.on('error', (err?: unknown) => this.onInnerError(g, err, inner));
    inner.start().catch((err: unknown) => this.onInnerError(g, err, inner));
  }

  private async listForGeneration(g: number): Promise<KubernetesListObject<T>> {
    if (g !== this.gen) throw new Error('stale informer generation');
    const startSeq = this.seq;
    this.listsInFlight++;
    try {
      const list = await this.opts.list();
      if (g !== this.gen) throw new Error('stale informer generation');
      this.reconcile(list.items ?? [], startSeq, false);
      this.listed = new WeakSet(list.items ?? []);
      this.genListed = true;
      this.touch();
      if (!this.synced) this.markSynced();
      return list;
    } finally {
      this.listsInFlight--;
      if (this.listsInFlight === 0) this.tombstones.clear();
    }
  }

  private onConnect(g: number, inner: Inner<T>): void {
    if (g !== this.gen) {
      void this.stopInner(inner);
      return;
    }
    this.touch();
    // A watch that ends immediately over and over (ListWatch re-watches with no delay) is treated as a failure.
    const now = Date.now();
    this.connectTimes.push(now);
    this.connectTimes = this.connectTimes.filter((t) => now - t < 10_000);
    if (this.connectTimes.length > 10) {
      this.onInnerError(g, new Error('watch reconnecting too often'), inner, 'flapping');
    }
  }

  private onWatchEvent(g: number, inner: Inner<T>, type: 'upsert' | 'delete', obj: T): void {
    if (g !== this.gen) {
      void this.stopInner(inner);
      return;
    }
    this.touch();
    if (type === 'upsert' && this.listed.has(obj)) return; // already reconciled (and maybe superseded)
    if (type === 'upsert') this.upsert(obj);
    else this.remove(objectKey(obj), obj);
  }

  private onInnerError(g: number, err: unknown, inner?: Inner<T>, reason = 'error'): void {
    if (g !== this.gen || this.stopped) {
      if (inner && inner !== this.inner) void this.stopInner(inner);
      return;
    }
    if (this.restartTimer) return;
    this.counters.errors++;
    this.lastError = errText(err);
    if (Date.now() - this.genStartedAt >= this.stableAfterMs) this.failures = 0;
    const delay = this.backoffDelay(this.failures);
    this.failures++;
    this.log.warn({ err: this.lastError, delayMs: delay, failures: this.failures }, 'informer failed; restarting after backoff');
    this.emitError(err);
    this.gen++; // late callbacks of the failed generation are ignored from now on
    const old = this.inner;
    this.inner = undefined;
    if (old) void this.stopInner(old);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      if (this.stopped) return;
      this.countRestart(reason);
      this.startGeneration();
    }, delay);
  }

  private restartNow(reason: string): void {
    clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    this.log.warn({ reason }, 'restarting informer');
    const old = this.inner;
    this.inner = undefined;
    this.gen++;
    if (old) void this.stopInner(old);
    this.countRestart(reason);
    this.startGeneration();
  }

  private countRestart(reason: string): void {
    this.counters.restarts++;
    try {
      this.opts.onRestart?.(reason);
    } catch (err) {
      this.log.error({ err }, 'onRestart hook threw');
    }
  }

  private checkWatchdog(): void {
    if (this.stopped || this.restartTimer) return;
    const idle = Date.now() - this.lastActivity;
    if (idle >= this.watchdogTimeoutMs) {
      this.lastError = `no watch activity for ${Math.round(idle / 1000)}s`;
      this.restartNow('stalled');
    }
  }

  backoffDelay(n: number): number {
    const { initialMs, maxMs, factor, jitter } = this.backoff;
    const capped = Math.min(maxMs, initialMs * Math.pow(factor, Math.min(n, 60)));
    return Math.round(capped * (1 - jitter * Math.random()));
  }

  private async stopInner(inner: Inner<T>): Promise<void> {
    try {
      await inner.stop();
    } catch (err) {
      this.log.debug({ err: errText(err) }, 'stopping informer generation failed');
    }
  }

  private touch(): void {
    this.lastActivity = Date.now();
  }

  private markSynced(): void {
    this.synced = true;
    while (this.syncWaiters.length) this.syncWaiters.shift()?.();
  }

  private upsert(obj: T): void {
    const key = objectKey(obj);
    const cur = this.cache.get(key);
    if (cur && sameVersion(cur.obj, obj)) return;
    this.cache.set(key, { obj, seq: ++this.seq });
    if (cur) this.emit('update', obj, cur.obj);
    else this.emit('add', obj);
  }

  private remove(key: string, obj?: T): void {
    const cur = this.cache.get(key);
    if (!cur) return;
    this.cache.delete(key);
    const s = ++this.seq;
    if (this.listsInFlight > 0) this.tombstones.set(key, s);
    this.emit('delete', obj ?? cur.obj);
  }

  /**
   * Bring the cache to the listed state. Entries the watch wrote after the list started are newer than the
   * list and are left alone. Returns the number of differences found. With `resync`, unchanged objects
   * are re-delivered as updates.
   */
  private reconcile(items: T[], startSeq: number, resync: boolean): number {
    let diff = 0;
    const seen = new Set<string>();
    for (const obj of items) {
      const key = objectKey(obj);
      seen.add(key);
      const cur = this.cache.get(key);
      if (!cur) {
        const deletedAt = this.tombstones.get(key);
        if (deletedAt !== undefined && deletedAt > startSeq) continue;
        diff++;
        this.cache.set(key, { obj, seq: ++this.seq });
        this.emit('add', obj);
      } else if (cur.seq > startSeq) {
        continue;
      } else if (!sameVersion(cur.obj, obj)) {
        diff++;
        this.cache.set(key, { obj, seq: ++this.seq });
        this.emit('update', obj, cur.obj);
      } else if (resync) {
        this.emit('update', cur.obj, cur.obj);
      }
    }
    for (const [key, cur] of [...this.cache]) {
      if (seen.has(key) || cur.seq > startSeq) continue;
      diff++;
      this.remove(key);
    }
    return diff;
  }

  private emit(event: InformerEvent, obj: T, old?: T): void {
    for (const h of this.handlers[event]) {
      try {
        h(obj, old);
      } catch (err) {
        this.log.error({ err, event, key: objectKey(obj) }, 'informer handler threw');
      }
    }
  }

  private emitError(err: unknown): void {
    for (const h of this.errorHandlers) {
      try {
        h(err);
      } catch (e) {
        this.log.error({ err: e }, 'informer error handler threw');
      }
    }
  }
}

function sameVersion(a: KubernetesObject, b: KubernetesObject): boolean {
  const ra = a.metadata?.resourceVersion;
  return ra !== undefined && ra !== '' && ra === b.metadata?.resourceVersion;
}
