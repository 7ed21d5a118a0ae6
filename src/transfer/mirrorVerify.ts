/**
 * Verifying a pre-copy mirror without putting the whole disk's re-read inside the downtime.
 *
 *   1. pre-pass (the guest still runs, the mirror is READY): a dirty bitmap starts on every source
 *      disk, then both hosts hash their copy in 4 MiB chunks, each through the QEMU process that owns
 *      it (the source QEMU's own NBD server; the target's qemu-nbd), so each read is consistent with
 *      the writes that process has acknowledged. Chunks whose hashes differ are remembered.
 *   2. converge (guest halted, mirror converged, source QEMU still alive): the bitmap is read back
 *      over NBD — the 64 KiB blocks the guest wrote since the pre-pass began.
 *   3. verify (both QEMUs stopped): only those blocks and the differing chunks are read and hashed
 *      from the image files on both hosts.
 *
 * Why this verifies as much as a full comparison: a block the guest did not write since the
 * bitmap started held the same content on the source throughout; the pre-pass found the target's
 * chunk equal to it (or the chunk is re-read in step 3); afterwards only the mirror writes to the
 * target, and only blocks it copies from the source — a block copied to the wrong place leaves its
 * own (dirty) block unequal, and step 3 reads every dirty block. What it does not see is a byte
 * changed on the target's disk behind qemu-nbd's back between the pre-pass and the cutover — no
 * copy path can do that, and a full comparison one second before the start has the same blind spot
 * one second later. When anything is missing (no pre-pass, the bitmap unreadable, more changed than
 * MAX_CHANGED_SHARE of the data) the caller falls back to the full comparison.
 */
import { createHash } from 'node:crypto';
import { assertSafePath } from '../api/inventory.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { GuestDataMismatchError, type DiskVerification } from '../hosts/qemuIncoming.js';
import type { QmpClient } from '../hosts/qmp.js';

export const VERIFY_CHUNK_BYTES = 4 * 1024 * 1024;
const BITMAP = 'vmops-verify';
/** above this share of the pre-passed bytes changed, re-reading ranges costs more than one full pass */
const MAX_CHANGED_SHARE = 0.5;
/** ranges closer than this are read as one (one qemu-img start per range) */
const MERGE_GAP_BYTES = 1024 * 1024;
const DEVICE = /^[A-Za-z0-9_-]{1,64}$/;

export interface VerifyDisk {
  file: string;
  /** QEMU BlockBackend name on the source, also the export name on both hosts */
  device: string;
  /** the source format node (below the mirror's filter) that carries the dirty bitmap */
  nodeName: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** the NBD socket serving this disk's copy on the target (pre-copy: its qemu-nbd; live: the incoming QEMU's server) */
  targetSocket: string;
  /** the copy's export name there, when it is not `device` */
  targetExport?: string;
}

export interface PrepassDisk extends VerifyDisk {
  /** chunk indexes whose hashes differed (or had data on one side only) during the pre-pass */
  mismatched: number[];
  /** bytes of data the pre-pass hashed on the source */
  hashedBytes: number;
}

export interface Prepass {
  disks: PrepassDisk[];
  ms: number;
}

/** [offset, length] pairs in bytes */
type Ranges = Array<[number, number]>;

/** What the cutover still has to compare: per disk, the byte ranges the pre-pass cannot vouch for. */
export interface ChangedRanges {
  disks: Array<{ disk: PrepassDisk; ranges: Ranges }>;
  bytes: number;
  /** how the guest's writes were learned: QEMU's count said none, or the bitmap was read over NBD */
  bitmapRead: 'count' | 'export';
  /** how long the pre-pass took (while the guest ran) */
  prepassMs: number;
}

export interface IncrementalVerification {
  disks: DiskVerification[];
  ranges: number;
  bytes: number;
}

function sh(lines: string[]): string {
  return lines.join('\n');
}

const HASH_FN = 'if command -v openssl >/dev/null 2>&1; then h() { openssl dgst -sha256 -r | cut -d" " -f1; }; else h() { sha256sum -b | cut -d" " -f1; }; fi';

/**
 * sh: $1 = a path in the VM directory (names the temp file), $2 = NBD URI, $3 = chunk bytes; prints
 * "index sha256" for every chunk holding data. qemu-img writes zero runs as holes, so which chunks
 * hold data does not depend on either host's image layout.
 */
const CHUNK_HASHES_SH = sh([
  'set -e',
  HASH_FN,
  't=$(mktemp "$1.verify.XXXXXX")',
  'trap \'rm -f "$t"\' EXIT',
  'qemu-img convert -f raw -O raw "$2" "$t"',
  'qemu-img map -f raw --output=json "$t" | perl -ne \'BEGIN { $c = shift @ARGV; $last = -1 } next unless /"start":\\s*(\\d+),\\s*"length":\\s*(\\d+).*"data":\\s*true/; for (my $k = int($1 / $c); $k <= int(($1 + $2 - 1) / $c); $k++) { next if $k <= $last; print "$k\\n"; $last = $k }\' "$3" |',
  'while read -r k; do printf "%s %s\\n" "$k" "$(dd if="$t" bs="$3" skip="$k" count=1 status=none | h)"; done',
]);

/** sh: $1 = NBD socket, $2 = bitmap, $3… = exports; prints each export's dirty map (qemu-img map JSON) followed by a "--" line. */
const DIRTY_MAPS_SH = sh([
  'set -e',
  'sock=$1 bitmap=$2; shift 2',
  'for e in "$@"; do',
  '  qemu-img map --output=json --image-opts "driver=nbd,server.type=unix,server.path=$sock,export=$e,x-dirty-bitmap=qemu:dirty-bitmap:$bitmap"',
  '  echo --',
  'done',
]);

/** sh: $1 = image file, $2 = format; stdin = "offset length" lines; prints "offset sha256" per range (holes read as zeros). */
const RANGE_HASHES_SH = sh([
  'set -e',
  HASH_FN,
  't=$(mktemp "$1.verify.XXXXXX")',
  'trap \'rm -f "$t"\' EXIT',
  'while read -r off len; do',
  '  qemu-img convert -U --image-opts "driver=raw,offset=$off,size=$len,file.driver=$2,file.file.driver=file,file.file.filename=$1" -O raw "$t"',
  '  printf "%s %s\\n" "$off" "$(h < "$t")"',
  'done',
]);

async function chunkHashes(hv: Hypervisor, tempBase: string, uri: string): Promise<Map<number, string>> {
  const out = await hv.conn.execOk(['sh', '-c', CHUNK_HASHES_SH, 'verify-chunks', tempBase, uri, String(VERIFY_CHUNK_BYTES)], { timeoutMs: 60 * 60_000 });
  const m = new Map<number, string>();
  for (const line of out.toString('utf8').split('\n')) {
    if (!line) continue;
    const r = /^(\d+) ([0-9a-f]{64})$/.exec(line);
    if (!r) throw new Error(`on ${hv.host.name}: unexpected chunk hash line for ${tempBase}`);
    m.set(Number(r[1]), r[2] as string);
  }
  return m;
}

async function bestEffort(p: Promise<unknown>): Promise<void> {
  await p.catch(() => undefined);
}

/**
 * Removes the verification's NBD server and bitmaps from the source QEMU: before a pre-pass (an
 * interrupted attempt leaves them until the QEMU quits) and when a source is resumed after an abort.
 */
export async function clearSourceState(qmp: QmpClient, disks: VerifyDisk[]): Promise<void> {
  await bestEffort(qmp.execute('nbd-server-stop'));
  for (const d of disks) await bestEffort(qmp.execute('block-dirty-bitmap-remove', { node: d.nodeName, name: BITMAP }));
}

/** Dirty bytes QEMU counts in each disk's verification bitmap; undefined where QEMU does not say. */
async function dirtyCounts(qmp: QmpClient, disks: VerifyDisk[]): Promise<Array<number | undefined>> {
  const nodes = await qmp.execute<Array<{ 'node-name'?: string; 'dirty-bitmaps'?: Array<{ name?: string; count?: unknown }> }>>('query-named-block-nodes', { flat: true });
  return disks.map((d) => {
    const count = nodes.find((n) => n['node-name'] === d.nodeName)?.['dirty-bitmaps']?.find((b) => b.name === BITMAP)?.count;
    return typeof count === 'number' && Number.isSafeInteger(count) && count >= 0 ? count : undefined;
  });
}

async function exportSource(qmp: QmpClient, socket: string, disks: VerifyDisk[], bitmaps: boolean): Promise<void> {
  await bestEffort(qmp.execute('nbd-server-stop'));
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
  for (const d of disks) {
    await qmp.execute('block-export-add', {
      type: 'nbd', id: `${BITMAP}-${d.device}`, 'node-name': d.nodeName, name: d.device, writable: false,
      ...(bitmaps ? { bitmaps: [BITMAP] } : {}),
    });
  }
}

function assertNbdTarget(device: string, socket: string): void {
  if (!DEVICE.test(device)) throw new Error(`unexpected block device name ${JSON.stringify(device)}`);
  assertSafePath('NBD socket', socket);
}

function nbdUri(device: string, socket: string): string {
  assertNbdTarget(device, socket);
  return `nbd+unix:///${device}?socket=${socket}`;
}

/**
 * Step 1, while the guest runs: starts the dirty bitmaps, hashes both copies chunk by chunk. The
 * source QEMU is left with its bitmaps and no NBD server.
 */
export async function prepassVerify(opts: { qmp: QmpClient; source: Hypervisor; target: Hypervisor; srcDir: string; dstDir: string; disks: VerifyDisk[] }): Promise<Prepass> {
  const { qmp, source, target, srcDir, dstDir, disks } = opts;
  const t0 = Date.now();
  const socket = `${srcDir}/verify.nbd.sock`;
  await clearSourceState(qmp, disks);
  // the bitmap starts before either copy is read: every guest write from here on is in it
  for (const d of disks) await qmp.execute('block-dirty-bitmap-add', { node: d.nodeName, name: BITMAP });
  try {
    await exportSource(qmp, socket, disks, false);
    const out: PrepassDisk[] = [];
    for (const d of disks) {
      const [s, t] = await Promise.all([
        chunkHashes(source, `${srcDir}/${d.file}`, nbdUri(d.device, socket)),
        chunkHashes(target, `${dstDir}/${d.file}`, nbdUri(d.targetExport ?? d.device, d.targetSocket)),
      ]);
      const mismatched = [...new Set([...s.keys(), ...t.keys()])].filter((k) => s.get(k) !== t.get(k)).sort((a, b) => a - b);
      out.push({ ...d, mismatched, hashedBytes: s.size * VERIFY_CHUNK_BYTES });
    }
    return { disks: out, ms: Date.now() - t0 };
  } catch (err) {
    await clearSourceState(qmp, disks);
    throw err;
  } finally {
    await bestEffort(qmp.execute('nbd-server-stop'));
    await bestEffort(source.removeFile(socket));
  }
}

/** Parses `qemu-img map` output read through x-dirty-bitmap: dirty extents are reported as "data": false. */
export function dirtyExtents(mapJson: string): Ranges {
  const out: Ranges = [];
  for (const e of JSON.parse(mapJson) as Array<{ start: number; length: number; data: boolean }>) if (!e.data) out.push([e.start, e.length]);
  return out;
}

/** Chunk indexes and extents as sorted, merged byte ranges clipped to the disk. */
export function mergeRanges(chunks: number[], extents: Ranges, virtualSize: number, chunkBytes = VERIFY_CHUNK_BYTES, gap = MERGE_GAP_BYTES): Ranges {
  const all: Ranges = [...chunks.map((k): [number, number] => [k * chunkBytes, chunkBytes]), ...extents]
    .map(([o, l]): [number, number] => [o, Math.min(o + l, virtualSize) - o])
    .filter(([o, l]) => l > 0 && o < virtualSize)
    .sort((a, b) => a[0] - b[0]);
  const out: Ranges = [];
  for (const [o, l] of all) {
    const last = out[out.length - 1];
    if (last && o <= last[0] + last[1] + gap) last[1] = Math.max(last[1], Math.min(o + l, virtualSize) - last[0]);
    else out.push([o, l]);
  }
  return out;
}

/**
 * Step 2, the guest halted and the mirror converged (the source QEMU alive): reads which blocks the
 * guest wrote since the pre-pass, and removes the bitmaps. Returns undefined when more changed than
 * a range re-read is worth (the caller then compares in full).
 */
export async function changedSincePrepass(opts: { qmp: QmpClient; source: Hypervisor; srcDir: string; prepass: Prepass }): Promise<ChangedRanges | undefined> {
  const { qmp, source, srcDir, prepass } = opts;
  const socket = `${srcDir}/verify.nbd.sock`;
  try {
    for (const d of prepass.disks) await qmp.execute('block-dirty-bitmap-disable', { node: d.nodeName, name: BITMAP });
    const ranges = (extents: (d: PrepassDisk, i: number) => Ranges, bitmapRead: ChangedRanges['bitmapRead']): ChangedRanges | undefined => {
      const disks: ChangedRanges['disks'] = prepass.disks.map((d, i) => ({ disk: d, ranges: mergeRanges(d.mismatched, extents(d, i), d.virtualSize) }));
      const bytes = disks.reduce((n, d) => n + d.ranges.reduce((m, [, l]) => m + l, 0), 0);
      const hashed = prepass.disks.reduce((n, d) => n + d.hashedBytes, 0);
      return bytes > Math.max(hashed, VERIFY_CHUNK_BYTES) * MAX_CHANGED_SHARE ? undefined : { disks, bytes, bitmapRead, prepassMs: prepass.ms };
    };
    // QEMU counts each bitmap's dirty bytes: when the guest wrote nothing since the pre-pass there is
    // nothing to read. Reading means an NBD export, and exporting a postmigrate source's node cost
    // 0.3 s of live downtime at 32 GiB (QEMU re-activating the image, we believe).
    // An unknown count is not a zero: then the bitmap is read.
    if ((await dirtyCounts(qmp, prepass.disks)).every((c) => c === 0)) return ranges(() => [], 'count');
    await exportSource(qmp, socket, prepass.disks, true);
    // one round trip for every disk (this runs inside the downtime): a map per disk, a line between them
    for (const d of prepass.disks) assertNbdTarget(d.device, socket);
    const maps = (await source.conn.execOk(['sh', '-c', DIRTY_MAPS_SH, 'verify-dirty', socket, BITMAP, ...prepass.disks.map((d) => d.device)], { timeoutMs: 120_000 }))
      .toString('utf8')
      .split(/^--$/m);
    if (maps.length !== prepass.disks.length + 1) throw new Error(`on ${source.host.name}: unexpected dirty-bitmap output`);
    return ranges((_d, i) => dirtyExtents(maps[i] ?? ''), 'export');
  } finally {
    await clearSourceState(qmp, prepass.disks);
    // the stale socket file is harmless (the host's sweep removes *.nbd.sock): not worth a round trip in the downtime
    void bestEffort(source.removeFile(socket));
  }
}

async function rangeHashes(hv: Hypervisor, file: string, format: 'qcow2' | 'raw', ranges: Ranges): Promise<string[]> {
  assertSafePath('image', file);
  const out = await hv.conn.execOk(['sh', '-c', RANGE_HASHES_SH, 'verify-ranges', file, format], { stdin: ranges.map(([o, l]) => `${o} ${l}\n`).join(''), timeoutMs: 30 * 60_000 });
  const lines = out.toString('utf8').split('\n').filter(Boolean);
  const wellFormed = lines.length === ranges.length && lines.every((l, i) => /^(\d+) [0-9a-f]{64}$/.exec(l)?.[1] === String(ranges[i]?.[0]));
  if (!wellFormed) throw new Error(`on ${hv.host.name}: unexpected range hash output for ${file}`);
  return lines;
}

/**
 * Step 3, both QEMUs stopped: hashes the changed ranges from the image files on both hosts and
 * throws GuestDataMismatchError on any difference. The hashes reported per disk summarise the
 * ranges' hashes (the same ranges on both sides).
 */
export async function verifyChangedRanges(opts: { source: Hypervisor; target: Hypervisor; srcDir: string; dstDir: string; changed: ChangedRanges }): Promise<IncrementalVerification> {
  const { source, target, srcDir, dstDir, changed } = opts;
  const results: DiskVerification[] = [];
  let ranges = 0;
  for (const { disk, ranges: r } of changed.disks) {
    ranges += r.length;
    const [s, t] = r.length === 0
      ? [[], []]
      : await Promise.all([rangeHashes(source, `${srcDir}/${disk.file}`, disk.format, r), rangeHashes(target, `${dstDir}/${disk.file}`, disk.format, r)]);
    const digest = (lines: string[]) => `${createHash('sha256').update(lines.join('\n')).digest('hex')}:${r.length} ranges`;
    results.push({ file: disk.file, sourceSha256: digest(s), targetSha256: digest(t) });
  }
  if (results.some((x) => x.sourceSha256 !== x.targetSha256)) throw new GuestDataMismatchError(results);
  return { disks: results, ranges, bytes: changed.bytes };
}
