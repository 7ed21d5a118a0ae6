/**
 * The relay's long-lived segment hasher program (HASHER), run here by the real sh, perl and openssl
 * as a host runs it; test/integration/transfer.test.ts and direct.test.ts use it over real sshd.
 */
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { opsText, type Segment } from '../../src/transfer/plan.js';
import { HASHER, HASHER_SH } from '../../src/transfer/scripts.js';

const dir = mkdtempSync(join(tmpdir(), 'vmops-hasher-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const MiB = 1024 * 1024;
const data = randomBytes(3 * MiB + 12345);
const file = join(dir, 'disk.img');
writeFileSync(file, data);
const seg = (index: number, extents: Array<[number, number]>): Segment => {
  const ex = extents.map(([offset, length]) => ({ offset, length }));
  return { index, start: ex[0]!.offset, end: ex.at(-1)!.offset + ex.at(-1)!.length, extents: ex, dataBytes: ex.reduce((n, e) => n + e.length, 0) };
};
const sha = (...parts: Buffer[]): string => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
};
const run = (path: string, sync: '0' | '1', requests: Segment[]) => spawnSync('sh', ['-c', HASHER_SH, 'relay-hasher', HASHER, path, sync], { input: opsText(requests, true) });

describe('the segment hasher', () => {
  it('answers every request in order with the sha256 of exactly its extents, across 1 MiB reads and for several extents', () => {
    const requests = [seg(7, [[0, 2 * MiB + 1]]), seg(8, [[2 * MiB + 1, MiB + 12344]]), seg(9, [[10, 20], [MiB, 5], [3 * MiB, 12345]])];
    for (const sync of ['0', '1'] as const) {
      const r = run(file, sync, requests);
      expect(r.stderr.toString()).toBe('');
      expect(r.status).toBe(0);
      const lines = r.stdout.toString().trim().split('\n');
      expect(lines).toEqual([
        `H 7 ${sha(data.subarray(0, 2 * MiB + 1))}`,
        `H 8 ${sha(data.subarray(2 * MiB + 1))}`,
        `H 9 ${sha(data.subarray(10, 30), data.subarray(MiB, MiB + 5), data.subarray(3 * MiB, 3 * MiB + 12345))}`,
      ]);
    }
  });

  it('fails loudly on an extent past the end of the file, after the answers before it and with no digest of what it read', () => {
    const r = run(file, '0', [seg(0, [[0, 100]]), seg(1, [[data.length - 10, 20]])]);
    expect(r.status).not.toBe(0);
    expect(r.stdout.toString()).toBe(`H 0 ${sha(data.subarray(0, 100))}\n`);
    expect(r.stderr.toString()).toMatch(/unexpected end of file/);
  });

  it('fails loudly when its file is missing or a request is malformed', () => {
    const missing = run(join(dir, 'missing'), '1', [seg(0, [[0, 1]])]);
    expect(missing.status).not.toBe(0);
    expect(missing.stderr.toString()).toMatch(/open .*missing/);
    const bad = spawnSync('sh', ['-c', HASHER_SH, 'relay-hasher', HASHER, file, '0'], { input: 'D 0 1\nE ;rm\n' });
    expect(bad.status).not.toBe(0);
    expect(bad.stderr.toString()).toMatch(/bad request/);
  });
});
