/**
 * Status at fleet scale (pure): one summary line per environment, and a per-VM list bounded so a
 * migration of hundreds of VMs stays far below the API server's object size limit (~1.5 MiB).
 * The plan keeps every VM; the per-VM list keeps what a human needs: what runs, what failed, and
 * the most recent successes.
 */
import type { EnvironmentSummary, PlanEntry, VMMigrationStatus, VMStatus } from '../api/types.js';

/** Above this many VMs the per-VM list is bounded. */
export const VM_LIST_LIMIT = 50;

export function environmentSummaries(entries: PlanEntry[], reasons: Map<string, string>): EnvironmentSummary[] {
  const out = new Map<string, EnvironmentSummary>();
  for (const e of entries) {
    let s = out.get(e.environment);
    if (!s) out.set(e.environment, (s = { name: e.environment, target: e.to, reason: reasons.get(e.environment) ?? '', phase: 'Pending', vmsDone: 0, vmsTotal: 0 }));
    s.vmsTotal++;
  }
  return [...out.values()];
}

export function initialVmList(entries: PlanEntry[]): VMStatus[] {
  // Small migrations list every VM up front, as before; large ones list VMs once they start.
  return entries.length <= VM_LIST_LIMIT ? entries.map((e) => ({ environment: e.environment, name: e.vm, phase: 'Pending', attempts: 0 })) : [];
}

/** Applies a patch to one VM's entry, adding it if the bounded list dropped or never had it. */
export function patchVm(s: VMMigrationStatus, environment: string, name: string, patch: Partial<VMStatus>): void {
  s.vms ??= [];
  let v = s.vms.find((x) => x.environment === environment && x.name === name);
  if (!v) s.vms.push((v = { environment, name, phase: 'Pending', attempts: 0 }));
  Object.assign(v, patch);
}

const TERMINAL_OK = new Set<VMStatus['phase']>(['Succeeded']);

/**
 * Keeps every VM that is not finished successfully (running, failed, rolled back, pending with a
 * message) and the most recently finished successes up to `limit` entries in all.
 */
export function boundVmList(vms: VMStatus[], limit = VM_LIST_LIMIT): VMStatus[] {
  if (vms.length <= limit) return vms;
  const keep = vms.filter((v) => !TERMINAL_OK.has(v.phase) && !(v.phase === 'Pending' && !v.message));
  const ok = vms.filter((v) => TERMINAL_OK.has(v.phase)).sort((a, b) => (b.finishedAt ?? '').localeCompare(a.finishedAt ?? ''));
  const room = Math.max(0, limit - keep.length);
  const kept = new Set([...keep, ...ok.slice(0, room)]);
  return vms.filter((v) => kept.has(v));
}

export function patchEnvironment(s: VMMigrationStatus, environment: string, patch: Partial<EnvironmentSummary>): void {
  const e = s.environments?.find((x) => x.name === environment);
  if (e) Object.assign(e, patch);
  const list = s.environments ?? [];
  const finished = list.filter((x) => x.phase === 'Succeeded').length;
  s.environmentProgress = `${finished}/${list.length}`;
}

/** "host02 ×2, host03 ×1": where the VMs of a plan go, for messages. */
export function targetsText(entries: PlanEntry[]): string {
  const envsPer = new Map<string, Set<string>>();
  for (const e of entries) {
    if (!envsPer.has(e.to)) envsPer.set(e.to, new Set());
    envsPer.get(e.to)!.add(e.environment);
  }
  return [...envsPer].sort(([a], [b]) => (a < b ? -1 : 1)).map(([h, s]) => `${s.size} environment(s) to ${h}`).join(', ') || 'nothing to move';
}
