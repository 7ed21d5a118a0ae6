/** VMMigration (vmops.dev/v1alpha1): the types the operator reads and the status it writes. */
import type { V1ObjectMeta } from '@kubernetes/client-node';
import type { VMRole } from './inventory.js';

export const GROUP = 'vmops.dev';
export const VERSION = 'v1alpha1';
export const PLURAL = 'vmmigrations';
export const KIND = 'VMMigration';

export type Strategy = 'Rolling' | 'LiveMigrate';
export type LiveFallback = 'PreCopy' | 'Cold' | 'None';
export type MigrationPhase = 'Pending' | 'Running' | 'Paused' | 'Succeeded' | 'Failed';
/** Degraded: the VM ran on the target and stays there after a later step kept failing; its source image is kept (rule 2). */
export type VMPhase = 'Pending' | 'Running' | 'Succeeded' | 'Failed' | 'RolledBack' | 'Degraded' | 'Cancelled';

export interface VMMigrationSpec {
  environments?: string[];
  sourceHost?: string;
  /** absent: the operator picks a target per environment (see placement) */
  targetHost?: string;
  /** fleet moves: candidate targets when targetHost is absent (default: every inventory host but the source) */
  targetHosts?: string[];
  placement?: { maxEnvironmentsPercentPerHost?: number; cpuOvercommitRatio?: number; memoryReserveMiB?: number; diskReserveMiB?: number };
  maxParallelEnvironments?: number;
  /** environments with a VM down at the same instant, across the whole migration (0 = maxParallelEnvironments) */
  maxDisruptedEnvironments?: number;
  hostLimits?: { maxOutboundPerHost?: number; maxInboundPerHost?: number; bandwidthMiBpsPerHost?: number };
  /** VM moves only inside [notBefore, notAfter] (a move expected to outlast notAfter is not started); mirrors do not start earlier yet */
  window?: { notBefore?: string; notAfter?: string; daily?: { start: string; end: string } };
  /** environments ("student-42") or single VMs ("student-42/node-1") to leave alone from now on: a VM in flight finishes or rolls back, nothing new of them starts */
  cancel?: string[];
  strategy?: Strategy;
  transfer?: { mode?: 'Relay' | 'Direct'; precopy?: boolean; mirrorAhead?: number; compression?: 'None' | 'Zstd' | 'Auto'; bandwidthLimitMiBps?: number; stallTimeoutSeconds?: number };
  live?: { downtimeLimit?: string; maxBandwidthMiBps?: number; convergenceTimeout?: string; autoConverge?: boolean; fallback?: LiveFallback };
  maxUnavailablePerEnvironment?: number;
  drain?: { timeout?: string; gracePeriodSeconds?: number; deleteEmptyDirData?: boolean; force?: boolean; ignoreDaemonSets?: boolean; skipWaitForDeleteTimeoutSeconds?: number };
  shutdown?: { powerdownTimeout?: string };
  nodeReadyTimeout?: string;
  /** how long a not-yet-safe verdict (quorum, API readiness, environment busy, host unreachable) may hold the migration before it fails */
  safetyWaitTimeout?: string;
  paused?: boolean;
  dryRun?: boolean;
}

export interface Condition {
  // Reconciling/Stalled: kstatus conventions, set from the phase by controller/kstatus.ts
  type: 'Ready' | 'Progressing' | 'Degraded' | 'Reconciling' | 'Stalled';
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
  observedGeneration?: number;
  lastTransitionTime: string;
}

export interface PlanEntry {
  order: number;
  environment: string;
  vm: string;
  role: VMRole;
  node: string;
  from: string;
  to: string;
}

export interface VMStatus {
  environment: string;
  name: string;
  phase: VMPhase;
  step?: string;
  attempts: number;
  /** the student's outage: from the last moment the guest served to the first it served again (src/migrate/outage.ts) */
  outageSeconds?: number;
  /** how the outage's end was seen, and its parts; stopToStartSeconds is the operator's share */
  outage?: { until: 'NodeReady' | 'GuestResumed'; startedAt: string; endedAt: string; shutdownSeconds?: number; copySeconds?: number; bootSeconds?: number; stopToStartSeconds: number };
  bytesTransferred?: number;
  bytesTotal?: number;
  /** while copying: current rate and time left at that rate */
  bytesPerSecond?: number;
  etaSeconds?: number;
  /** while (and after) a live migration: QEMU's own figures from query-migrate, last sample */
  live?: LiveFigures;
  startedAt?: string;
  finishedAt?: string;
  message?: string;
}

/** QEMU's view of a live migration in flight (query-migrate). */
export interface LiveFigures {
  /** QEMU's estimate of the stop-and-copy downtime at the current dirty rate and bandwidth */
  expectedDowntimeMs?: number;
  remainingBytes: number;
  transferredBytes: number;
  totalBytes: number;
  dirtyPagesPerSecond?: number;
  /** auto-converge's vCPU throttle, percent (absent while QEMU does not throttle) */
  cpuThrottlePercent?: number;
}

export type EnvironmentPhase = 'Pending' | 'Running' | 'Waiting' | 'Succeeded' | 'Failed' | 'Cancelled';

/** One line per environment: where it goes, why there, how far it is. */
export interface EnvironmentSummary {
  name: string;
  target: string;
  /** why this target: the placement decision in one sentence */
  reason: string;
  phase: EnvironmentPhase;
  vmsDone: number;
  vmsTotal: number;
  message?: string;
}

export interface VMMigrationStatus {
  phase?: MigrationPhase;
  observedGeneration?: number;
  progress?: string;
  /** environments done/total, for kubectl get */
  environmentProgress?: string;
  environments?: EnvironmentSummary[];
  currentVM?: string;
  message?: string;
  startedAt?: string;
  finishedAt?: string;
  /** set while a not-yet-safe verdict holds the migration; the safetyWaitTimeout deadline counts from here (null clears it in the merge patch) */
  waitingSince?: string | null;
  conditions?: Condition[];
  plan?: PlanEntry[];
  vms?: VMStatus[];
}

export interface VMMigration {
  apiVersion: string;
  kind: string;
  metadata: V1ObjectMeta & { name: string; namespace: string; uid: string };
  spec: VMMigrationSpec;
  status?: VMMigrationStatus;
}

/** Effective settings after defaults: what the rest of the operator works with. */
export interface MigrationSettings {
  environments: string[] | undefined;
  sourceHost: string | undefined;
  targetHost: string | undefined;
  targetHosts: string[] | undefined;
  placement: PlacementSettings;
  maxParallelEnvironments: number;
  maxDisruptedEnvironments: number;
  maxOutboundPerHost: number;
  maxInboundPerHost: number;
  /** relay copies leaving or arriving at one host share this many bytes per second (undefined: no budget) */
  bandwidthPerHostBytesPerSec: number | undefined;
  /** daily: seconds after midnight UTC; endS < startS crosses midnight */
  window: { notBeforeMs: number | undefined; notAfterMs: number | undefined; daily?: { startS: number; endS: number } };
  cancel: string[];
  strategy: Strategy;
  precopy: boolean;
  /** pre-copy: VMs of an environment that mirror while the one before them drains and cuts over */
  mirrorAhead: number;
  live: { downtimeLimitMs: number; maxBandwidthBytesPerSec: number | undefined; convergenceTimeoutMs: number; autoConverge: boolean; fallback: LiveFallback };
  stallTimeoutMs: number;
  compression: 'none' | 'zstd' | 'auto';
  bandwidthLimitBytesPerSec: number | undefined;
  /** relay: file copies stream through the operator; direct: source → target with a per-copy key (transfer/direct.ts) */
  transferMode: 'relay' | 'direct';
  drainTimeoutMs: number;
  /** -1: each pod's own terminationGracePeriodSeconds (kubectl's default) */
  drainGracePeriodSeconds: number;
  deleteEmptyDirData: boolean;
  drainForce: boolean;
  drainIgnoreDaemonSets: boolean;
  drainSkipWaitForDeleteTimeoutSeconds: number;
  powerdownTimeoutMs: number;
  nodeReadyTimeoutMs: number;
  safetyWaitTimeoutMs: number;
  /** disk mirrors (pre-copy and live) must be in sync within this */
  mirrorReadyTimeoutMs: number;
  paused: boolean;
  dryRun: boolean;
}

export interface PlacementSettings {
  /** no host may hold more than this share of all environments (see README "Fleet moves") */
  maxEnvironmentsPercentPerHost: number;
  /** vCPUs of VMs per host CPU */
  cpuOvercommitRatio: number;
  memoryReserveBytes: number;
  diskReserveBytes: number;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses Go-style durations as the CRD schema allows them ("90s", "1m30s", "500ms"). */
export function parseDuration(value: string): number {
  const re = /([0-9]+)(ms|s|m|h)/gy;
  let total = 0;
  let consumed = 0;
  for (let m = re.exec(value); m; m = re.exec(value)) {
    total += Number(m[1]) * UNIT_MS[m[2]!]!;
    consumed = re.lastIndex;
  }
  if (consumed !== value.length || value.length === 0) throw new Error(`invalid duration ${JSON.stringify(value)} (expected e.g. 90s, 10m, 1h30m)`);
  return total;
}

/**
 * Every spec default, defined once. The CRD schema repeats them (the API server applies them on
 * create) and test/unit/flowDefaults.test.ts keeps the two equal; settingsFrom applies them to
 * resources written before a default existed.
 */
export const SPEC_DEFAULTS = {
  strategy: 'Rolling',
  precopy: false,
  // opt-in: on hosts that also carry the guests, concurrent mirrors and pre-passes compete for CPU (README)
  mirrorAhead: 0,
  compression: 'None',
  transferMode: 'Relay',
  stallTimeoutSeconds: 60,
  live: { downtimeLimit: '300ms', convergenceTimeout: '10m', autoConverge: true, fallback: 'PreCopy' },
  // kubectl drain's defaults, except ignoreDaemonSets (README, "Drain"): DaemonSet pods stay with the node, which comes back
  drain: { timeout: '10m', gracePeriodSeconds: -1, deleteEmptyDirData: false, force: false, ignoreDaemonSets: true, skipWaitForDeleteTimeoutSeconds: 0 },
  powerdownTimeout: '60s',
  nodeReadyTimeout: '5m',
  safetyWaitTimeout: '30m',
} as const;

/** Timeouts the spec does not expose, named here so no function carries its own fallback. */
export const TIMEOUTS = {
  /** a disk mirror (pre-copy or live) must reach READY within this */
  mirrorReadyMs: 3_600_000,
  /** QEMU start until QMP reports running */
  vmStartMs: 30_000,
  /** QMP quit until the process is gone, before SIGKILL */
  vmQuitMs: 10_000,
  /** soft cancel of READY mirror jobs (the last dirty blocks) */
  mirrorConvergeMs: 120_000,
} as const;

/** Fleet-move defaults, defined once; the CRD repeats them (test/unit/fleet.placement.test.ts keeps them equal). */
export const FLEET_DEFAULTS = {
  placement: { maxEnvironmentsPercentPerHost: 15, cpuOvercommitRatio: 4, memoryReserveMiB: 512, diskReserveMiB: 1024 },
  maxParallelEnvironments: 1,
  maxDisruptedEnvironments: 0,
  hostLimits: { maxOutboundPerHost: 2, maxInboundPerHost: 2 },
} as const;

function parseTime(value: string | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  const ms = Date.parse(value);
  if (!/^\d{4}-\d{2}-\d{2}T/.test(value) || Number.isNaN(ms)) throw new Error(`invalid ${field} ${JSON.stringify(value)} (expected RFC 3339, e.g. 2026-11-28T06:00:00Z)`);
  return ms;
}

/** "22:00" or "22:00:30" (UTC) → seconds after midnight. */
function parseTimeOfDay(value: string, field: string): number {
  const m = /^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$/.exec(value);
  if (!m) throw new Error(`invalid ${field} ${JSON.stringify(value)} (expected HH:MM or HH:MM:SS, UTC)`);
  return Number(m[1]) * 3600 + Number(m[2]) * 60 + Number(m[3] ?? 0);
}

/** Effective settings: the spec with SPEC_DEFAULTS applied. */
export function placementFrom(p: VMMigrationSpec['placement']): PlacementSettings {
  const F = FLEET_DEFAULTS.placement;
  return {
    maxEnvironmentsPercentPerHost: p?.maxEnvironmentsPercentPerHost ?? F.maxEnvironmentsPercentPerHost,
    cpuOvercommitRatio: p?.cpuOvercommitRatio ?? F.cpuOvercommitRatio,
    memoryReserveBytes: (p?.memoryReserveMiB ?? F.memoryReserveMiB) * 1048576,
    diskReserveBytes: (p?.diskReserveMiB ?? F.diskReserveMiB) * 1048576,
  };
}

export function settingsFrom(spec: VMMigrationSpec): MigrationSettings {
  const d = SPEC_DEFAULTS;
  const F = FLEET_DEFAULTS;
  return {
    environments: spec.environments,
    sourceHost: spec.sourceHost,
    targetHost: spec.targetHost,
    targetHosts: spec.targetHosts,
    placement: placementFrom(spec.placement),
    maxParallelEnvironments: spec.maxParallelEnvironments ?? F.maxParallelEnvironments,
    // 0 = as many as move in parallel
    maxDisruptedEnvironments: spec.maxDisruptedEnvironments || (spec.maxParallelEnvironments ?? F.maxParallelEnvironments),
    maxOutboundPerHost: spec.hostLimits?.maxOutboundPerHost ?? F.hostLimits.maxOutboundPerHost,
    maxInboundPerHost: spec.hostLimits?.maxInboundPerHost ?? F.hostLimits.maxInboundPerHost,
    bandwidthPerHostBytesPerSec: spec.hostLimits?.bandwidthMiBpsPerHost ? spec.hostLimits.bandwidthMiBpsPerHost * 1048576 : undefined,
    window: {
      notBeforeMs: parseTime(spec.window?.notBefore, 'window.notBefore'), notAfterMs: parseTime(spec.window?.notAfter, 'window.notAfter'),
      ...(spec.window?.daily ? { daily: { startS: parseTimeOfDay(spec.window.daily.start, 'window.daily.start'), endS: parseTimeOfDay(spec.window.daily.end, 'window.daily.end') } } : {}),
    },
    cancel: spec.cancel ?? [],
    strategy: spec.strategy ?? d.strategy,
    precopy: spec.transfer?.precopy ?? d.precopy,
    mirrorAhead: spec.transfer?.mirrorAhead ?? d.mirrorAhead,
    live: {
      downtimeLimitMs: parseDuration(spec.live?.downtimeLimit ?? d.live.downtimeLimit),
      maxBandwidthBytesPerSec: spec.live?.maxBandwidthMiBps ? spec.live.maxBandwidthMiBps * 1048576 : undefined,
      convergenceTimeoutMs: parseDuration(spec.live?.convergenceTimeout ?? d.live.convergenceTimeout),
      autoConverge: spec.live?.autoConverge ?? d.live.autoConverge,
      fallback: spec.live?.fallback ?? d.live.fallback,
    },
    stallTimeoutMs: (spec.transfer?.stallTimeoutSeconds ?? d.stallTimeoutSeconds) * 1000,
    compression: ({ None: 'none', Zstd: 'zstd', Auto: 'auto' } as const)[spec.transfer?.compression ?? d.compression],
    bandwidthLimitBytesPerSec: spec.transfer?.bandwidthLimitMiBps ? spec.transfer.bandwidthLimitMiBps * 1048576 : undefined,
    transferMode: (spec.transfer?.mode ?? d.transferMode) === 'Direct' ? 'direct' : 'relay',
    drainTimeoutMs: parseDuration(spec.drain?.timeout ?? d.drain.timeout),
    drainGracePeriodSeconds: spec.drain?.gracePeriodSeconds ?? d.drain.gracePeriodSeconds,
    deleteEmptyDirData: spec.drain?.deleteEmptyDirData ?? d.drain.deleteEmptyDirData,
    drainForce: spec.drain?.force ?? d.drain.force,
    drainIgnoreDaemonSets: spec.drain?.ignoreDaemonSets ?? d.drain.ignoreDaemonSets,
    drainSkipWaitForDeleteTimeoutSeconds: spec.drain?.skipWaitForDeleteTimeoutSeconds ?? d.drain.skipWaitForDeleteTimeoutSeconds,
    powerdownTimeoutMs: parseDuration(spec.shutdown?.powerdownTimeout ?? d.powerdownTimeout),
    nodeReadyTimeoutMs: parseDuration(spec.nodeReadyTimeout ?? d.nodeReadyTimeout),
    safetyWaitTimeoutMs: parseDuration(spec.safetyWaitTimeout ?? d.safetyWaitTimeout),
    mirrorReadyTimeoutMs: TIMEOUTS.mirrorReadyMs,
    paused: spec.paused ?? false,
    dryRun: spec.dryRun ?? false,
  };
}

/** The bounded strategy label used in metrics. */
export function strategyName(s: Pick<MigrationSettings, 'strategy' | 'precopy'>): 'cold' | 'precopy' | 'live' {
  return s.strategy === 'LiveMigrate' ? 'live' : s.precopy ? 'precopy' : 'cold';
}
