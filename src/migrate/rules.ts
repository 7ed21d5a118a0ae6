/**
 * Migration-level rules, kept out of the controller (which only maps them to Kubernetes): how a
 * move's outcome ends the migration, and how long a not-yet-safe verdict may hold it.
 */
import type { EnvironmentSpec } from '../api/inventory.js';
import type { PlanEntry } from '../api/types.js';
import type { MoveOutcome } from './vmMove.js';

/** What the migration does after a VM move ended with this outcome. */
export type MigrationVerdict = 'continue' | 'wait' | 'fail' | 'handover';

export function afterMove(outcome: MoveOutcome | 'moved'): MigrationVerdict {
  switch (outcome) {
    case 'moved': return 'continue';
    // not safe yet: nothing was touched, check again later (until safetyWaitTimeout)
    case 'waiting': return 'wait';
    // stopped on purpose (leadership lost, shutdown): the next leader resumes from the journal
    case 'interrupted': return 'handover';
    // untouched, rolled back or stuck: terminal until the spec changes
    default: return 'fail';
  }
}

/**
 * A wait that began at `since`: fail once it has lasted `timeoutMs`, otherwise check again after a
 * backoff that grows with the time already waited (2 s … 30 s).
 */
export function safetyWait(sinceMs: number, nowMs: number, timeoutMs: number): { fail: true; waitedMs: number } | { fail: false; retryAfterMs: number } {
  const waitedMs = nowMs - sinceMs;
  if (waitedMs >= timeoutMs) return { fail: true, waitedMs };
  return { fail: false, retryAfterMs: Math.min(30_000, Math.max(2000, waitedMs / 4)) };
}

/** A move as the operator's own store recorded it when the migration was planned. */
export interface StoredMove {
  environment: string;
  vm: string;
  fromHost: string;
  toHost: string;
}

/**
 * The plan a resumed migration runs. The store's moves (written before the first move) are the
 * truth; status is only read back when the store has no record of the migration (a new database),
 * and then every entry is checked against the inventory — status is writable by anyone with
 * patch rights on the status subresource and has no schema constraints worth trusting.
 */
export function resumePlan(input: {
  status?: PlanEntry[];
  stored: StoredMove[];
  hosts: string[];
  environments: EnvironmentSpec[];
  /** the spec's scope: moves an earlier spec of the same migration planned elsewhere are not this run's */
  spec: { targetHost?: string; targetHosts?: string[]; sourceHost?: string; environments?: string[] };
}): { entries: PlanEntry[]; problems: string[]; statusIgnored?: string } {
  const { targetHost, targetHosts, sourceHost, environments } = input.spec;
  const targetOk = (to: string) => (targetHost ? to === targetHost : targetHosts ? targetHosts.includes(to) : true);
  const inScope = (m: { environment: string; from: string; to: string }) => targetOk(m.to)
    && (!sourceHost || m.from === sourceHost) && (!environments || environments.includes(m.environment));
  const problems: string[] = [];
  const vmOf = (env: string, vm: string) => input.environments.find((e) => e.name === env)?.vms.find((v) => v.name === vm);
  const key = (e: { environment: string; vm: string; from: string; to: string }) => `${e.environment}/${e.vm}:${e.from}->${e.to}`;
  if (input.stored.length > 0) {
    const entries: PlanEntry[] = [];
    for (const m of input.stored) {
      if (!inScope({ environment: m.environment, from: m.fromHost, to: m.toHost })) continue;
      const spec = vmOf(m.environment, m.vm);
      if (!spec) {
        problems.push(`VM ${m.environment}/${m.vm} of the stored plan is no longer in the inventory`);
        continue;
      }
      entries.push({ order: entries.length + 1, environment: m.environment, vm: m.vm, role: spec.role, node: spec.nodeName, from: m.fromHost, to: m.toHost });
    }
    const fromStatus = (input.status ?? []).map(key).join(', ');
    const fromStore = entries.map(key).join(', ');
    const statusIgnored = input.status && fromStatus !== fromStore ? `status.plan (${fromStatus || 'empty'}) differs from the operator's stored plan (${fromStore}); resuming the stored plan` : undefined;
    return { entries, problems, statusIgnored };
  }
  const entries = input.status ?? [];
  if (entries.length === 0) problems.push('status.plan is empty and the operator has no stored plan for this migration');
  const seen = new Set<string>();
  for (const e of entries) {
    const name = `${e.environment}/${e.vm}`;
    if (e.from === e.to) problems.push(`${name}: from and to are both ${e.from}`);
    else if (!inScope(e)) problems.push(`${name}: ${e.from} → ${e.to} is outside the spec (target ${targetHost ?? targetHosts?.join('|') ?? 'any'}, source ${sourceHost ?? 'any'})`);
    for (const h of [e.from, e.to]) if (!input.hosts.includes(h)) problems.push(`${name}: host ${h} is not in the inventory`);
    const spec = vmOf(e.environment, e.vm);
    if (!spec) problems.push(`VM ${name} is not in the inventory`);
    else if (spec.role !== e.role || spec.nodeName !== e.node) problems.push(`${name}: role/node in status.plan (${e.role}/${e.node}) differ from the inventory (${spec.role}/${spec.nodeName})`);
    if (seen.has(name)) problems.push(`${name} appears twice in status.plan`);
    seen.add(name);
  }
  return { entries, problems };
}
