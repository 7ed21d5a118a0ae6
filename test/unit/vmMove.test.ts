/**
 * The per-VM state machine's decisions (resume point, rollback, fencing,
 * quorum gate) with in-memory hosts and guest. The same code runs against
 * real sshd/QEMU/Kubernetes in test/e2e.
 */
import { describe, expect, it } from 'vitest';
import type { EnvironmentSpec, HostSpec, VMSpec } from '../../src/api/inventory.js';
import { settingsFrom } from '../../src/api/types.js';
import type { GuestCluster } from '../../src/guest/guestCluster.js';
import type { Hypervisor } from '../../src/hosts/hypervisor.js';
import { Handover, moveVm, MoveError, type MoveContext } from '../../src/migrate/vmMove.js';
import { LiveMigrationAbortedError } from '../../src/transfer/live.js';
import { Store } from '../../src/store/store.js';
import { log } from '../../src/util/log.js';

type State = 'absent' | 'stopped' | 'running';

function fakeHost(name: string, initial: State, calls: string[]): Hypervisor & { state: State; qmpStatus?: string } {
  const host: HostSpec = { name, address: '127.0.0.2', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: `/${name}` };
  const h = {
    host, state: initial, qmpStatus: undefined as string | undefined, conn: {} as never,
    vmDir: (env: string, vm: VMSpec) => `/${name}/${env}/${vm.name}`,
    vmStatus: async () => ({ state: h.state, qmpStatus: h.qmpStatus ?? (h.state === 'running' ? 'running' : undefined) }),
    startVm: async () => { calls.push(`${name}:start`); h.state = 'running'; return { state: 'running' }; },
    stopVm: async () => { calls.push(`${name}:stop`); const was = h.state; h.state = 'stopped'; return was === 'running' ? 'quit' : 'already-stopped'; },
    ensureDir: async () => { if (h.state === 'absent') h.state = 'stopped'; },
    removeVmDir: async () => { calls.push(`${name}:remove`); h.state = 'absent'; },
  };
  return h as unknown as Hypervisor & { state: State; qmpStatus?: string };
}

function fakeGuest(calls: string[], opts: { quorumOk?: boolean } = {}): GuestCluster {
  return {
    apiHealthy: async () => true,
    nodeState: async () => ({ exists: true, ready: true, unschedulable: false }),
    controlPlaneQuorum: async () => ({ ok: opts.quorumOk ?? true, controllers: 3, healthy: opts.quorumOk === false ? 1 : 2, reason: opts.quorumOk === false ? 'controller-3 is NotReady' : 'ok' }),
    cordon: async (n: string) => { calls.push(`cordon:${n}`); },
    uncordon: async (n: string) => { calls.push(`uncordon:${n}`); },
    drain: async (n: string) => { calls.push(`drain:${n}`); return { evicted: 2 }; },
    waitNodeReady: async (n: string) => { calls.push(`ready:${n}`); },
  } as unknown as GuestCluster;
}

const vm: VMSpec = { name: 'controller-1', role: 'controller', nodeName: 'e-controller-1', host: 'host01', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
const env: EnvironmentSpec = { name: 'e', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [vm] };

async function context(src: State, dst: State, over: Partial<MoveContext> = {}) {
  const calls: string[] = [];
  const store = await Store.open(':memory:');
  const source = fakeHost('host01', src, calls);
  const target = fakeHost('host02', dst, calls);
  const ctx: MoveContext = {
    migrationUid: 'uid', environment: env, vm, source, target, guest: fakeGuest(calls), store,
    settings: settingsFrom({ targetHost: 'host02', environments: ['e'] }), log, signal: new AbortController().signal,
    observer: { step: () => undefined, progress: () => undefined },
    transfer: async () => { calls.push('transfer'); target.state = 'stopped'; return [{ file: 'disk0.qcow2', bytes: 100, sha256: 'x', seconds: 0 }]; },
    ...over,
  };
  return { ctx, calls, source, target, store };
}

describe('moveVm', () => {
  it('runs every step in order and journals begin/end for each', async () => {
    const { ctx, calls, source, target, store } = await context('running', 'absent');
    const r = await moveVm(ctx);
    expect(calls).toEqual(['cordon:e-controller-1', 'drain:e-controller-1', 'host01:stop', 'transfer', 'host02:start', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r).toMatchObject({ bytes: 100, resumedFrom: 'cordon' });
    expect(source.state).toBe('absent');
    expect(target.state).toBe('running');
    const journal = (await store.journalEntries('uid')).map((j) => `${j.step}:${j.event}`);
    expect(journal.filter((j) => j.endsWith(':begin'))).toHaveLength(10);
    expect(journal.every((j, i) => !j.endsWith(':end') || journal[i - 1] === j.replace(':end', ':begin'))).toBe(true);
    expect((await store.environment('e'))).toBeUndefined(); // placement lives in the inventory rows, not created here
  });

  it('rolls back to the source when the copy fails: VM restarted there, node uncordoned, target cleared', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent', {
      transfer: async () => { throw new Error('checksum mismatch for disk0.qcow2'); },
    });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MoveError);
    expect(err).toMatchObject({ step: 'transfer', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(target.state).toBe('absent');
    expect(calls.slice(-2)).toEqual(['host01:start', 'uncordon:e-controller-1']);
  });

  it('never removes the source when the node does not come Ready on the target; rolls back instead', async () => {
    const { ctx, source, target } = await context('running', 'absent');
    (ctx.guest as unknown as { waitNodeReady: () => Promise<void> }).waitNodeReady = async () => { throw new Error('node not Ready within 300 s'); };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'nodeReady', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(target.state).toBe('absent');
  });

  it('resumes after a crash that happened once the VM already ran on the target', async () => {
    const { ctx, calls, source } = await context('stopped', 'running');
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('nodeReady');
    expect(calls).toEqual(['ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(source.state).toBe('absent');
  });

  it('resumes a copy interrupted by a crash without stopping anything again', async () => {
    const { ctx, calls } = await context('stopped', 'stopped');
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('transfer');
    expect(calls[0]).toBe('transfer');
    expect(calls).not.toContain('host01:stop');
  });

  it('refuses to touch a VM that is live on both hosts', async () => {
    const { ctx, calls } = await context('running', 'running');
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'precheck', outcome: 'untouched' });
    expect(calls).toEqual([]);
  });

  it('does not stop a controller when the control plane would lose quorum', async () => {
    const { ctx, calls } = await context('running', 'absent', {});
    ctx.guest = fakeGuest(calls, { quorumOk: false });
    await expect(moveVm(ctx)).rejects.toThrow(/lose quorum.*controller-3 is NotReady/);
    expect(calls).toEqual([]);
  });
});

describe('moveVm strategies', () => {
  const live = (target: { state: State }, calls: string[], fail = false, source?: { state: State }) => async () => {
    calls.push('live');
    if (fail) throw new LiveMigrationAbortedError('did not converge in 2 s', 'migrate');
    target.state = 'running';
    if (source) source.state = 'stopped';
    return { qemuDowntimeMs: 20, measuredDowntimeMs: 180, totalMs: 1500, bytes: { disks: 10, migration: 20, total: 30 }, ramTransferred: 20, phases: { prepareMs: 0, mirrorMs: 0, migrateMs: 0, handoverMs: 0 } };
  };
  const precopyFakes = (source: { state: State }, target: { state: State }, calls: string[], opts: { failDrain?: boolean } = {}) => ({
    startPrecopy: async () => {
      calls.push('mirror');
      return { ready: Promise.resolve({}), abort: async () => { calls.push('mirror-abort'); } } as never;
    },
    precopyCutover: async () => {
      calls.push('cutover');
      source.state = 'stopped';
      target.state = 'running';
      return { downtimeMs: 900, bytes: 64, disks: [], how: 'stop', phases: {} } as never;
    },
    failDrain: opts.failDrain,
  });

  it('live: hands the VM over without cordon, drain or stop and reports QEMU-side downtime', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    ctx.strategies = { liveMigrate: live(target, calls, false, source) as never };
    const r = await moveVm(ctx);
    expect(calls).toEqual(['live', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r.downtimeMs).toBe(180);
    expect(r.bytes).toBe(30);
  });

  it('live that does not converge falls back to pre-copy with a drain', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    const f = precopyFakes(source, target, calls);
    ctx.strategies = { liveMigrate: live(target, calls, true) as never, startPrecopy: f.startPrecopy as never, precopyCutover: f.precopyCutover as never };
    const r = await moveVm(ctx);
    expect(calls.slice(0, 5)).toEqual(['live', 'mirror', 'cordon:e-controller-1', 'drain:e-controller-1', 'cutover']);
    expect(calls).not.toContain('host01:stop');
    expect(r.downtimeMs).toBe(900);
  });

  it('live with fallback None fails and leaves the VM running on the source, node untouched', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate', live: { fallback: 'None' } });
    ctx.strategies = { liveMigrate: live(target, calls, true) as never };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'live', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(calls).not.toContain('cordon:e-controller-1');
  });

  it('pre-copy: mirror overlaps the drain; cutover replaces stop, transfer and start', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    const f = precopyFakes(source, target, calls);
    ctx.strategies = { startPrecopy: f.startPrecopy as never, precopyCutover: f.precopyCutover as never };
    const r = await moveVm(ctx);
    expect(calls).toEqual(['mirror', 'cordon:e-controller-1', 'drain:e-controller-1', 'cutover', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r.downtimeMs).toBe(900);
  });

  it('pre-copy: a failed drain aborts the mirror before rolling back', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    const f = precopyFakes(source, target, calls);
    ctx.strategies = { startPrecopy: f.startPrecopy as never, precopyCutover: f.precopyCutover as never };
    (ctx.guest as unknown as { drain: () => Promise<void> }).drain = async () => { throw new Error('drain timed out: PDB'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'drain', outcome: 'rolled-back' });
    expect(calls).toContain('mirror-abort');
    expect(calls.indexOf('mirror-abort')).toBeLessThan(calls.indexOf('uncordon:e-controller-1'));
    expect(source.state).toBe('running');
  });

  it('after a crash mid live migration, a target still in inmigrate is discarded and the move starts over', async () => {
    const { ctx, calls, target } = await context('running', 'running');
    target.qmpStatus = 'inmigrate';
    const r = await moveVm(ctx);
    expect(calls.slice(0, 2)).toEqual(['host02:stop', 'host02:remove']);
    expect(r.resumedFrom).toBe('cordon');
  });

  it('after a crash right after a live handover, the postmigrate source is quit and the move completes', async () => {
    const { ctx, calls, source } = await context('running', 'running');
    source.qmpStatus = 'postmigrate';
    const r = await moveVm(ctx);
    expect(calls[0]).toBe('host01:stop');
    expect(r.resumedFrom).toBe('nodeReady');
  });
});

describe('moveVm interruption', () => {
  it('stops without rolling back when the run is handed over (leadership lost); the next run resumes', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    (ctx.guest as unknown as { drain: () => Promise<void> }).drain = async () => {
      calls.push('drain');
      ac.abort(new Handover('lost leadership'));
      throw new Error('drain aborted');
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'drain', outcome: 'interrupted' });
    expect(calls).toEqual(['cordon:e-controller-1', 'drain']);
    expect(source.state).toBe('running');

    // the next leader picks it up: same VM state, a fresh signal
    ctx.signal = new AbortController().signal;
    (ctx.guest as unknown as { drain: () => Promise<{ evicted: number }> }).drain = async () => ({ evicted: 0 });
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('cordon');
    expect(source.state).toBe('absent');
  });

  it('a user cancel (plain abort) still rolls back', async () => {
    const { ctx, calls } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    (ctx.guest as unknown as { drain: () => Promise<void> }).drain = async () => {
      ac.abort(new Error('VMMigration deleted'));
      throw new Error('drain aborted');
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'rolled-back' });
    expect(calls).toContain('uncordon:e-controller-1');
  });
});
