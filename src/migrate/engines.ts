/**
 * Wires the byte movers of src/transfer and the QEMU lifecycle of src/hosts into the MoveEngines
 * the per-VM flow drives: which function moves the bytes is decided here, when is decided by the
 * step list.
 */
import type { HostSpec, VMSpec } from '../api/inventory.js';
import type { LiveFallback, MigrationSettings } from '../api/types.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { flushDisks, openQmpAt, quitQemu, verifyGuestData } from '../hosts/qemuIncoming.js';
import { pauseSourceForCutover, resumeIncoming, resumeSource } from '../hosts/qmpRunState.js';
import type { HostConnection } from '../hosts/ssh.js';
import { LiveMigrationAbortedError, liveMigrateUntilHandover } from '../transfer/live.js';
import { copyNonDiskFiles, startPrecopy } from '../transfer/mirror.js';
import { verifyChangedRanges } from '../transfer/mirrorVerify.js';
import { relayVmFiles } from '../transfer/relay.js';
import { RateMeter, type TokenBucket } from '../transfer/throttle.js';
import type { Logger } from '../util/log.js';
import { mib } from '../util/units.js';
import { LiveFellBack, type MoveEngines } from './vmMove.js';

export interface EngineOptions {
  source: Hypervisor;
  target: Hypervisor;
  environment: string;
  vm: VMSpec;
  settings: MigrationSettings;
  log: Logger;
  /** a fresh SSH connection for a relay retry after a dropped connection */
  reconnect?: (host: HostSpec) => Promise<HostConnection>;
  /** the per-host budgets this move's relay copies share with the migration's other moves */
  sharedBandwidth?: readonly TokenBucket[];
  /** this move's share of the per-host budget for streams no operator-side bucket sees (QEMU's, Direct copies; qemuStreamShare), bytes/s */
  qemuStreamBytesPerSec?: number;
}

const finiteOrUndefined = (n: number): number | undefined => (Number.isFinite(n) ? n : undefined);

function changedRangesVerified(ranges: number, bytes: number, prepassMs: number): string {
  return `guest data verified: ${ranges} changed range(s), ${mib(bytes)} compared at the cut-over; the rest compared while the guest ran (${(prepassMs / 1000).toFixed(1)} s)`;
}

/**
 * A failed live migration continues with the fallback strategy from the source only when its abort
 * proved the target gone (LiveMigrationAbortedError.targetGone); otherwise the move fails, and its
 * rollback deals with what is left on the target first (failing closed while it cannot).
 */
export function liveFallback(err: unknown, fallback: LiveFallback): boolean {
  return err instanceof LiveMigrationAbortedError && err.targetGone && fallback !== 'None';
}

export function hypervisorEngines(o: EngineOptions): MoveEngines {
  const { source, target, environment, vm, settings, log } = o;
  const hosts = { source, target, environment, vm };
  // QEMU limits each mirror job: the move's share is split across its disks
  const perDisk = o.qemuStreamBytesPerSec ? Math.max(1, Math.floor(o.qemuStreamBytesPerSec / Math.max(1, vm.files.filter((f) => f.kind === 'disk').length))) : undefined;
  const liveBandwidth = o.qemuStreamBytesPerSec ? Math.min(settings.live.maxBandwidthBytesPerSec ?? Infinity, o.qemuStreamBytesPerSec) : settings.live.maxBandwidthBytesPerSec;
  return {
    async copyAll({ signal, onProgress }) {
      const done = new Map<string, number>();
      const totals = new Map<string, number>();
      const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
      const meter = new RateMeter();
      const results = await relayVmFiles({
        ...hosts, stallTimeoutMs: settings.stallTimeoutMs, signal, compression: settings.compression,
        bandwidthLimit: settings.bandwidthLimitBytesPerSec, sharedBandwidth: o.sharedBandwidth, reconnect: o.reconnect,
        // a direct stream passes no operator-side bucket: it gets the limit and this move's fixed share of the per-host budget
        ...(settings.transferMode === 'direct' ? { direct: { bytesPerSec: finiteOrUndefined(Math.min(settings.bandwidthLimitBytesPerSec ?? Infinity, o.qemuStreamBytesPerSec ?? Infinity)) } } : {}),
        onProgress: (file, d, t) => {
          done.set(file, d);
          totals.set(file, t);
          const bytesTransferred = sum(done);
          const bytesTotal = sum(totals);
          meter.update(bytesTransferred);
          const eta = meter.etaSeconds(bytesTotal);
          onProgress({ bytesTransferred, bytesTotal, bytesPerSecond: Math.round(meter.bytesPerSecond), etaSeconds: eta === undefined ? undefined : Math.ceil(eta) });
        },
      });
      return results.reduce((n, r) => n + r.bytes, 0);
    },
    copyNonDisk: (signal) => copyNonDiskFiles({ ...hosts, signal }),
    async startMirror({ signal, onProgress }) {
      const handle = await startPrecopy({
        ...hosts, signal, log, readyTimeoutMs: settings.mirrorReadyTimeoutMs, speedBytesPerSec: perDisk,
        onProgress: (p) => onProgress({ bytesTransferred: p.offset, bytesTotal: p.len }),
      });
      // the pre-pass and the non-disk files run while the guest still runs: the cut-over waits for them, not the guest
      const ready = handle.ready.then(() => handle.prepared);
      // a mirror dropped before READY (rollback, window closed, turn withdrawn) rejects it with nobody
      // waiting: unhandled, that rejection would end the operator process
      ready.catch(() => undefined);
      return {
        ready,
        copyFiles: (signal) => handle.copyRemainingFiles(signal),
        async verify() {
          const v = await handle.verify();
          return v.how === 'incremental' ? changedRangesVerified(v.ranges ?? 0, v.bytes ?? 0, v.prepassMs ?? 0) : `guest data verified in full (${v.why ?? 'no pre-pass'})`;
        },
        haltSource: (powerdownTimeoutMs) => pauseSourceForCutover(handle.sourceQmp, { powerdownTimeoutMs }),
        converge: async () => (await handle.complete()).bytes,
        quitSource: () => quitQemu(source, environment, vm, handle.sourceQmp),
        detach: () => handle.detach(),
        async abortAndResume() {
          await handle.abort().catch((e: Error) => log.warn({ err: e.message }, 'aborting the mirror failed'));
          // the handle closes its QMP client when it ends; a halted guest is resumed through a fresh one
          const qmp = handle.sourceQmp.isClosed ? await openQmpAt(source, source.vmDir(environment, vm)) : handle.sourceQmp;
          try {
            await resumeSource(qmp);
          } finally {
            qmp.close();
          }
        },
      };
    },
    async live({ signal, onProgress }) {
      const h = await liveMigrateUntilHandover({
        ...hosts, signal, log, mirrorReadyTimeoutMs: settings.mirrorReadyTimeoutMs,
        downtimeLimitMs: settings.live.downtimeLimitMs, maxBandwidthBytesPerSec: liveBandwidth, mirrorSpeedBytesPerSec: perDisk,
        convergenceTimeoutMs: settings.live.convergenceTimeoutMs, autoConverge: settings.live.autoConverge,
        onProgress: (p) => onProgress(p.phase, p.tunnelBytes, p.ram && {
          remainingBytes: p.ram.remaining, transferredBytes: p.ram.transferred, totalBytes: p.ram.total,
          ...(p.expectedDowntimeMs !== undefined ? { expectedDowntimeMs: p.expectedDowntimeMs } : {}),
          ...(p.ram.dirtyPagesRate !== undefined ? { dirtyPagesPerSecond: p.ram.dirtyPagesRate } : {}),
          ...(p.cpuThrottlePercent !== undefined ? { cpuThrottlePercent: p.cpuThrottlePercent } : {}),
        }),
      }).catch((err: unknown) => {
        if (liveFallback(err, settings.live.fallback)) throw new LiveFellBack((err as Error).message);
        throw err;
      });
      return {
        bytes: h.result.bytes.total,
        stoppedAt: h.stoppedAt,
        sourceRunState: async () => (await h.sourceQmp.execute<{ status: string }>('query-status')).status,
        quitSource: () => quitQemu(source, environment, vm, h.sourceQmp),
        async verify() {
          // the session's client is the target's only QMP client (QEMU serves one at a time)
          await flushDisks(h.targetQmp, target.vmDir(environment, vm), vm);
          if (!h.changed) {
            await verifyGuestData(source, target, environment, vm);
            return `guest data verified in full (${h.changedWhy})`;
          }
          const r = await verifyChangedRanges({ source, target, srcDir: source.vmDir(environment, vm), dstDir: target.vmDir(environment, vm), changed: h.changed });
          return changedRangesVerified(r.ranges, r.bytes, h.changed.prepassMs);
        },
        async resumeTarget() {
          try {
            return await resumeIncoming(h.targetQmp, { nbdServerStopped: true });
          } finally {
            h.targetQmp.close();
            // the tunnels' teardown waits until the guest runs again, not inside its downtime
            await h.cleanup().catch((e: Error) => log.warn({ err: e.message }, 'closing the live migration tunnels failed'));
          }
        },
        abort: (reason) => h.abort(reason).catch(() => undefined),
        async release() {
          h.targetQmp.close();
          await h.cleanup().catch((e: Error) => log.warn({ err: e.message }, 'closing the live migration tunnels failed'));
        },
        async detach() {
          h.targetQmp.close();
          h.sourceQmp.close();
          await h.cleanup().catch((e: Error) => log.warn({ err: e.message }, 'closing the live migration tunnels failed'));
        },
      };
    },
    verify: async () => {
      // a resumed live handover verifies against a paused target QEMU: make its caches visible first
      if ((await target.vmStatus(environment, vm)).state === 'paused') {
        const qmp = await openQmpAt(target, target.vmDir(environment, vm));
        try {
          await flushDisks(qmp, target.vmDir(environment, vm), vm);
        } finally {
          qmp.close();
        }
      }
      await verifyGuestData(source, target, environment, vm);
    },
    async resumeTarget() {
      const qmp = await openQmpAt(target, target.vmDir(environment, vm));
      try {
        return await resumeIncoming(qmp);
      } finally {
        qmp.close();
      }
    },
  };
}
