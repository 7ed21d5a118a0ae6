/**
 * In-memory doubles of the hosts, guest cluster and byte movers a move drives, acting on host
 * states the way the real parts act on QEMU. Shared by the per-VM flow unit tests.
 */
import type { EnvironmentSpec, VMSpec } from '../../src/api/inventory.js';
import { settingsFrom } from '../../src/api/types.js';
import type { VmStatus } from '../../src/hosts/hypervisor.js';
import { readinessGuard } from '../../src/migrate/readinessGuard.js';
import { LiveFellBack, type MoveContext, type MoveEngines, type MoveGuest, type MoveHost } from '../../src/migrate/vmMove.js';
import { Store } from '../../src/store/store.js';
import { pino } from 'pino';

export const log = pino({ level: 'warn' });

export type State = 'absent' | 'stopped' | 'running' | 'paused';

export interface FakeHost extends MoveHost {
  state: State;
  qmpStatus?: string;
  /** the uid holding the source lock, like the lock file in the VM directory */
  lock?: string;
  /** the migration that recorded the guest may have run from this VM directory (the host's marker file) */
  marker?: string;
}

export function fakeHost(name: string, initial: State, calls: string[]): FakeHost {
  const h: FakeHost = {
    host: { name },
    state: initial,
    vmStatus: async (): Promise<VmStatus> => ({ state: h.state, qmpStatus: h.qmpStatus ?? (h.state === 'running' ? 'running' : h.state === 'paused' ? 'paused' : undefined) }),
    startVm: async (_e, _v, o) => {
      if (h.lock && h.lock !== o?.lockHolder) throw new Error(`${name}: locked by migration ${h.lock}`);
      calls.push(`${name}:start`); h.state = 'running'; h.qmpStatus = undefined;
    },
    stopVm: async () => { calls.push(`${name}:stop`); const was = h.state; h.state = 'stopped'; h.qmpStatus = undefined; return was === 'running' ? 'quit' : 'already-stopped'; },
    removeVmDir: async (_e, _v, o) => {
      if (o?.staleCopy && h.marker) throw new Error(`${name}: refusing to remove a directory the guest may have run from`);
      calls.push(`${name}:remove`); h.state = 'absent'; h.lock = undefined; h.marker = undefined;
    },
    ranHere: async () => (h.state === 'absent' ? undefined : h.marker),
    markRanHere: async (_e, _v, uid) => { h.marker ??= uid; },
    lockSource: async (_e, _v, holder) => {
      if (h.state === 'absent') return 'absent';
      if (h.lock && h.lock !== holder.uid) throw new Error(`${name}: locked by migration ${h.lock}`);
      const was = h.lock;
      h.lock = holder.uid;
      return was ? 'held' : 'locked';
    },
    unlockSource: async (_e, _v, uid) => {
      if (h.lock && h.lock !== uid) throw new Error(`${name}: locked by migration ${h.lock}`);
      h.lock = undefined;
    },
  };
  return h;
}

export function fakeGuest(calls: string[], opts: { quorumOk?: boolean } = {}) {
  const guest = {
    quorumOk: opts.quorumOk ?? true,
    apiHealthy: async () => true,
    nodeState: async () => ({ exists: true, ready: true, unschedulable: false }),
    controlPlaneQuorum: async () => ({ ok: guest.quorumOk, controllers: 3, healthy: guest.quorumOk ? 2 : 1, reason: guest.quorumOk ? 'ok' : 'controller-3 is NotReady' }),
    cordon: async (n: string) => { calls.push(`cordon:${n}`); },
    uncordon: async (n: string) => { calls.push(`uncordon:${n}`); },
    drain: async (n: string) => { calls.push(`drain:${n}`); return { evicted: 2, pdbRetries: 0 }; },
    waitNodeReady: async (n: string) => { calls.push(`ready:${n}`); },
  } satisfies MoveGuest & Record<string, unknown>;
  return guest;
}

export const vm: VMSpec = { name: 'controller-1', role: 'controller', nodeName: 'e-controller-1', host: 'host01', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
export const env: EnvironmentSpec = { name: 'e', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [vm] };

/** Byte movers that act on the fake hosts the way the real ones act on QEMU. */
export function fakeEngines(source: FakeHost, target: FakeHost, calls: string[]): MoveEngines & { liveFails?: 'fallback' | 'hard' } {
  const e: MoveEngines & { liveFails?: 'fallback' | 'hard' } = {
    copyAll: async () => {
      if (target.marker) throw new Error('host02: refusing to copy into a directory the guest may have run from');
      calls.push('transfer'); target.state = 'stopped'; return 100;
    },
    copyNonDisk: async () => { calls.push('copy-files'); return 1; },
    startMirror: async () => {
      calls.push('mirror');
      if (target.state === 'absent') target.state = 'stopped';
      return {
        ready: Promise.resolve(),
        haltSource: async () => { calls.push('halt'); source.state = 'paused'; return 'stop'; },
        converge: async () => { calls.push('converge'); return 64; },
        quitSource: async () => { calls.push('quit-source'); source.state = 'stopped'; },
        copyFiles: (signal) => e.copyNonDisk(signal),
        verify: async () => { await e.verify(); return 'guest data verified'; },
        abortAndResume: async () => { calls.push('mirror-abort'); target.state = 'absent'; source.state = 'running'; },
        detach: async () => { calls.push('mirror-detach'); },
      };
    },
    live: async () => {
      calls.push('live');
      if (e.liveFails === 'fallback') throw new LiveFellBack('did not converge in 2 s');
      if (e.liveFails === 'hard') throw new Error('live migration aborted: did not converge in 2 s');
      source.qmpStatus = 'postmigrate';
      target.state = 'paused';
      return {
        bytes: 30,
        stoppedAt: Date.now() - 180,
        sourceRunState: async () => source.qmpStatus ?? source.state,
        quitSource: async () => { calls.push('quit-source'); source.state = 'stopped'; source.qmpStatus = undefined; },
        verify: async () => { await e.verify(); return 'guest data verified'; },
        resumeTarget: async () => { calls.push('resume-target'); target.state = 'running'; return Date.now(); },
        abort: async () => { calls.push('live-abort'); },
        release: async () => { calls.push('live-release'); },
        detach: async () => { calls.push('live-detach'); },
      };
    },
    verify: async () => { calls.push('verify'); },
    resumeTarget: async () => { calls.push('resume-target'); target.state = 'running'; target.qmpStatus = undefined; return Date.now(); },
  };
  return e;
}

export async function context(src: State, dst: State, over: Partial<MoveContext> = {}) {
  const calls: string[] = [];
  const store = await Store.open(':memory:');
  const source = fakeHost('host01', src, calls);
  const target = fakeHost('host02', dst, calls);
  const guest = fakeGuest(calls);
  const engines = fakeEngines(source, target, calls);
  const ctx: MoveContext = {
    migrationUid: 'uid', environment: env, vm, source, target, guest, safety: { guard: readinessGuard(guest) }, store, engines,
    settings: settingsFrom({ targetHost: 'host02', environments: ['e'] }), log, signal: new AbortController().signal,
    observer: { step: () => undefined, progress: () => undefined },
    ...over,
  };
  return { ctx, calls, source, target, store, guest, engines };
}
