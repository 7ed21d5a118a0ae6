/**
 * Deterministic test disk images: the same (size, format, seed) always gives byte-identical
 * guest-visible content, with data regions and holes, so a checksum proves a copy was faithful.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { promisify } from 'node:util';
import { adoptHostFile } from './hosts.js';

const execFileP = promisify(execFile);

export interface DiskImageOptions {
  sizeMiB: number;
  format: 'qcow2' | 'raw';
  seed: number;
  /** number of data regions written; the rest of the image stays a hole */
  regions?: number;
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
  await execFileP('qemu-io', ['-f', opts.format, ...cmds, path]);
  // Inside a test host's vmDir the image belongs to the host's (unprivileged) user, as QEMU there runs as it.
  await adoptHostFile(path);
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}
