/**
 * Resuming a migration trusts the operator's own store, not what it reads back from status
 * (issue 8, hole 11), and a move that ended on the target is reported Degraded, not rolled back.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { pino } from 'pino';
import { beforeEach, describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec } from '../../src/api/inventory.js';
import type { PlanEntry, VMMigration, VMMigrationStatus } from '../../src/api/types.js';
import { runMigration, type RunnerDeps, type StatusSink } from '../../src/controller/migrationRunner.js';
import { MoveError, type MoveContext, type MoveResult } from '../../src/migrate/vmMove.js';
import { Store } from '../../src/store/store.js';

const log = pino({ level: 'silent' });
const host = (name: string): HostSpec => ({ name, address: '127.0.0.2', port: 22, user: 'u', hostKey: 'ssh-ed25519 AAAA', vmDir: '/vms' });
const env: EnvironmentSpec = {
  name: 'e', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' },
  vms: ['node-1', 'node-2'].map((name) => ({ name, role: 'worker' as const, nodeName: `e-${name}`, host: 'h1', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk' as const, format: 'qcow2' as const }] })),
};
const entry = (over: Partial<PlanEntry> = {}): PlanEntry => ({ order: 1, environment: 'e', vm: 'node-1', role: 'worker', node: 'e-node-1', from: 'h1', to: 'h2', ...over });

function vmm(status?: VMMigrationStatus): VMMigration {
  return { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name: 'm', namespace: 'ns', uid: 'uid-1', generation: 1 }, spec: { targetHost: 'h2', environments: ['e'] }, status };
}

let store: Store;
let status: VMMigrationStatus;
let moved: { from: string; to: string }[];
let events: string[];
const sink = (initial: VMMigration): StatusSink => {
  status = structuredClone(initial.status ?? {});
  return { update: (m) => m(status), flush: async () => undefined, close: () => undefined, get current() { return status; } };
};

function deps(move: (ctx: MoveContext) => Promise<MoveResult> = async () => ({ outage: undefined, nodeReadyMs: 1, bytes: 1, resumedFrom: 'cordon', mode: 'cold' })): RunnerDeps {
  return {
    kc: new KubeConfig(), store, log, events: { emit: (_o, type, reason, message) => { events.push(`${type}/${reason}: ${message}`); } }, latest: () => undefined,
    pool: { hypervisor: async (h) => ({ host: h, withLogger() { return this; } }) as never, connectFresh: async () => { throw new Error('unused'); } },
    claimEnvironments: () => [], releaseEnvironments: () => undefined,
    statusSink: sink, openGuest: async () => ({}) as never,
    move: async (ctx) => {
      moved.push({ from: ctx.source.host.name, to: ctx.target.host.name });
      return move(ctx);
    },
  };
}

beforeEach(async () => {
  store = await Store.open(':memory:');
  await store.loadInventory({ hosts: [host('h1'), host('h2'), host('h3')], environments: [env] });
  moved = [];
  events = [];
});

describe('resume: the plan comes from the operator\'s store, not from status', () => {
  it('a fresh run records the whole plan in the store before the first move', async () => {
    await runMigration(vmm(), deps(async () => {
      expect((await store.moves('uid-1')).map((m) => `${m.environment}/${m.vm}:${m.fromHost}->${m.toHost}`)).toEqual(['e/node-1:h1->h2', 'e/node-2:h1->h2']);
      return { outage: undefined, nodeReadyMs: 1, bytes: 1, resumedFrom: 'cordon', mode: 'cold' };
    }), new AbortController().signal);
    expect(status.phase).toBe('Succeeded');
  });

  it('a status plan patched to another source host is ignored in favour of the stored one, with a Warning', async () => {
    await store.ensureMove({ migrationUid: 'uid-1', environment: 'e', vm: 'node-1', fromHost: 'h1', toHost: 'h2' });
    await runMigration(vmm({ phase: 'Running', plan: [entry({ from: 'h3' })] }), deps(), new AbortController().signal);
    expect(moved).toEqual([{ from: 'h1', to: 'h2' }]);
    expect(events.some((e) => /Warning\/StatusPlanIgnored/.test(e))).toBe(true);
    expect(status.plan?.[0]).toMatchObject({ from: 'h1', to: 'h2' });
  });

  it('without a stored plan, a status plan with from == to is rejected before anything runs', async () => {
    await runMigration(vmm({ phase: 'Running', plan: [entry({ from: 'h2', to: 'h2' })] }), deps(), new AbortController().signal);
    expect(moved).toEqual([]);
    expect(status.phase).toBe('Failed');
    expect(status.conditions?.find((c) => c.type === 'Degraded')).toMatchObject({ status: 'True', reason: 'InvalidStatusPlan' });
    expect(status.message).toMatch(/from and to are both h2/);
  });

  it('without a stored plan, a status plan naming unknown hosts or VMs is rejected', async () => {
    await runMigration(vmm({ phase: 'Running', plan: [entry({ from: 'h9' }), entry({ order: 2, vm: 'ghost' })] }), deps(), new AbortController().signal);
    expect(moved).toEqual([]);
    expect(status.message).toMatch(/host h9 is not in the inventory/);
    expect(status.message).toMatch(/VM e\/ghost is not in the inventory/);
  });
});

describe('a move that stays on the target', () => {
  it('is reported Degraded: VM phase Degraded, migration Failed with Degraded=True and the reason', async () => {
    await runMigration(vmm(), deps(async () => { throw new MoveError('nodeReady', 'node not Ready — the VM ran on h2 and stays there; the source image on h1 is kept', 'stuck-on-target'); }), new AbortController().signal);
    expect(status.vms?.[0]?.phase).toBe('Degraded');
    expect(status.phase).toBe('Failed');
    expect(status.conditions?.find((c) => c.type === 'Degraded')).toMatchObject({ status: 'True' });
    expect(status.message).toMatch(/stays on h2; source image kept on h1/);
  });
});

describe('resume: moves of an earlier spec of the same migration are not resumed', () => {
  it('a stored move to another target (the spec changed after a failure) is left out', async () => {
    await store.ensureMove({ migrationUid: 'uid-1', environment: 'e', vm: 'node-1', fromHost: 'h1', toHost: 'h3' });
    await store.ensureMove({ migrationUid: 'uid-1', environment: 'e', vm: 'node-2', fromHost: 'h1', toHost: 'h2' });
    await runMigration(vmm({ phase: 'Running' }), deps(), new AbortController().signal);
    expect(moved).toEqual([{ from: 'h1', to: 'h2' }]);
  });
});
