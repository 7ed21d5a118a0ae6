/** VMMigration (vmops.dev/v1alpha1): the types the operator reads and the status it writes. */
import type { V1ObjectMeta } from '@kubernetes/client-node';
import type { VMRole } from './inventory.js';

export const GROUP = 'vmops.dev';
export const VERSION = 'v1alpha1';
export const PLURAL = 'vmmigrations';
export const KIND = 'VMMigration';

export type Strategy = 'Rolling' | 'LiveMigrate';
export type LiveFallback = 'PreCopy' | 'Cold' | 'None';
export type MigrationPhase = 'Pending' | 'Running' | 'Paused' | 'Succeeded' | 'Failed' | 'Aborted';
export type VMPhase = 'Pending' | 'Running' | 'Succeeded' | 'Failed' | 'RolledBack' | 'Skipped';

export interface VMMigrationSpec {
  environments?: string[];
  sourceHost?: string;
  targetHost: string;
  strategy?: Strategy;
  transfer?: { mode?: 'Relay'; precopy?: boolean; compression?: 'None' | 'Zstd' | 'Auto'; bandwidthLimitMiBps?: number; stallTimeoutSeconds?: number };
  live?: { downtimeLimit?: string; maxBandwidthMiBps?: number; convergenceTimeout?: string; fallback?: LiveFallback };
  maxUnavailablePerEnvironment?: number;
  drain?: { timeout?: string; gracePeriodSeconds?: number; deleteEmptyDirData?: boolean };
  shutdown?: { powerdownTimeout?: string };
  nodeReadyTimeout?: string;
  paused?: boolean;
  dryRun?: boolean;
}

export interface Condition {
  type: 'Ready' | 'Progressing' | 'Degraded';
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
  downtimeSeconds?: number;
  bytesTransferred?: number;
  bytesTotal?: number;
  /** while copying: current rate and time left at that rate */
  bytesPerSecond?: number;
  etaSeconds?: number;
  startedAt?: string;
  finishedAt?: string;
  message?: string;
}

export interface VMMigrationStatus {
  phase?: MigrationPhase;
  observedGeneration?: number;
  progress?: string;
  currentVM?: string;
  message?: string;
  startedAt?: string;
  finishedAt?: string;
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
  targetHost: string;
  strategy: Strategy;
  precopy: boolean;
  live: { downtimeLimitMs: number; maxBandwidthBytesPerSec: number | undefined; convergenceTimeoutMs: number; fallback: LiveFallback };
  stallTimeoutMs: number;
  compression: 'none' | 'zstd' | 'auto';
  bandwidthLimitBytesPerSec: number | undefined;
  drainTimeoutMs: number;
  drainGracePeriodSeconds: number;
  deleteEmptyDirData: boolean;
  powerdownTimeoutMs: number;
  nodeReadyTimeoutMs: number;
  paused: boolean;
  dryRun: boolean;
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

/** Defaults mirror the CRD's so a resource written before a default existed behaves the same. */
export function settingsFrom(spec: VMMigrationSpec): MigrationSettings {
  return {
    environments: spec.environments,
    sourceHost: spec.sourceHost,
    targetHost: spec.targetHost,
    strategy: spec.strategy ?? 'Rolling',
    precopy: spec.transfer?.precopy ?? false,
    live: {
      downtimeLimitMs: parseDuration(spec.live?.downtimeLimit ?? '300ms'),
      maxBandwidthBytesPerSec: spec.live?.maxBandwidthMiBps ? spec.live.maxBandwidthMiBps * 1048576 : undefined,
      convergenceTimeoutMs: parseDuration(spec.live?.convergenceTimeout ?? '10m'),
      fallback: spec.live?.fallback ?? 'PreCopy',
    },
    stallTimeoutMs: (spec.transfer?.stallTimeoutSeconds ?? 60) * 1000,
    compression: ({ None: 'none', Zstd: 'zstd', Auto: 'auto' } as const)[spec.transfer?.compression ?? 'None'],
    bandwidthLimitBytesPerSec: spec.transfer?.bandwidthLimitMiBps ? spec.transfer.bandwidthLimitMiBps * 1048576 : undefined,
    drainTimeoutMs: parseDuration(spec.drain?.timeout ?? '10m'),
    drainGracePeriodSeconds: spec.drain?.gracePeriodSeconds ?? 30,
    deleteEmptyDirData: spec.drain?.deleteEmptyDirData ?? true,
    powerdownTimeoutMs: parseDuration(spec.shutdown?.powerdownTimeout ?? '60s'),
    nodeReadyTimeoutMs: parseDuration(spec.nodeReadyTimeout ?? '5m'),
    paused: spec.paused ?? false,
    dryRun: spec.dryRun ?? false,
  };
}

/** The bounded strategy label used in metrics. */
export function strategyName(s: Pick<MigrationSettings, 'strategy' | 'precopy'>): 'cold' | 'precopy' | 'live' {
  return s.strategy === 'LiveMigrate' ? 'live' : s.precopy ? 'precopy' : 'cold';
}
