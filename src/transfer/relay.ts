/**
 * Host-to-host file copy relayed through the operator over two plain SSH exec channels (no SFTP,
 * no trust between the hosts, nothing staged on the operator's disk):
 *
 *   source: perl READER (data extents only, framed) [| zstd -1 -T0]
 *     → operator: counts wire bytes, token-bucket limit, stall timer, parses the frames and hashes
 *       each segment's file bytes (via a local `zstd -d` when compressed)
 *     → target: [zstd -d |] perl WRITER into <file>.partial, created sparse with truncate.
 *
 * The file is cut into fixed segments; after the target wrote a segment the operator hashes those
 * bytes on the target file (one exec) and compares with its stream hash. A dropped connection,
 * a killed process or a mismatch is retried (p-retry), resending only segments not yet verified.
 * Before the atomic rename: every data segment verified, target size right, no data outside the
 * source's extents (holes are holes), and the source file unchanged (size, mtime, ctime, inode).
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pRetry, { AbortError } from 'p-retry';
import { assertSafeName, assertSafePath, vmDirectory, type HostSpec, type VMSpec } from '../api/inventory.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { RemoteCommandError, type HostConnection, type SpawnedCommand } from '../hosts/ssh.js';
import { log } from '../util/log.js';
import { openDirectChannel, type DirectChannel } from './direct.js';
import { ExtentMap, FrameParser, opsText, planSegments, subtractExtents, type Extent, type Segment } from './plan.js';
import { SegmentHasher } from './hasher.js';
import { MAP_SH, PREPARE_SH, PROBE_SH, READER, WRITER } from './scripts.js';
import { TokenBucket } from './throttle.js';

const logger = log.child({ component: 'relay' });

/** Some segments' target bytes did not hash to what was streamed; they are resent on the next attempt. */
export class SegmentVerifyError extends Error {
  constructor(
    readonly path: string,
    readonly segments: number[],
    detail: string,
  ) {
    super(`copy of ${path}: ${segments.length} segment(s) not verified on the target (${segments.slice(0, 8).join(', ')}${segments.length > 8 ? ', …' : ''}): ${detail}`);
    this.name = 'SegmentVerifyError';
  }
}

export class SourceChangedError extends Error {
  constructor(
    readonly path: string,
    readonly before: string,
    readonly after: string,
  ) {
    super(`source file ${path} changed during the copy (size mtime ctime inode: ${before} → ${after}); is the VM really stopped?`);
    this.name = 'SourceChangedError';
  }
}

export class RelayStalledError extends Error {
  constructor(
    readonly path: string,
    readonly stallMs: number,
    readonly bytesDone: number,
  ) {
    super(`relay of ${path} stalled: no data for ${stallMs} ms after ${bytesDone} bytes`);
    this.name = 'RelayStalledError';
  }
}

export type Compression = 'none' | 'zstd';

export interface AttemptStats {
  attempt: number;
  /** segments this attempt set out to send */
  segments: number;
  /** file bytes streamed (data extents only) */
  dataBytes: number;
  /** bytes that passed through the operator (compressed size when compressed) */
  wireBytes: number;
  error?: string;
}

export interface RelayResult {
  /** bytes that had to be sent: the file's allocated data (holes excluded); = progress total */
  bytes: number;
  /** logical file size */
  size: number;
  /**
   * sha256 over the verified manifest (size, segment size and every segment's extents and sha256):
   * equal manifests ⇔ byte-identical files. Not the sha256 of the whole file (that would read the holes).
   */
  sha256: string;
  compression: Compression;
  /** all bytes through the operator, over all attempts */
  wireBytes: number;
  /** file bytes streamed over all attempts (> bytes only when something was resent) */
  sentBytes: number;
  segments: number;
  attempts: AttemptStats[];
  seconds: number;
}

export interface RelayOptions {
  source: HostConnection;
  sourcePath: string;
  target: HostConnection;
  targetPath: string;
  /** bytesTotal = data bytes to send (holes excluded); bytesDone never decreases */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  signal?: AbortSignal;
  /** fail (not retried) when no byte arrived for this long (default 60 s) */
  stallTimeoutMs?: number;
  /** 'auto' = zstd when both hosts and the operator have it (default 'none') */
  compression?: Compression | 'auto';
  /** bytes per second through the operator (wire bytes); unlimited if unset */
  bandwidthLimit?: number;
  /** budgets shared with other copies in flight (per host, see HostBandwidth): every one of them is honoured */
  sharedBandwidth?: readonly TokenBucket[];
  /** verification and resume granularity (default 32 MiB) */
  segmentBytes?: number;
  /** attempts after the first (default 3) */
  retries?: number;
  /** a fresh connection after a drop; without it a dead connection fails the copy */
  reconnect?: (host: HostSpec) => Promise<HostConnection>;
  /** fault injection for tests: runs before a segment is hashed on the target */
  beforeVerify?: (segment: number, partialPath: string) => Promise<void> | void;
  /** attempt start (tests use it to find the remote processes) */
  onAttempt?: (attempt: number) => void;
  /**
   * transfer mode Direct: the source streams to the target itself with a per-copy key (direct.ts)
   * instead of through the operator; `bytesPerSec` bounds that stream (operator-side buckets see no byte)
   */
  direct?: { environment: string; vm: string; bytesPerSec?: number };
}

const DEFAULT_SEGMENT = 32 * 1024 * 1024;

/** The stall timer and caller's signal must also bound waits that are not stream operations. */
function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

let localZstd: boolean | undefined;
/** The operator decompresses a copy of the stream to hash the file bytes; without zstd here, no compression. */
function operatorHasZstd(): boolean {
  localZstd ??= spawnSync('zstd', ['-V'], { stdio: 'ignore' }).status === 0;
  return localZstd;
}

interface SourceProbe {
  size: number;
  identity: string;
  zstd: boolean;
  extents: Extent[];
}

/**
 * The data extents of a file on a host, read from `qemu-img map` as it prints them: never held whole
 * (a fragmented sparse disk prints ~30 MB per GiB) and bounded in count (ExtentMap). Without qemu-img
 * (or when it fails) every byte is data.
 */
async function mapExtents(conn: HostConnection, path: string, size: number): Promise<Extent[]> {
  const cmd = await conn.spawn(['sh', '-c', MAP_SH, 'relay-map', path]);
  const map = new ExtentMap(size);
  let failed: Error | undefined;
  let noMap = false;
  const timer = setTimeout(() => {
    failed ??= new Error(`on ${conn.host.name}: qemu-img map of ${path} took over 10 minutes`);
    cmd.kill();
  }, 10 * 60_000);
  cmd.stdin.end();
  cmd.stderr.resume();
  onLines(cmd.stdout, (line) => {
    if (failed) return;
    if (line.trim() === 'NOMAP') noMap = true;
    try {
      map.line(line);
    } catch (err) {
      failed = new Error(`on ${conn.host.name}: qemu-img map of ${path}: ${(err as Error).message}`);
      cmd.kill();
    }
  }, 8192);
  const code = await cmd.exit.finally(() => clearTimeout(timer));
  if (failed) throw failed;
  if (code !== 0) throw new Error(`on ${conn.host.name}: mapping ${path} failed (exit ${code})`);
  if (noMap) return size > 0 ? [{ offset: 0, length: size }] : [];
  return map.extents();
}

async function probeSource(conn: HostConnection, path: string): Promise<SourceProbe> {
  const out = (await conn.execOk(['sh', '-c', PROBE_SH, 'relay-probe', path], { timeoutMs: 120_000 })).toString('utf8');
  const [statLine = '', zstdLine = ''] = out.split('\n');
  const size = Number(statLine.split(' ')[0]);
  if (!Number.isSafeInteger(size) || size < 0) throw new Error(`on ${conn.host.name}: cannot stat ${path}: ${JSON.stringify(statLine)}`);
  return { size, identity: statLine.trim(), zstd: zstdLine.trim() === 'zstd=1', extents: await mapExtents(conn, path, size) };
}

async function sourceIdentity(conn: HostConnection, path: string): Promise<string> {
  return (await conn.execOk(['stat', '-L', '-c', '%s %.9Y %.9Z %i', path])).toString('utf8').trim();
}

/** Collects a stream's lines; with `maxLine`, a longer line is cut there (what follows up to its newline is dropped). */
function onLines(stream: NodeJS.ReadableStream, fn: (line: string) => void, maxLine = Infinity): void {
  let buf = '';
  let skipping = false;
  stream.on('data', (d: Buffer) => {
    buf += d.toString('utf8');
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      if (!skipping) fn(buf.slice(0, nl));
      skipping = false;
      buf = buf.slice(nl + 1);
    }
    if (buf.length > maxLine) {
      if (!skipping) fn(buf);
      skipping = true;
      buf = '';
    }
  });
  stream.on('end', () => {
    if (buf && !skipping) fn(buf);
  });
}

/** At most `n` tasks at a time. */
function limiter(n: number): <T>(task: () => Promise<T>) => Promise<T> {
  let active = 0;
  const queue: Array<() => void> = [];
  return <T>(task: () => Promise<T>): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      const run = (): void => {
        active++;
        task()
          .then(resolve, reject)
          .finally(() => {
            active--;
            queue.shift()?.();
          });
      };
      if (active < n) run();
      else queue.push(run);
    });
}

export async function relayFile(opts: RelayOptions): Promise<RelayResult> {
  const { sourcePath, targetPath } = opts;
  assertSafePath('source path', sourcePath);
  assertSafePath('target path', targetPath);
  const partial = `${targetPath}.partial`;
  const stallMs = opts.stallTimeoutMs ?? 60_000;
  const segmentBytes = opts.segmentBytes ?? DEFAULT_SEGMENT;
  opts.signal?.throwIfAborted();
  let source = opts.source;
  let target = opts.target;
  const t0 = Date.now();

  const probe = await probeSource(source, sourcePath);
  const segments = planSegments(probe.size, probe.extents, segmentBytes);
  const total = segments.reduce((n, s) => n + s.dataBytes, 0);
  const bySegment = new Map(segments.map((s) => [s.index, s]));
  const verified = new Map<number, string>();
  const attempts: AttemptStats[] = [];
  let wireTotal = 0;
  let sentTotal = 0;
  let reported = 0;
  let compression: Compression = 'none';
  const progress = (done: number): void => {
    if (done > reported) reported = Math.min(done, total);
    opts.onProgress?.(reported, total);
  };

  const ensureConnections = async (): Promise<void> => {
    for (const which of ['source', 'target'] as const) {
      const c = which === 'source' ? source : target;
      if (c.isAlive) continue;
      if (!opts.reconnect) throw new AbortError(new Error(`SSH connection to ${c.host.name} was lost and no reconnect was given`));
      logger.info({ host: c.host.name }, 'reconnecting for the next relay attempt');
      const fresh = await opts.reconnect(c.host);
      if (which === 'source') source = fresh;
      else target = fresh;
    }
  };

  /**
   * An attempt's segment hashers, one per file, started at their first request: the target's also
   * writes the partial file's pages back as it goes (see HASHER), the source's only hashes.
   */
  const attemptHashers = () => {
    const started = new Map<string, Promise<SegmentHasher>>();
    const on = (conn: HostConnection, path: string, flush: boolean): Promise<SegmentHasher> => {
      let h = started.get(path);
      if (!h) {
        h = SegmentHasher.start(conn, path, { flush, timeoutMs: Math.max(stallMs, 60_000) });
        h.catch(() => undefined);
        started.set(path, h);
      }
      return h;
    };
    return {
      /** sha256 of the segment's extents in the target's partial file */
      target: async (seg: Segment): Promise<string> => (await on(target, partial, true)).hash(seg),
      source: async (seg: Segment): Promise<string> => (await on(source, sourcePath, false)).hash(seg),
      /** every answer is in (or the attempt failed): the hashers end */
      end: (): void => {
        for (const h of started.values()) void h.then((x) => x.kill(), () => undefined);
      },
    };
  };

  /** every pending segment verified, or the attempt fails naming the rest (they are resent next time) */
  const checkVerified = (pending: Segment[], failures: string[], stats: AttemptStats): void => {
    const missing = pending.filter((s) => !verified.has(s.index)).map((s) => s.index);
    if (missing.length === 0) return;
    const e = new SegmentVerifyError(sourcePath, missing, failures.join('; ') || 'no verification result');
    stats.error = e.message;
    throw e;
  };

  /** What every attempt shares: its abort signal (own, stall, caller's), the stall timer, and the error it ends with. */
  const attemptControl = (attemptNumber: number, stats: AttemptStats) => {
    const local = new AbortController();
    const stall = new AbortController();
    const signal = AbortSignal.any([local.signal, stall.signal, ...(opts.signal ? [opts.signal] : [])]);
    let stallTimer: NodeJS.Timeout | undefined;
    const disarmStall = (): void => {
      if (stallTimer) clearTimeout(stallTimer);
    };
    const armStall = (): void => {
      disarmStall();
      stallTimer = setTimeout(() => stall.abort(new RelayStalledError(sourcePath, stallMs, reported)), stallMs);
    };
    const failed = (err: unknown): Error => {
      const reason = signal.aborted && signal.reason instanceof Error ? signal.reason : (err as Error);
      stats.error = reason.message;
      logger.debug({ path: sourcePath, attemptNumber, err: reason.message }, 'copy attempt failed');
      // the user's abort and a stall end the copy; everything else is worth another attempt
      return opts.signal?.aborted || reason instanceof RelayStalledError ? new AbortError(reason) : reason;
    };
    return { local, signal, armStall, disarmStall, failed };
  };

  const channel = opts.direct ? await openDirectChannel({ source, target, partial, ...opts.direct }) : undefined;

  /**
   * One Direct attempt: the source streams the pending segments to the target over its own SSH
   * connection; the target WRITER's segment reports come back through it. Each reported segment is
   * hashed on both hosts and compared.
   */
  const directAttempt = async (ch: DirectChannel, attemptNumber: number, pending: Segment[], stats: AttemptStats, verifiedBefore: number): Promise<void> => {
    const { local, signal, armStall, disarmStall, failed } = attemptControl(attemptNumber, stats);
    const hashers = attemptHashers();
    const failures: string[] = [];
    const verifyLimit = limiter(2);
    const verifications: Promise<void>[] = [];
    const verifySegment = async (index: number): Promise<void> => {
      const seg = bySegment.get(index);
      if (!seg) throw new Error(`target reported unplanned segment ${index}`);
      await opts.beforeVerify?.(index, partial);
      const [expected, got] = await Promise.all([hashers.source(seg), hashers.target(seg)]);
      if (got === expected) verified.set(index, got);
      else failures.push(`segment ${index}: source ${expected}, target ${got}`);
    };
    let stream: SpawnedCommand | undefined;
    let ended = false;
    let done = false;
    const errOut: Buffer[] = [];
    try {
      armStall();
      stream = await source.spawn(ch.streamArgv(READER, sourcePath));
      stream.stderr.on('data', (d: Buffer) => errOut.push(d));
      onLines(stream.stdout, (line) => {
        if (line === 'END') ended = true;
        const m = /^E (\d+)$/.exec(line);
        if (!m) return;
        armStall();
        const index = Number(m[1]);
        const n = bySegment.get(index)?.dataBytes ?? 0;
        stats.dataBytes += n;
        sentTotal += n;
        progress(verifiedBefore + stats.dataBytes);
        verifications.push(verifyLimit(() => verifySegment(index)).catch((e: unknown) => void failures.push((e as Error).message)));
      });
      stream.stdin.end(opsText(pending, true));
      const code = await abortable(stream.exit, signal);
      done = true;
      if (code !== 0 || !ended) throw new RemoteCommandError(source.host.name, ['relay-direct', sourcePath], code, Buffer.concat(errOut).toString() || 'the direct stream ended before the target writer finished');
      await abortable(Promise.all(verifications), signal);
    } catch (err) {
      throw failed(err);
    } finally {
      disarmStall();
      hashers.end();
      if (!done) stream?.kill();
      local.abort(new Error('attempt finished'));
    }
    checkVerified(pending, failures, stats);
  };

  const attempt = async (attemptNumber: number): Promise<void> => {
    await ensureConnections();
    opts.onAttempt?.(attemptNumber);
    const prep = (await target.execOk(['sh', '-c', PREPARE_SH, 'relay-prepare', partial, String(probe.size), attemptNumber === 1 ? '1' : '0'])).toString('utf8');
    if (prep.startsWith('new') && verified.size > 0) {
      logger.warn({ path: partial }, 'partial file vanished between attempts; starting over');
      verified.clear();
    }
    if (attemptNumber === 1) {
      const wanted = opts.compression ?? 'none';
      compression = wanted !== 'none' && probe.zstd && prep.includes('zstd=1') && operatorHasZstd() ? 'zstd' : 'none';
      if (wanted === 'zstd' && compression === 'none') logger.info({ path: sourcePath }, 'zstd not available on both hosts and the operator; sending uncompressed');
    }
    const pending = segments.filter((s) => !verified.has(s.index));
    const stats: AttemptStats = { attempt: attemptNumber, segments: pending.length, dataBytes: 0, wireBytes: 0 };
    attempts.push(stats);
    if (pending.length === 0) return;
    const verifiedBefore = [...verified.keys()].reduce((n, k) => n + (bySegment.get(k)?.dataBytes ?? 0), 0);
    if (channel) return directAttempt(channel, attemptNumber, pending, stats, verifiedBefore);

    const { local, signal, armStall, disarmStall, failed } = attemptControl(attemptNumber, stats);

    // Stream digests per segment, resolved by the parser; target digests checked as the writer reports segments.
    const streamDigest = new Map<number, { promise: Promise<string>; resolve: (h: string) => void }>();
    for (const s of pending) {
      let resolve!: (h: string) => void;
      const promise = new Promise<string>((r) => (resolve = r));
      streamDigest.set(s.index, { promise, resolve });
    }
    const parser = new FrameParser(
      pending,
      (index, hex) => streamDigest.get(index)?.resolve(hex),
      (n) => {
        stats.dataBytes += n;
        sentTotal += n;
        progress(verifiedBefore + stats.dataBytes);
      },
    );
    const hashers = attemptHashers();
    const failures: string[] = [];
    const verifyLimit = limiter(2);
    const verifications: Promise<void>[] = [];
    const verifySegment = async (index: number): Promise<void> => {
      const seg = bySegment.get(index);
      const sd = streamDigest.get(index);
      if (!seg || !sd) throw new Error(`target reported unplanned segment ${index}`);
      const expected = await abortable(sd.promise, signal);
      await opts.beforeVerify?.(index, partial);
      const got = await hashers.target(seg);
      if (got === expected) verified.set(index, got);
      else failures.push(`segment ${index}: stream ${expected}, target ${got}`);
    };

    const readerArgv = compression === 'zstd' ? ['sh', '-c', 'perl -e "$1" f "$2" | zstd -q -1 -T0 -c', 'relay-read', READER, sourcePath] : ['perl', '-e', READER, 'f', sourcePath];
    const writerArgv = compression === 'zstd' ? ['sh', '-c', 'zstd -q -d -c | perl -e "$1" "$2"', 'relay-write', WRITER, partial] : ['perl', '-e', WRITER, partial];

    let reader: SpawnedCommand | undefined;
    let writer: SpawnedCommand | undefined;
    let decomp: ChildProcessWithoutNullStreams | undefined;
    const srcErr: Buffer[] = [];
    const dstErr: Buffer[] = [];
    let streamDone = false;
    let writerEnded = false;
    try {
      writer = await target.spawn(writerArgv);
      writer.stderr.on('data', (d: Buffer) => dstErr.push(d));
      onLines(writer.stdout, (line) => {
        if (line === 'END') writerEnded = true;
        const m = /^E (\d+)$/.exec(line);
        if (m) verifications.push(verifyLimit(() => verifySegment(Number(m[1]))).catch((e: unknown) => void failures.push((e as Error).message)));
      });
      void writer.exit.then((code) => {
        // a clean exit after END is normal even before the operator's side finished (e.g. local zstd still draining)
        if (code !== 0 || !writerEnded) local.abort(new RemoteCommandError(target.host.name, ['relay-write', partial], code, Buffer.concat(dstErr).toString() || 'target writer exited early'));
      });
      reader = await source.spawn(readerArgv);
      reader.stderr.on('data', (d: Buffer) => srcErr.push(d));
      reader.stdin.end(opsText(pending, true));

      if (compression === 'zstd') {
        decomp = spawn('zstd', ['-q', '-d', '-c'], { stdio: ['pipe', 'pipe', 'pipe'] });
        decomp.stdout.on('data', (d: Buffer) => {
          try {
            parser.push(d);
          } catch (err) {
            local.abort(err);
          }
        });
        decomp.stderr.resume();
        decomp.stdin.on('error', () => undefined);
      }
      const buckets = [...(opts.bandwidthLimit ? [new TokenBucket(opts.bandwidthLimit)] : []), ...(opts.sharedBandwidth ?? [])];
      const d = decomp;
      const meter = new Transform({
        transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
          void (async () => {
            armStall();
            for (const b of buckets) await b.take(chunk.length, signal);
            stats.wireBytes += chunk.length;
            wireTotal += chunk.length;
            if (d) {
              if (!d.stdin.write(chunk)) await abortable(once(d.stdin, 'drain'), signal);
            } else {
              parser.push(chunk);
            }
            armStall();
          })().then(
            () => cb(null, chunk),
            (err: unknown) => cb(err as Error),
          );
        },
      });
      armStall();
      // pipeline propagates backpressure end to end: a slow target throttles the source's SSH window.
      // pipeline() settles only once every stream closed, and sshd does not close the channel of a
      // stopped (hung) process: an abort or stall must not wait for that.
      const piped = pipeline(reader.stdout, meter, writer.stdin, { signal });
      piped.catch(() => undefined);
      await abortable(piped, signal);
      if (d) {
        d.stdin.end();
        const [code] = (await abortable(once(d, 'close'), signal)) as [number | null];
        if (code !== 0) throw new Error(`local zstd -d exited with ${code}`);
      }
      parser.finish();
      streamDone = true;
      const [srcCode, dstCode] = await abortable(Promise.all([reader.exit, writer.exit]), signal);
      if (srcCode !== 0) throw new RemoteCommandError(source.host.name, ['relay-read', sourcePath], srcCode, Buffer.concat(srcErr).toString());
      if (dstCode !== 0 || !writerEnded) throw new RemoteCommandError(target.host.name, ['relay-write', partial], dstCode, Buffer.concat(dstErr).toString());
      await abortable(Promise.all(verifications), signal);
    } catch (err) {
      throw failed(err);
    } finally {
      disarmStall();
      hashers.end();
      if (!streamDone) {
        reader?.kill();
        writer?.kill();
        decomp?.kill('SIGKILL');
        local.abort(new Error('attempt finished'));
      }
    }
    checkVerified(pending, failures, stats);
  };

  try {
    await pRetry(attempt, {
      retries: opts.retries ?? 3,
      minTimeout: 200,
      maxTimeout: 2000,
      signal: opts.signal,
      onFailedAttempt: ({ error, attemptNumber, retriesLeft }) => {
        logger.warn({ path: sourcePath, attemptNumber, retriesLeft, verified: verified.size, segments: segments.length, err: error.message }, 'relay attempt failed');
      },
    });
    await finalCheck();
    // Data must be on disk before the rename makes it the real file; one round trip for both.
    await target.execOk(['sh', '-c', 'sync -- "$1" && mv -f -T -- "$1" "$2"', 'relay-commit', partial, targetPath]);
  } catch (err) {
    logger.debug({ path: sourcePath, err: (err as Error).message }, 'relay failed; removing the partial file');
    if (target.isAlive) await target.exec(['rm', '-f', '--', partial]).catch(() => undefined);
    else if (opts.reconnect) await opts.reconnect(target.host).then((c) => c.exec(['rm', '-f', '--', partial]).finally(() => c.close())).catch(() => undefined);
    throw err;
  } finally {
    // a revocation that fails here is left to the line's expiry-time and the VM's next direct copy
    if (channel) await channel.close(source, target).catch((e: unknown) => logger.warn({ path: sourcePath, err: (e as Error).message }, 'removing the direct copy\'s key failed; it expires on its own'));
  }

  async function finalCheck(): Promise<void> {
    const [after, fin] = await Promise.all([sourceIdentity(source, sourcePath), target.execOk(['stat', '-c', '%s', partial], { timeoutMs: 120_000 })]);
    if (after !== probe.identity) throw new SourceChangedError(sourcePath, probe.identity, after);
    const sizeLine = fin.toString('utf8').trim();
    if (Number(sizeLine) !== probe.size) throw new Error(`on ${target.host.name}: ${partial} has size ${sizeLine}, expected ${probe.size}`);
    // Holes must read as zeros: anything the target has allocated outside the source's data must be zero bytes.
    const extra = subtractExtents(await mapExtents(target, partial, probe.size), probe.extents);
    if (extra.length > 0) {
      const r = await target.exec(['perl', '-e', READER, 'z', partial], { stdin: opsText([{ index: -1, start: 0, end: probe.size, extents: extra, dataBytes: 0 }], false), timeoutMs: 30 * 60_000 });
      if (r.code !== 0 || r.stdout.toString().trim() !== 'zero') throw new Error(`on ${target.host.name}: ${partial} has non-zero data where the source has holes: ${r.stderr.trim()}`);
    }
  }

  const manifest = createHash('sha256');
  manifest.update(`size ${probe.size} segment ${segmentBytes}\n`);
  for (const s of segments) manifest.update(`${s.index} ${s.extents.map((e) => `${e.offset}+${e.length}`).join(',')} ${verified.get(s.index) ?? ''}\n`);
  const seconds = (Date.now() - t0) / 1000;
  progress(total);
  logger.info(
    { from: source.host.name, to: target.host.name, path: sourcePath, size: probe.size, bytes: total, wireBytes: wireTotal, sentBytes: sentTotal, compression, attempts: attempts.length, seconds, mibPerSec: seconds > 0 ? Math.round(probe.size / 1048576 / seconds) : undefined },
    'file relayed',
  );
  return { bytes: total, size: probe.size, sha256: manifest.digest('hex'), compression, wireBytes: wireTotal, sentBytes: sentTotal, segments: segments.length, attempts, seconds };
}

/** bytes, sha256 and seconds as before; the details are optional so other transfer engines can return this type too. */
export type VmFileRelayResult = Pick<RelayResult, 'bytes' | 'sha256' | 'seconds'> & Partial<RelayResult> & { file: string };

/** The per-copy knobs of relayFile that a whole-VM copy passes through unchanged. */
type RelayTuning = Pick<RelayOptions, 'signal' | 'stallTimeoutMs' | 'compression' | 'bandwidthLimit' | 'sharedBandwidth' | 'segmentBytes' | 'retries' | 'reconnect' | 'beforeVerify'>;

export interface RelayVmOptions extends RelayTuning {
  source: Hypervisor;
  target: Hypervisor;
  environment: string;
  vm: VMSpec;
  onProgress?: (file: string, bytesDone: number, bytesTotal: number) => void;
  /** Direct: each file streams source → target with a per-copy key (direct.ts); default relay */
  direct?: { bytesPerSec?: number };
}

/** Copies every file of the VM (VMSpec.files) into the same VM directory layout on the target host. */
export async function relayVmFiles(opts: RelayVmOptions): Promise<VmFileRelayResult[]> {
  const { source, target, environment, vm, onProgress: _onProgress, direct, ...tuning } = opts;
  const srcDir = vmDirectory(source.host, environment, vm.name);
  const dstDir = vmDirectory(target.host, environment, vm.name);
  for (const f of vm.files) assertSafeName('VM file', f.name);

  // Copying a disk under a running QEMU would yield an inconsistent image.
  const st = await source.vmStatus(environment, vm);
  if (st.state !== 'stopped') throw new Error(`refusing to copy ${environment}/${vm.name} from ${source.host.name}: source VM is ${st.state}`);
  const tst = await target.vmStatus(environment, vm);
  if (tst.state !== 'absent' && tst.state !== 'stopped') {
    throw new Error(`refusing to copy ${environment}/${vm.name} to ${target.host.name}: a QEMU for it is ${tst.state} there`);
  }
  await target.ensureCopyTarget(dstDir);

  const results: VmFileRelayResult[] = [];
  for (const f of vm.files) {
    opts.signal?.throwIfAborted();
    const r = await relayFile({
      source: source.conn,
      sourcePath: `${srcDir}/${f.name}`,
      target: target.conn,
      targetPath: `${dstDir}/${f.name}`,
      onProgress: opts.onProgress ? (d, t) => opts.onProgress?.(f.name, d, t) : undefined,
      ...(direct ? { direct: { environment, vm: vm.name, bytesPerSec: direct.bytesPerSec } } : {}),
      ...tuning,
    });
    results.push({ file: f.name, ...r });
  }
  return results;
}
