import type { Condition, VMMigrationStatus } from '../api/types.js';

/** Sets a condition, keeping lastTransitionTime when the status did not change (the Kubernetes convention). */
export function setCondition(conditions: Condition[] | undefined, next: Omit<Condition, 'lastTransitionTime'>, now = new Date()): Condition[] {
  const list = [...(conditions ?? [])];
  const i = list.findIndex((c) => c.type === next.type);
  const prev = i >= 0 ? list[i] : undefined;
  const merged: Condition = { ...next, lastTransitionTime: prev && prev.status === next.status ? prev.lastTransitionTime : now.toISOString() };
  if (i >= 0) list[i] = merged;
  else list.push(merged);
  return list;
}

/** The states a migration's status can be put in; each sets phase and conditions together. */
export type MigrationState = 'running' | 'waiting' | 'paused' | 'succeeded' | 'failed' | 'dryRun';

type Cond = [Condition['status'], string] | undefined;

/**
 * The one place phase and conditions are written. `reason`/`message` fill the conditions the state
 * names; a condition a state leaves undefined keeps its value (waiting and paused only say
 * Progressing=False).
 */
export function setState(s: VMMigrationStatus, generation: number, state: MigrationState, reason: string, message: string, now = new Date()): void {
  const table: Record<MigrationState, { phase?: VMMigrationStatus['phase']; Ready: Cond; Progressing: Cond; Degraded: Cond }> = {
    running: { phase: 'Running', Ready: ['False', 'InProgress'], Progressing: ['True', 'Migrating'], Degraded: ['False', 'AsExpected'] },
    waiting: { phase: s.phase === 'Running' ? 'Running' : 'Pending', Ready: undefined, Progressing: ['False', reason], Degraded: undefined },
    paused: { phase: 'Paused', Ready: undefined, Progressing: ['False', 'Paused'], Degraded: undefined },
    succeeded: { phase: 'Succeeded', Ready: ['True', 'Succeeded'], Progressing: ['False', 'Completed'], Degraded: ['False', 'AsExpected'] },
    failed: { phase: 'Failed', Ready: ['False', reason], Progressing: ['False', reason], Degraded: ['True', reason] },
    dryRun: { phase: 'Succeeded', Ready: ['True', 'DryRun'], Progressing: ['False', 'DryRun'], Degraded: ['False', 'DryRun'] },
  };
  const row = table[state];
  s.phase = row.phase;
  s.observedGeneration = generation;
  // null, not undefined: the status is written as a merge patch, where only null removes a field
  if (state !== 'waiting') s.waitingSince = null;
  if (state === 'succeeded' || state === 'failed' || state === 'dryRun') {
    s.finishedAt = now.toISOString();
    s.currentVM = '';
  }
  if (state !== 'waiting' && state !== 'paused') s.message = message;
  for (const type of ['Ready', 'Progressing', 'Degraded'] as const) {
    const c = row[type];
    if (!c) continue;
    const detail = state === 'running' && type === 'Degraded' ? 'no failures' : state === 'dryRun' && type !== 'Ready' ? 'nothing was moved' : message;
    s.conditions = setCondition(s.conditions, { type, status: c[0], reason: c[1], message: detail, observedGeneration: generation }, now);
  }
}

/**
 * Marks the status as reflecting `generation` (never an older one): status.observedGeneration and every
 * condition's. Called when the operator has processed that spec without a change of phase: an edit
 * during a run, or an edit of a finished migration (which stays finished).
 */
export function observeGeneration(s: VMMigrationStatus, generation: number): void {
  if (!s.phase || (s.observedGeneration ?? 0) >= generation) return;
  s.observedGeneration = generation;
  s.conditions = s.conditions?.map((c) => ({ ...c, observedGeneration: generation }));
}
