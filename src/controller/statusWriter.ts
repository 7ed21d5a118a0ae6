import { CoreV1Api, CustomObjectsApi, PatchStrategy, setHeaderOptions, type KubeConfig } from '@kubernetes/client-node';
import pRetry from 'p-retry';
import { GROUP, KIND, PLURAL, VERSION, type VMMigration, type VMMigrationStatus } from '../api/types.js';
import type { Logger } from '../util/log.js';
import { withKstatus } from './kstatus.js';
import { observeGeneration } from './conditions.js';
import { boundedStrings, boundedText } from '../util/text.js';

/**
 * Owns the status of one VMMigration while it runs. Progress updates arrive
 * many times a second during a copy; they are coalesced into at most one
 * merge-patch per interval, and phase changes are flushed at once.
 */
export class StatusWriter {
  private status: VMMigrationStatus;
  private dirty = false;
  private inFlight: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly api: CustomObjectsApi;

  /**
   * `observed`: the generation the run acts on now (its spec read as it comes), stamped on every write
   * so that an edit during a long step is acknowledged without waiting for the step to end.
   */
  constructor(kc: KubeConfig, private readonly obj: Pick<VMMigration, 'metadata'>, initial: VMMigrationStatus, private readonly log: Logger, private readonly intervalMs = 1000, private readonly observed?: () => number | undefined) {
    this.api = kc.makeApiClient(CustomObjectsApi);
    this.status = structuredClone(initial);
    // a step may run for long without a status change (a drain held by a PDB, a copy between
    // progress reports): an edit is acknowledged within a few seconds all the same
    if (observed) {
      this.watch = setInterval(() => {
        const g = observed();
        if (g !== undefined && this.status.phase && (this.status.observedGeneration ?? 0) < g) this.update(() => undefined);
      }, 2000);
      this.watch.unref();
    }
  }
  private readonly watch: NodeJS.Timeout | undefined;

  get current(): VMMigrationStatus {
    return this.status;
  }

  /** Applies a change; written within intervalMs, or immediately when `flush` is awaited. */
  update(mutate: (s: VMMigrationStatus) => void): void {
    mutate(this.status);
    this.dirty = true;
    this.timer ??= setTimeout(() => {
      this.timer = undefined;
      void this.flush().catch((err: Error) => this.log.warn({ err: err.message }, 'status write failed; will retry with the next update'));
    }, this.intervalMs);
  }

  async flush(): Promise<void> {
    while (this.inFlight) await this.inFlight.catch(() => undefined);
    const generation = this.observed?.();
    if (generation !== undefined && (this.status.observedGeneration ?? 0) < generation && this.status.phase) {
      observeGeneration(this.status, generation);
      this.dirty = true;
    }
    if (!this.dirty) return;
    this.dirty = false;
    // messages carry guest text (pod names, API answers): bounded, so the patch stays far below the API server's limit
    const body = { status: boundedStrings(withKstatus(this.status)) };
    const { name, namespace } = this.obj.metadata;
    this.inFlight = pRetry(
      () => this.api.patchNamespacedCustomObjectStatus({ group: GROUP, version: VERSION, namespace, plural: PLURAL, name, body }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch)),
      {
        retries: 4, minTimeout: 200,
        // A deleted object has no status to write: stop trying.
        shouldRetry: ({ error }) => (error as { code?: number }).code !== 404,
      },
    ).then(() => undefined);
    try {
      await this.inFlight;
    } catch (err) {
      this.dirty = true;
      throw err;
    } finally {
      this.inFlight = undefined;
    }
  }

  close(): void {
    if (this.timer) clearTimeout(this.timer);
    if (this.watch) clearInterval(this.watch);
    this.timer = undefined;
  }
}

/** Kubernetes Events on the VMMigration, so `kubectl describe vmm` tells the story step by step. */
export class EventRecorder {
  private readonly core: CoreV1Api;
  constructor(kc: KubeConfig, private readonly component: string, private readonly log: Logger) {
    this.core = kc.makeApiClient(CoreV1Api);
  }

  emit(obj: Pick<VMMigration, 'metadata'>, type: 'Normal' | 'Warning', reason: string, message: string): void {
    const now = new Date();
    const { name, namespace, uid } = obj.metadata;
    const body = {
      metadata: { generateName: `${name}.`, namespace },
      involvedObject: { apiVersion: `${GROUP}/${VERSION}`, kind: KIND, name, namespace, uid },
      type, reason, message: boundedText(message),
      source: { component: this.component },
      firstTimestamp: now, lastTimestamp: now, count: 1,
      reportingComponent: this.component, reportingInstance: process.env.HOSTNAME ?? 'local',
    };
    this.core.createNamespacedEvent({ namespace, body }).catch((err: Error) => this.log.debug({ err: err.message }, 'event not recorded'));
  }
}
