import { CoordinationV1Api, V1MicroTime, type KubeConfig, type V1Lease } from '@kubernetes/client-node';
import { log as rootLog, type Logger } from '../../util/log.js';

/** The subset of CoordinationV1Api the elector uses (lets tests pass an in-memory fake). */
export interface LeaseApi {
  readNamespacedLease(p: { name: string; namespace: string }): Promise<V1Lease>;
  createNamespacedLease(p: { namespace: string; body: V1Lease }): Promise<V1Lease>;
  replaceNamespacedLease(p: { name: string; namespace: string; body: V1Lease }): Promise<V1Lease>;
}

export interface LeaderElectorOptions {
  /** used to build a CoordinationV1Api unless `api` is given */
  kubeConfig?: KubeConfig;
  api?: LeaseApi;
  namespace: string;
  /** Lease name, e.g. vm-migration-operator */
  name: string;
  /** unique per replica, e.g. pod name + random suffix */
  identity: string;
  /** how long non-leaders wait after the last observed change before taking over; default 15 */
  leaseDurationSeconds?: number;
  /** the leader steps down if it could not renew for this long; default 10 */
  renewDeadlineSeconds?: number;
  /** interval between acquire/renew attempts; default 2 */
  retryPeriodSeconds?: number;
  /** called when this replica becomes leader; `signal` is aborted when leadership is lost or released */
  onStartedLeading: (signal: AbortSignal) => void | Promise<void>;
  /** called after leadership ended (after the signal was aborted) */
  onStoppedLeading?: (reason: string) => void;
  /** called when the observed holder changes (undefined = nobody) */
  onNewLeader?: (identity: string | undefined) => void;
  logger?: Logger;
}

const JITTER = 1.2;

function httpCode(err: unknown): number | undefined {
  if (err && typeof err === 'object') {
    const e = err as { code?: unknown; statusCode?: unknown };
    if (typeof e.code === 'number') return e.code;
    if (typeof e.statusCode === 'number') return e.statusCode;
  }
  return undefined;
}

function errText(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n').slice(0, 2).join(' ');
  return String(err);
}

/**
 * Leader election on a coordination.k8s.io/v1 Lease, following client-go's algorithm:
 *  - candidates read the Lease every retryPeriod; a Lease held by someone else is considered valid until
 *    leaseDuration has passed since *this replica observed* its last change (no cross-node clock comparison);
 *  - acquire/renew writes use the observed resourceVersion (optimistic concurrency: a 409 means we lost the race);
 *  - the leader renews every retryPeriod and steps down (aborting the signal) when it could not renew for
 *    renewDeadline — which is shorter than leaseDuration, so it stops before anyone else can take over;
 *  - release() writes an empty holderIdentity so a successor takes over at its next retry.
 */
export class LeaseLeaderElector {
  private readonly api: LeaseApi;
  private readonly opts: LeaderElectorOptions;
  private readonly log: Logger;
  private readonly leaseDurationMs: number;
  private readonly renewDeadlineMs: number;
  private readonly retryPeriodMs: number;

  private observed?: V1Lease;
  private observedAt = 0;
  private observedHolder?: string;

  private leading = false;
  private leaderAbort?: AbortController;
  private deadlineTimer?: NodeJS.Timeout;
  private lastRenew = 0;

  private running = false;
  private stopped = false;
  private loopDone?: Promise<void>;
  private wake?: () => void;

  constructor(opts: LeaderElectorOptions) {
    this.opts = opts;
    if (opts.api) this.api = opts.api;
    else if (opts.kubeConfig) this.api = opts.kubeConfig.makeApiClient(CoordinationV1Api);
    else throw new Error('LeaseLeaderElector needs kubeConfig or api');
    if (!opts.identity) throw new Error('LeaseLeaderElector needs a non-empty identity');
    this.leaseDurationMs = (opts.leaseDurationSeconds ?? 15) * 1000;
    this.renewDeadlineMs = (opts.renewDeadlineSeconds ?? 10) * 1000;
    this.retryPeriodMs = (opts.retryPeriodSeconds ?? 2) * 1000;
    if (!(this.leaseDurationMs > this.renewDeadlineMs)) throw new Error('leaseDuration must be greater than renewDeadline');
    if (!(this.renewDeadlineMs > JITTER * this.retryPeriodMs)) throw new Error('renewDeadline must be greater than 1.2 × retryPeriod');
    if (!(this.retryPeriodMs > 0)) throw new Error('retryPeriod must be positive');
    this.log = (opts.logger ?? rootLog).child({ component: 'leader-election', lease: `${opts.namespace}/${opts.name}`, identity: opts.identity });
  }

  get identity(): string {
    return this.opts.identity;
  }

  get isLeader(): boolean {
    return this.leading;
  }

  /** Holder of the Lease as last observed (undefined = nobody / unknown). */
  get leader(): string | undefined {
    return this.observedHolder;
  }

  /** Begin campaigning (and, once leading, renewing) in the background. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.stopped = false;
    this.loopDone = this.loop().catch((err: unknown) => {
      this.log.error({ err }, 'leader election loop crashed');
      this.stepDown('election loop crashed');
    });
  }

  /**
   * Stop campaigning. If leading: abort the leader's signal, call onStoppedLeading and (unless
   * `release: false`) write an empty holderIdentity so another replica takes over at once.
   */
  async stop(opts: { release?: boolean } = {}): Promise<void> {
    this.stopped = true;
    this.wake?.();
    await this.loopDone;
    this.running = false;
    const wasLeading = this.leading;
    this.stepDown('stopped');
    if ((opts.release ?? true) && (wasLeading || this.observedHolder === this.opts.identity)) {
      await this.releaseLease();
    }
  }

  /** Give up leadership and stop campaigning (shutdown path). Same as stop({release: true}). */
  release(): Promise<void> {
    return this.stop({ release: true });
  }

  // ---------------------------------------------------------------------------------------------

  private async loop(): Promise<void> {
    while (!this.stopped) {
      let ok = false;
      try {
        ok = await this.withTimeout(this.tryAcquireOrRenew(), Math.max(1000, this.renewDeadlineMs / 2));
      } catch (err) {
        this.log.warn({ err: errText(err) }, this.leading ? 'failed to renew lease' : 'failed to acquire lease');
      }
      if (this.stopped) break;
      if (ok) {
        this.lastRenew = Date.now();
        if (!this.leading) this.becomeLeader();
        else this.armDeadline();
      } else if (this.leading && this.observedHolder !== undefined && this.observedHolder !== this.opts.identity) {
        this.stepDown(`lease taken over by ${this.observedHolder}`);
      }
      const wait = this.leading ? this.retryPeriodMs : this.retryPeriodMs * (1 + (JITTER - 1) * Math.random());
      await this.sleep(wait);
    }
  }

  /** One attempt; true when this replica holds the Lease afterwards. */
  private async tryAcquireOrRenew(): Promise<boolean> {
    const { namespace, name, identity } = this.opts;
    const now = Date.now();
    let current: V1Lease;
    try {
      current = await this.api.readNamespacedLease({ name, namespace });
    } catch (err) {
      if (httpCode(err) !== 404) throw err;
      const body: V1Lease = {
        apiVersion: 'coordination.k8s.io/v1',
        kind: 'Lease',
        metadata: { name, namespace },
        spec: {
          holderIdentity: identity,
          leaseDurationSeconds: Math.round(this.leaseDurationMs / 1000),
          acquireTime: new V1MicroTime(now),
          renewTime: new V1MicroTime(now),
          leaseTransitions: 0,
        },
      };
      try {
        const created = await this.api.createNamespacedLease({ namespace, body });
        this.observe(created);
        return true;
      } catch (e) {
        if (httpCode(e) === 409) return false; // someone else created it first
        throw e;
      }
    }

    this.observe(current);
    const spec = current.spec ?? {};
    const holder = spec.holderIdentity || undefined;
    const heldByMe = holder === identity;
    if (holder && !heldByMe) {
      const durMs = (spec.leaseDurationSeconds ?? this.leaseDurationMs / 1000) * 1000;
      if (this.observedAt + durMs > now) return false; // still valid for someone else
    }

    const body: V1Lease = {
      ...current,
      metadata: { ...current.metadata, name, namespace, resourceVersion: current.metadata?.resourceVersion },
      spec: {
        ...spec,
        holderIdentity: identity,
        leaseDurationSeconds: Math.round(this.leaseDurationMs / 1000),
        renewTime: new V1MicroTime(now),
        acquireTime: heldByMe && spec.acquireTime ? new V1MicroTime(new Date(spec.acquireTime).getTime()) : new V1MicroTime(now),
        leaseTransitions: heldByMe ? (spec.leaseTransitions ?? 0) : (spec.leaseTransitions ?? 0) + 1,
      },
    };
    try {
      const updated = await this.api.replaceNamespacedLease({ name, namespace, body });
      this.observe(updated);
      return true;
    } catch (e) {
      if (httpCode(e) === 409) {
        this.log.debug('lease changed concurrently (409)');
        return false;
      }
      throw e;
    }
  }

  private observe(lease: V1Lease): void {
    const prevRv = this.observed?.metadata?.resourceVersion;
    const rv = lease.metadata?.resourceVersion;
    if (!this.observed || prevRv !== rv || rv === undefined) {
      this.observed = lease;
      this.observedAt = Date.now();
    }
    const holder = lease.spec?.holderIdentity || undefined;
    if (holder !== this.observedHolder) {
      this.observedHolder = holder;
      this.log.info({ leader: holder ?? null }, 'observed new leader');
      try {
        this.opts.onNewLeader?.(holder);
      } catch (err) {
        this.log.error({ err }, 'onNewLeader threw');
      }
    }
  }

  private becomeLeader(): void {
    this.leading = true;
    this.leaderAbort = new AbortController();
    this.armDeadline();
    this.log.info('started leading');
    const signal = this.leaderAbort.signal;
    try {
      const r = this.opts.onStartedLeading(signal);
      if (r && typeof (r as Promise<void>).catch === 'function') {
        (r as Promise<void>).catch((err: unknown) => {
          if (!signal.aborted) this.log.error({ err }, 'onStartedLeading failed');
        });
      }
    } catch (err) {
      this.log.error({ err }, 'onStartedLeading threw');
    }
  }

  private armDeadline(): void {
    clearTimeout(this.deadlineTimer);
    const remaining = this.lastRenew + this.renewDeadlineMs - Date.now();
    this.deadlineTimer = setTimeout(() => this.stepDown('failed to renew lease within renewDeadline'), Math.max(0, remaining));
  }

  private stepDown(reason: string): void {
    clearTimeout(this.deadlineTimer);
    this.deadlineTimer = undefined;
    if (!this.leading) return;
    this.leading = false;
    this.log.warn({ reason }, 'stopped leading');
    this.leaderAbort?.abort(new Error(`leadership lost: ${reason}`));
    this.leaderAbort = undefined;
    try {
      this.opts.onStoppedLeading?.(reason);
    } catch (err) {
      this.log.error({ err }, 'onStoppedLeading threw');
    }
  }

  /** Write an empty holder (only if we are still the holder). Retries once on a write conflict. */
  private async releaseLease(): Promise<void> {
    const { namespace, name, identity } = this.opts;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const current = await this.api.readNamespacedLease({ name, namespace });
        if ((current.spec?.holderIdentity || undefined) !== identity) return;
        const now = Date.now();
        const body: V1Lease = {
          ...current,
          spec: {
            ...current.spec,
            holderIdentity: '',
            leaseDurationSeconds: 1,
            acquireTime: new V1MicroTime(now),
            renewTime: new V1MicroTime(now),
          },
        };
        const updated = await this.api.replaceNamespacedLease({ name, namespace, body });
        this.observe(updated);
        this.log.info('released lease');
        return;
      } catch (err) {
        if (httpCode(err) === 409 && attempt === 0) continue;
        this.log.warn({ err: errText(err) }, 'failed to release lease (it will expire instead)');
        return;
      }
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.wake = () => {
        this.wake = undefined;
        done();
      };
    });
  }

  private withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`lease request timed out after ${ms} ms`)), ms);
    });
    return Promise.race([p, timeout]).finally(() => clearTimeout(t));
  }
}
