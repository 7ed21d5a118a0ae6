/**
 * The runner's bookkeeping, with the move itself replaced: vmops_migrations_active returns to 0
 * after every path, and phase + conditions come out of the one status helper.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { pino } from 'pino';
import { beforeEach, describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec } from '../../src/api/inventory.js';
import type { VMMigration, VMMigrationStatus } from '../../src/api/types.js';
import { Aborted, runMigration, type RunnerDeps, type StatusSink } from '../../src/controller/migrationRunner.js';
import { migrationsActive } from '../../src/metrics/metrics.js';
import { Handover, MoveError, type MoveContext, type MoveResult } from '../../src/migrate/vmMove.js';
import { Store } from '../../src/store/store.js';

const log = pino({ level: 'silent' });
const host = (name: string): HostSpec => ({ name, address: '127.0.0.2', port: 22, user: 'u', hostKey: 'ssh-ed25519 AAAA', vmDir: '/vms' });
const env: EnvironmentSpec = {
  name: 'e', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' },
  vms: [{ name: 'node-1', role: 'worker', nodeName: 'e-node-1', host: 'h1', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] }],
};

async function active(): Promise<number> {
  return (await migrationsActive.get()).values[0]?.value ?? 0;
}

function vmm(status?: VMMigrationStatus, spec: Partial<VMMigration['spec']> = {}): VMMigration {
  return { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name: 'm', namespace: 'ns', uid: 'uid-1', generation: 1 }, spec: { targetHost: 'h2', environments: ['e'], ...spec }, status };
}

let store: Store;
let status: VMMigrationStatus;
let duringRun: number[];
const sink = (initial: VMMigration): StatusSink => {
  status = structuredClone(initial.status ?? {});
  return { update: (m) => m(status), flush: async () => undefined, close: () => undefined, get current() { return status; } };
};

function deps(move: (ctx: MoveContext) => Promise<MoveResult>, over: Partial<RunnerDeps> = {}): RunnerDeps {
  const hv = { host: host('h1'), withLogger() { return this; } };
  return {
    kc: new KubeConfig(), store, log, events: { emit: () => undefined }, latest: () => undefined,
    pool: { hypervisor: async () => hv as never, connectFresh: async () => { throw new Error('unused'); } },
    claimEnvironments: () => [], releaseEnvironments: () => undefined,
    statusSink: sink, openGuest: async () => ({}) as never,
    move: async (ctx) => {
      duringRun.push(await active());
      return move(ctx);
    },
    ...over,
  };
}

const ok = async (): Promise<MoveResult> => ({ outage: { seconds: 12, until: 'NodeReady', startedAt: '2026-12-07T06:00:00.000Z', endedAt: '2026-12-07T06:00:12.000Z', shutdownSeconds: 2, copySeconds: 1, bootSeconds: 9, stopToStartSeconds: 3.5 }, nodeReadyMs: 10, bytes: 5, resumedFrom: 'cordon', mode: 'cold' });

beforeEach(async () => {
  store = await Store.open(':memory:');
  await store.loadInventory({ hosts: [host('h1'), host('h2')], environments: [env] });
  duringRun = [];
});

describe('vmops_migrations_active returns to 0 on every path', () => {
  it('success', async () => {
    await runMigration(vmm(), deps(ok), new AbortController().signal);
    expect(duringRun).toEqual([1]);
    expect(await active()).toBe(0);
    expect(status.phase).toBe('Succeeded');
    expect(status.conditions?.map((c) => `${c.type}=${c.status}/${c.reason}`)).toEqual(['Ready=True/Succeeded', 'Progressing=False/Completed', 'Degraded=False/AsExpected']);
  });

  it('failure (rolled back)', async () => {
    await runMigration(vmm(), deps(async () => { throw new MoveError('transfer', 'disk gone', 'rolled-back'); }), new AbortController().signal);
    expect(await active()).toBe(0);
    expect(status.phase).toBe('Failed');
    expect(status.conditions?.find((c) => c.type === 'Degraded')).toMatchObject({ status: 'True', reason: 'MoveFailed' });
  });

  it('invalid reference', async () => {
    await runMigration(vmm(undefined, { targetHost: 'h9' }), deps(ok), new AbortController().signal);
    expect(await active()).toBe(0);
    expect(status.conditions?.find((c) => c.type === 'Ready')).toMatchObject({ status: 'False', reason: 'InvalidReference' });
  });

  it('resume of a run that was Running', async () => {
    const plan = [{ order: 1, environment: 'e', vm: 'node-1', role: 'worker' as const, node: 'e-node-1', from: 'h1', to: 'h2' }];
    await runMigration(vmm({ phase: 'Running', plan, vms: [{ environment: 'e', name: 'node-1', phase: 'Running', attempts: 1 }] }), deps(ok), new AbortController().signal);
    expect(duringRun).toEqual([1]);
    expect(await active()).toBe(0);
    expect(status.phase).toBe('Succeeded');
  });

  it('abort by handover (lost leadership)', async () => {
    const ac = new AbortController();
    const err = await runMigration(vmm(), deps(async () => { ac.abort(new Handover('lost leadership')); throw new MoveError('drain', 'interrupted: lost leadership', 'interrupted'); }), ac.signal).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Aborted);
    expect(await active()).toBe(0);
  });

  it('deletion (cancel rolls back)', async () => {
    const ac = new AbortController();
    const err = await runMigration(vmm(), deps(async () => { ac.abort(new Error('VMMigration deleted')); throw new MoveError('drain', 'migration aborted', 'rolled-back'); }), ac.signal).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Aborted);
    expect(await active()).toBe(0);
  });

  it('a crash inside the run (unexpected error)', async () => {
    const err = await runMigration(vmm(), deps(ok, { openGuest: async () => { throw new Error('boom'); } }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toEqual({ kind: 'done' });
    expect(await active()).toBe(0);
    expect(status.phase).toBe('Failed');
  });

  it('dry run', async () => {
    await runMigration(vmm(undefined, { dryRun: true }), deps(ok), new AbortController().signal);
    expect(await active()).toBe(0);
    expect(status.conditions?.map((c) => c.reason)).toEqual(['DryRun', 'DryRun', 'DryRun']);
  });
});

describe('waiting is a state, not a failure', () => {
  it('a not-yet-safe verdict: Progressing=False with its reason, re-queued, gauge back to 0', async () => {
    const waiting = new MoveError('quorum', 'control plane would lose quorum without e-controller-1', 'waiting', { safe: false, reason: 'WaitingForQuorum', message: 'control plane would lose quorum' });
    const err = await runMigration(vmm(), deps(async () => { throw waiting; }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(await active()).toBe(0);
    expect(status.phase).toBe('Running');
    expect(status.waitingSince).toBeDefined();
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ status: 'False', reason: 'WaitingForQuorum' });
    expect(status.conditions?.find((c) => c.type === 'Degraded')).toMatchObject({ status: 'False' });
  });

  it('fails once safetyWaitTimeout has passed since the wait began', async () => {
    const waiting = new MoveError('precheck', 'API not ready', 'waiting', { safe: false, reason: 'WaitingForAPIServer', message: 'API not ready' });
    const since = new Date(Date.now() - 61_000).toISOString();
    const plan = [{ order: 1, environment: 'e', vm: 'node-1', role: 'worker' as const, node: 'e-node-1', from: 'h1', to: 'h2' }];
    const err = await runMigration(vmm({ phase: 'Running', plan, waitingSince: since }, { safetyWaitTimeout: '1m' }), deps(async () => { throw waiting; }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Aborted);
    expect(status.phase).toBe('Failed');
    expect(status.conditions?.find((c) => c.type === 'Ready')).toMatchObject({ reason: 'SafetyWaitTimeout' });
    expect(status.message).toMatch(/API not ready \(still not safe after 6\d s/);
    expect(await active()).toBe(0);
  });

  it('an environment held by another migration waits with WaitingForEnvironment', async () => {
    const err = await runMigration(vmm(), deps(ok, { claimEnvironments: () => ['e'] }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(status.phase).toBe('Pending');
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ status: 'False', reason: 'WaitingForEnvironment' });
    expect(await active()).toBe(0);
  });

  it('an unreachable target host at precheck waits with WaitingForHost', async () => {
    const err = await runMigration(vmm(), deps(ok, { pool: { hypervisor: async () => { throw new Error('connect ECONNREFUSED'); }, connectFresh: async () => { throw new Error('unused'); } } }), new AbortController().signal).catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'retry' });
    expect(status.conditions?.find((c) => c.type === 'Progressing')).toMatchObject({ reason: 'WaitingForHost', message: expect.stringMatching(/h1 is unreachable/) });
    expect(await active()).toBe(0);
  });
});

describe('migration rules (src/migrate/rules.ts)', () => {
  it('waiting backs off with the time waited and fails at the deadline; outcomes map to continue/wait/fail/handover', async () => {
    const { afterMove, safetyWait } = await import('../../src/migrate/rules.js');
    expect(safetyWait(0, 1000, 60_000)).toEqual({ fail: false, retryAfterMs: 2000 });
    expect(safetyWait(0, 40_000, 60_000)).toEqual({ fail: false, retryAfterMs: 10_000 });
    expect(safetyWait(0, 59_999, 3_600_000 * 10)).toEqual({ fail: false, retryAfterMs: 14_999.75 });
    expect(safetyWait(0, 60_000, 60_000)).toEqual({ fail: true, waitedMs: 60_000 });
    expect(['moved', 'waiting', 'interrupted', 'untouched', 'rolled-back', 'stuck'].map((o) => afterMove(o as never))).toEqual(['continue', 'wait', 'handover', 'fail', 'fail', 'fail']);
  });
});
