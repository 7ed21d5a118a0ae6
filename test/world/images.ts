/**
 * Deterministic test disk images: the same (size, format, seed) always gives byte-identical
 * guest-visible content, with data regions and holes, so a checksum proves a copy was faithful.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, stat, unlink } from 'node:fs/promises';
import { promisify } from 'node:util';
import { adoptHostFile } from './hosts.js';

const execFileP = promisify(execFile);

export interface DiskImageOptions {
  sizeMiB: number;
  format: 'qcow2' | 'raw';
  seed: number;
  /** number of data regions written; the rest of the image stays a hole */
  regions?: number;
  /** MiB of data written from the image's start, besides the regions */
  denseMiB?: number;
}

/** mulberry32: tiny, seedable, good enough to spread regions. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export async function createDiskImage(path: string, opts: DiskImageOptions): Promise<void> {
  const sizeBytes = opts.sizeMiB * 1024 * 1024;
  await execFileP('qemu-img', ['create', '-q', '-f', opts.format, path, String(sizeBytes)]);

  const rnd = prng(opts.seed);
  const unit = 64 * 1024;
  const units = Math.floor(sizeBytes / unit);
  const regions = opts.regions ?? 8;
  const cmds: string[] = [];
  for (let i = 0; i < regions; i++) {
    // Up to 1 MiB per region keeps images mostly sparse but with real data to copy.
    const lenUnits = 1 + Math.floor(rnd() * 16);
    const startUnit = Math.floor(rnd() * Math.max(1, units - lenUnits));
    const pattern = 1 + Math.floor(rnd() * 255);
    cmds.push('-c', `write -q -P ${pattern} ${startUnit * unit} ${lenUnits * unit}`);
  }
  // dense data from the start (a filled guest disk), a different byte per MiB so nothing dedups or reads as zero
  for (let m = 0; m < (opts.denseMiB ?? 0); m++) cmds.push('-c', `write -q -P ${1 + (m % 255)} ${m * 1048576} 1048576`);
  await execFileP('qemu-io', ['-f', opts.format, ...cmds, path]);
  // Inside a test host's vmDir the image belongs to the host's (unprivileged) user, as QEMU there runs as it.
  await adoptHostFile(path);
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

const WORDS = 'the of and kube node pod etcd apiserver ready error warn info debug request latency bytes disk vm host migrate copy verify segment student cluster worker controller beachhead restart timeout 200 404 500 GET PUT POST /api/v1/namespaces default kube-system'.split(' ');

/** One block of log-like text: compressible like real guest text (zstd -1 ≈ 3-4x), deterministic per seed. */
function textBlock(bytes: number, rnd: () => number): Buffer {
  const parts: string[] = [];
  let n = 0;
  while (n < bytes) {
    const words: string[] = [`2025-01-${String(1 + Math.floor(rnd() * 28)).padStart(2, '0')}T${Math.floor(rnd() * 1e6)}Z`];
    const k = 4 + Math.floor(rnd() * 12);
    for (let i = 0; i < k; i++) words.push(rnd() < 0.15 ? String(Math.floor(rnd() * 1e9)) : (WORDS[Math.floor(rnd() * WORDS.length)] as string));
    const line = `${words.join(' ')}\n`;
    parts.push(line);
    n += line.length;
  }
  return Buffer.from(parts.join('')).subarray(0, bytes);
}

export type BlockKind = 'zero' | 'random' | 'text';

/** Content of one 1 MiB block of a mixed image: a third each of zeros, random bytes and text. */
function mixedBlock(kind: BlockKind, bytes: number, rnd: () => number): Buffer {
  if (kind === 'zero') return Buffer.alloc(bytes);
  if (kind === 'random') return randomBytes(bytes);
  return textBlock(bytes, rnd);
}

/**
 * A file of `sizeBytes` whose 1 MiB blocks are zeros (written, not holes), random or text, in a
 * seeded order. Turned into a qcow2 with all clusters allocated when `qcow2` is set.
 */
export async function createMixedFile(file: string, opts: { sizeBytes: number; seed: number; qcow2?: boolean }): Promise<void> {
  const rnd = prng(opts.seed);
  const raw = opts.qcow2 ? `${file}.raw-tmp` : file;
  const fh = await open(raw, 'w');
  try {
    const block = 1024 * 1024;
    for (let off = 0; off < opts.sizeBytes; off += block) {
      const kinds: BlockKind[] = ['zero', 'random', 'text'];
      const kind = kinds[Math.floor(rnd() * 3)] as BlockKind;
      const len = Math.min(block, opts.sizeBytes - off);
      await fh.write(mixedBlock(kind, len, rnd), 0, len, off);
    }
  } finally {
    await fh.close();
  }
  if (opts.qcow2) {
    // -S 0: zero blocks stay allocated data in the qcow2 (a used disk is full of freed-but-written blocks)
    await execFileP('qemu-img', ['convert', '-q', '-S', '0', '-f', 'raw', '-O', 'qcow2', raw, file]);
    await unlink(raw);
  }
  await adoptHostFile(file);
}

/**
 * A sparse raw file of `sizeBytes` with about `dataBytes` allocated in chunks of `chunkBytes` at
 * seeded, non-overlapping, chunk-aligned offsets; each chunk holds random or text data.
 */
export async function createSparseFile(file: string, opts: { sizeBytes: number; dataBytes: number; chunkBytes?: number; seed: number }): Promise<{ allocated: number }> {
  const chunk = opts.chunkBytes ?? 4 * 1024 * 1024;
  const slots = Math.floor(opts.sizeBytes / chunk);
  const want = Math.min(slots, Math.round(opts.dataBytes / chunk));
  const rnd = prng(opts.seed);
  const chosen = new Set<number>();
  while (chosen.size < want) chosen.add(Math.floor(rnd() * slots));
  const fh = await open(file, 'w');
  try {
    await fh.truncate(opts.sizeBytes);
    for (const slot of [...chosen].sort((a, b) => a - b)) {
      await fh.write(mixedBlock(rnd() < 0.5 ? 'random' : 'text', chunk, rnd), 0, chunk, slot * chunk);
    }
  } finally {
    await fh.close();
  }
  await adoptHostFile(file);
  return { allocated: want * chunk };
}

/** Allocated bytes of a file (st_blocks × 512). */
export async function allocatedBytes(file: string): Promise<number> {
  return (await stat(file)).blocks * 512;
}
