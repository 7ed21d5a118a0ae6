/**
 * Host-to-host file copy relayed through the operator: `cat` on the source streams over one SSH
 * connection into `cat > file.partial` on the target over another. The hosts need no trust in each
 * other and nothing is staged on the operator's disk. Three checksums (stream, source file, target
 * file) must agree before the .partial is atomically renamed into place.
 */
import { createHash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { assertSafeName, assertSafePath, vmDirectory, type VMSpec } from '../api/inventory.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import type { HostConnection } from '../hosts/ssh.js';
import { RemoteCommandError } from '../hosts/ssh.js';
import { log } from '../util/log.js';

const logger = log.child({ component: 'relay' });

export class ChecksumMismatchError extends Error {
  constructor(
    readonly path: string,
    readonly streamSha256: string,
    readonly sourceSha256: string,
    readonly targetSha256: string,
  ) {
    super(`checksum mismatch copying ${path}: stream ${streamSha256}, source file ${sourceSha256}, target file ${targetSha256}`);
    this.name = 'ChecksumMismatchError';
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

export interface RelayResult {
  bytes: number;
  sha256: string;
}

export interface RelayOptions {
  source: HostConnection;
  sourcePath: string;
  target: HostConnection;
  targetPath: string;
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  signal?: AbortSignal;
  /** abort when no byte arrived for this long (default 60 s) */
  stallTimeoutMs?: number;
}

/** Throws ChecksumMismatchError unless all three digests are equal. */
export function verifyChecksums(path: string, stream: string, source: string, target: string): void {
  if (stream !== source || stream !== target) throw new ChecksumMismatchError(path, stream, source, target);
}

async function remoteSha256(conn: HostConnection, path: string): Promise<string> {
  const out = await conn.execOk(['sha256sum', '-b', '--', path], { timeoutMs: 30 * 60_000 });
  const hex = out.toString('utf8').split(/\s/)[0] ?? '';
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new Error(`on ${conn.host.name}: unexpected sha256sum output for ${path}`);
  return hex;
}

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

export async function relayFile(opts: RelayOptions): Promise<RelayResult> {
  const { source, target, sourcePath, targetPath } = opts;
  assertSafePath('source path', sourcePath);
  assertSafePath('target path', targetPath);
  const partial = `${targetPath}.partial`;
  const stallMs = opts.stallTimeoutMs ?? 60_000;
  opts.signal?.throwIfAborted();

  const total = Number((await source.execOk(['stat', '-L', '-c', '%s', '--', sourcePath])).toString('utf8').trim());

  const hash = createHash('sha256');
  let done = 0;
  const stall = new AbortController();
  let stallTimer: NodeJS.Timeout | undefined;
  const armStall = (): void => {
    if (stallTimer) clearTimeout(stallTimer);
    stallTimer = setTimeout(() => stall.abort(new RelayStalledError(sourcePath, stallMs, done)), stallMs);
  };
  const signal = opts.signal ? AbortSignal.any([opts.signal, stall.signal]) : stall.signal;

  const meter = new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      hash.update(chunk);
      done += chunk.length;
      armStall();
      opts.onProgress?.(done, total);
      cb(null, chunk);
    },
  });

  // The shell only sees a fixed script; the path arrives as $1.
  const writer = await target.spawn(['sh', '-c', 'exec cat > "$1"', 'relay-write', partial]);
  let reader: Awaited<ReturnType<HostConnection['spawn']>> | undefined;
  const srcErr: Buffer[] = [];
  const dstErr: Buffer[] = [];
  writer.stderr.on('data', (d: Buffer) => dstErr.push(d));
  // The channel is a Duplex: pipeline() waits for its readable side to end too, which never happens unless it flows.
  writer.stdout.resume();
  const t0 = Date.now();
  try {
    reader = await source.spawn(['cat', '--', sourcePath]);
    reader.stderr.on('data', (d: Buffer) => srcErr.push(d));
    reader.stdin.end();
    armStall();
    // pipeline propagates backpressure end to end: a slow target throttles the source's SSH window.
    await pipeline(reader.stdout, meter, writer.stdin, { signal });
    const [srcCode, dstCode] = await abortable(Promise.all([reader.exit, writer.exit]), signal);
    if (srcCode !== 0) throw new RemoteCommandError(source.host.name, ['cat', sourcePath], srcCode, Buffer.concat(srcErr).toString());
    if (dstCode !== 0) throw new RemoteCommandError(target.host.name, ['cat', '>', partial], dstCode, Buffer.concat(dstErr).toString());
  } catch (err) {
    reader?.kill();
    writer.kill();
    await target.exec(['rm', '-f', '--', partial]).catch(() => undefined);
    const reason = signal.aborted && signal.reason instanceof Error ? signal.reason : err;
    throw reason;
  } finally {
    if (stallTimer) clearTimeout(stallTimer);
  }
  const seconds = (Date.now() - t0) / 1000;
  const streamSha = hash.digest('hex');

  try {
    const [srcSha, dstSha] = await Promise.all([remoteSha256(source, sourcePath), remoteSha256(target, partial)]);
    verifyChecksums(sourcePath, streamSha, srcSha, dstSha);
    // Data must be on disk before the rename makes it the real file, or a host crash could leave a torn "final" file.
    // One round trip for both: each SSH exec costs a remote shell start.
    await target.execOk(['sh', '-c', 'sync -- "$1" && mv -f -T -- "$1" "$2"', 'relay-commit', partial, targetPath]);
  } catch (err) {
    await target.exec(['rm', '-f', '--', partial]).catch(() => undefined);
    throw err;
  }
  logger.info(
    { from: source.host.name, to: target.host.name, path: sourcePath, bytes: done, seconds, mbPerSec: seconds > 0 ? Math.round(done / 1e6 / seconds) : undefined },
    'file relayed',
  );
  return { bytes: done, sha256: streamSha };
}

export interface VmFileRelayResult extends RelayResult {
  file: string;
  seconds: number;
}

export interface RelayVmOptions {
  source: Hypervisor;
  target: Hypervisor;
  environment: string;
  vm: VMSpec;
  onProgress?: (file: string, bytesDone: number, bytesTotal: number) => void;
  signal?: AbortSignal;
  stallTimeoutMs?: number;
  /**
   * Copying a disk under a running QEMU yields an inconsistent image; only callers doing
   * their own consistency handling (e.g. a pre-copy that is re-verified later) may turn this off.
   */
  requireSourceStopped?: boolean;
}

/** Copies every file of the VM (VMSpec.files) into the same VM directory layout on the target host. */
export async function relayVmFiles(opts: RelayVmOptions): Promise<VmFileRelayResult[]> {
  const { source, target, environment, vm } = opts;
  const srcDir = vmDirectory(source.host, environment, vm.name);
  const dstDir = vmDirectory(target.host, environment, vm.name);
  for (const f of vm.files) assertSafeName('VM file', f.name);

  if (opts.requireSourceStopped ?? true) {
    const st = await source.vmStatus(environment, vm);
    if (st.state !== 'stopped') throw new Error(`refusing to copy ${environment}/${vm.name} from ${source.host.name}: source VM is ${st.state}`);
  }
  const tst = await target.vmStatus(environment, vm);
  if (tst.state !== 'absent' && tst.state !== 'stopped') {
    throw new Error(`refusing to copy ${environment}/${vm.name} to ${target.host.name}: a QEMU for it is ${tst.state} there`);
  }
  await target.ensureDir(dstDir);

  const results: VmFileRelayResult[] = [];
  for (const f of vm.files) {
    opts.signal?.throwIfAborted();
    const t0 = Date.now();
    const r = await relayFile({
      source: source.conn,
      sourcePath: `${srcDir}/${f.name}`,
      target: target.conn,
      targetPath: `${dstDir}/${f.name}`,
      onProgress: opts.onProgress ? (d, t) => opts.onProgress?.(f.name, d, t) : undefined,
      signal: opts.signal,
      stallTimeoutMs: opts.stallTimeoutMs,
    });
    results.push({ file: f.name, ...r, seconds: (Date.now() - t0) / 1000 });
  }
  return results;
}
