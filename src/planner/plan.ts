/**
 * Pure planning: inventory + migration settings → ordered VM moves, or the
 * problems that make the migration impossible. No I/O here.
 */
import type { EnvironmentSpec, HostSpec, VMRole, VMSpec } from '../api/inventory.js';
import type { MigrationSettings, PlanEntry } from '../api/types.js';

export interface PlanResult {
  entries: PlanEntry[];
  /** each problem is a sentence naming what is wrong; non-empty means: do not start */
  problems: string[];
}

/**
 * Order inside one environment:
 * 1. beachhead: the student's entry point; nothing else depends on it being up during the other moves.
 * 2. workers: their drains need a fully healthy control plane, so they go while all controllers are untouched.
 * 3. controllers last, one at a time, each gated by a quorum check; moving them last keeps the
 *    window in which the control plane runs with two of three members as short as possible.
 */
const ROLE_ORDER: Record<VMRole, number> = { beachhead: 0, worker: 1, controller: 2 };

export function orderVms(vms: VMSpec[]): VMSpec[] {
  return [...vms].sort((a, b) => ROLE_ORDER[a.role] - ROLE_ORDER[b.role] || a.name.localeCompare(b.name, 'en', { numeric: true }));
}

export function planMigration(hosts: HostSpec[], environments: EnvironmentSpec[], settings: Pick<MigrationSettings, 'environments' | 'sourceHost' | 'targetHost'>): PlanResult {
  const problems: string[] = [];
  const hostNames = new Set(hosts.map((h) => h.name));
  if (!hostNames.has(settings.targetHost)) problems.push(`target host "${settings.targetHost}" is not in the inventory (known hosts: ${[...hostNames].join(', ') || 'none'})`);
  if (settings.sourceHost !== undefined && !hostNames.has(settings.sourceHost)) problems.push(`source host "${settings.sourceHost}" is not in the inventory (known hosts: ${[...hostNames].join(', ') || 'none'})`);

  const byName = new Map(environments.map((e) => [e.name, e]));
  let selected: EnvironmentSpec[];
  if (settings.environments && settings.environments.length > 0) {
    const unknown = settings.environments.filter((n) => !byName.has(n));
    if (unknown.length > 0) problems.push(`unknown environment${unknown.length > 1 ? 's' : ''} ${unknown.map((n) => `"${n}"`).join(', ')}: not in the inventory`);
    selected = settings.environments.filter((n) => byName.has(n)).map((n) => byName.get(n)!);
  } else {
    selected = environments.filter((e) => e.vms.some((v) => v.host === settings.sourceHost));
  }
  if (problems.length > 0) return { entries: [], problems };

  const entries: PlanEntry[] = [];
  for (const env of selected) {
    const movable = env.vms.filter((v) => v.host !== settings.targetHost && (settings.sourceHost === undefined || v.host === settings.sourceHost));
    for (const vm of orderVms(movable)) {
      entries.push({ order: entries.length + 1, environment: env.name, vm: vm.name, role: vm.role, node: vm.nodeName, from: vm.host, to: settings.targetHost });
    }
  }
  return { entries, problems };
}
