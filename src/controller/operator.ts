/**
 * Wires the controller: informer → work queue → reconcile, under a Lease.
 * Reconcile is short: it looks at one VMMigration and, when work is due,
 * starts a runner for it; the runner reports back through status and by
 * re-queueing the key.
 *
 * Deletion: the operator puts its finalizer on every VMMigration before it
 * touches anything for it. A delete then only sets deletionTimestamp; the
 * runner is cancelled (the move in flight rolls back), and the finalizer is
 * released once the store shows no move in flight. When the operator was down
 * during the delete, the next leader sees deletionTimestamp, finds the
 * interrupted move in the store and runs it cancelled from the start: the
 * move locates the VM and rolls back from wherever it was.
 */
import { CustomObjectsApi, PatchStrategy, setHeaderOptions, type KubeConfig, type KubernetesListObject } from '@kubernetes/client-node';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../api/types.js';
import { readCapacity, vmAllocatedBytes } from '../hosts/capacity.js';
import { sweepDirect } from '../transfer/direct.js';
import type { HostPool } from '../hosts/pool.js';
import * as metrics from '../metrics/metrics.js';
import type { Store } from '../store/store.js';
import type { Logger } from '../util/log.js';
import { Handover } from '../migrate/vmMove.js';
import { Aborted, runMigration, type RunnerDeps } from './migrationRunner.js';
import { ResilientInformer, objectKey } from './runtime/informer.js';
import { LeaseLeaderElector } from './runtime/leaderElection.js';
import { WorkQueue } from './runtime/workQueue.js';
import { EventRecorder } from './statusWriter.js';
import { FINALIZER, Finalizers, hasFinalizer } from './finalizer.js';
import { observeGeneration } from './conditions.js';

export interface ControllerOptions {
  kc: KubeConfig;
  store: Store;
  pool: HostPool;
  log: Logger;
  /** watch VMMigrations in this namespace only; undefined = all namespaces */
  namespace?: string;
  /** Lease location; undefined disables election (single replica, e.g. local runs) */
  leaderElection?: { namespace: string; name: string; identity: string };
  statusIntervalMs?: number;
  relistIntervalMs?: number;
  /** the guest-safety parts per environment (src/controller/guestSafetyWiring.ts); default: readiness guard */
  guestSafety?: RunnerDeps['guestSafety'];
}

interface ActiveRun {
  key: string;
  controller: AbortController;
  done: Promise<void>;
}

export class MigrationController {
  private readonly informer: ResilientInformer<VMMigration>;
  private readonly queue = new WorkQueue<string>({ name: 'vmmigrations', concurrency: 4, metrics: metrics.workQueueMetricsHooks() });
  private readonly runs = new Map<string, ActiveRun>();
  private readonly claims = new Map<string, string>();
  /** a run that must wait (it ended with retry) is not re-run before this time by its own status writes' watch events */
  private readonly notBefore = new Map<string, { at: number; generation: number }>();
  private readonly events: EventRecorder;
  private readonly finalizers: Finalizers;
  private elector: LeaseLeaderElector | undefined;
  private leading: AbortSignal | undefined;
  private queueRunning: Promise<void> | undefined;
  /** what direct copies of an earlier leader left on the hosts is removed before this one moves anything */
  private swept: Promise<void> | undefined;

  constructor(private readonly opts: ControllerOptions) {
    const api = opts.kc.makeApiClient(CustomObjectsApi);
    const ns = opts.namespace;
    const path = ns ? `/apis/${GROUP}/${VERSION}/namespaces/${ns}/${PLURAL}` : `/apis/${GROUP}/${VERSION}/${PLURAL}`;
    this.informer = new ResilientInformer({
      kubeConfig: opts.kc, path, name: 'vmmigrations', logger: opts.log,
      relistIntervalMs: opts.relistIntervalMs,
      list: async () => (ns
        ? await api.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: ns, plural: PLURAL })
        : await api.listClusterCustomObject({ group: GROUP, version: VERSION, plural: PLURAL })) as KubernetesListObject<VMMigration>,
      onRestart: metrics.informerRestartHook(),
    });
    const enqueue = (o: VMMigration) => this.queue.add(objectKey(o as never));
    this.informer.on('add', enqueue);
    this.informer.on('update', enqueue);
    this.informer.on('delete', enqueue);
    this.events = new EventRecorder(opts.kc, 'vm-migration-operator', opts.log);
    this.finalizers = new Finalizers(opts.kc);
  }

  /** Ready = informer synced and (with election) either leading or standing by healthily. */
  readiness(): { ready: boolean; reason?: string } {
    if (!this.informer.hasSynced) return { ready: false, reason: 'informer not synced' };
    return { ready: true };
  }

  async start(): Promise<void> {
    this.informer.start();
    const le = this.opts.leaderElection;
    if (!le) {
      this.leading = new AbortController().signal;
      this.swept = this.sweepHosts();
      metrics.leaderIsLeader.set(1);
      this.queueRunning = this.queue.run((key, signal) => this.reconcile(key, signal));
      return;
    }
    this.elector = new LeaseLeaderElector({
      kubeConfig: this.opts.kc, ...le, logger: this.opts.log,
      onStartedLeading: (signal) => {
        this.opts.log.info({ identity: le.identity }, 'leading: reconciling VMMigrations');
        this.leading = signal;
        this.swept = this.sweepHosts();
        metrics.leaderIsLeader.set(1);
        for (const o of this.informer.list()) this.queue.add(objectKey(o));
        signal.addEventListener('abort', () => {
          // Lost the Lease: another replica takes over; stop touching VMs now. Steps resume from the journal there.
          for (const run of this.runs.values()) run.controller.abort(new Handover('lost leadership'));
        });
      },
      onStoppedLeading: (reason) => {
        metrics.leaderIsLeader.set(0);
        this.opts.log.warn({ reason }, 'stopped leading');
      },
    });
    this.queueRunning = this.queue.run((key, signal) => this.reconcile(key, signal));
    this.elector.start();
  }

  async stop(): Promise<void> {
    for (const run of this.runs.values()) run.controller.abort(new Handover('operator shutting down'));
    await Promise.allSettled([...this.runs.values()].map((r) => r.done));
    await this.queue.shutdown({ timeoutMs: 10_000 });
    await this.queueRunning;
    await this.informer.stop();
    await this.elector?.stop({ release: true });
  }

  /**
   * Removes, from every host of the inventory, the per-copy keys and authorizations direct copies left
   * behind (an operator killed mid-copy); an unreachable host is logged and left to the lines' own
   * expiry-time. Bounded: moves wait for it at most a minute.
   */
  private async sweepHosts(): Promise<void> {
    const hosts = await this.opts.store.hosts().catch(() => []);
    const sweep = Promise.allSettled(hosts.map(async (h) => {
      try {
        await sweepDirect((await this.opts.pool.hypervisor(h)).conn);
      } catch (err) {
        this.opts.log.warn({ host: h.name, err: (err as Error).message }, 'could not sweep direct-copy keys left on the host; they expire on their own');
      }
    }));
    await Promise.race([sweep, new Promise((r) => setTimeout(r, 60_000).unref())]);
  }

  private async reconcile(key: string, _signal: AbortSignal): Promise<void | { requeueAfterMs?: number }> {
    if (!this.leading || this.leading.aborted) return;
    await this.swept;
    const [namespace, name] = key.includes('/') ? key.split('/') as [string, string] : [undefined, key];
    const obj = this.informer.get(name, namespace);
    if (!obj) {
      // Gone without our finalizer (deleted before we added it): a runner for it still rolls back.
      for (const run of this.runs.values()) {
        if (run.key === key) run.controller.abort(new Error(`VMMigration ${key} deleted`));
      }
      return;
    }
    if (obj.metadata.deletionTimestamp) return this.finalize(obj, key);
    const uid = obj.metadata.uid;
    if (this.runs.has(uid)) return;
    // a finished migration stays finished; an edit of it (a limit, a label of the spec) is seen and said so
    if (!needsWork(obj)) {
      if (obj.status?.phase === 'Succeeded' && (obj.status.observedGeneration ?? 0) < (obj.metadata.generation ?? 1)) await this.acknowledge(obj);
      return;
    }
    const wait = this.notBefore.get(uid);
    // Too early (an event, e.g. our own status write, re-queued the key, and the queue's add() drops a
    // pending delayed add): look again when the wait is over, or the wait lasts until the next relist.
    if (wait && Date.now() < wait.at - 100 && wait.generation === (obj.metadata.generation ?? 1)) return { requeueAfterMs: wait.at - Date.now() };
    this.notBefore.delete(uid);
    // Before any side effect: from now on a delete waits for us.
    await this.finalizers.add(obj);
    this.startRun(obj, key);
  }

  /** Records that the current generation of a finished migration was seen: observedGeneration, on the status and each condition. */
  private async acknowledge(obj: VMMigration): Promise<void> {
    const status = structuredClone(obj.status ?? {});
    observeGeneration(status, obj.metadata.generation ?? 1);
    const api = this.opts.kc.makeApiClient(CustomObjectsApi);
    const { name, namespace } = obj.metadata;
    await api.patchNamespacedCustomObjectStatus(
      { group: GROUP, version: VERSION, namespace, plural: PLURAL, name, body: { status: { observedGeneration: status.observedGeneration, conditions: status.conditions ?? [] } } },
      setHeaderOptions('Content-Type', PatchStrategy.MergePatch),
    );
  }

  /** Deletion requested: cancel what runs, roll back what an earlier run left in flight, then let the object go. */
  private async finalize(obj: VMMigration, key: string): Promise<void> {
    if (!hasFinalizer(obj)) return;
    const uid = obj.metadata.uid;
    const log = this.opts.log.child({ migration: key });
    const active = this.runs.get(uid);
    if (active) {
      // The runner re-queues the key when it has finished rolling back.
      if (!active.controller.signal.aborted) {
        log.info('VMMigration is being deleted: cancelling the move in flight');
        active.controller.abort(new Error(`VMMigration ${key} is being deleted`));
      }
      return;
    }
    const { inFlight, stuck } = await this.opts.store.unresolvedMoves(uid);
    if (inFlight.length > 0) {
      // The operator was down (or lost the Lease) when the delete came: the interrupted move rolls back now.
      log.info({ vms: inFlight.map((m) => `${m.environment}/${m.vm}`) }, 'VMMigration is being deleted with a move in flight: rolling it back');
      this.startRun(obj, key, new Error(`VMMigration ${key} is being deleted`));
      return;
    }
    if (stuck.length > 0) {
      const message = `finalizer kept: the move of ${stuck.map((m) => `${m.environment}/${m.vm} (${m.fromHost} → ${m.toHost}, ${m.phase})`).join(', ')} ended neither moved nor rolled back; check where the VM runs, then remove the finalizer ${FINALIZER} by hand`;
      log.error(message);
      this.events.emit(obj, 'Warning', 'FinalizerKept', message);
      return;
    }
    await this.finalizers.remove(obj);
    log.info('VMMigration released: nothing in flight');
  }

  private startRun(obj: VMMigration, key: string, cancel?: Error): void {
    const uid = obj.metadata.uid;
    const { name, namespace } = obj.metadata;
    const controller = new AbortController();
    if (cancel) controller.abort(cancel);
    const leading = this.leading!;
    const onLost = () => controller.abort(new Handover('lost leadership'));
    leading.addEventListener('abort', onLost, { once: true });
    const log = this.opts.log.child({ migration: key });
    const done = runMigration(obj, {
      kc: this.opts.kc, store: this.opts.store, pool: this.opts.pool, events: this.events, log,
      latest: () => this.informer.get(name, namespace),
      claimEnvironments: (id, envs) => this.claim(id, envs),
      releaseEnvironments: (id) => this.release(id),
      holderOf: (env) => this.runs.get(this.claims.get(env) ?? '')?.key,
      capacity: {
        host: async (h) => readCapacity((await this.opts.pool.hypervisor(h)).conn, h),
        vmBytes: async (h, env, vm) => vmAllocatedBytes((await this.opts.pool.hypervisor(h)).conn, h, env, vm),
      },
      statusIntervalMs: this.opts.statusIntervalMs,
      guestSafety: this.opts.guestSafety,
    }, controller.signal).then(
      (end) => {
        if (end.kind !== 'retry') return;
        this.notBefore.set(uid, { at: Date.now() + end.afterMs, generation: obj.metadata.generation ?? 1 });
        this.queue.addAfter(key, end.afterMs);
      },
      (err: Error) => {
        if (err instanceof Aborted || controller.signal.aborted) log.warn({ reason: err.message }, 'migration run stopped');
        else {
          log.error({ err: err.message }, 'migration run crashed; retrying with backoff');
          this.queue.addRateLimited(key);
        }
      },
    ).finally(() => {
      leading.removeEventListener('abort', onLost);
      this.runs.delete(uid);
      // A deletion waits for this run: look again now that it has rolled back.
      if (this.informer.get(name, namespace)?.metadata.deletionTimestamp) this.queue.add(key);
    });
    this.runs.set(uid, { key, controller, done });
  }

  private claim(uid: string, envs: string[]): string[] {
    const busy = envs.filter((e) => this.claims.has(e) && this.claims.get(e) !== uid);
    if (busy.length === 0) for (const e of envs) this.claims.set(e, uid);
    return busy;
  }

  private release(uid: string): void {
    for (const [env, owner] of this.claims) if (owner === uid) this.claims.delete(env);
  }
}

/** Terminal phases stay terminal unless the spec changed after a failure. */
function needsWork(obj: VMMigration): boolean {
  const phase = obj.status?.phase;
  // a dry run whose spec now says dryRun: false is to be done for real
  if (phase === 'Succeeded') return obj.status?.conditions?.find((c) => c.type === 'Ready')?.reason === 'DryRun' && obj.spec.dryRun !== true;
  if (phase === 'Failed') return (obj.status?.observedGeneration ?? 0) < (obj.metadata.generation ?? 1);
  return true;
}
