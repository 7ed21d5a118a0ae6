/**
 * Pure planning: inventory + migration settings → ordered VM moves, or the
 * problems that make the migration impossible. No I/O here.
 */
import type { EnvironmentSpec, HostSpec, VMRole, VMSpec } from '../api/inventory.js';
import { placementFrom, type MigrationSettings, type PlanEntry } from '../api/types.js';
import { chooseTargets, type Choice, type Demand, type HostCapacity } from './placement.js';

export interface PlanResult {
  entries: PlanEntry[];
  /** each problem is a sentence naming what is wrong; non-empty means: do not start */
  problems: string[];
  /** the chosen target per environment and why, in plan order */
  environments: Choice[];
  /** the condition reason for the problems: a bad reference, or no room under the policy */
  reason?: 'InvalidReference' | 'NoPlacement';
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

type PlanSettings = Pick<MigrationSettings, 'environments' | 'sourceHost' | 'targetHost'> & Partial<Pick<MigrationSettings, 'targetHosts' | 'placement'>>;

/**
 * Without spec.targetHost the target of each environment is chosen here (see placement.ts);
 * `capacity` holds what was measured on the hosts — without it only the placement policy and the
 * inventory's vCPU count are checked, and each reason says so.
 */
export function planMigration(hosts: HostSpec[], environments: EnvironmentSpec[], settings: PlanSettings, capacity?: Map<string, HostCapacity>, unreachable?: Map<string, string>): PlanResult {
  const problems: string[] = [];
  const hostNames = new Set(hosts.map((h) => h.name));
  const known = () => [...hostNames].join(', ') || 'none';
  if (settings.targetHost !== undefined && !hostNames.has(settings.targetHost)) problems.push(`target host "${settings.targetHost}" is not in the inventory (known hosts: ${known()})`);
  if (settings.sourceHost !== undefined && !hostNames.has(settings.sourceHost)) problems.push(`source host "${settings.sourceHost}" is not in the inventory (known hosts: ${known()})`);
  for (const t of settings.targetHosts ?? []) if (!hostNames.has(t)) problems.push(`target host "${t}" in spec.targetHosts is not in the inventory (known hosts: ${known()})`);

  const byName = new Map(environments.map((e) => [e.name, e]));
  let selected: EnvironmentSpec[];
  if (settings.environments && settings.environments.length > 0) {
    const unknown = settings.environments.filter((n) => !byName.has(n));
    if (unknown.length > 0) problems.push(`unknown environment${unknown.length > 1 ? 's' : ''} ${unknown.map((n) => `"${n}"`).join(', ')}: not in the inventory`);
    selected = settings.environments.filter((n) => byName.has(n)).map((n) => byName.get(n)!);
  } else {
    selected = environments.filter((e) => e.vms.some((v) => v.host === settings.sourceHost));
  }
  if (problems.length > 0) return { entries: [], problems, environments: [], reason: 'InvalidReference' };

  const movingVms = (env: EnvironmentSpec, target: string) => env.vms.filter((v) => v.host !== target && (settings.sourceHost === undefined || v.host === settings.sourceHost));
  const moving = selected.map((env) => {
    const leaving = settings.sourceHost !== undefined ? [settings.sourceHost] : [...new Set(env.vms.map((v) => v.host))].sort();
    const demand = (target: string): Demand => {
      const vms = movingVms(env, target);
      let diskBytes: number | undefined = 0;
      for (const h of new Set(vms.map((v) => v.host))) {
        const b = capacity?.get(h)?.environmentBytes[env.name];
        diskBytes = b === undefined || diskBytes === undefined ? undefined : diskBytes + b;
      }
      return { memoryBytes: vms.reduce((a, v) => a + v.memoryMiB * 1048576, 0), vcpus: vms.reduce((a, v) => a + v.cpus, 0), diskBytes };
    };
    return { env, leaving, demand };
  }).filter((m) => m.env.vms.some((v) => v.host !== settings.targetHost && (settings.sourceHost === undefined || v.host === settings.sourceHost)));

  const candidates = (settings.targetHosts ?? hosts.map((h) => h.name).filter((h) => h !== settings.sourceHost)).slice().sort();
  const { choices, problems: placementProblems } = chooseTargets({
    hosts, allEnvironments: environments, moving, candidates, capacity, unreachable, placement: settings.placement ?? placementFrom(undefined), fixedTarget: settings.targetHost,
  });
  if (placementProblems.length > 0) return { entries: [], problems: placementProblems, environments: [], reason: 'NoPlacement' };

  const entries: PlanEntry[] = [];
  const chosen: Choice[] = [];
  for (const { env } of moving) {
    const choice = choices.get(env.name)!;
    chosen.push(choice);
    for (const vm of orderVms(movingVms(env, choice.target))) {
      entries.push({ order: entries.length + 1, environment: env.name, vm: vm.name, role: vm.role, node: vm.nodeName, from: vm.host, to: choice.target });
    }
  }
  return { entries, problems, environments: chosen };
}
