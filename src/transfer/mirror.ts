/**
 * Pre-copy: the disks of a RUNNING VM are mirrored to the target host while the guest keeps working,
 * so a later cold cutover only has to stop the VM, let the mirror converge and start it on the target
 * — downtime no longer depends on disk size.
 *
 *   target: qemu-img create <disk>.partial (source's virtual size)
 *           qemu-nbd --fork --persistent --socket <dir>/<disk>.nbd.sock <disk>.partial   (one per disk)
 *   tunnel: unix socket in the source VM dir ──operator──▶ that NBD socket (src/transfer/tunnel.ts)
 *   source: drive-mirror sync=full mode=existing target=nbd+unix:///<export>?socket=<tunnel> → BLOCK_JOB_READY
 *   cutover: pause the guest (ACPI power-down with shutdown action "pause", or QMP stop), soft-cancel the
 *           READY mirrors (QEMU copies what is still dirty, then ends the job; the source keeps its own
 *           disk, so a rollback simply resumes it), stop qemu-nbd (flushes), rename .partial → final.
 *
 * Pausing the guest and quitting the source QEMU are VM lifecycle (src/hosts/qemuIncoming.ts); the
 * per-VM flow runs them as its `stop` and `fence` steps around `converge` (PrecopyHandle.complete).
 *
 * Also the generic mirror-job driver used by live migration (src/transfer/live.ts).
 */
import type { VMSpec } from '../api/inventory.js';
import { TIMEOUTS } from '../api/types.js';
import { NBD_STOP_FN, type Hypervisor } from '../hosts/hypervisor.js';
import { createDisks, openQmpAt, queryDisks, verifyGuestData, type DiskVerification, type QemuDisk } from '../hosts/qemuIncoming.js';
import type { QmpClient, QmpEvent } from '../hosts/qmp.js';
import { changedSincePrepass, clearSourceState, prepassVerify, verifyChangedRanges, type ChangedRanges, type Prepass } from './mirrorVerify.js';
import { relayFile } from './relay.js';
import { openTunnel, tunnelSocketPath, type Tunnel } from './tunnel.js';
import { log as rootLog, type Logger } from '../util/log.js';
import { sleep } from '../util/sleep.js';

// ───────────────────────────── generic mirror jobs ─────────────────────────────

export interface MirrorJobProgress {
  jobId: string;
  device: string;
  /** bytes copied so far / current total (total grows while the guest dirties data) */
  offset: number;
  len: number;
  ready: boolean;
  status: string;
}

export interface MirrorProgress {
  jobs: MirrorJobProgress[];
  offset: number;
  len: number;
  ready: boolean;
}

interface BlockJobInfo {
  device: string;
  type: string;
  len: number;
  offset: number;
  ready: boolean;
  status: string;
}

export interface MirrorTarget {
  disk: QemuDisk;
  /** QEMU filename of the target, e.g. nbd+unix:///virtio0?socket=/path */
  uri: string;
}

export class MirrorJobs {
  readonly jobIds: string[];
  /** error text per job id, from BLOCK_JOB_ERROR / BLOCK_JOB_COMPLETED(error) */
  private readonly errors = new Map<string, string>();
  private readonly ended = new Map<string, string>();
  private last: MirrorProgress;
  private readonly onEvent: (ev: QmpEvent) => void;

  private constructor(
    private readonly qmp: QmpClient,
    readonly targets: MirrorTarget[],
    prefix: string,
  ) {
    this.jobIds = targets.map((t) => `${prefix}-${t.disk.device}`);
    this.last = { jobs: [], offset: 0, len: 0, ready: false };
    this.onEvent = (ev: QmpEvent): void => {
      const id = typeof ev.data?.device === 'string' ? ev.data.device : undefined;
      if (!id || !this.jobIds.includes(id)) return;
      if (ev.event === 'BLOCK_JOB_ERROR') this.errors.set(id, `I/O error (${String(ev.data?.operation)})`);
      if (ev.event === 'BLOCK_JOB_COMPLETED' || ev.event === 'BLOCK_JOB_CANCELLED') {
        if (typeof ev.data?.error === 'string') this.errors.set(id, ev.data.error);
        this.ended.set(id, ev.event);
      }
    };
    qmp.on('event', this.onEvent);
  }

  /**
   * drive-mirror sync=full mode=existing for every target. copyMode 'write-blocking' (active mirror)
   * makes every guest write reach the target before it completes once the job is READY, so nothing is
   * left dirty when the source stops — required for live migration.
   */
  static async start(qmp: QmpClient, targets: MirrorTarget[], opts: { prefix: string; copyMode?: 'background' | 'write-blocking'; speedBytesPerSec?: number }): Promise<MirrorJobs> {
    const jobs = new MirrorJobs(qmp, targets, opts.prefix);
    await jobs.clearStale();
    const started: string[] = [];
    try {
      for (const [i, t] of targets.entries()) {
        const jobId = jobs.jobIds[i] as string;
        await qmp.execute('drive-mirror', {
          'job-id': jobId,
          device: t.disk.device,
          target: t.uri,
          // the NBD export carries guest data: never probe it for a format
          format: 'raw',
          sync: 'full',
          mode: 'existing',
          'copy-mode': opts.copyMode ?? 'background',
          ...(opts.speedBytesPerSec ? { speed: opts.speedBytesPerSec } : {}),
          // keep the job around after it ended so its result can be read
          'auto-dismiss': false,
        });
        started.push(jobId);
      }
    } catch (err) {
      await jobs.cancel({ force: true, only: started }).catch(() => undefined);
      jobs.dispose();
      throw err;
    }
    return jobs;
  }

  /**
   * Jobs with our ids left by an earlier run that died (auto-dismiss is off, and a READY mirror of a
   * paused guest never notices its vanished target): cancelled and dismissed, or the new drive-mirror
   * would be refused as a duplicate job id.
   */
  private async clearStale(): Promise<void> {
    for (let i = 0; i < 100; i++) {
      const stale = (await this.qmp.execute<BlockJobInfo[]>('query-block-jobs')).filter((j) => this.jobIds.includes(j.device));
      if (stale.length === 0) return;
      for (const j of stale) {
        if (j.status === 'concluded') await this.qmp.execute('job-dismiss', { id: j.device }).catch(() => undefined);
        else if (j.status !== 'aborting' && j.status !== 'null') await this.qmp.execute('block-job-cancel', { device: j.device, force: true }).catch(() => undefined);
      }
      await sleep(50);
    }
    throw new Error(`stale block jobs ${this.jobIds.join(', ')} of an earlier run would not go away`);
  }

  async poll(): Promise<MirrorProgress> {
    const all = await this.qmp.execute<BlockJobInfo[]>('query-block-jobs');
    const jobs: MirrorJobProgress[] = [];
    for (const [i, id] of this.jobIds.entries()) {
      const j = all.find((x) => x.device === id);
      const device = this.targets[i]?.disk.device ?? id;
      if (!j) jobs.push({ jobId: id, device, offset: 0, len: 0, ready: false, status: 'absent' });
      else jobs.push({ jobId: id, device, offset: j.offset, len: j.len, ready: j.ready, status: j.status });
    }
    this.last = {
      jobs,
      offset: jobs.reduce((n, j) => n + j.offset, 0),
      len: jobs.reduce((n, j) => n + j.len, 0),
      ready: jobs.every((j) => j.ready),
    };
    return this.last;
  }

  get progress(): MirrorProgress {
    return this.last;
  }

  private failure(): string | undefined {
    for (const [id, e] of this.errors) return `mirror job ${id}: ${e}`;
    for (const j of this.last.jobs) {
      if (j.status === 'concluded' || j.status === 'absent' || j.status === 'aborting' || j.status === 'null') return `mirror job ${j.jobId} ended before it was ready (status ${j.status})`;
    }
    return undefined;
  }

  /** Resolves once every job is READY (source and target in sync, mirroring new writes). */
  async waitReady(opts: { timeoutMs: number; pollMs?: number; signal?: AbortSignal; onProgress?: (p: MirrorProgress) => void }): Promise<MirrorProgress> {
    const deadline = Date.now() + opts.timeoutMs;
    while (true) {
      opts.signal?.throwIfAborted();
      const p = await this.poll();
      opts.onProgress?.(p);
      const f = this.failure();
      if (f) throw new Error(f);
      if (p.ready) return p;
      if (Date.now() > deadline) throw new Error(`mirror not ready within ${opts.timeoutMs} ms (${p.offset}/${p.len} bytes)`);
      await sleep(opts.pollMs ?? 200);
    }
  }

  /**
   * Ends the jobs. force=false on READY jobs is QEMU's "soft cancel": the job first copies everything
   * still dirty, then ends without pivoting (the source keeps using its own disk). force=true drops
   * the job at once (the target is then incomplete). Waits until the jobs concluded; throws with
   * QEMU's error if a soft cancel did not end in sync.
   */
  async cancel(opts: { force: boolean; timeoutMs?: number; only?: string[] }): Promise<void> {
    const ids = opts.only ?? this.jobIds;
    for (const id of ids) {
      await this.qmp.execute('block-job-cancel', { device: id, force: opts.force }).catch((err: Error) => {
        // a job that already ended is fine; its outcome is checked below
        if (!/not found|No active block job|cannot be cancelled|in state/i.test(err.message)) throw err;
      });
    }
    const deadline = Date.now() + (opts.timeoutMs ?? TIMEOUTS.mirrorConvergeMs);
    while (true) {
      const all = await this.qmp.execute<BlockJobInfo[]>('query-block-jobs');
      const mine = all.filter((j) => ids.includes(j.device));
      const pending = mine.filter((j) => j.status !== 'concluded');
      if (pending.length === 0) {
        for (const j of mine) await this.qmp.execute('job-dismiss', { id: j.device }).catch(() => undefined);
        break;
      }
      if (Date.now() > deadline) throw new Error(`mirror jobs ${pending.map((j) => `${j.device}:${j.status}`).join(', ')} did not end within ${opts.timeoutMs ?? TIMEOUTS.mirrorConvergeMs} ms`);
      // a cutover waits here with the guest down: the job's own status change wakes the loop
      await this.qmp.nap(50, ['JOB_STATUS_CHANGE', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED']);
    }
    if (!opts.force) {
      const errs = ids.map((id) => (this.errors.has(id) ? `${id}: ${this.errors.get(id) ?? ''}` : undefined)).filter(Boolean);
      if (errs.length > 0) throw new Error(`mirror did not converge: ${errs.join('; ')}`);
    }
  }

  dispose(): void {
    this.qmp.removeListener('event', this.onEvent);
  }
}

// ───────────────────────────── pre-copy (cold cutover) ─────────────────────────────

export interface PrecopyOptions {
  source: Hypervisor;
  target: Hypervisor;
  environment: string;
  vm: VMSpec;
  /** QMP client of the source QEMU to use (QEMU serves one QMP client at a time); opened if absent */
  sourceQmp?: QmpClient;
  /** mirror speed limit per disk, bytes/s (0 = unlimited) */
  speedBytesPerSec?: number;
  copyMode?: 'background' | 'write-blocking';
  readyTimeoutMs?: number;
  onProgress?: (p: MirrorProgress) => void;
  signal?: AbortSignal;
  /** the move's logger (carries migration, environment and VM) */
  log?: Logger;
  /**
   * Hash both copies while the guest still runs once the mirror is READY, so the cutover only
   * compares what the guest wrote since (src/transfer/mirrorVerify.ts). Default true.
   */
  prepass?: boolean;
  /** test seam: runs after READY, right before the pre-pass, with each disk's NBD export on the target */
  beforePrepass?: (exports: Array<{ disk: QemuDisk; socket: string }>) => Promise<void>;
}

export interface PrecopyVerification {
  how: 'incremental' | 'full';
  disks: DiskVerification[];
  /** incremental: the ranges and bytes compared at the cutover, and how long the pre-pass took while the guest ran */
  ranges?: number;
  bytes?: number;
  prepassMs?: number;
  /** full: why the incremental comparison could not be used */
  why?: string;
}

export interface PrecopyCompleteResult {
  /** bytes that went through the tunnels (NBD protocol, both directions) */
  bytes: number;
  disks: { file: string; virtualSize: number }[];
}

export interface PrecopyHandle {
  /** resolves once every disk is mirrored and in sync (BLOCK_JOB_READY); rejects on error/timeout */
  readonly ready: Promise<MirrorProgress>;
  /**
   * Settles once what can be done while the guest still runs is done, successful or not (never
   * rejects): the pre-pass, then a copy of the VM's non-disk files (started at READY).
   */
  readonly prepared: Promise<void>;
  /** latest progress (refreshed while waiting for ready and on poll()) */
  progress(): MirrorProgress;
  poll(): Promise<MirrorProgress>;
  /** the source QMP client in use; share it, do not close it */
  readonly sourceQmp: QmpClient;
  readonly disks: QemuDisk[];
  readonly tunnels: Tunnel[];
  /**
   * After the guest is paused/shut down on the source (QEMU still alive, see pauseSourceForCutover):
   * lets the mirrors converge (soft cancel), stops the NBD exports (flushed), renames the target disks
   * into place. Throws if the source VM is still running. The source QEMU is left alive (paused).
   */
  complete(opts?: { timeoutMs?: number }): Promise<PrecopyCompleteResult>;
  /**
   * After complete() and with the source QEMU quit: compares the guest data on both hosts — only
   * what changed since the pre-pass when there is one, in full otherwise. Throws GuestDataMismatchError.
   */
  verify(): Promise<PrecopyVerification>;
  /**
   * After the source QEMU quit: copies the non-disk files that changed (size, mtime, ctime or inode)
   * since they were copied ahead, or all of them without an ahead copy; returns the bytes.
   */
  copyRemainingFiles(signal?: AbortSignal): Promise<number>;
  /** Drops the mirrors, stops the exports, removes the target's partial disks; the source is untouched. Idempotent. */
  abort(): Promise<void>;
  /**
   * Handed over (leadership lost): lets go of the source QEMU's monitor and the tunnels, undoing
   * nothing — the next leader finds the VM as it is and decides (QEMU serves one monitor client).
   */
  detach(): Promise<void>;
}

interface NbdExport {
  disk: QemuDisk;
  socket: string;
  pidFile: string;
  partial: string;
}

const PARTIAL = '.partial';

const NBD_STOP_SCRIPT = `${NBD_STOP_FN}\nnbd_stop "$1" "$2"`;

async function stopNbd(target: Hypervisor, e: NbdExport): Promise<void> {
  const r = await target.conn.exec(['sh', '-c', NBD_STOP_SCRIPT, 'nbd-stop', e.pidFile, `--socket=${e.socket}`]);
  if (r.code === 3) throw new Error(`qemu-nbd for ${e.partial} on ${target.host.name} ignored SIGTERM and was killed; its data may not be flushed`);
  if (r.code !== 0) throw new Error(`stopping qemu-nbd on ${target.host.name} failed (${r.code}): ${r.stderr}`);
  await target.removeFile(e.socket).catch(() => undefined);
}

export async function startPrecopy(opts: PrecopyOptions): Promise<PrecopyHandle> {
  const { source, target, environment, vm } = opts;
  const logger = (opts.log ?? rootLog).child({ component: 'mirror', from: source.host.name, to: target.host.name });
  const srcDir = source.vmDir(environment, vm);
  const dstDir = target.vmDir(environment, vm);
  const ownQmp = !opts.sourceQmp;
  const qmp = opts.sourceQmp ?? (await openQmpAt(source, srcDir));
  const exports: NbdExport[] = [];
  const tunnels: Tunnel[] = [];
  let jobs: MirrorJobs | undefined;
  let aborted = false;

  const cleanup = async (removePartials: boolean): Promise<void> => {
    if (jobs) {
      await jobs.cancel({ force: true, timeoutMs: 30_000 }).catch((err: Error) => logger.warn({ err: err.message }, 'mirror cancel failed'));
      jobs.dispose();
    }
    for (const t of tunnels) await t.close();
    for (const e of exports) {
      await stopNbd(target, e).catch((err: Error) => logger.warn({ err: err.message }, 'qemu-nbd stop failed'));
      if (removePartials) for (const f of [e.partial, e.socket, e.pidFile]) await target.removeFile(f).catch(() => undefined);
    }
  };

  let disks: QemuDisk[];
  try {
    const st = await qmp.execute<{ status: string }>('query-status');
    if (st.status !== 'running' && st.status !== 'paused') throw new Error(`source VM is ${st.status}, not running`);
    disks = await queryDisks(qmp, srcDir, vm);
    // The target must hold no live QEMU of this VM; files of an earlier attempt are replaced.
    const tst = await target.vmStatus(environment, vm);
    if (tst.state !== 'absent' && tst.state !== 'stopped') throw new Error(`a QEMU for ${vm.name} is ${tst.state} on ${target.host.name}`);
    await target.ensureCopyTarget(dstDir);
    await createDisks(target, dstDir, disks, PARTIAL);
    for (const d of disks) {
      const e: NbdExport = {
        disk: d,
        socket: `${dstDir}/${d.file}.nbd.sock`,
        pidFile: `${dstDir}/${d.file}.nbd.pid`,
        partial: `${dstDir}/${d.file}${PARTIAL}`,
      };
      await target.conn.execOk(
        [
          'qemu-nbd',
          '--fork',
          `--pid-file=${e.pidFile}`,
          `--socket=${e.socket}`,
          '--persistent',
          '--shared=4',
          `--format=${d.format}`,
          `--export-name=${d.device}`,
          '--discard=unmap',
          '--',
          e.partial,
        ],
        { timeoutMs: 30_000 },
      );
      exports.push(e);
      tunnels.push(await openTunnel({ a: source.conn, b: target.conn, socketPathOnA: tunnelSocketPath(srcDir, `nbd-${d.device}`), destination: { unixPath: e.socket } }));
    }
    jobs = await MirrorJobs.start(
      qmp,
      disks.map((d, i) => ({ disk: d, uri: `nbd+unix:///${d.device}?socket=${tunnels[i]?.socketPathOnA ?? ''}` })),
      { prefix: 'precopy', copyMode: opts.copyMode ?? 'background', speedBytesPerSec: opts.speedBytesPerSec },
    );
  } catch (err) {
    await cleanup(true);
    if (ownQmp) qmp.close();
    throw err;
  }
  const mj = jobs;
  logger.info({ disks: disks.map((d) => d.file) }, 'pre-copy mirrors started');

  const ready = mj.waitReady({ timeoutMs: opts.readyTimeoutMs ?? TIMEOUTS.mirrorReadyMs, signal: opts.signal, onProgress: opts.onProgress });
  // the caller may only look at progress; an unobserved rejection must not crash the process
  ready.catch(() => undefined);

  const bytes = (): number => tunnels.reduce((n, t) => n + t.stats.bytesAtoB + t.stats.bytesBtoA, 0);

  let prepass: Prepass | undefined;
  let prepassFailure = opts.prepass === false ? 'no pre-pass was asked for' : 'the pre-pass did not run';
  let changed: ChangedRanges | undefined;
  const verifyDisks = disks.flatMap((d, i) => (d.nodeName ? [{ ...d, nodeName: d.nodeName, targetSocket: exports[i]?.socket ?? '' }] : []));
  const prepassed: Promise<void> = opts.prepass === false
    ? Promise.resolve()
    : ready.then(
        async () => {
          if (verifyDisks.length !== disks.length) throw new Error('QEMU reported no node name for a disk');
          await opts.beforePrepass?.(exports.map((e) => ({ disk: e.disk, socket: e.socket })));
          prepass = await prepassVerify({ qmp, source, target, srcDir, dstDir, disks: verifyDisks });
          if (aborted) prepass = undefined;
          else logger.info({ ms: prepass.ms, mismatchedChunks: prepass.disks.reduce((n, d) => n + d.mismatched.length, 0) }, 'pre-pass: both copies hashed while the guest runs');
        },
      ).catch((err: Error) => {
        prepassFailure = `the pre-pass failed: ${err.message}`;
        if (!aborted) logger.warn({ err: err.message }, 'pre-pass failed; the cutover will compare the disks in full');
      });

  // non-disk files are not held open by QEMU: copied while the guest runs, re-copied at the cutover only if they changed
  let filesAhead: Map<string, string> | undefined;
  let aheadCopy: Promise<void> | undefined;
  const aheadAbort = new AbortController();
  const aheadSignal = opts.signal ? AbortSignal.any([opts.signal, aheadAbort.signal]) : aheadAbort.signal;
  let cutover = false;
  const prepared = prepassed.then(() => {
    // nothing starts in the background once the cut-over began (complete() or the remaining files)
    if (aborted || cutover) return;
    aheadCopy = copyNonDiskFilesAhead({ source, target, environment, vm, signal: aheadSignal }).then(
      (sigs) => { filesAhead = sigs; },
      (err: Error) => { if (!aborted) logger.warn({ err: err.message }, 'copying the non-disk files ahead failed; they are copied at the cutover'); },
    );
    return aheadCopy;
  });

  return {
    ready,
    prepared,
    progress: () => mj.progress,
    poll: () => mj.poll(),
    sourceQmp: qmp,
    disks,
    tunnels,
    async complete(copts = {}) {
      if (aborted) throw new Error('pre-copy was aborted');
      const st = await qmp.execute<{ status: string }>('query-status');
      if (st.status === 'running') throw new Error('pre-copy complete() needs the source VM stopped (it is running): data would keep changing');
      await ready;
      await mj.cancel({ force: false, timeoutMs: copts.timeoutMs ?? TIMEOUTS.mirrorConvergeMs });
      mj.dispose();
      jobs = undefined;
      // a pre-pass still running would compete with the cutover for both hosts: it is not waited for
      cutover = true;
      const pp = prepass;
      prepass = undefined;
      // the source's bitmap is read while the target finishes its exports (different hosts, both in the downtime)
      const readChanged = async (): Promise<void> => {
        if (!pp) return;
        try {
          changed = await changedSincePrepass({ qmp, source, srcDir, prepass: pp });
          if (!changed) prepassFailure = 'the guest changed more than half of the pre-passed data since the pre-pass';
        } catch (err) {
          prepassFailure = `reading the dirty bitmap failed: ${(err as Error).message}`;
        }
      };
      // one round trip on the target: stop every qemu-nbd (it flushes on SIGTERM), rename into place, make the renames durable
      const finish = target.conn.exec([
        'sh',
        '-c',
        [
          NBD_STOP_FN,
          'set -e',
          'dir=$1; shift',
          'while [ $# -gt 0 ]; do',
          '  pidf=$1 sock=$2 part=$3 final=$4; shift 4',
          '  nbd_stop "$pidf" "--socket=$sock" || exit $?',
          '  rm -f -- "$sock"',
          '  mv -f -T -- "$part" "$final"',
          '  sync -- "$final"',
          'done',
          'sync -- "$dir"',
        ].join('\n'),
        'precopy-finish',
        dstDir,
        ...exports.flatMap((e) => [e.pidFile, e.socket, e.partial, `${dstDir}/${e.disk.file}`]),
      ]);
      const [r] = await Promise.all([finish, readChanged(), ...tunnels.map((t) => t.close())]);
      if (r.code === 3) throw new Error(`a qemu-nbd on ${target.host.name} ignored SIGTERM and was killed; target data may be incomplete`);
      if (r.code !== 0) throw new Error(`finishing the NBD exports on ${target.host.name} failed (${r.code}): ${r.stderr}`);
      if (ownQmp) qmp.close();
      return { bytes: bytes(), disks: disks.map((d) => ({ file: d.file, virtualSize: d.virtualSize })) };
    },
    async copyRemainingFiles(signal) {
      // an ahead copy still in flight would write the same .partial files: let it end first
      cutover = true;
      await aheadCopy;
      return copyNonDiskFiles({ source, target, environment, vm, signal, unchangedSince: filesAhead });
    },
    async verify() {
      if (!changed) return { how: 'full', disks: await verifyGuestData(source, target, environment, vm), why: prepassFailure };
      const r = await verifyChangedRanges({ source, target, srcDir, dstDir, changed });
      return { how: 'incremental', disks: r.disks, ranges: r.ranges, bytes: r.bytes, prepassMs: changed.prepassMs };
    },
    async detach() {
      if (aborted) return;
      aborted = true;
      aheadAbort.abort(new Error('handed over'));
      for (const t of tunnels) await t.close().catch(() => undefined);
      if (ownQmp) qmp.close();
    },
    async abort() {
      if (aborted) return;
      aborted = true;
      aheadAbort.abort(new Error('pre-copy aborted'));
      await aheadCopy;
      await cleanup(true);
      // the target never ran (the source is still the truth): its copies of the non-disk files go with the partial disks
      for (const name of nonDiskNames(vm)) await target.removeFile(`${dstDir}/${name}`).catch(() => undefined);
      // the source runs on: no bitmap of ours should keep counting its writes
      if (!qmp.isClosed) await clearSourceState(qmp, verifyDisks);
      if (ownQmp) qmp.close();
    },
  };
}

type FileSignatures = Map<string, string>;

/** size, mtime, ctime and inode of each file: a write, a replacement or a truncation changes one of them */
async function fileSignatures(hv: Hypervisor, dir: string, names: string[]): Promise<FileSignatures> {
  const m: FileSignatures = new Map();
  if (names.length === 0) return m;
  const out = await hv.conn.execOk(['stat', '-c', '%s %Y %Z %i', '--', ...names.map((n) => `${dir}/${n}`)]);
  const lines = out.toString('utf8').split('\n').filter(Boolean);
  if (lines.length !== names.length) throw new Error(`on ${hv.host.name}: stat gave ${lines.length} lines for ${names.length} files`);
  names.forEach((n, i) => m.set(n, lines[i] as string));
  return m;
}

const nonDiskNames = (vm: VMSpec): string[] => vm.files.filter((f) => f.kind !== 'disk').map((f) => f.name);

/** Relays the VM's files that are not disks (QEMU does not hold them open, so no mirror is needed); returns their source signatures as they were before the copy. */
async function copyNonDiskFilesAhead(opts: { source: Hypervisor; target: Hypervisor; environment: string; vm: VMSpec; signal?: AbortSignal }): Promise<FileSignatures> {
  const before = await fileSignatures(opts.source, opts.source.vmDir(opts.environment, opts.vm), nonDiskNames(opts.vm));
  await copyNonDiskFiles(opts);
  return before;
}

/**
 * Relays the VM's files that are not disks; returns the bytes. With `unchangedSince` (signatures
 * taken before an earlier copy) a file whose source signature is the same and whose target copy is
 * there with the same size is not copied again.
 */
export async function copyNonDiskFiles(opts: { source: Hypervisor; target: Hypervisor; environment: string; vm: VMSpec; signal?: AbortSignal; unchangedSince?: FileSignatures }): Promise<number> {
  const { source, target, environment, vm } = opts;
  const srcDir = source.vmDir(environment, vm);
  const dstDir = target.vmDir(environment, vm);
  let names = nonDiskNames(vm);
  if (opts.unchangedSince && names.length > 0) {
    const now = await fileSignatures(source, srcDir, names);
    const there = await target.listVmFiles(environment, vm);
    const sizeOf = (sig: string | undefined) => sig?.split(' ')[0];
    names = names.filter((n) => now.get(n) !== opts.unchangedSince?.get(n) || String(there.find((f) => f.name === n)?.size) !== sizeOf(now.get(n)));
  }
  let bytes = 0;
  for (const name of names) {
    const r = await relayFile({ source: source.conn, sourcePath: `${srcDir}/${name}`, target: target.conn, targetPath: `${dstDir}/${name}`, signal: opts.signal });
    bytes += r.bytes;
  }
  return bytes;
}
