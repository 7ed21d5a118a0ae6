/**
 * kstatus conventions (what Flux, kpt and Argo CD's generic health read) derived from the phase
 * and the operator's own conditions: `Reconciling` while work is pending or running, `Stalled`
 * once the operator has given up and only a spec change or a human helps, `Ready` as before.
 * Pure; called on every status write so the three can never disagree with the phase.
 */
import type { VMMigrationStatus } from '../api/types.js';
import { setCondition } from './conditions.js';

export function withKstatus(status: VMMigrationStatus, now = new Date()): VMMigrationStatus {
  const phase = status.phase;
  if (!phase) return status;
  const generation = status.observedGeneration;
  const degraded = status.conditions?.find((c) => c.type === 'Degraded');
  const message = status.message ?? degraded?.message ?? phase;
  const stalled = phase === 'Failed';
  const reconciling = phase === 'Pending' || phase === 'Running' || phase === 'Paused';
  // a safety wait (quorum, PDB, unreachable host) is still reconciling; Progressing says why it waits
  const waiting = status.waitingSince ? status.conditions?.find((c) => c.type === 'Progressing') : undefined;
  status.conditions = setCondition(status.conditions, {
    type: 'Reconciling',
    status: reconciling ? 'True' : 'False',
    reason: reconciling ? (waiting ? waiting.reason : phase) : 'Finished',
    message: !reconciling ? `reconciliation finished: ${phase}`
      : waiting ? `waiting: ${waiting.message}`
      : status.progress ? `${phase}: ${status.progress} VM(s) done; ${message}` : `${phase}: ${message}`,
    ...(generation !== undefined && { observedGeneration: generation }),
  }, now);
  status.conditions = setCondition(status.conditions, {
    type: 'Stalled',
    status: stalled ? 'True' : 'False',
    reason: stalled ? (degraded?.status === 'True' ? degraded.reason : phase) : 'NotStalled',
    message: stalled ? message : 'no error that needs a change of spec',
    ...(generation !== undefined && { observedGeneration: generation }),
  }, now);
  return status;
}
