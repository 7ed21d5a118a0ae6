import type { Condition } from '../api/types.js';

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
