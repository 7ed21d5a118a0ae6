/**
 * Rule 2 on real parts: two sshd hosts, real QEMU, the real per-VM flow (moveVm with the real
 * Hypervisor, byte movers and SQLite journal). Only the guest cluster is a double — its node never
 * comes Ready. After the handover a guest-visible write lands on the target's disk (through the
 * target QEMU's own block layer, as a guest write would); the move must stop there (stuck-on-target),
 * keep that write, keep the source image unchanged and never start the source again.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { vmDirectory, type EnvironmentSpec, type VMSpec } from '../../src/api/inventory.js';
import { settingsFrom, type VMMigrationSpec } from '../../src/api/types.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { guestContentSha256, openQmpAt, verifyGuestData } from '../../src/hosts/qemuIncoming.js';
import { pauseSourceForCutover } from '../../src/hosts/qmpRunState.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startPrecopy } from '../../src/transfer/mirror.js';
import { qemuStreamShare } from '../../src/transfer/throttle.js';
import { QmpClient } from '../../src/hosts/qmp.js';
import { connect } from 'node:net';
import { hypervisorEngines } from '../../src/migrate/engines.js';
import { readinessGuard } from '../../src/migrate/readinessGuard.js';
import { releaseSource, unlockSource } from '../../src/migrate/releaseSource.js';
import { moveVm, MoveError, type MoveGuest, type MoveHost } from '../../src/migrate/vmMove.js';
import { Store } from '../../src/store/store.js';
import { startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { createDiskImage } from '../world/images.js';
import { LOOPBACK } from '../world/loopback.js';

const execFileP = promisify(execFile);
const ENV = 'env-rf';
const log = pino({ level: 'silent' });

/** Records lifecycle calls on a real hypervisor (the calls still go to the real host). */
function recording(hv: Hypervisor, calls: string[]): MoveHost {
  return {
    host: hv.host,
    vmStatus: (e, v) => hv.vmStatus(e, v),
    startVm: (e, v, o) => { calls.push(`${hv.host.name}:start`); return hv.startVm(e, v, o); },
    stopVm: (e, v, o) => { calls.push(`${hv.host.name}:stop`); return hv.stopVm(e, v, o); },
    removeVmDir: (e, v) => { calls.push(`${hv.host.name}:remove`); return hv.removeVmDir(e, v); },
    resumeVm: (e, v, o) => { calls.push(`${hv.host.name}:resume`); return hv.resumeVm(e, v, o); },
    lockSource: (e, v, h) => hv.lockSource(e, v, h),
    unlockSource: (e, v, u) => hv.unlockSource(e, v, u),
  };
}

describe('roll forward once the VM ran on the target (real hosts, real QEMU)', () => {
  let two: TwoHosts;
  const used: VMSpec[] = [];

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-rf-', firstAddress: LOOPBACK.rollforward.first });
  });

  afterEach(async () => {
    for (const vm of used.splice(0)) {
      await two.hv1.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
      await two.hv2.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
    }
  });

  afterAll(async () => {
    await two?.stop();
  });

  for (const [label, spec] of [['cold', {}], ['live', { strategy: 'LiveMigrate' }]] as [string, Partial<VMMigrationSpec>][]) {
    it(`${label}: node never Ready on the target → stuck-on-target; the guest's write on the target survives, the source is never started`, async () => {
      const vm: VMSpec = { name: `rf-${label}`, role: 'worker', nodeName: `rf-${label}`, host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
      used.push(vm);
      const env: EnvironmentSpec = { name: ENV, kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [vm] };
      const { hv1, hv2, h1, h2 } = two;
      const srcDir = vmDirectory(h1, ENV, vm.name);
      const dstDir = vmDirectory(h2, ENV, vm.name);
      await mkdir(srcDir, { recursive: true });
      await createDiskImage(path.join(srcDir, 'disk0.qcow2'), { sizeMiB: 32, format: 'qcow2', seed: 5, regions: 8 });
      const before = await guestContentSha256(hv1, `${srcDir}/disk0.qcow2`, 'qcow2');
      await hv1.startVm(ENV, vm);

      const calls: string[] = [];
      const guestWrites: string[] = [];
      const guest: MoveGuest & { controlPlaneQuorum: () => Promise<{ ok: boolean; controllers: number; healthy: number; reason: string }> } = {
        apiHealthy: async () => true,
        nodeState: async () => ({ exists: true, ready: true, unschedulable: false }),
        controlPlaneQuorum: async () => ({ ok: true, controllers: 0, healthy: 0, reason: 'ok' }),
        cordon: async () => undefined,
        uncordon: async () => undefined,
        drain: async () => ({ evicted: 0, pdbRetries: 0 }),
        waitNodeReady: async () => {
          if (guestWrites.length === 0) {
            // the guest runs on the target and writes: through the target QEMU's block layer
            const qmp = await openQmpAt(hv2, dstDir);
            try {
              const blocks = await qmp.execute<{ device: string }[]>('query-block');
              const dev = blocks[0]!.device;
              await qmp.execute('human-monitor-command', { 'command-line': `qemu-io ${dev} "write -P 0xa7 1M 256k"` });
              await qmp.execute('human-monitor-command', { 'command-line': `qemu-io ${dev} "flush"` });
              guestWrites.push(dev);
            } finally {
              qmp.close();
            }
          }
          throw new Error(`node ${vm.nodeName} not Ready within 1 s`);
        },
      };
      const settings = settingsFrom({ targetHost: 'host02', environments: [ENV], nodeReadyTimeout: '3s', shutdown: { powerdownTimeout: '0s' }, ...spec });
      const store = await Store.open(':memory:');
      const err = await moveVm({
        migrationUid: `uid-${label}`, environment: env, vm, source: recording(hv1, calls), target: recording(hv2, calls), guest,
        safety: { guard: readinessGuard(guest) }, store, settings, log, signal: new AbortController().signal,
        engines: hypervisorEngines({ source: hv1, target: hv2, environment: ENV, vm, settings, log }),
        observer: { step: () => undefined, progress: () => undefined },
      }).catch((e: unknown) => e);

      expect(err).toBeInstanceOf(MoveError);
      expect(err).toMatchObject({ step: 'nodeReady', outcome: 'stuck-on-target' });
      expect((err as Error).message).toMatch(/stays there.*source image on host01 is kept/);
      expect(guestWrites).toHaveLength(1);
      // the VM still runs on the target, nowhere else; the source was never started or resumed
      expect((await hv2.vmStatus(ENV, vm)).qmpStatus).toBe('running');
      expect((await hv1.vmStatus(ENV, vm)).state).toBe('stopped');
      expect(calls.filter((c) => c.startsWith('host01:') && c !== 'host01:stop')).toEqual([]);
      expect(calls).not.toContain('host02:stop');
      expect(calls).not.toContain('host02:remove');
      // the journal never shows a rollback
      expect((await store.journalEntries(`uid-${label}`)).some((j) => j.step === 'rollback')).toBe(false);

      // the guest's write is on the target's disk; the kept source image is exactly what it was
      const readBack = await execFileP('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', 'read -P 0xa7 1M 256k', `${dstDir}/disk0.qcow2`]);
      expect(readBack.stdout).toMatch(/read 262144\/262144 bytes/);
      expect(await guestContentSha256(hv1, `${srcDir}/disk0.qcow2`, 'qcow2')).toBe(before);

      // the kept source image is locked for this move: a stray start (a retry, a second replica) is refused
      expect(await hv1.sourceLock(ENV, vm)).toMatchObject({ uid: `uid-${label}`, target: 'host02' });
      await expect(hv1.startVm(ENV, vm)).rejects.toThrow(new RegExp(`locked by migration uid-${label}.*moving it to host02`));
      expect((await hv1.vmStatus(ENV, vm)).state).toBe('stopped');

      // an administrator releases the kept source image: refused while the move is not Degraded, then done
      await store.ensureMove({ migrationUid: `uid-${label}`, environment: ENV, vm: vm.name, fromHost: 'host01', toHost: 'host02' });
      const release = () => releaseSource({ store, migrationUid: `uid-${label}`, environment: ENV, vm, source: hv1, target: hv2 });
      await expect(release()).rejects.toThrow(/is Pending, not Degraded/);
      await store.updateMove(`uid-${label}`, ENV, vm.name, { phase: 'Degraded' });
      expect(await release()).toMatch(/released by an administrator/);
      expect((await hv1.vmStatus(ENV, vm)).state).toBe('absent');
      expect((await hv2.vmStatus(ENV, vm)).qmpStatus).toBe('running');

      await hv2.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
      const read = await execFileP('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0xa7 1M 256k', `${dstDir}/disk0.qcow2`]);
      expect(read.stdout).toMatch(/read 262144\/262144 bytes/);
      expect(read.stdout + read.stderr).not.toMatch(/Pattern verification failed/);
      expect(await guestContentSha256(hv2, `${dstDir}/disk0.qcow2`, 'qcow2')).not.toBe(before);
    }, 180_000);
  }

  /** A VM running on host01 with a 32 MiB disk; its guest content hash. */
  async function runningOnHost01(name: string): Promise<{ vm: VMSpec; env: EnvironmentSpec; before: string }> {
    const vm: VMSpec = { name, role: 'worker', nodeName: name, host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
    used.push(vm);
    const dir = vmDirectory(two.h1, ENV, vm.name);
    await mkdir(dir, { recursive: true });
    await createDiskImage(path.join(dir, 'disk0.qcow2'), { sizeMiB: 32, format: 'qcow2', seed: 13, regions: 8 });
    const before = await guestContentSha256(two.hv1, `${dir}/disk0.qcow2`, 'qcow2');
    await two.hv1.startVm(ENV, vm);
    return { vm, env: { name: ENV, kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [vm] }, before };
  }

  const readyGuest = () => {
    const g = {
      apiHealthy: async () => true, nodeState: async () => ({ exists: true, ready: true, unschedulable: false }),
      controlPlaneQuorum: async () => ({ ok: true, controllers: 0, healthy: 0, reason: 'ok' }),
      cordon: async () => undefined, uncordon: async () => undefined, drain: async () => ({ evicted: 0, pdbRetries: 0 }), waitNodeReady: async () => undefined,
    };
    return g;
  };

  function cold(o: { uid: string; env: EnvironmentSpec; vm: VMSpec; store: Store; source: Hypervisor; target: Hypervisor; calls: string[]; onStep?: (step: string) => void }) {
    const guest = readyGuest();
    const settings = settingsFrom({ targetHost: 'host02', environments: [ENV], shutdown: { powerdownTimeout: '0s' } });
    return moveVm({
      migrationUid: o.uid, environment: o.env, vm: o.vm, source: recording(o.source, o.calls), target: recording(o.target, o.calls), guest,
      safety: { guard: readinessGuard(guest) }, store: o.store, settings, log, signal: new AbortController().signal,
      engines: hypervisorEngines({ source: o.source, target: o.target, environment: ENV, vm: o.vm, settings, log }),
      observer: { step: (step, ev) => { if (ev === 'begin') o.onStep?.(step); }, progress: () => undefined },
    });
  }

  it('the target host unreachable right before start: rolled back, the source runs again; the next run discards the stale copy and finishes', async () => {
    const { vm, env, before } = await runningOnHost01('rf-tdown');
    const store = await Store.open(':memory:');
    const calls: string[] = [];
    const d2 = await HostConnection.connect(two.h2, two.world.identity);
    const err = await cold({ uid: 'uid-tdown', env, vm, store, source: two.hv1, target: new Hypervisor(two.h2, d2), calls, onStep: (s) => { if (s === 'start') d2.close(); } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'start', outcome: 'rolled-back' });
    expect((await two.hv1.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    expect((await two.hv2.vmStatus(ENV, vm)).state).toBe('stopped'); // the copy, never started
    expect(calls).not.toContain('host02:start');
    // the rollback released the source lock it held
    expect(await two.hv1.sourceLock(ENV, vm)).toBeUndefined();

    await cold({ uid: 'uid-tdown', env, vm, store, source: two.hv1, target: two.hv2, calls: [] });
    expect((await two.hv2.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    expect((await two.hv1.vmStatus(ENV, vm)).state).toBe('absent');
    await two.hv2.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
    expect(await guestContentSha256(two.hv2, `${vmDirectory(two.h2, ENV, vm.name)}/disk0.qcow2`, 'qcow2')).toBe(before);
  }, 180_000);

  it('the source host unreachable after the stop: the VM is started nowhere (stuck) until the source is proven stopped; then the move finishes', async () => {
    const { vm, env, before } = await runningOnHost01('rf-sdown');
    const store = await Store.open(':memory:');
    const calls: string[] = [];
    const d1 = await HostConnection.connect(two.h1, two.world.identity);
    const err = await cold({ uid: 'uid-sdown', env, vm, store, source: new Hypervisor(two.h1, d1), target: two.hv2, calls, onStep: (s) => { if (s === 'fence') d1.close(); } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'fence', outcome: 'stuck' });
    expect(calls.filter((c) => c.endsWith(':start'))).toEqual([]);
    expect((await two.hv1.vmStatus(ENV, vm)).state).toBe('stopped');
    expect((await two.hv2.vmStatus(ENV, vm)).state).toBe('absent');

    // the stopped source stays locked for this move: nothing but the move (or an administrator) may start it
    const lock = await two.hv1.sourceLock(ENV, vm);
    expect(lock).toMatchObject({ uid: 'uid-sdown', target: 'host02' });
    await expect(two.hv1.startVm(ENV, vm)).rejects.toThrow(/locked by migration uid-sdown.*moving it to host02.*unlock-source/);
    await expect(two.hv1.startVm(ENV, vm, { lockHolder: 'uid-other' })).rejects.toThrow(/locked by migration uid-sdown/);
    // a second migration of the same VM is refused before it touches anything
    const other = await cold({ uid: 'uid-other', env, vm, store, source: two.hv1, target: two.hv2, calls: [] }).catch((e: unknown) => e);
    expect(other).toMatchObject({ outcome: 'untouched' });
    expect((other as Error).message).toMatch(/locked by migration uid-sdown/);
    expect((await two.hv1.vmStatus(ENV, vm)).state).toBe('stopped');

    // an administrator's unlock: refused while the move may still act, journaled when done
    await store.ensureMove({ migrationUid: 'uid-sdown', environment: ENV, vm: vm.name, fromHost: 'host01', toHost: 'host02' });
    await store.updateMove('uid-sdown', ENV, vm.name, { phase: 'Running' });
    const unlock = () => unlockSource({ store, migrationUid: 'uid-sdown', environment: ENV, vm, source: two.hv1, target: two.hv2 });
    await expect(unlock()).rejects.toThrow(/is Running/);
    await store.updateMove('uid-sdown', ENV, vm.name, { phase: 'Failed' });
    expect(await unlock()).toMatch(/lock of migration uid-sdown removed from host01/);
    expect(await two.hv1.sourceLock(ENV, vm)).toBeUndefined();
    expect((await store.journalEntries('uid-sdown', ENV, vm.name)).some((j) => j.step === 'unlock')).toBe(true);

    // reachable again: the next run finds the source stopped, copies, fences, starts on the target
    const r = await cold({ uid: 'uid-sdown', env, vm, store, source: two.hv1, target: two.hv2, calls: [] });
    expect(r.resumedFrom).toBe('transfer');
    expect((await two.hv2.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    await two.hv2.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
    expect(await guestContentSha256(two.hv2, `${vmDirectory(two.h2, ENV, vm.name)}/disk0.qcow2`, 'qcow2')).toBe(before);
  }, 180_000);

  it('leadership lost during the guest\'s ACPI shutdown: stopVm gives up without the quit, the VM is left for the next leader', async () => {
    const { vm } = await runningOnHost01('rf-lease');
    const ac = new AbortController();
    // leadership goes once the guest was asked to power down (QEMU's POWERDOWN event, seen on the second monitor)
    const observe = await QmpClient.open(connect(`${vmDirectory(two.h1, ENV, vm.name)}/qmp-observe.sock`), { timeoutMs: 10_000 });
    const pressed = observe.waitForEvent('POWERDOWN', 60_000).then(() => ac.abort(new Error('lost leadership')));
    pressed.catch(() => undefined); // awaited below; a failure before that must not go unhandled
    try {
      await expect(two.hv1.stopVm(ENV, vm, { powerdownTimeoutMs: 30_000, signal: ac.signal })).rejects.toThrow(/lost leadership/);
      await pressed;
    } finally {
      observe.close();
    }
    // had it waited out the 30 s it would have quit QEMU: still running means it gave up without acting
    expect((await two.hv1.vmStatus(ENV, vm)).qmpStatus).toBe('running');
  }, 60_000);

  it('a per-host bandwidth budget reaches QEMU: the pre-copy mirror job runs at the move\'s fixed share (budget ÷ the streams a host may carry)', async () => {
    const vm: VMSpec = { name: 'rf-speed', role: 'worker', nodeName: 'rf-speed', host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
    used.push(vm);
    const { hv1, hv2, h1 } = two;
    const srcDir = vmDirectory(h1, ENV, vm.name);
    await mkdir(srcDir, { recursive: true });
    await createDiskImage(path.join(srcDir, 'disk0.qcow2'), { sizeMiB: 32, format: 'qcow2', seed: 10, regions: 8 });
    await hv1.startVm(ENV, vm);
    const settings = settingsFrom({ targetHost: 'host02', environments: [ENV], transfer: { precopy: true }, hostLimits: { bandwidthMiBpsPerHost: 8, maxOutboundPerHost: 1, maxInboundPerHost: 1 } });
    const share = qemuStreamShare(settings.bandwidthPerHostBytesPerSec!, settings.maxOutboundPerHost, settings.maxInboundPerHost);
    expect(share).toBe(4 * 1048576);
    const engines = hypervisorEngines({ source: hv1, target: hv2, environment: ENV, vm, settings, log, qemuStreamBytesPerSec: share });
    const mirror = await engines.startMirror({ signal: new AbortController().signal, onProgress: () => undefined });
    try {
      // the mirror holds the VM's QMP monitor; the second one answers for its block jobs
      const qmp = await QmpClient.open(connect(`${srcDir}/qmp-observe.sock`), { timeoutMs: 10_000 });
      try {
        const jobs = await qmp.execute<Array<{ device: string; speed: number }>>('query-block-jobs');
        expect(jobs.map((j) => j.speed)).toEqual([4 * 1048576]);
      } finally {
        qmp.close();
      }
    } finally {
      await mirror.abortAndResume();
    }
    expect((await hv1.vmStatus(ENV, vm)).qmpStatus).toBe('running');
  }, 120_000);

  it('a pre-copy whose operator died mid-mirror leaves a qemu-nbd and a block job behind; the next run clears both and mirrors again', async () => {
    const vm: VMSpec = { name: 'rf-stale', role: 'worker', nodeName: 'rf-stale', host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
    used.push(vm);
    const { hv1, hv2, h1, h2 } = two;
    const srcDir = vmDirectory(h1, ENV, vm.name);
    const dstDir = vmDirectory(h2, ENV, vm.name);
    await mkdir(srcDir, { recursive: true });
    await createDiskImage(path.join(srcDir, 'disk0.qcow2'), { sizeMiB: 32, format: 'qcow2', seed: 9, regions: 8 });
    await hv1.startVm(ENV, vm);

    // the "operator" that dies: its own SSH connections, closed without any cleanup
    const [d1, d2] = await Promise.all([HostConnection.connect(h1, two.world.identity), HostConnection.connect(h2, two.world.identity)]);
    const dying = await startPrecopy({ source: new Hypervisor(h1, d1), target: new Hypervisor(h2, d2), environment: ENV, vm, log });
    await dying.ready;
    d1.close();
    d2.close();
    await new Promise((r) => setTimeout(r, 500));
    const nbdAlive = async () => (await execFileP('pgrep', ['-f', `qemu-nbd.*${dstDir}/`]).catch(() => ({ stdout: '' }))).stdout.trim();
    expect(await nbdAlive(), 'the dead run left its qemu-nbd').not.toBe('');

    // the next run (precheck clears the target's stale exports; the new mirror replaces the stale job)
    await hv2.clearStaleExports(ENV, vm);
    expect(await nbdAlive()).toBe('');
    const again = await startPrecopy({ source: hv1, target: hv2, environment: ENV, vm, log });
    await again.ready;
    await pauseSourceForCutover(again.sourceQmp, { powerdownTimeoutMs: 0 });
    await again.complete();
    expect((await verifyGuestData(hv1, hv2, ENV, vm)).every((v) => v.sourceSha256 === v.targetSha256)).toBe(true);
    again.sourceQmp.close();
  }, 180_000);
});
