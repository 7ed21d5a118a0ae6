/**
 * Wires the controller: informer → work queue → reconcile, under a Lease.
 * Reconcile is short: it looks at one VMMigration and, when work is due,
 * starts a runner for it; the runner reports back through status and by
 * re-queueing the key.
 */
import { CustomObjectsApi, type KubeConfig, type KubernetesListObject } from '@kubernetes/client-node';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../api/types.js';
import { readCapacity, vmAllocatedBytes } from '../hosts/capacity.js';
import type { HostPool } from '../hosts/pool.js';
import * as metrics from '../metrics/metrics.js';
import type { Store } from '../store/store.js';
import type { Logger } from '../util/log.js';
import { Handover } from '../migrate/vmMove.js';
import { Aborted, RetryLater, runMigration } from './migrationRunner.js';
import { ResilientInformer, objectKey } from './runtime/informer.js';
import { LeaseLeaderElector } from './runtime/leaderElection.js';
import { WorkQueue } from './runtime/workQueue.js';
import { EventRecorder } from './statusWriter.js';

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
  private readonly events: EventRecorder;
  private elector: LeaseLeaderElector | undefined;
  private leading: AbortSignal | undefined;
  private queueRunning: Promise<void> | undefined;

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
      metrics.leaderIsLeader.set(1);
      this.queueRunning = this.queue.run((key, signal) => this.reconcile(key, signal));
      return;
    }
    this.elector = new LeaseLeaderElector({
      kubeConfig: this.opts.kc, ...le, logger: this.opts.log,
      onStartedLeading: (signal) => {
        this.opts.log.info({ identity: le.identity }, 'leading: reconciling VMMigrations');
        this.leading = signal;
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

  private async reconcile(key: string, _signal: AbortSignal): Promise<void | { requeueAfterMs?: number }> {
    if (!this.leading || this.leading.aborted) return;
    const [namespace, name] = key.includes('/') ? key.split('/') as [string, string] : [undefined, key];
    const obj = this.informer.get(name, namespace);
    if (!obj) {
      // Deleted: a runner for it (found by key) stops at the next step boundary and rolls back.
      for (const run of this.runs.values()) {
        if (run.key === key) run.controller.abort(new Error(`VMMigration ${key} deleted`));
      }
      return;
    }
    const uid = obj.metadata.uid;
    if (this.runs.has(uid)) return;
    if (!needsWork(obj)) return;

    const controller = new AbortController();
    const leading = this.leading;
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
    }, controller.signal).then(
      () => undefined,
      (err: Error) => {
        if (err instanceof RetryLater) this.queue.addAfter(key, err.afterMs);
        else if (err instanceof Aborted || controller.signal.aborted) log.warn({ reason: err.message }, 'migration run stopped');
        else {
          log.error({ err: err.message }, 'migration run crashed; retrying with backoff');
          this.queue.addRateLimited(key);
        }
      },
    ).finally(() => {
      leading.removeEventListener('abort', onLost);
      this.runs.delete(uid);
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
  if (phase === 'Succeeded') return false;
  if (phase === 'Failed') return (obj.status?.observedGeneration ?? 0) < (obj.metadata.generation ?? 1);
  return true;
}
