import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { WorkQueueMetricsHooks } from '../controller/runtime/workQueue.js';
import { STEP_NAMES, type StepName } from '../migrate/steps.js';

/**
 * The operator's own Prometheus registry (not prom-client's global one, so tests and embedders
 * can't collide with other libraries' metrics).
 *
 * Label policy: labels only ever carry small closed enums (strategy, result, step). Never VM,
 * environment or host names, never anything from a Secret.
 */
export const registry = new Registry();

// Standard, unprefixed process_* and nodejs_* metrics so stock dashboards work.
collectDefaultMetrics({ register: registry });
// prom-client also exports these three gauges with a counter's "_total" suffix, which breaks the
// naming rules (promtool check metrics); the same numbers remain in nodejs_active_{handles,requests,resources}{type}.
for (const misnamed of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(misnamed);

/** Migration strategies known to the operator; anything else is reported as "other". */
export const STRATEGIES = ['cold', 'precopy', 'live', 'other'] as const;
export type StrategyLabel = (typeof STRATEGIES)[number];

// stuck: the rollback itself failed; a human must decide where the VM runs (alerted on).
export const MOVE_RESULTS = ['success', 'failure', 'rolled_back', 'stuck'] as const;
export type MoveResult = (typeof MOVE_RESULTS)[number];

/** Step names of a VM move (the flow's vocabulary, src/migrate/steps.ts); anything else is reported as "other". */
export const STEPS = [...STEP_NAMES, 'other'] as const;
export type StepLabel = StepName | 'other';

function oneOf<T extends string>(allowed: readonly T[], value: string, fallback: T): T {
  return (allowed as readonly string[]).includes(value) ? (value as T) : fallback;
}

/** Clamp a free-form strategy string to the bounded label set. */
export function strategyLabel(s: string): StrategyLabel {
  return oneOf(STRATEGIES, s, 'other');
}
/** Clamp a free-form step name to the bounded label set. */
export function stepLabel(s: string): StepLabel {
  return oneOf(STEPS, s, 'other');
}
/** Clamp a move result to the bounded label set. */
export function resultLabel(s: string): MoveResult {
  return oneOf(MOVE_RESULTS, s, 'failure');
}

export const migrationsStarted = new Counter({
  name: 'vmops_migrations_started_total',
  help: 'VMMigration objects whose execution started',
  labelNames: ['strategy'] as const,
  registers: [registry],
});

export const migrationsSucceeded = new Counter({
  name: 'vmops_migrations_succeeded_total',
  help: 'VMMigration objects that completed successfully',
  labelNames: ['strategy'] as const,
  registers: [registry],
});

export const migrationsFailed = new Counter({
  name: 'vmops_migrations_failed_total',
  help: 'VMMigration objects that ended in failure',
  labelNames: ['strategy'] as const,
  registers: [registry],
});

export const migrationsActive = new Gauge({
  name: 'vmops_migrations_active',
  help: 'VMMigration objects currently being executed',
  registers: [registry],
});

export const vmMoves = new Counter({
  name: 'vmops_vm_moves_total',
  help: 'Single VM moves between hypervisor hosts, by result',
  labelNames: ['result'] as const,
  registers: [registry],
});

const SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

const OUTAGE_ENDS = ['NodeReady', 'GuestResumed'] as const;

/** The headline: what the student saw. Labelled by how its end was seen (cold and pre-copy: node Ready; live: guest resumed). */
export const vmOutage = new Histogram({
  name: 'vmops_vm_outage_seconds',
  help: "The student's outage of a moved VM: from the stop until its node is Ready again (live: the guest's pause for the hand-over)",
  labelNames: ['until'] as const,
  buckets: SECONDS_BUCKETS,
  registers: [registry],
});

/** The operator's share of the outage, a breakdown beside it: the guest's boot and kubelet's start are not in it. */
export const vmStopToStart = new Histogram({
  name: 'vmops_vm_stop_to_start_seconds',
  help: "From the stop command on the source until the target's QEMU runs the guest (part of the outage; without the boot)",
  buckets: SECONDS_BUCKETS,
  registers: [registry],
});

export const transferBytes = new Counter({
  name: 'vmops_transfer_bytes_total',
  help: 'Bytes of VM disk and state copied between hosts',
  registers: [registry],
});

export const transferRate = new Gauge({
  name: 'vmops_transfer_rate_bytes_per_second',
  help: 'Rate of the copy in progress (0 when none runs)',
  registers: [registry],
});

export const stepDuration = new Histogram({
  name: 'vmops_step_duration_seconds',
  help: 'Duration of VM move steps',
  labelNames: ['step'] as const,
  buckets: [0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600],
  registers: [registry],
});

export const workqueueDepth = new Gauge({
  name: 'vmops_workqueue_depth',
  help: 'Keys waiting in the controller work queue',
  registers: [registry],
});

export const workqueueAdds = new Counter({
  name: 'vmops_workqueue_adds_total',
  help: 'Keys added to the controller work queue (after deduplication)',
  registers: [registry],
});

export const workqueueRetries = new Counter({
  name: 'vmops_workqueue_retries_total',
  help: 'Rate-limited requeues of the controller work queue (failures)',
  registers: [registry],
});

export const informerRestarts = new Counter({
  name: 'vmops_informer_restarts_total',
  help: 'Restarts of informers (watch errors, stalls, missed events)',
  registers: [registry],
});

export const leaderIsLeader = new Gauge({
  name: 'vmops_leader_is_leader',
  help: '1 while this replica holds the leader Lease',
  registers: [registry],
});

// A stuck move shows as this timestamp no longer advancing (alert VMOpsVMMoveStuck).
// QEMU's own figures for a live migration in flight (query-migrate), the last sample of any; 0 when none runs
export const liveRemainingBytes = new Gauge({ name: 'vmops_live_migration_remaining_bytes', help: 'RAM the live migration in flight still has to send (QEMU query-migrate); 0 when none runs', registers: [registry] });
export const liveExpectedDowntime = new Gauge({ name: 'vmops_live_migration_expected_downtime_seconds', help: "QEMU's expected stop-and-copy downtime for the live migration in flight; 0 when none runs", registers: [registry] });
export const liveDirtyPages = new Gauge({ name: 'vmops_live_migration_dirty_pages_per_second', help: 'Guest pages dirtied per second during the live migration in flight (QEMU); 0 when none runs', registers: [registry] });

export const liveCpuThrottle = new Gauge({ name: 'vmops_live_migration_cpu_throttle_percent', help: 'vCPU throttle auto-converge applies to the guest of the live migration in flight (QEMU), percent; 0 when none', registers: [registry] });

export function recordLiveFigures(f: { remainingBytes: number; expectedDowntimeMs?: number; dirtyPagesPerSecond?: number; cpuThrottlePercent?: number } | undefined): void {
  liveRemainingBytes.set(f?.remainingBytes ?? 0);
  liveExpectedDowntime.set((f?.expectedDowntimeMs ?? 0) / 1000);
  liveDirtyPages.set(f?.dirtyPagesPerSecond ?? 0);
  liveCpuThrottle.set(f?.cpuThrottlePercent ?? 0);
}

export const moveLastProgress = new Gauge({
  name: 'vmops_vm_move_last_progress_timestamp_seconds',
  help: 'Unix time of the last step change or copied byte of the least recently progressing VM move in flight, planned waits (window, turn) left out; 0 when none',
  registers: [registry],
});

let informerSyncedSource: () => boolean = () => false;
export const informerSynced = new Gauge({
  name: 'vmops_informer_synced',
  help: '1 once the VMMigration informer has listed and synced its cache',
  registers: [registry],
  collect() {
    this.set(informerSyncedSource() ? 1 : 0);
  },
});
/** Where vmops_informer_synced reads from at scrape time. */
export function reportInformerSynced(source: () => boolean): void {
  informerSyncedSource = source;
}

/**
 * Counters with labels appear only at their first increment, and Prometheus's increase() cannot
 * see a series born at 1, so alerts would miss the first failure. Export every label value at 0.
 */
export function initLabelledCounters(): void {
  for (const strategy of STRATEGIES) {
    migrationsStarted.inc({ strategy }, 0);
    migrationsSucceeded.inc({ strategy }, 0);
    migrationsFailed.inc({ strategy }, 0);
  }
  for (const result of MOVE_RESULTS) vmMoves.inc({ result }, 0);
  for (const until of OUTAGE_ENDS) vmOutage.zero({ until });
}

/**
 * Moves in flight (several at once in a fleet move): when each last made progress, and whether it
 * sits in a planned wait — the cut-over held for spec.window or for its turn behind the
 * environment's previous VM, the VM running undisturbed: waiting there for hours is not stuck.
 */
const movesInFlight = new Map<object, { at: number; plannedWait: boolean }>();
function refreshMoveProgress(): void {
  const active = [...movesInFlight.values()].filter((m) => !m.plannedWait);
  moveLastProgress.set(active.length === 0 ? 0 : Math.min(...active.map((m) => m.at)) / 1000);
}

export interface MoveProgress {
  /** a step began or ended, or bytes moved */
  progress(): void;
  /** the move entered (true) or left (false) a planned wait */
  plannedWait(on: boolean): void;
  /** done, failed, waiting or handed over: nothing left of it to look stuck */
  ended(): void;
}

export function moveInFlight(): MoveProgress {
  const key = {};
  movesInFlight.set(key, { at: Date.now(), plannedWait: false });
  refreshMoveProgress();
  const set = (m: Partial<{ at: number; plannedWait: boolean }>) => {
    const cur = movesInFlight.get(key);
    if (!cur) return;
    movesInFlight.set(key, { ...cur, ...m });
    refreshMoveProgress();
  };
  return {
    progress: () => set({ at: Date.now() }),
    plannedWait: (on) => set({ at: Date.now(), plannedWait: on }),
    ended: () => {
      if (!movesInFlight.delete(key)) return;
      refreshMoveProgress();
      if (movesInFlight.size === 0) recordLiveFigures(undefined);
    },
  };
}

// --- convenience recorders (they clamp labels so callers can't leak unbounded strings) ---

export function recordMigrationStarted(strategy: string): void {
  migrationsStarted.inc({ strategy: strategyLabel(strategy) });
}

export function recordMigrationFinished(strategy: string, ok: boolean): void {
  (ok ? migrationsSucceeded : migrationsFailed).inc({ strategy: strategyLabel(strategy) });
}

/**
 * The only writer of vmops_migrations_active: call when a migration run starts, call the returned
 * function (idempotent) when it ends, however it ends.
 */
export function migrationRunStarted(): () => void {
  migrationsActive.inc();
  let ended = false;
  return () => {
    if (ended) return;
    ended = true;
    migrationsActive.dec();
  };
}

export function recordVmMove(result: string, outage?: { seconds: number; until: (typeof OUTAGE_ENDS)[number]; stopToStartSeconds: number }): void {
  vmMoves.inc({ result: resultLabel(result) });
  const ok = (x: number) => Number.isFinite(x) && x >= 0;
  if (outage && ok(outage.seconds)) vmOutage.observe({ until: outage.until }, outage.seconds);
  if (outage && ok(outage.stopToStartSeconds)) vmStopToStart.observe(outage.stopToStartSeconds);
}

export function recordTransferBytes(bytes: number): void {
  if (Number.isFinite(bytes) && bytes > 0) {
    transferBytes.inc(bytes);
  }
}

/** Start a step timer; call the returned function when the step ends. */
export function startStepTimer(step: string): () => number {
  const end = stepDuration.startTimer({ step: stepLabel(step) });
  return () => end();
}

/** Hooks for WorkQueue's `metrics` option. Use them on a single (the controller's) queue. */
export function workQueueMetricsHooks(): WorkQueueMetricsHooks {
  return {
    depth: (n) => workqueueDepth.set(n),
    add: () => workqueueAdds.inc(),
    retry: () => workqueueRetries.inc(),
  };
}

/** Hook for ResilientInformer's `onRestart` option. */
export function informerRestartHook(): (reason: string) => void {
  return () => informerRestarts.inc();
}
