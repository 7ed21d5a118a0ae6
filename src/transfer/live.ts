/**
 * Live migration of a running VM to another host, disks included, through the operator (no trust
 * between hosts):
 *
 *   target: qemu-img create (source virtual sizes); QEMU with the VM's argv + `-incoming defer -S`
 *           (status inmigrate); nbd-server-start on <dir>/nbd.sock; nbd-server-add writable per disk
 *   source: drive-mirror sync=full mode=existing copy-mode=write-blocking to the tunnelled NBD → READY
 *   both:   migrate-set-parameters (downtime-limit, max-bandwidth); target migrate-incoming unix:<dir>/migrate.sock;
 *           source migrate unix:<tunnel>; query-migrate until completed (woken by QEMU's MIGRATION events);
 *           with a pre-pass, QEMU pauses in pre-switchover (guest stopped, block nodes still active):
 *           the dirty bitmap is read there, then migrate-continue
 *   then:   source is postmigrate (the guest's last state is on the target); source mirrors are soft-
 *           cancelled (nothing is dirty: write-blocking mirrored every write synchronously), target
 *           nbd-server-stop. liveMigrate returns here, with the target paused: quitting the source
 *           (fence) and resuming the target (start) are VM lifecycle, done by the caller through
 *           src/hosts (the per-VM flow's `fence` and `start` steps).
 *
 * Safety: the guest never runs on two hosts. The target is never resumed here; every failure before
 * the return (mirror, convergence timeout, target crash) cancels the migration and the mirrors, quits
 * the incoming target QEMU (proven gone) and removes the target's files, and leaves the source
 * running. After the return, `abort()` does the same for a caller that cannot finish the handover.
 */
import type { VMSpec } from '../api/inventory.js';
import { TIMEOUTS } from '../api/types.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { createDisks, openQmpAt, queryDisks, quitQemu, startIncomingQemu, type IncomingQemu, type QemuDisk } from '../hosts/qemuIncoming.js';
import type { QmpClient } from '../hosts/qmp.js';
import { log as rootLog, type Logger } from '../util/log.js';
import { sleep } from '../util/sleep.js';
import { openTunnel, tunnelSocketPath, type Tunnel } from './tunnel.js';
import { copyNonDiskFiles, MirrorJobs, type MirrorProgress } from './mirror.js';
import { changedSincePrepass, prepassVerify, type ChangedRanges, type Prepass } from './mirrorVerify.js';

/** QEMU's default max-bandwidth (MAX_THROTTLE, 128 MiB/s) */
export const QEMU_DEFAULT_MAX_BANDWIDTH = 128 * 1024 * 1024;

/** The run was handed over (leadership lost, shutdown): its abort reason says it is resumable. */
export function handedOver(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true && (signal.reason as { resumable?: unknown } | undefined)?.resumable === true;
}

export class LiveMigrationAbortedError extends Error {
  /**
   * The abort proved the target's QEMU gone and its files removed. Only then may the move go on from
   * the source (a fallback strategy): a partial incoming QEMU left behind must be dealt with by a
   * rollback that looks at the target first (fails closed while it cannot).
   */
  readonly targetGone: boolean;
  constructor(
    message: string,
    /** where it stopped: the source still runs the VM (unless the message names cleanup problems) */
    readonly phase: 'prepare' | 'mirror' | 'migrate' | 'handover',
    opts: { targetGone: boolean } = { targetGone: true },
  ) {
    super(message);
    this.name = 'LiveMigrationAbortedError';
    this.targetGone = opts.targetGone;
  }
}

export interface LiveProgress {
  phase: 'mirror' | 'migrate' | 'handover';
  mirror?: MirrorProgress;
  /** query-migrate's ram section: transferred / remaining / total bytes, dirty pages rate */
  ram?: { transferred: number; remaining: number; total: number; dirtyPagesRate?: number };
  /** QEMU's expected downtime (ms) at the current dirty rate and bandwidth */
  expectedDowntimeMs?: number;
  /** auto-converge's vCPU throttle (percent), once QEMU throttles */
  cpuThrottlePercent?: number;
  tunnelBytes: number;
}

export interface LiveMigrateOptions {
  source: Hypervisor;
  target: Hypervisor;
  environment: string;
  vm: VMSpec;
  /** QEMU's downtime-limit (ms): the RAM left for the final stop-and-copy must fit in it (default 300) */
  downtimeLimitMs?: number;
  /** QEMU's max-bandwidth for the RAM migration, bytes/s (default: QEMU's default, 128 MiB/s; set on every attempt) */
  maxBandwidthBytesPerSec?: number;
  /** disk mirror speed limit per disk, bytes/s (default: unlimited) */
  mirrorSpeedBytesPerSec?: number;
  /** disk mirror: give up if not READY in time (default TIMEOUTS.mirrorReadyMs) */
  mirrorReadyTimeoutMs?: number;
  /** RAM migration: give up (migrate_cancel, clean abort) if not completed in time (default 10 min) */
  convergenceTimeoutMs?: number;
  /** QEMU's auto-converge capability: throttle the guest's vCPUs while it dirties RAM faster than it is sent (default false) */
  autoConverge?: boolean;
  /**
   * QEMU's multifd: the RAM pages go over this many extra connections (each one an SSH channel of
   * the tunnel), sent and received by that many QEMU threads. 0 or unset: one stream (the default;
   * the benchmark measures both).
   */
  multifdChannels?: number;
  /** test seam: runs after the mirror is READY, right before the pre-pass, with the target's NBD socket and each disk's export name there */
  beforePrepass?: (target: { socket: string; exports: string[] }) => Promise<void>;
  onProgress?: (p: LiveProgress) => void;
  signal?: AbortSignal;
  pollMs?: number;
  /** QMP client of the source QEMU to use (QEMU serves one client at a time); owned by the result from then on */
  sourceQmp?: QmpClient;
  /** the move's logger (carries migration, environment and VM) */
  log?: Logger;
  /**
   * Hash both copies while the guest runs and read the dirty bitmap at the handover, so a later
   * verification compares only what changed (default true; the bitmap read costs ~0.1 s of downtime).
   */
  prepass?: boolean;
}

export interface LiveMigrateResult {
  /** QEMU's own figure from query-migrate (source stop → last byte sent) */
  qemuDowntimeMs: number;
  /** our figure: STOP event seen from the source → target's cont answered (status running); set by whoever resumes the target */
  measuredDowntimeMs: number;
  totalMs: number;
  /** mirror (NBD) and migration stream bytes through the operator, both directions */
  bytes: { disks: number; migration: number; total: number };
  /** query-migrate ram.transferred on the source */
  ramTransferred: number;
  /** prepassMs: both copies hashed while the guest runs (0 without a pre-pass); migrateMs: the RAM migration alone */
  phases: { prepareMs: number; mirrorMs: number; prepassMs: number; migrateMs: number; handoverMs: number };
  /**
   * Where the guest's downtime went up to the handover, ms: QEMU's STOP → the operator saw the
   * migration completed (detectMs, QEMU's stop-and-copy included, bitmapMs not), of which bitmapMs
   * reading the dirty bitmap at the pre-switchover pause; from there, side by side, → the target
   * paused with the whole state and → the mirrors' soft cancel confirmed; the later of both → the
   * target's NBD server stopped.
   */
  handoverSplit: { detectMs: number; bitmapMs: number; targetPausedMs: number; mirrorCancelMs: number; nbdStopMs: number };
}

/**
 * The migrated guest, waiting for its handover: the source QEMU is postmigrate (it will not run the
 * guest again unless told to), the target QEMU paused with the whole state. The caller fences the
 * source (quit, proven gone) and resumes the target through src/hosts, or calls abort().
 */
export interface LiveHandover {
  result: LiveMigrateResult;
  /** wall-clock time QEMU stopped the guest on the source (its STOP event) */
  stoppedAt: number;
  sourceQmp: QmpClient;
  targetQmp: QmpClient;
  /**
   * What the guest wrote since both copies were hashed while it ran (src/transfer/mirrorVerify.ts):
   * the verify step compares only these ranges. Undefined: compare in full (`changedWhy` says why).
   */
  changed?: ChangedRanges;
  changedWhy: string;
  /** Before the target ran: quit the target QEMU (proven gone), remove its files, resume the source. */
  abort(reason: Error): Promise<never>;
  /** After the target runs: closes the migration's tunnels and removes their sockets (idempotent). */
  cleanup(): Promise<void>;
}

interface MigrateInfo {
  status?: string;
  downtime?: number;
  'total-time'?: number;
  'error-desc'?: string;
  'expected-downtime'?: number;
  ram?: { transferred: number; remaining: number; total: number; 'dirty-pages-rate'?: number };
  'cpu-throttle-percentage'?: number;
}

async function status(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>('query-status')).status;
}

export async function liveMigrateUntilHandover(opts: LiveMigrateOptions): Promise<LiveHandover> {
  const { source, target, environment, vm } = opts;
  const pollMs = opts.pollMs ?? 100;
  const srcDir = source.vmDir(environment, vm);
  const dstDir = target.vmDir(environment, vm);
  const logger = (opts.log ?? rootLog).child({ component: 'live', from: source.host.name, to: target.host.name });
  const t0 = Date.now();

  const src = opts.sourceQmp ?? (await openQmpAt(source, srcDir));
  let incoming: IncomingQemu | undefined;
  let createdDir = false;
  let disks: QemuDisk[] = [];
  const tunnels: Tunnel[] = [];
  let jobs: MirrorJobs | undefined;
  let migrateStarted = false;
  let phase: LiveMigrationAbortedError['phase'] = 'prepare';
  const tunnelBytes = (): number => tunnels.reduce((n, t) => n + t.stats.bytesAtoB + t.stats.bytesBtoA, 0);

  /** Every failure before the handover ends here: source running, target gone. */
  const abort = async (reason: Error): Promise<never> => {
    if (handedOver(opts.signal)) {
      // Leadership lost (or a shutdown): the next leader resumes from what it finds, and must find it
      // as it is — no migrate_cancel, no quit, no cont from a replica that may no longer act. Let go of
      // QEMU's monitors (one client each) and the tunnels; a migration cut off that way fails on its
      // own (the source runs on, the incoming QEMU exits).
      logger.warn({ phase }, 'handed over mid live migration: letting go of both QEMUs, undoing nothing');
      jobs?.dispose();
      for (const t of tunnels) await t.close().catch(() => undefined);
      incoming?.qmp.close();
      src.close();
      throw opts.signal?.reason instanceof Error ? opts.signal.reason : reason;
    }
    logger.warn({ phase, err: reason.message }, 'live migration failed; aborting');
    const problems: string[] = [];
    if (migrateStarted) {
      await src.execute('migrate_cancel').catch((e: Error) => problems.push(`migrate_cancel: ${e.message}`));
      const deadline = Date.now() + 30_000;
      while (Date.now() < deadline) {
        const m = await src.execute<MigrateInfo>('query-migrate').catch(() => ({}) as MigrateInfo);
        if (m.status !== 'active' && m.status !== 'cancelling' && m.status !== 'device' && m.status !== 'pre-switchover' && m.status !== 'setup') break;
        await sleep(50);
      }
    }
    if (jobs) {
      await jobs.cancel({ force: true, timeoutMs: 30_000 }).catch((e: Error) => problems.push(`mirror cancel: ${e.message}`));
      jobs.dispose();
    }
    for (const t of tunnels) await t.close();
    // Target first: once it is proven gone, the source may safely run again.
    try {
      await quitQemu(target, environment, vm, incoming?.qmp);
      if (createdDir) await target.removeVmDir(environment, vm, { staleCopy: true });
      else for (const d of disks) await target.removeFile(`${dstDir}/${d.file}`);
    } catch (e) {
      problems.push(`target cleanup: ${(e as Error).message}`);
    }
    try {
      const s = await status(src);
      if (s === 'postmigrate' || s === 'paused' || s === 'finish-migrate') {
        if (problems.some((p) => p.startsWith('target cleanup'))) {
          problems.push(`source left ${s}: the target QEMU could not be proven gone`);
        } else {
          await src.execute('cont');
        }
      }
    } catch (e) {
      problems.push(`source resume: ${(e as Error).message}`);
    }
    src.close();
    const extra = problems.length ? ` (cleanup problems: ${problems.join('; ')})` : '';
    throw new LiveMigrationAbortedError(`live migration of ${vm.name} aborted in ${phase}: ${reason.message}${extra}`, phase, { targetGone: !problems.some((p) => p.startsWith('target cleanup')) });
  };

  let tPrepared = 0;
  let tMirrored = 0;
  let tPrepassed = 0;
  let tMigrated = 0;
  let tTargetPaused = 0;
  let tCancelled = 0;
  let switchoverSeen = false;
  let bitmapMs = 0;
  let stopSeenAt: number | undefined;
  const onStop = (): void => {
    stopSeenAt ??= Date.now();
  };
  src.on('STOP', onStop);
  let mig: MigrateInfo = {};
  let prepass: Prepass | undefined;
  let changed: ChangedRanges | undefined;
  let changedWhy = '';

  try {
    // ── prepare ──
    if ((await status(src)) !== 'running') throw new Error('source VM is not running');
    disks = await queryDisks(src, srcDir, vm);
    const tst = await target.vmStatus(environment, vm);
    if (tst.state === 'absent') createdDir = true;
    else if (tst.state !== 'stopped') throw new Error(`a QEMU for ${vm.name} is ${tst.state} on ${target.host.name}`);
    else {
      // files of an earlier, aborted attempt would be overwritten; anything else there is not ours to replace
      for (const d of disks) {
        if (await target.exists(`${dstDir}/${d.file}`)) throw new Error(`${dstDir}/${d.file} already exists on ${target.host.name}`);
      }
    }
    await target.ensureCopyTarget(dstDir);
    await createDisks(target, dstDir, disks);
    // non-disk files are not opened by QEMU (see Hypervisor.startVm): copy them now
    await copyNonDiskFiles({ source, target, environment, vm, signal: opts.signal });
    incoming = await startIncomingQemu(target, environment, vm, { paused: true });
    const dst = incoming.qmp;
    const targetDisks = await queryDisks(dst, dstDir, vm);
    const nbdSock = `${dstDir}/nbd.sock`;
    await dst.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
    for (const d of targetDisks) await dst.execute('nbd-server-add', { device: d.device, name: d.device, writable: true });
    const nbdTunnel = await openTunnel({ a: source.conn, b: target.conn, socketPathOnA: tunnelSocketPath(srcDir, 'nbd'), destination: { unixPath: nbdSock } });
    tunnels.push(nbdTunnel);
    tPrepared = Date.now();

    // ── mirror ──
    phase = 'mirror';
    jobs = await MirrorJobs.start(
      src,
      disks.map((d, i) => ({ disk: d, uri: `nbd+unix:///${targetDisks[i]?.device ?? d.device}?socket=${nbdTunnel.socketPathOnA}` })),
      { prefix: 'live', copyMode: 'write-blocking', speedBytesPerSec: opts.mirrorSpeedBytesPerSec },
    );
    await jobs.waitReady({
      timeoutMs: opts.mirrorReadyTimeoutMs ?? TIMEOUTS.mirrorReadyMs,
      signal: opts.signal,
      onProgress: (p) => opts.onProgress?.({ phase: 'mirror', mirror: p, tunnelBytes: tunnelBytes() }),
    });
    tMirrored = Date.now();
    // both copies hashed while the guest runs: the verify inside the downtime then only compares what changed since
    if (opts.prepass === false) changedWhy = 'no pre-pass was asked for';
    else if (disks.every((d) => d.nodeName)) {
      await opts.beforePrepass?.({ socket: nbdSock, exports: disks.map((d, i) => targetDisks[i]?.device ?? d.device) });
      prepass = await prepassVerify({
        qmp: src, source, target, srcDir, dstDir,
        disks: disks.map((d, i) => ({ ...d, nodeName: d.nodeName ?? '', targetSocket: nbdSock, targetExport: targetDisks[i]?.device ?? d.device })),
      }).catch((e: Error) => {
        changedWhy = `the pre-pass failed: ${e.message}`;
        logger.warn({ err: e.message }, 'pre-pass failed; the handover will compare the disks in full');
        return undefined;
      });
    } else changedWhy = 'QEMU reported no node name for a disk';
    tPrepassed = Date.now();
    opts.signal?.throwIfAborted();

    // ── migrate ──
    phase = 'migrate';
    // always both: parameters persist in the source QEMU across attempts (an aborted slow attempt would throttle the next)
    const multifd = opts.multifdChannels ?? 0;
    if (!Number.isInteger(multifd) || multifd < 0 || multifd > 16) throw new Error(`multifd channels must be an integer from 0 to 16, not ${multifd}`);
    await src.execute('migrate-set-parameters', {
      'downtime-limit': opts.downtimeLimitMs ?? 300,
      'max-bandwidth': opts.maxBandwidthBytesPerSec ?? QEMU_DEFAULT_MAX_BANDWIDTH,
      ...(multifd > 0 ? { 'multifd-channels': multifd } : {}),
    });
    // events: QEMU announces each migration state (MIGRATION), so the end of the stop-and-copy wakes the poll below
    await src.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'auto-converge', state: opts.autoConverge === true },
        { capability: 'events', state: true },
        { capability: 'multifd', state: multifd > 0 },
        // with a pre-pass: QEMU waits in pre-switchover (guest stopped, block nodes still active) until migrate-continue
        { capability: 'pause-before-switchover', state: prepass !== undefined },
      ],
    });
    // both ends must agree on multifd and its channel count
    await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'multifd', state: multifd > 0 }] });
    if (multifd > 0) await dst.execute('migrate-set-parameters', { 'multifd-channels': multifd });
    const migSock = `${dstDir}/migrate.sock`;
    await dst.execute('migrate-incoming', { uri: `unix:${migSock}` });
    const migTunnel = await openTunnel({ a: source.conn, b: target.conn, socketPathOnA: tunnelSocketPath(srcDir, 'mig'), destination: { unixPath: migSock } });
    tunnels.push(migTunnel);
    opts.signal?.throwIfAborted();
    migrateStarted = true;
    await src.execute('migrate', { uri: `unix:${migTunnel.socketPathOnA}` });
    const deadline = Date.now() + (opts.convergenceTimeoutMs ?? 600_000);
    while (true) {
      mig = await src.execute<MigrateInfo>('query-migrate');
      opts.onProgress?.({
        phase: 'migrate',
        mirror: jobs.progress,
        ram: mig.ram ? { transferred: mig.ram.transferred, remaining: mig.ram.remaining, total: mig.ram.total, dirtyPagesRate: mig.ram['dirty-pages-rate'] } : undefined,
        expectedDowntimeMs: mig['expected-downtime'],
        ...(mig['cpu-throttle-percentage'] !== undefined ? { cpuThrottlePercent: mig['cpu-throttle-percentage'] } : {}),
        tunnelBytes: tunnelBytes(),
      });
      if (mig.status === 'completed') break;
      if (mig.status === 'pre-switchover' && prepass && !switchoverSeen) {
        // The guest is stopped, nothing more will be written, and the source's block nodes are still
        // active: read what the guest wrote since the pre-pass now. After completion the nodes are
        // inactive, and exporting one cost up to 0.45 s at 32 GiB (QEMU re-activating the image, we believe).
        switchoverSeen = true;
        const t = Date.now();
        changed = await changedSincePrepass({ qmp: src, source, srcDir, prepass }).catch((e: Error) => {
          changedWhy = `reading the dirty bitmap failed: ${e.message}`;
          return undefined;
        });
        if (!changed && !changedWhy) changedWhy = 'the guest changed more than half of the pre-passed data since the pre-pass';
        bitmapMs = Date.now() - t;
        await src.execute('migrate-continue', { state: 'pre-switchover' });
        continue;
      }
      if (mig.status === 'failed' || mig.status === 'cancelled') throw new Error(`migration ${mig.status}: ${mig['error-desc'] ?? 'no reason given'}`);
      if (incoming.qmp.isClosed) throw new Error('target QEMU went away during migration');
      if (Date.now() > deadline) throw new Error(`migration did not converge within ${opts.convergenceTimeoutMs ?? 600_000} ms (status ${mig.status ?? '?'}, ram remaining ${mig.ram?.remaining ?? '?'} bytes)`);
      opts.signal?.throwIfAborted();
      // once the guest stopped every millisecond counts: QEMU's MIGRATION event ends the nap early
      await src.nap(stopSeenAt === undefined ? pollMs : 10, ['MIGRATION', 'STOP']);
    }
    tMigrated = Date.now();
  } catch (err) {
    src.removeListener('STOP', onStop);
    return abort(err as Error);
  }

  // ── handover ── the guest state now lives in the (paused) target; the source is postmigrate.
  phase = 'handover';
  const dst = incoming.qmp;
  try {
    // the guest is down from here on: independent questions to the two QEMUs go out together
    const mirrors = jobs;
    // The two QEMUs are independent here: the source's checks and the mirrors' end run while the
    // target still loads the state.
    const sourceSide = async (): Promise<void> => {
      // QEMU fills in its downtime figure just after it announced completion: ask again when it was not there yet
      const [s0, final] = await Promise.all([status(src), mig.downtime ? undefined : src.execute<MigrateInfo>('query-migrate')]);
      if (final?.downtime) mig = final;
      let s = s0;
      // QEMU announces the completion a moment before the source's run state leaves finish-migrate
      // (seen in the e2e once the MIGRATION event woke the poll): both are stopped, wait for the second
      const settleUntil = Date.now() + 5000;
      while (s === 'finish-migrate' && Date.now() < settleUntil) {
        await sleep(5);
        s = await status(src);
      }
      if (s !== 'postmigrate') throw new Error(`source is ${s} after migration, expected postmigrate`);
      // write-blocking mirrors hold nothing dirty; the soft cancel still drains and confirms the sync
      await mirrors.cancel({ force: false, timeoutMs: 60_000 });
      mirrors.dispose();
      jobs = undefined;
      tCancelled = Date.now();
    };
    const targetSide = async (): Promise<void> => {
      // the target must have the whole state before it may run
      const waitUntil = Date.now() + 30_000;
      let ts = await status(dst);
      while (ts === 'inmigrate' && Date.now() < waitUntil) {
        await dst.nap(20, ['MIGRATION']);
        ts = await status(dst);
      }
      if (ts !== 'paused') throw new Error(`target is ${ts} after migration, expected paused`);
      tTargetPaused = Date.now();
    };
    // both settle before a failure is handled: abort() must not race a half-done side
    const failed = (await Promise.allSettled([sourceSide(), targetSide()])).find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    // the bitmap was read at the pre-switchover pause
    if (prepass && !switchoverSeen) throw new Error('the migration completed without its pre-switchover pause');
    await dst.execute('nbd-server-stop');
  } catch (err) {
    // The target never ran: kill it (proven gone) and resume the source.
    src.removeListener('STOP', onStop);
    return abort(err as Error);
  }
  src.removeListener('STOP', onStop);
  const tHandover = Date.now();
  // both streams are done: their counts are final
  const bytesDisks = tunnels[0] ? tunnels[0].stats.bytesAtoB + tunnels[0].stats.bytesBtoA : 0;
  const bytesMig = tunnels[1] ? tunnels[1].stats.bytesAtoB + tunnels[1].stats.bytesBtoA : 0;
  // Closing the tunnels and removing their sockets is six SSH round trips the paused guest need not
  // wait for: the caller runs it once the target runs (abort closes the tunnels too).
  let cleaned: Promise<void> | undefined;
  const cleanup = (): Promise<void> =>
    (cleaned ??= (async () => {
      for (const t of tunnels) await t.close();
      await target.removeFile(`${dstDir}/nbd.sock`).catch(() => undefined);
      await target.removeFile(`${dstDir}/migrate.sock`).catch(() => undefined);
    })());
  const result: LiveMigrateResult = {
    qemuDowntimeMs: mig.downtime ?? -1,
    measuredDowntimeMs: -1,
    totalMs: Date.now() - t0,
    bytes: { disks: bytesDisks, migration: bytesMig, total: bytesDisks + bytesMig },
    ramTransferred: mig.ram?.transferred ?? 0,
    phases: { prepareMs: tPrepared - t0, mirrorMs: tMirrored - tPrepared, prepassMs: tPrepassed - tMirrored, migrateMs: tMigrated - tPrepassed, handoverMs: tHandover - tMigrated },
    handoverSplit: {
      detectMs: tMigrated - (stopSeenAt ?? tMigrated) - bitmapMs, bitmapMs,
      targetPausedMs: tTargetPaused - tMigrated, mirrorCancelMs: tCancelled - tMigrated, nbdStopMs: tHandover - Math.max(tCancelled, tTargetPaused),
    },
  };
  logger.info({ qemuDowntimeMs: result.qemuDowntimeMs, bytes: result.bytes.total, phases: result.phases, handoverSplit: result.handoverSplit }, 'live migration done; target paused, waiting for the handover');
  return { result, stoppedAt: stopSeenAt ?? tMigrated, sourceQmp: src, targetQmp: dst, changed, changedWhy: changedWhy || 'no pre-pass', abort, cleanup };
}
