import { describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec } from '../../src/api/inventory.js';
import { planMigration } from '../../src/planner/plan.js';

const host = (name: string): HostSpec => ({ name, address: '127.0.0.2', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: '/vms' });
const env = (name: string, at: string, extra: Partial<Record<string, string>> = {}): EnvironmentSpec => ({
  name,
  kubeconfigSecret: { namespace: 'ns', name: `${name}-kc`, key: 'kubeconfig' },
  vms: [
    ['controller-2', 'controller'], ['node-10', 'worker'], ['beachhead', 'beachhead'], ['controller-1', 'controller'],
    ['node-2', 'worker'], ['controller-3', 'controller'], ['node-1', 'worker'],
  ].map(([n, role]) => ({ name: n!, role: role as 'worker', nodeName: `${name}-${n}`, host: extra[n!] ?? at, memoryMiB: 64, cpus: 1, files: [] })),
});

describe('planMigration', () => {
  const hosts = [host('host01'), host('host02'), host('host03')];

  it('orders beachhead, workers, controllers with natural name order', () => {
    const r = planMigration(hosts, [env('student-1', 'host01')], { environments: ['student-1'], sourceHost: undefined, targetHost: 'host02' });
    expect(r.problems).toEqual([]);
    expect(r.entries.map((e) => e.vm)).toEqual(['beachhead', 'node-1', 'node-2', 'node-10', 'controller-1', 'controller-2', 'controller-3']);
    expect(r.entries.map((e) => e.order)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(new Set(r.entries.map((e) => e.to))).toEqual(new Set(['host02']));
  });

  it('skips VMs already on the target (a re-applied migration is a no-op for them)', () => {
    const r = planMigration(hosts, [env('student-1', 'host01', { beachhead: 'host02', 'node-1': 'host02' })], { environments: ['student-1'], sourceHost: undefined, targetHost: 'host02' });
    expect(r.entries.map((e) => e.vm)).not.toContain('beachhead');
    expect(r.entries).toHaveLength(5);
  });

  it('evacuates every environment with VMs on the source host when no environment is named', () => {
    const r = planMigration(hosts, [env('a', 'host01'), env('b', 'host03'), env('c', 'host03', { 'node-1': 'host01' })], { environments: undefined, sourceHost: 'host01', targetHost: 'host02' });
    expect([...new Set(r.entries.map((e) => e.environment))]).toEqual(['a', 'c']);
    expect(r.entries.filter((e) => e.environment === 'c').map((e) => e.vm)).toEqual(['node-1']);
  });

  it('names unknown hosts and environments', () => {
    const r = planMigration(hosts, [env('a', 'host01')], { environments: ['a', 'zz', 'yy'], sourceHost: 'host07', targetHost: 'host09' });
    expect(r.entries).toEqual([]);
    expect(r.problems.join('\n')).toContain('target host "host09" is not in the inventory');
    expect(r.problems.join('\n')).toContain('source host "host07" is not in the inventory');
    expect(r.problems.join('\n')).toContain('unknown environments "zz", "yy"');
  });
});
