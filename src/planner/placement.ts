/**
 * Pure target selection for fleet moves: which host takes each environment, from measured
 * capacity and the placement policy (no host may hold more than a share of all environments).
 * No I/O here; capacity is read over SSH by src/hosts/capacity.ts and passed in.
 */
import type { EnvironmentSpec, HostSpec } from '../api/inventory.js';
import type { PlacementSettings } from '../api/types.js';

/** What a host has room for, as measured on it. */
export interface HostCapacity {
  host: string;
  memTotalBytes: number;
  memAvailableBytes: number;
  cpus: number;
  /** free bytes in the filesystem holding the host's VM directory */
  diskFreeBytes: number;
  /** allocated bytes (du) of each environment directory found on the host */
  environmentBytes: Record<string, number>;
}

/** What one environment needs on its target. */
export interface Demand {
  memoryBytes: number;
  vcpus: number;
  /** undefined = the source could not tell (no capacity reading) */
  diskBytes: number | undefined;
}

export interface Choice {
  environment: string;
  target: string;
  reason: string;
}

const GiB = 1024 ** 3;
/** sizes in messages: MiB below 1 GiB, so small test VMs read as well as real ones */
export const gib = (bytes: number): string => (Math.abs(bytes) < GiB ? `${(bytes / 1048576).toFixed(1)} MiB` : `${(bytes / GiB).toFixed(bytes < 10 * GiB ? 2 : 1)} GiB`);

/**
 * Environments one host may hold: floor(total × percent / 100), so that losing the host really
 * affects at most that share of the students — but at least 1, because an environment is never
 * split and a policy that admits no environment anywhere would forbid every move. With fewer hosts
 * than ceil(100 / percent) no placement of the whole cloud can satisfy the policy; target selection
 * then refuses as soon as the hosts' caps are used up.
 */
export function maxEnvironmentsPerHost(totalEnvironments: number, percent: number): number {
  return Math.max(1, Math.floor((totalEnvironments * percent) / 100));
}

/** Running totals per host while choices are made: the inventory's state plus what was placed so far. */
export class HostLedger {
  private readonly envs = new Map<string, Set<string>>();
  private readonly mem = new Map<string, number>();
  private readonly vcpus = new Map<string, number>();
  private readonly disk = new Map<string, number>();

  constructor(environments: EnvironmentSpec[]) {
    for (const env of environments) {
      for (const vm of env.vms) {
        this.envSet(vm.host).add(env.name);
        this.add(this.mem, vm.host, vm.memoryMiB * 1048576);
        this.add(this.vcpus, vm.host, vm.cpus);
      }
    }
  }

  private envSet(host: string): Set<string> {
    let s = this.envs.get(host);
    if (!s) this.envs.set(host, (s = new Set()));
    return s;
  }

  private add(m: Map<string, number>, host: string, v: number): void {
    m.set(host, (m.get(host) ?? 0) + v);
  }

  environmentsOn(host: string): ReadonlySet<string> {
    return this.envs.get(host) ?? new Set();
  }

  committedMemory(host: string): number {
    return this.mem.get(host) ?? 0;
  }

  committedVcpus(host: string): number {
    return this.vcpus.get(host) ?? 0;
  }

  /** disk placed on the host by this plan (the inventory's own use is already in the measured free space) */
  plannedDisk(host: string): number {
    return this.disk.get(host) ?? 0;
  }

  /**
   * Records env moving onto target: the plan is judged by the state after the moves (memory and
   * vCPUs leave the source with the VMs), so a rebalance of every host can be planned. The
   * transient — a VM arriving before another left — is what the per-VM check right before each
   * move (vmFits, measured MemAvailable) guards. Disk is not credited back to the source: the
   * planner does not count on a deletion.
   */
  place(env: EnvironmentSpec, target: string, leaving: string[], d: Demand): void {
    this.envSet(target).add(env.name);
    for (const h of leaving) if (h !== target) this.envSet(h).delete(env.name);
    this.add(this.mem, target, d.memoryBytes);
    this.add(this.vcpus, target, d.vcpus);
    this.add(this.disk, target, d.diskBytes ?? 0);
    for (const vm of env.vms) {
      if (vm.host === target || !leaving.includes(vm.host)) continue;
      this.add(this.mem, vm.host, -vm.memoryMiB * 1048576);
      this.add(this.vcpus, vm.host, -vm.cpus);
    }
  }
}

export interface FitInput {
  host: string;
  env: string;
  demand: Demand;
  capacity: HostCapacity | undefined;
  ledger: HostLedger;
  placement: PlacementSettings;
  /** undefined = the policy does not apply (target named by hand) */
  envCap: number | undefined;
  totalEnvironments: number;
}

export type Fit = { ok: true; envsAfter: number; memFreeAfter: number | undefined; diskFreeAfter: number | undefined; vcpusAfter: number; vcpuLimit: number | undefined } | { ok: false; short: string };

/** Does env fit on host? If not, `short` names what is short, with the numbers. */
export function fits(i: FitInput): Fit {
  const have = i.ledger.environmentsOn(i.host);
  const envsAfter = have.size + (have.has(i.env) ? 0 : 1);
  if (i.envCap !== undefined && envsAfter > i.envCap) {
    return { ok: false, short: `placement policy: it would hold ${envsAfter} environments, at most ${i.envCap} allowed (${i.placement.maxEnvironmentsPercentPerHost}% of ${i.totalEnvironments})` };
  }
  const vcpusAfter = i.ledger.committedVcpus(i.host) + i.demand.vcpus;
  if (!i.capacity) return { ok: true, envsAfter, memFreeAfter: undefined, diskFreeAfter: undefined, vcpusAfter, vcpuLimit: undefined };
  const c = i.capacity;
  // MemAvailable sees what runs now; MemTotal minus the inventory's VMs sees what is promised. Take the smaller.
  const memFree = Math.min(c.memAvailableBytes, c.memTotalBytes - i.ledger.committedMemory(i.host)) - i.placement.memoryReserveBytes;
  const memFreeAfter = memFree - i.demand.memoryBytes;
  const shorts: string[] = [];
  if (memFreeAfter < 0) shorts.push(`memory: ${gib(Math.max(0, memFree))} free (after a ${gib(i.placement.memoryReserveBytes)} reserve), ${gib(i.demand.memoryBytes)} needed`);
  // Like the percentage, CPU overcommit is policy: it binds the operator's choices, not a hand-named target.
  const vcpuLimit = i.envCap === undefined ? undefined : c.cpus * i.placement.cpuOvercommitRatio;
  if (vcpuLimit !== undefined && vcpusAfter > vcpuLimit) shorts.push(`CPU: ${vcpusAfter} vCPUs would exceed ${c.cpus} CPUs × ${i.placement.cpuOvercommitRatio} = ${vcpuLimit}`);
  const diskFree = c.diskFreeBytes - i.ledger.plannedDisk(i.host) - i.placement.diskReserveBytes;
  const diskFreeAfter = i.demand.diskBytes === undefined ? undefined : diskFree - i.demand.diskBytes;
  if (diskFreeAfter !== undefined && diskFreeAfter < 0) shorts.push(`disk: ${gib(Math.max(0, diskFree))} free in the VM directory (after a ${gib(i.placement.diskReserveBytes)} reserve), ${gib(i.demand.diskBytes!)} needed`);
  if (shorts.length > 0) return { ok: false, short: shorts.join(', ') };
  return { ok: true, envsAfter, memFreeAfter, diskFreeAfter, vcpusAfter, vcpuLimit };
}

/**
 * The stable preference among hosts that fit: a host already holding VMs of the environment (fewer
 * bytes to move, and the environment ends up whole), then the fewest environments afterwards
 * (smallest blast radius), then the most free memory afterwards (by at least MEMORY_NOISE_BYTES),
 * then the host name.
 */
/** free-memory differences below this are measurement noise, not a preference */
export const MEMORY_NOISE_BYTES = 1024 ** 3;

export function compareCandidates(a: { host: string; holdsEnv: boolean; fit: Extract<Fit, { ok: true }> }, b: typeof a): number {
  if (a.holdsEnv !== b.holdsEnv) return a.holdsEnv ? -1 : 1;
  if (a.fit.envsAfter !== b.fit.envsAfter) return a.fit.envsAfter - b.fit.envsAfter;
  const ma = a.fit.memFreeAfter ?? 0;
  const mb = b.fit.memFreeAfter ?? 0;
  // MemAvailable moves by hundreds of MiB between two reads; a difference that small must not decide.
  if (Math.abs(ma - mb) >= MEMORY_NOISE_BYTES) return mb - ma;
  return a.host < b.host ? -1 : a.host > b.host ? 1 : 0;
}

export interface ChooseInput {
  hosts: HostSpec[];
  /** every environment of the inventory (the policy's denominator and the current placement) */
  allEnvironments: EnvironmentSpec[];
  /** per selected environment: the hosts its moving VMs leave and what it needs */
  moving: Array<{ env: EnvironmentSpec; leaving: string[]; demand: (target: string) => Demand }>;
  candidates: string[];
  capacity: Map<string, HostCapacity> | undefined;
  /** hosts whose capacity could not be read, with why: never chosen (a hand-named one is not checked here; its move waits for it) */
  unreachable?: Map<string, string>;
  placement: PlacementSettings;
  /** hand-named target: no choice, only the capacity check */
  fixedTarget: string | undefined;
}

/**
 * Greedy, deterministic: the largest environments (memory) choose first, each takes the best
 * host that still fits. A tight packing a full search would find can be refused; the message
 * then names, per host, what is short.
 */
export function chooseTargets(input: ChooseInput): { choices: Map<string, Choice>; problems: string[] } {
  const total = input.allEnvironments.length;
  const envCap = input.fixedTarget === undefined ? maxEnvironmentsPerHost(total, input.placement.maxEnvironmentsPercentPerHost) : undefined;
  const ledger = new HostLedger(input.allEnvironments);
  const choices = new Map<string, Choice>();
  const problems: string[] = [];
  const sized = input.moving.map((m) => ({ ...m, mem: m.demand(input.fixedTarget ?? '').memoryBytes }));
  sized.sort((a, b) => b.mem - a.mem || (a.env.name < b.env.name ? -1 : a.env.name > b.env.name ? 1 : 0));
  for (const m of sized) {
    const hostsOfEnv = new Set(m.env.vms.map((v) => v.host));
    const names = input.fixedTarget !== undefined ? [input.fixedTarget] : input.candidates.filter((h) => !m.leaving.includes(h));
    const ok: Array<{ host: string; holdsEnv: boolean; fit: Extract<Fit, { ok: true }>; demand: Demand }> = [];
    const rejected: string[] = [];
    for (const host of names) {
      const down = input.unreachable?.get(host);
      if (down !== undefined && input.fixedTarget === undefined) {
        rejected.push(`${host}: capacity not readable (${down})`);
        continue;
      }
      const demand = m.demand(host);
      const fit = fits({ host, env: m.env.name, demand, capacity: input.capacity?.get(host), ledger, placement: input.placement, envCap, totalEnvironments: total });
      if (fit.ok) ok.push({ host, holdsEnv: hostsOfEnv.has(host), fit, demand });
      else rejected.push(`${host}: ${fit.short}`);
    }
    const needs = (d: Demand) => `${gib(d.memoryBytes)} memory, ${d.vcpus} vCPUs${d.diskBytes === undefined ? '' : `, ${gib(d.diskBytes)} disk`}`;
    if (ok.length === 0) {
      const d = m.demand(names[0] ?? '');
      const policyNote = envCap !== undefined && input.candidates.length * envCap < total
        ? ` (the policy allows ${envCap} environment(s) per host: ${input.candidates.length} candidate host(s) can hold at most ${input.candidates.length * envCap} of ${total}; raise spec.placement.maxEnvironmentsPercentPerHost or add hosts)`
        : '';
      problems.push(names.length === 0
        ? `no candidate target host for environment ${m.env.name}: every candidate is a host it leaves`
        : `no host can take environment ${m.env.name} (needs ${needs(d)}): ${rejected.join('; ')}${policyNote}`);
      continue;
    }
    ok.sort(compareCandidates);
    const best = ok[0]!;
    ledger.place(m.env, best.host, m.leaving, best.demand);
    const f = best.fit;
    const parts = [
      input.fixedTarget !== undefined ? 'named in spec.targetHost' : `best of ${names.length} candidate(s)${best.holdsEnv ? ', already holds VMs of it' : ''}`,
      envCap !== undefined ? `${f.envsAfter}/${envCap} environments after` : `${f.envsAfter} environments after`,
    ];
    if (f.memFreeAfter !== undefined) parts.push(`${gib(f.memFreeAfter)} memory free after`);
    if (f.diskFreeAfter !== undefined) parts.push(`${gib(f.diskFreeAfter)} disk free after`);
    if (f.vcpuLimit !== undefined) parts.push(`${f.vcpusAfter}/${f.vcpuLimit} vCPUs`);
    if (!input.capacity) parts.push('capacity not measured');
    if (rejected.length > 0) parts.push(`not ${rejected.map((r) => r.split(':')[0]).join(', ')} (${rejected.length === 1 ? rejected[0]!.slice(rejected[0]!.indexOf(':') + 2) : 'see dry run'})`);
    choices.set(m.env.name, { environment: m.env.name, target: best.host, reason: parts.join('; ') });
  }
  // A status message must stay readable (and small) when a whole fleet has no place.
  const MAX = 5;
  return { choices, problems: problems.length > MAX ? [...problems.slice(0, MAX), `and ${problems.length - MAX} more environment(s) without a place`] : problems };
}

/**
 * Per-VM check right before a VM moves (also for hand-named targets): room for its data and its
 * memory. `scratchBytes`: transient space the move needs besides (pre-copy and live verify through a
 * temporary raw copy of the data, src/transfer/mirrorVerify.ts).
 */
export function vmFits(i: { vm: string; target: string; allocatedBytes: number; scratchBytes?: number; memoryBytes: number; capacity: HostCapacity; placement: PlacementSettings }): { ok: true } | { ok: false; message: string } {
  const c = i.capacity;
  const diskFree = c.diskFreeBytes - i.placement.diskReserveBytes;
  const memFree = c.memAvailableBytes - i.placement.memoryReserveBytes;
  const scratch = i.scratchBytes ?? 0;
  const shorts: string[] = [];
  if (diskFree < i.allocatedBytes + scratch) {
    const why = scratch > 0 ? ` (${gib(i.allocatedBytes)} of data and ${gib(scratch)} of scratch space to verify it)` : '';
    shorts.push(`disk: ${gib(Math.max(0, diskFree))} free in the VM directory (after a ${gib(i.placement.diskReserveBytes)} reserve), ${gib(i.allocatedBytes + scratch)} needed${why}`);
  }
  if (memFree < i.memoryBytes) shorts.push(`memory: ${gib(Math.max(0, memFree))} available (after a ${gib(i.placement.memoryReserveBytes)} reserve), ${gib(i.memoryBytes)} needed`);
  return shorts.length === 0 ? { ok: true } : { ok: false, message: `${i.target} has no room for ${i.vm}: ${shorts.join(', ')}` };
}

/** Pre-copy and live compare the copies through a temporary raw copy of the data on the source too: room for it there. */
export function sourceScratchFits(i: { vm: string; source: string; scratchBytes: number; capacity: HostCapacity; placement: PlacementSettings }): { ok: true } | { ok: false; message: string } {
  const diskFree = i.capacity.diskFreeBytes - i.placement.diskReserveBytes;
  if (diskFree >= i.scratchBytes) return { ok: true };
  return { ok: false, message: `${i.source} has no scratch space to verify ${i.vm}: ${gib(Math.max(0, diskFree))} free in the VM directory (after a ${gib(i.placement.diskReserveBytes)} reserve), ${gib(i.scratchBytes)} needed (a temporary raw copy of the VM's data for the comparison while the guest runs)` };
}
