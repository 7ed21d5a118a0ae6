/**
 * The pre-copy cutover and a whole live migration as one call each, composed from the same pieces
 * the per-VM flow runs as separate journaled steps (stop → converge → fence → transfer → verify →
 * start; live → fence → start). Used by the strategy integration tests and the downtime benchmark,
 * which measure the pieces without a guest cluster around them.
 */
import type { VMSpec } from '../api/inventory.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { flushDisks, quitQemu, verifyGuestData, type DiskVerification } from '../hosts/qemuIncoming.js';
import { pauseSourceForCutover, resumeIncoming, resumeSource } from '../hosts/qmpRunState.js';
import { liveMigrateUntilHandover, type LiveMigrateOptions, type LiveMigrateResult } from '../transfer/live.js';
import { verifyChangedRanges, type IncrementalVerification } from '../transfer/mirrorVerify.js';
import { type PrecopyCompleteResult, type PrecopyHandle, type PrecopyVerification } from '../transfer/mirror.js';

export interface PrecopyCutoverResult extends PrecopyCompleteResult {
  /** stop issued on the source → QMP status running on the target */
  downtimeMs: number;
  how: 'powerdown' | 'stop';
  phases: { pauseMs: number; convergeMs: number; quitSourceMs: number; filesMs: number; verifyMs: number; startMs: number };
  verification?: PrecopyVerification;
}

/**
 * The cold cutover after startPrecopy's `ready` and `prepared`: pause the source, converge the mirrors, quit the
 * source QEMU (proven gone), relay the other files that changed since they were copied ahead, optionally verify the guest data on both hosts,
 * start on the target. A failure before the source quit aborts the mirror and resumes the source.
 */
export async function precopyCutover(
  handle: PrecopyHandle,
  opts: { source: Hypervisor; target: Hypervisor; environment: string; vm: VMSpec; powerdownTimeoutMs: number; verify?: boolean },
): Promise<PrecopyCutoverResult> {
  const { source, target, environment, vm } = opts;
  await handle.ready;
  await handle.prepared;
  const t0 = Date.now();
  let sourceQuit = false;
  try {
    const how = await pauseSourceForCutover(handle.sourceQmp, { powerdownTimeoutMs: opts.powerdownTimeoutMs });
    const t1 = Date.now();
    const res = await handle.complete();
    const t2 = Date.now();
    sourceQuit = true;
    await quitQemu(source, environment, vm, handle.sourceQmp);
    const t3 = Date.now();
    await handle.copyRemainingFiles();
    const t4 = Date.now();
    const verification = opts.verify ? await handle.verify() : undefined;
    const t5 = Date.now();
    await target.startVm(environment, vm);
    const t6 = Date.now();
    return { ...res, downtimeMs: t6 - t0, how, phases: { pauseMs: t1 - t0, convergeMs: t2 - t1, quitSourceMs: t3 - t2, filesMs: t4 - t3, verifyMs: t5 - t4, startMs: t6 - t5 }, verification };
  } catch (err) {
    if (!sourceQuit) {
      await handle.abort().catch(() => undefined);
      // the guest was only halted (QEMU kept alive): give it back
      await resumeSource(handle.sourceQmp).catch(() => undefined);
    }
    throw err;
  }
}

/**
 * Live migration through to the handover: fence the postmigrate source (quit, proven gone), with
 * `verify` compare the guest data as the operator's verify step does (only what changed since the
 * pre-pass when there is one; throws GuestDataMismatchError and leaves both QEMUs stopped/paused),
 * then resume the target.
 */
export async function liveMigrate(opts: LiveMigrateOptions & { verify?: boolean }): Promise<LiveMigrateResult & {
  verification?: IncrementalVerification | { full: DiskVerification[]; why: string };
  /** the rest of the downtime, ms: fencing the source (quit, proven gone), the verification, the target's cont */
  afterHandover: { quitMs: number; verifyMs: number; resumeMs: number };
  /** how the guest's writes since the pre-pass were learned (verify with a pre-pass only) */
  bitmapRead?: 'count' | 'export';
}> {
  const { source, target, environment, vm } = opts;
  const h = await liveMigrateUntilHandover({ ...opts, prepass: opts.verify === true });
  const t0 = Date.now();
  try {
    await quitQemu(source, environment, vm, h.sourceQmp);
  } catch (err) {
    return h.abort(err as Error);
  }
  const t1 = Date.now();
  let verification: IncrementalVerification | { full: DiskVerification[]; why: string } | undefined;
  if (opts.verify) {
    try {
      await flushDisks(h.targetQmp, target.vmDir(environment, vm), vm);
      verification = h.changed
        ? await verifyChangedRanges({ source, target, srcDir: source.vmDir(environment, vm), dstDir: target.vmDir(environment, vm), changed: h.changed })
        : { full: await verifyGuestData(source, target, environment, vm), why: h.changedWhy };
    } catch (err) {
      // the target stays paused, never run; its QMP connection and the tunnels go, so the caller can stop it
      h.targetQmp.close();
      await h.cleanup();
      throw err;
    }
  }
  const t2 = Date.now();
  const runningAt = await resumeIncoming(h.targetQmp, { nbdServerStopped: true }).finally(() => h.targetQmp.close());
  await h.cleanup();
  return { ...h.result, measuredDowntimeMs: runningAt - h.stoppedAt, verification, afterHandover: { quitMs: t1 - t0, verifyMs: t2 - t1, resumeMs: runningAt - t2 }, ...(h.changed ? { bitmapRead: h.changed.bitmapRead } : {}) };
}
