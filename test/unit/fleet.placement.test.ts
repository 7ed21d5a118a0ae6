import { describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec } from '../../src/api/inventory.js';
import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { FLEET_DEFAULTS, settingsFrom } from '../../src/api/types.js';
import { planMigration } from '../../src/planner/plan.js';
import { maxEnvironmentsPerHost, vmFits, type HostCapacity } from '../../src/planner/placement.js';

const GiB = 1024 ** 3;
const host = (name: string): HostSpec => ({ name, address: '127.0.0.2', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: '/vms' });
const ROLES = [['beachhead', 'beachhead'], ['controller-1', 'controller'], ['controller-2', 'controller'], ['controller-3', 'controller'], ['node-1', 'worker'], ['node-2', 'worker'], ['node-3', 'worker']] as const;
const env = (name: string, at: string, split: Record<string, string> = {}): EnvironmentSpec => ({
  name,
  kubeconfigSecret: { namespace: 'ns', name: `${name}-kc`, key: 'kubeconfig' },
  vms: ROLES.map(([n, role]) => ({ name: n, role, nodeName: `${name}-${n}`, host: split[n] ?? at, memoryMiB: 1024, cpus: 1, files: [] })),
});
const hostNames = (n: number) => Array.from({ length: n }, (_, i) => `host${String(i + 1).padStart(2, '0')}`);
/** n environments spread round-robin over the hosts */
const cloud = (hosts: string[], n: number) => Array.from({ length: n }, (_, i) => env(`student-${String(i + 1).padStart(3, '0')}`, hosts[i % hosts.length]!));
const roomy = (name: string, over: Partial<HostCapacity> = {}): HostCapacity => ({ host: name, memTotalBytes: 512 * GiB, memAvailableBytes: 400 * GiB, cpus: 64, diskFreeBytes: 4000 * GiB, environmentBytes: {}, ...over });
const capacities = (names: string[], envs: EnvironmentSpec[], perEnvBytes: number, over: Record<string, Partial<HostCapacity>> = {}) =>
  new Map(names.map((h) => [h, roomy(h, { environmentBytes: Object.fromEntries(envs.filter((e) => e.vms.some((v) => v.host === h)).map((e) => [e.name, perEnvBytes])), ...over[h] })]));

/** environments per host after the plan ran: the state the policy is about */
function after(envs: EnvironmentSpec[], plan: ReturnType<typeof planMigration>): Map<string, Set<string>> {
  const where = new Map(envs.flatMap((e) => e.vms.map((v) => [`${e.name}/${v.name}`, v.host] as const)));
  for (const p of plan.entries) where.set(`${p.environment}/${p.vm}`, p.to);
  const by = new Map<string, Set<string>>();
  for (const [k, h] of where) {
    if (!by.has(h)) by.set(h, new Set());
    by.get(h)!.add(k.split('/')[0]!);
  }
  return by;
}

describe('placement policy: environments per host', () => {
  it('is floor(total × percent) so that losing a host affects at most that share, but at least one', () => {
    expect(maxEnvironmentsPerHost(100, 15)).toBe(15);
    expect(maxEnvironmentsPerHost(20, 15)).toBe(3); // 3/20 = 15% exactly; 4 would be 20%
    expect(maxEnvironmentsPerHost(19, 15)).toBe(2); // 2.85 rounds down: 3 would be 15.8%
    expect(maxEnvironmentsPerHost(6, 15)).toBe(1); // 0.9: one environment is the indivisible unit
    expect(maxEnvironmentsPerHost(4, 50)).toBe(2);
  });
});

describe('target selection (spec.targetHost absent)', () => {
  const names = hostNames(10);
  const envs = cloud(names, 100);
  const cap = capacities(names, envs, 18 * GiB);

  it('evacuates a host of 10 environments across the other 9, each environment whole, policy holding afterwards', () => {
    const r = planMigration(names.map(host), envs, settingsFrom({ sourceHost: 'host01' }), cap);
    expect(r.problems).toEqual([]);
    expect(r.environments).toHaveLength(10);
    expect(r.entries).toHaveLength(70);
    for (const e of r.environments) {
      expect(e.target).not.toBe('host01');
      expect(new Set(r.entries.filter((p) => p.environment === e.environment).map((p) => p.to))).toEqual(new Set([e.target]));
      expect(e.reason).toMatch(/best of 9 candidate\(s\); 1[12]\/15 environments after; .* memory free after; .* disk free after; \d+\/256 vCPUs/);
    }
    const by = after(envs, r);
    expect(by.get('host01')).toBeUndefined();
    for (const [, set] of by) expect(set.size).toBeLessThanOrEqual(15);
    // spread: 10 environments over 9 hosts → no host takes more than 2
    const taken = new Map<string, number>();
    for (const e of r.environments) taken.set(e.target, (taken.get(e.target) ?? 0) + 1);
    expect(Math.max(...taken.values())).toBe(2);
  });

  it('is deterministic: the same inputs give the same plan, ties broken by host name', () => {
    const a = planMigration(names.map(host), envs, settingsFrom({ sourceHost: 'host01' }), cap);
    const b = planMigration(names.map(host), [...envs].reverse(), settingsFrom({ sourceHost: 'host01' }), new Map([...cap].reverse()));
    expect(b.environments.map((e) => [e.environment, e.target]).sort()).toEqual(a.environments.map((e) => [e.environment, e.target]).sort());
    // all hosts equal: the first (largest = equal, so by name) environment goes to the first host by name
    expect(a.environments.find((e) => e.environment === 'student-001')!.target).toBe('host02');
  });

  it('refuses when the policy leaves no room, naming the cap and what to change; nothing is planned', () => {
    // 20 environments on 3 hosts: 3 per host allowed, and the hosts already hold 7/7/6
    const three = hostNames(3);
    const small = cloud(three, 20);
    const r = planMigration(three.map(host), small, settingsFrom({ sourceHost: 'host01' }), capacities(three, small, GiB));
    expect(r.entries).toEqual([]);
    expect(r.problems[0]).toMatch(/no host can take environment student-\d+ \(needs 7\.00 GiB memory, 7 vCPUs, 1\.00 GiB disk\): host02: placement policy: it would hold 8 environments, at most 3 allowed \(15% of 20\)/);
    expect(r.problems[0]).toContain('2 candidate host(s) can hold at most 6 of 20; raise spec.placement.maxEnvironmentsPercentPerHost or add hosts');
  });

  it('small inventories: 4 environments on host01 fit on two targets only with a 50% policy', () => {
    const three = hostNames(3);
    const four = ['a', 'b', 'c', 'd'].map((n) => env(n, 'host01'));
    const refused = planMigration(three.map(host), four, settingsFrom({ sourceHost: 'host01' }));
    expect(refused.problems.join('\n')).toMatch(/at most 1 allowed \(15% of 4\)/);
    const r = planMigration(three.map(host), four, settingsFrom({ sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 50 } }));
    expect(r.problems).toEqual([]);
    expect(r.environments.map((e) => `${e.environment}→${e.target}`)).toEqual(['a→host02', 'b→host03', 'c→host02', 'd→host03']);
    expect(r.environments[0]!.reason).toContain('capacity not measured');
  });

  it('skips a host short of disk or memory and says so, with the numbers', () => {
    const three = hostNames(3);
    const one = [env('a', 'host01'), env('b', 'host02'), env('c', 'host03')];
    const cap3 = capacities(three, one, 20 * GiB, { host02: { diskFreeBytes: 10 * GiB }, host03: { memAvailableBytes: 6 * GiB } });
    const r = planMigration(three.map(host), one, settingsFrom({ environments: ['a'], placement: { maxEnvironmentsPercentPerHost: 100 } }), cap3);
    expect(r.problems[0]).toBe('no host can take environment a (needs 7.00 GiB memory, 7 vCPUs, 20.0 GiB disk): '
      + 'host02: disk: 9.00 GiB free in the VM directory (after a 1.00 GiB reserve), 20.0 GiB needed; '
      + 'host03: memory: 5.50 GiB free (after a 512.0 MiB reserve), 7.00 GiB needed');
    const ok = planMigration(three.map(host), one, settingsFrom({ environments: ['a'], placement: { maxEnvironmentsPercentPerHost: 100 } }), capacities(three, one, 20 * GiB, { host02: { diskFreeBytes: 10 * GiB } }));
    expect(ok.environments[0]).toMatchObject({ target: 'host03' });
    expect(ok.environments[0]!.reason).toContain('not host02 (disk: 9.00 GiB free');
  });

  it('counts the memory the inventory already promised on a host, not only what is free right now', () => {
    const two = hostNames(2);
    const envs2 = [env('a', 'host01'), ...Array.from({ length: 5 }, (_, i) => env(`z${i}`, 'host02'))];
    // host02: 64 GiB total, 35 GiB promised to its five environments' VMs, 60 GiB "available" (VMs idle)
    const cap2 = capacities(two, envs2, GiB, { host02: { memTotalBytes: 40 * GiB, memAvailableBytes: 38 * GiB } });
    const r = planMigration(two.map(host), envs2, settingsFrom({ sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 100 } }), cap2);
    expect(r.problems[0]).toContain('host02: memory: 4.50 GiB free (after a 512.0 MiB reserve), 7.00 GiB needed');
  });

  it('keeps a split environment whole: the host already holding some of its VMs is preferred', () => {
    const three = hostNames(3);
    const envs3 = [env('a', 'host01', { 'node-3': 'host03', 'controller-3': 'host03' }), env('b', 'host02')];
    const r = planMigration(three.map(host), envs3, settingsFrom({ sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 100 } }));
    expect(r.environments[0]).toMatchObject({ environment: 'a', target: 'host03' });
    expect(r.environments[0]!.reason).toContain('already holds VMs of it');
    expect(r.entries.map((e) => e.vm)).toEqual(['beachhead', 'node-1', 'node-2', 'controller-1', 'controller-2']);
  });

  it('a list of environments without a source leaves the hosts they are on, restricted to spec.targetHosts', () => {
    const four = hostNames(4);
    const envs4 = cloud(four, 8);
    const r = planMigration(four.map(host), envs4, settingsFrom({ environments: ['student-001', 'student-002'], targetHosts: ['host02', 'host04'], placement: { maxEnvironmentsPercentPerHost: 100 } }));
    expect(r.problems).toEqual([]);
    // student-002 lives on host02, so only host04 remains for it
    expect(Object.fromEntries(r.environments.map((e) => [e.environment, e.target]))).toEqual({ 'student-001': 'host02', 'student-002': 'host04' });
  });

  it('keeps the refusal readable when a whole fleet has no place: five environments, then a count', () => {
    const full = capacities(names, envs, GiB, Object.fromEntries(names.map((h) => [h, { memAvailableBytes: GiB }])));
    const r = planMigration(names.map(host), envs, settingsFrom({ sourceHost: 'host01' }), full);
    expect(r.problems).toHaveLength(6);
    expect(r.problems[5]).toBe('and 5 more environment(s) without a place');
  });

  it('names unknown hosts in spec.targetHosts', () => {
    const r = planMigration(hostNames(2).map(host), [env('a', 'host01')], settingsFrom({ sourceHost: 'host01', targetHosts: ['host09'] }));
    expect(r.problems).toEqual(['target host "host09" in spec.targetHosts is not in the inventory (known hosts: host01, host02)']);
  });
});

describe('hand-named target (spec.targetHost)', () => {
  it('is checked for memory and disk, not for the policies (percentage, CPU overcommit): the human chose it', () => {
    const two = hostNames(2);
    const envs2 = cloud(two, 10);
    const r = planMigration(two.map(host), envs2, settingsFrom({ sourceHost: 'host01', targetHost: 'host02' }), capacities(two, envs2, 2 * GiB));
    expect(r.problems).toEqual([]);
    expect(new Set(r.entries.map((e) => e.to))).toEqual(new Set(['host02']));
    expect(r.environments[0]!.reason).toMatch(/^named in spec.targetHost; \d+ environments after; [\d.]+ GiB memory free after; [\d.]+ GiB disk free after$/);
    const fewCpus = planMigration(two.map(host), envs2, settingsFrom({ sourceHost: 'host01', targetHost: 'host02' }), capacities(two, envs2, 2 * GiB, { host02: { cpus: 1 } }));
    expect(fewCpus.problems).toEqual([]);
    const short = planMigration(two.map(host), envs2, settingsFrom({ sourceHost: 'host01', targetHost: 'host02' }), capacities(two, envs2, 2 * GiB, { host02: { diskFreeBytes: 6 * GiB } }));
    expect(short.entries).toEqual([]);
    // two environments of 2 GiB fit into 5 GiB usable, the third does not
    expect(short.problems).toHaveLength(3);
    expect(short.problems[0]).toMatch(/host02: disk: 1\.00 GiB free in the VM directory \(after a 1\.00 GiB reserve\), 2\.00 GiB needed/);
  });
});

describe('vmFits: the check right before one VM moves', () => {
  const placement = settingsFrom({ sourceHost: 'host01' }).placement;
  it('passes with room, and names both numbers when short', () => {
    const c = roomy('host02', { diskFreeBytes: 3 * GiB, memAvailableBytes: 2 * GiB });
    expect(vmFits({ vm: 's/node-1', target: 'host02', allocatedBytes: GiB, memoryBytes: GiB, capacity: c, placement })).toEqual({ ok: true });
    expect(vmFits({ vm: 's/node-1', target: 'host02', allocatedBytes: 5 * GiB, memoryBytes: 4 * GiB, capacity: c, placement })).toEqual({
      ok: false,
      message: 'host02 has no room for s/node-1: disk: 2.00 GiB free in the VM directory (after a 1.00 GiB reserve), 5.00 GiB needed, memory: 1.50 GiB available (after a 512.0 MiB reserve), 4.00 GiB needed',
    });
  });

  it('counts the scratch space a pre-copy or live verification needs besides the data', () => {
    const c = roomy('host02', { diskFreeBytes: 3 * GiB, memAvailableBytes: 2 * GiB });
    // 1.5 GiB of data fits the 2 GiB free, data plus an equal scratch copy does not
    expect(vmFits({ vm: 's/node-1', target: 'host02', allocatedBytes: 1.5 * GiB, memoryBytes: GiB, capacity: c, placement })).toEqual({ ok: true });
    expect(vmFits({ vm: 's/node-1', target: 'host02', allocatedBytes: 1.5 * GiB, scratchBytes: 1.5 * GiB, memoryBytes: GiB, capacity: c, placement })).toEqual({
      ok: false,
      message: 'host02 has no room for s/node-1: disk: 2.00 GiB free in the VM directory (after a 1.00 GiB reserve), 3.00 GiB needed (1.50 GiB of data and 1.50 GiB of scratch space to verify it)',
    });
  });
});

describe('fleet spec defaults', () => {
  it('the CRD schema applies the same defaults as FLEET_DEFAULTS', () => {
    interface Schema { default?: unknown; properties?: Record<string, Schema> }
    const crd = parse(readFileSync(new URL('../../crds/vmops.dev_vmmigrations.yaml', import.meta.url), 'utf8')) as { spec: { versions: { schema: { openAPIV3Schema: Schema } }[] } };
    const spec = crd.spec.versions[0]!.schema.openAPIV3Schema.properties!.spec!;
    const at = (...path: string[]): unknown => path.reduce<Schema | undefined>((s, p) => s?.properties?.[p], spec)?.default;
    const p = (k: string) => at('placement', k);
    expect({
      placement: { maxEnvironmentsPercentPerHost: p('maxEnvironmentsPercentPerHost'), cpuOvercommitRatio: p('cpuOvercommitRatio'), memoryReserveMiB: p('memoryReserveMiB'), diskReserveMiB: p('diskReserveMiB') },
      maxParallelEnvironments: at('maxParallelEnvironments'), maxDisruptedEnvironments: at('maxDisruptedEnvironments'),
      hostLimits: { maxOutboundPerHost: at('hostLimits', 'maxOutboundPerHost'), maxInboundPerHost: at('hostLimits', 'maxInboundPerHost') },
    }).toEqual(FLEET_DEFAULTS);
  });
  it('reads the window as RFC 3339 and refuses anything else', () => {
    expect(settingsFrom({ sourceHost: 'h1', window: { notBefore: '2026-11-27T06:00:00Z' } }).window).toEqual({ notBeforeMs: Date.parse('2026-11-27T06:00:00Z'), notAfterMs: undefined });
    expect(() => settingsFrom({ sourceHost: 'h1', window: { notAfter: 'tomorrow' } })).toThrow('invalid window.notAfter "tomorrow" (expected RFC 3339');
    expect(settingsFrom({ sourceHost: 'h1', maxParallelEnvironments: 3 }).maxDisruptedEnvironments).toBe(3);
  });
});
