/**
 * One VM move as a journaled state machine. Read top to bottom:
 *
 *   locate → precheck → cordon → drain → stop (fenced) → transfer + verify
 *          → start on target → node Ready → uncordon → commit placement → clean source
 *
 * Strategies replace the middle: pre-copy mirrors the disks while the VM runs
 * (`mirror`, overlapping the drain) and `cutover` does stop → converge →
 * fenced quit → verify → start; live migration (`live`) hands the running VM
 * over without cordon or drain, and on a clean abort falls back to pre-copy
 * or cold as the spec says.
 *
 * Every step writes `begin` to the journal before its side effect and `end`
 * after it, and every step is idempotent: `locate` looks at where the VM
 * really is (QEMU status on both hosts) and resumes at the first step whose
 * effect is missing, so a re-run after an operator crash neither loses nor
 * doubles a VM. A failure before the VM runs on the target rolls back to the
 * source; the source image is only removed once the VM runs on the target,
 * its copy's checksum matched and its node is Ready.
 */
import type { EnvironmentSpec, HostSpec, VMSpec } from '../api/inventory.js';
import type { MigrationSettings, VMStatus } from '../api/types.js';
import type { GuestCluster } from '../guest/guestCluster.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import type { HostConnection } from '../hosts/ssh.js';
import type { Store } from '../store/store.js';
import { liveMigrate, LiveMigrationAbortedError } from '../transfer/live.js';
import { precopyCutover, startPrecopy, type PrecopyHandle } from '../transfer/mirror.js';
import { relayVmFiles } from '../transfer/relay.js';
import { RateMeter } from '../transfer/throttle.js';
import type { Logger } from '../util/log.js';

export type MoveStep = 'precheck' | 'live' | 'mirror' | 'cordon' | 'drain' | 'cutover' | 'stop' | 'transfer' | 'start' | 'nodeReady' | 'uncordon' | 'commit' | 'cleanup' | 'rollback';

export interface MoveObserver {
  /** a step began, ended or failed: for events, logs and step-duration metrics */
  step(step: MoveStep, event: 'begin' | 'end' | 'fail', info: { durationMs?: number; message?: string }): void;
  /** progress for the VM's status entry (merged into what was reported before) */
  progress(update: Partial<VMStatus>): void;
}

export interface MoveContext {
  migrationUid: string;
  environment: EnvironmentSpec;
  vm: VMSpec;
  source: Hypervisor;
  target: Hypervisor;
  guest: GuestCluster;
  store: Store;
  settings: MigrationSettings;
  observer: MoveObserver;
  log: Logger;
  signal: AbortSignal;
  /** the copy engine; relayVmFiles unless a strategy brings its own */
  transfer?: typeof relayVmFiles;
  /** a fresh SSH connection for a relay retry after a dropped connection */
  reconnect?: (host: HostSpec) => Promise<HostConnection>;
  /** replaceable for unit tests of the state machine */
  strategies?: { liveMigrate?: typeof liveMigrate; startPrecopy?: typeof startPrecopy; precopyCutover?: typeof precopyCutover };
}

export interface MoveResult {
  downtimeMs: number;
  nodeReadyMs: number;
  bytes: number;
  resumedFrom: MoveStep;
}

/**
 * untouched: failed before any side effect; rolled-back: back on the source; stuck: rollback failed,
 * needs a human; interrupted: stopped on purpose mid-way (leadership lost, shutdown) and left for
 * the next run to resume from the journal — rolling back then would race the new leader.
 */
export type MoveOutcome = 'untouched' | 'rolled-back' | 'stuck' | 'interrupted';

/** Abort reason that means "stop, someone will resume" rather than "cancel and roll back". */
export class Handover extends Error {
  readonly resumable = true;
}

export class MoveError extends Error {
  constructor(readonly step: MoveStep, message: string, readonly outcome: MoveOutcome) {
    super(message);
    this.name = 'MoveError';
  }
}

/** Where a previous (possibly interrupted) attempt left the VM; decides the resume point. */
type Location = 'source-running' | 'source-stopped' | 'target-running' | 'target-stopped';

export async function moveVm(ctx: MoveContext): Promise<MoveResult> {
  const { vm, environment, source, target, guest, settings, signal } = ctx;
  const env = environment.name;
  const run = stepRunner(ctx);
  let stoppedAt: number | undefined;
  let targetStarted = false;
  let bytes = 0;
  /** strategies that stop and start the VM themselves report their own stop → running figure */
  let downtimeOverrideMs: number | undefined;

  const location = await run('precheck', async () => {
    if (!(await guest.apiHealthy())) throw new Error(`the API server of ${env}'s guest cluster is not healthy`);
    const where = await locate(ctx);
    // Stopping a controller is only safe while etcd keeps quorum without it.
    if (vm.role === 'controller' && where === 'source-running') {
      const quorum = await guest.controlPlaneQuorum(vm.nodeName);
      if (!quorum.ok) throw new Error(`control plane would lose quorum without ${vm.nodeName}: ${quorum.reason}`);
    }
    const node = await guest.nodeState(vm.nodeName);
    if (!node.exists) throw new Error(`node ${vm.nodeName} of VM ${vm.name} does not exist in the guest cluster of ${env}`);
    return where;
  }).catch((err: Error) => {
    throw new MoveError('precheck', err.message, 'untouched');
  });
  const resumedFrom: MoveStep = location === 'source-running' ? 'cordon' : location === 'source-stopped' ? 'transfer' : location === 'target-stopped' ? 'start' : 'nodeReady';

  let precopy: PrecopyHandle | undefined;
  let moved = false;
  try {
    if (location === 'source-running' && settings.strategy === 'LiveMigrate') {
      // Live: the VM keeps running and its node stays Ready, so nothing is cordoned or drained.
      const live = await run('live', async () => {
        try {
          return await (ctx.strategies?.liveMigrate ?? liveMigrate)({
            source, target, environment: env, vm, signal,
            downtimeLimitMs: settings.live.downtimeLimitMs, maxBandwidthBytesPerSec: settings.live.maxBandwidthBytesPerSec,
            convergenceTimeoutMs: settings.live.convergenceTimeoutMs,
            onProgress: (p) => ctx.observer.progress({ bytesTransferred: p.tunnelBytes, message: `live: ${p.phase}` }),
          });
        } catch (err) {
          if (err instanceof LiveMigrationAbortedError && settings.live.fallback !== 'None') {
            ctx.observer.progress({ message: `live migration aborted (${err.message}); falling back to ${settings.live.fallback}` });
            return undefined;
          }
          throw err;
        }
      });
      if (live) {
        moved = true;
        targetStarted = true;
        bytes = live.bytes.total;
        downtimeOverrideMs = live.measuredDowntimeMs;
      }
    }
    const mode = settings.strategy === 'LiveMigrate' ? settings.live.fallback : settings.precopy ? 'PreCopy' : 'Cold';
    if (location === 'source-running' && !moved && mode === 'PreCopy') {
      // Mirror while the node drains: by the time the VM stops, its disks are already on the target.
      precopy = await run('mirror', () => (ctx.strategies?.startPrecopy ?? startPrecopy)({
        source, target, environment: env, vm, signal,
        onProgress: (p) => ctx.observer.progress({ bytesTransferred: p.offset, bytesTotal: p.len }),
      }));
    }
    if (location === 'source-running' && !moved) {
      await run('cordon', () => guest.cordon(vm.nodeName));
      await run('drain', () => guest.drain(vm.nodeName, {
        timeoutMs: settings.drainTimeoutMs, gracePeriodSeconds: settings.drainGracePeriodSeconds,
        deleteEmptyDirData: settings.deleteEmptyDirData, signal,
        onProgress: (remaining: number) => ctx.observer.progress({ message: `draining: ${remaining} pod(s) left` }),
      }));
    }
    if (precopy) {
      const handle = precopy;
      await handle.ready;
      // stop → mirror converges → source quit (fenced) → other files → start on target; the copy is verified before start.
      const cut = await run('cutover', () => (ctx.strategies?.precopyCutover ?? precopyCutover)(handle, {
        source, target, environment: env, vm, powerdownTimeoutMs: settings.powerdownTimeoutMs, verify: true,
      }));
      precopy = undefined;
      moved = true;
      targetStarted = true;
      bytes = cut.bytes;
      downtimeOverrideMs = cut.downtimeMs;
    }
    if (location === 'source-running' && !moved) {
      stoppedAt = Date.now();
      await run('stop', async () => {
        const how = await source.stopVm(env, vm, { powerdownTimeoutMs: settings.powerdownTimeoutMs });
        await assertStopped(source, env, vm);
        return how;
      });
    }
    if ((location === 'source-running' || location === 'source-stopped') && !moved) {
      stoppedAt ??= Date.now();
      bytes = await run('transfer', async () => {
        const done = new Map<string, number>();
        const totals = new Map<string, number>();
        const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
        const meter = new RateMeter();
        const results = await (ctx.transfer ?? relayVmFiles)({
          source, target, environment: env, vm, stallTimeoutMs: settings.stallTimeoutMs, signal,
          compression: settings.compression, bandwidthLimit: settings.bandwidthLimitBytesPerSec, reconnect: ctx.reconnect,
          onProgress: (file, d, t) => {
            done.set(file, d);
            totals.set(file, t);
            const bytesTransferred = sum(done);
            const bytesTotal = sum(totals);
            meter.update(bytesTransferred);
            const eta = meter.etaSeconds(bytesTotal);
            ctx.observer.progress({ bytesTransferred, bytesTotal, bytesPerSecond: Math.round(meter.bytesPerSecond), etaSeconds: eta === undefined ? undefined : Math.ceil(eta) });
          },
        });
        const total = results.reduce((n, r) => n + r.bytes, 0);
        ctx.observer.progress({ bytesTransferred: total, bytesTotal: total, bytesPerSecond: 0, etaSeconds: 0 });
        return total;
      });
    }
    if (location !== 'target-running' && !moved) {
      stoppedAt ??= Date.now();
      // Fencing: the source must be proven stopped right before the target starts.
      await run('start', async () => {
        await assertStopped(source, env, vm);
        await target.startVm(env, vm);
        targetStarted = true;
      });
    }
    const runningAt = Date.now();
    const downtimeMs = downtimeOverrideMs ?? (stoppedAt === undefined ? 0 : runningAt - stoppedAt);
    ctx.observer.progress({ downtimeSeconds: round(downtimeMs / 1000) });

    await run('nodeReady', () => guest.waitNodeReady(vm.nodeName, { timeoutMs: settings.nodeReadyTimeoutMs, signal }));
    const nodeReadyMs = Date.now() - runningAt;
    await run('uncordon', () => guest.uncordon(vm.nodeName));
    await run('commit', () => ctx.store.setPlacement(env, vm.name, target.host.name));
    await run('cleanup', async () => {
      // The copy was verified in `transfer` and the VM is healthy on the target: only now may the source go.
      const onSource = await source.vmStatus(env, vm);
      if (onSource.state === 'running' || onSource.state === 'paused' || onSource.state === 'other') {
        throw new Error(`refusing to clean up: VM ${vm.name} still has a live QEMU on ${source.host.name}`);
      }
      if (onSource.state !== 'absent') await source.removeVmDir(env, vm);
    });
    return { downtimeMs, nodeReadyMs, bytes, resumedFrom };
  } catch (err) {
    // A running mirror holds the source's QMP socket: release it before rollback looks at the VM.
    if (precopy) await precopy.abort().catch((e: Error) => ctx.log.warn({ err: e.message }, 'aborting the mirror failed'));
    const failedStep = (err as { step?: MoveStep }).step ?? 'precheck';
    if (signal.aborted && signal.reason instanceof Handover) {
      throw new MoveError(failedStep, `interrupted: ${signal.reason.message}`, 'interrupted');
    }
    const reason = (err as Error).message;
    const outcome = await rollback(ctx, { targetStarted }).then((): MoveOutcome => 'rolled-back', (rbErr: Error): MoveOutcome => {
      ctx.log.error({ err: rbErr.message }, 'rollback failed');
      ctx.observer.progress({ message: `rollback failed: ${rbErr.message}` });
      return 'stuck';
    });
    throw new MoveError(failedStep, reason, outcome);
  }
}

/**
 * Finds the VM. Exactly one host may hold a live QEMU for it; two is the
 * split-brain the fencing exists to prevent, and we stop rather than guess.
 */
async function locate(ctx: MoveContext): Promise<Location> {
  const { source, target, vm, environment } = ctx;
  const [src, dst] = await Promise.all([source.vmStatus(environment.name, vm), target.vmStatus(environment.name, vm)]);
  const live = (s: string) => s === 'running' || s === 'paused' || s === 'other';
  if (live(src.state) && live(dst.state)) {
    // An interrupted live migration leaves two QEMUs, but only one of them ever ran the guest:
    // a target still waiting for the incoming stream never ran it, a source that finished handing over never will again.
    if (src.qmpStatus === 'running' && (dst.qmpStatus === 'inmigrate' || dst.qmpStatus === 'prelaunch')) {
      await target.stopVm(environment.name, vm, { powerdownTimeoutMs: 0 });
      await assertStopped(target, environment.name, vm);
      await target.removeVmDir(environment.name, vm);
      return 'source-running';
    }
    if (src.qmpStatus === 'postmigrate' && dst.qmpStatus === 'running') {
      await source.stopVm(environment.name, vm, { powerdownTimeoutMs: 0 });
      await assertStopped(source, environment.name, vm);
      return 'target-running';
    }
    throw new Error(`VM ${vm.name} has a live QEMU on both ${source.host.name} (${src.qmpStatus ?? src.state}) and ${target.host.name} (${dst.qmpStatus ?? dst.state}); refusing to touch it`);
  }
  if (live(dst.state)) return 'target-running';
  if (live(src.state)) return 'source-running';
  if (src.state === 'absent' && dst.state === 'stopped') {
    // Source already cleaned: only possible after a verified copy.
    return 'target-stopped';
  }
  if (src.state === 'absent') throw new Error(`VM ${vm.name} has no files on ${source.host.name} nor a complete copy on ${target.host.name}`);
  return 'source-stopped';
}

async function assertStopped(h: Hypervisor, env: string, vm: VMSpec): Promise<void> {
  const s = await h.vmStatus(env, vm);
  if (s.state !== 'stopped' && s.state !== 'absent') throw new Error(`VM ${vm.name} is still ${s.state} on ${h.host.name}`);
}

/** Back to where we started: VM running on the source, node schedulable. */
async function rollback(ctx: MoveContext, state: { targetStarted: boolean }): Promise<void> {
  const { source, target, vm, environment, guest } = ctx;
  const env = environment.name;
  const run = stepRunner(ctx);
  await run('rollback', async () => {
    const onSource = await source.vmStatus(env, vm);
    const onTarget = await target.vmStatus(env, vm);
    if (onSource.state === 'absent') {
      // The source files are gone only after a complete, verified move: nothing to roll back to.
      throw new Error(`source files of ${vm.name} are gone; leaving the VM on ${target.host.name}`);
    }
    if (onTarget.state === 'running' || onTarget.state === 'paused' || onTarget.state === 'other' || state.targetStarted) {
      await target.stopVm(env, vm, { powerdownTimeoutMs: ctx.settings.powerdownTimeoutMs });
      await assertStopped(target, env, vm);
    }
    if (onSource.state === 'stopped') {
      await assertStopped(target, env, vm);
      await source.startVm(env, vm);
    }
    if (onTarget.state !== 'absent') await target.removeVmDir(env, vm);
    await guest.uncordon(vm.nodeName);
  });
}

function stepRunner(ctx: MoveContext) {
  const { store, migrationUid, environment, vm, observer } = ctx;
  return async function run<T>(step: MoveStep, fn: () => Promise<T>): Promise<T> {
    if (ctx.signal.aborted && step !== 'rollback') throw Object.assign(new Error('migration aborted'), { step });
    await store.journal(migrationUid, environment.name, vm.name, step, 'begin');
    await store.updateMove(migrationUid, environment.name, vm.name, { step });
    observer.progress({ step });
    observer.step(step, 'begin', {});
    const started = Date.now();
    try {
      const result = await fn();
      const durationMs = Date.now() - started;
      await store.journal(migrationUid, environment.name, vm.name, step, 'end', { durationMs });
      observer.step(step, 'end', { durationMs });
      return result;
    } catch (err) {
      const message = (err as Error).message;
      await store.journal(migrationUid, environment.name, vm.name, step, 'fail', { message });
      observer.step(step, 'fail', { durationMs: Date.now() - started, message });
      throw Object.assign(err as Error, { step: (err as { step?: MoveStep }).step ?? step });
    }
  };
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
