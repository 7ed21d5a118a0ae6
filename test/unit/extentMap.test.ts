/**
 * The extent map of a student's disk is read as qemu-img prints it and stays bounded: a fragmented
 * sparse disk (~30 MB of JSON per GiB) once ended the operator with an out-of-memory, and a cold move
 * resumes at `transfer` after every restart — a crash loop.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ExtentMap, subtractExtents, type Extent } from '../../src/transfer/plan.js';

/** every byte of `data` lies inside one of `map` (the map may also cover holes: they are read as zeros) */
const covers = (map: Extent[], data: Extent[]) => subtractExtents(data, map).length === 0;

describe('ExtentMap', () => {
  it('merges adjacent extents and keeps holes while it is small', () => {
    const m = new ExtentMap(1 << 20);
    for (const l of ['[{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0},', '{ "start": 4096, "length": 4096, "data": true},', '{ "start": 8192, "length": 8192, "data": false},', '{ "start": 16384, "length": 4096, "data": true}]']) m.line(l);
    expect(m.extents()).toEqual([{ offset: 0, length: 8192 }, { offset: 16384, length: 4096 }]);
  });

  it('a million fragments stay within the bound, and every data byte is still covered', () => {
    const max = 1000;
    const m = new ExtentMap(2 ** 40, max);
    const data: Extent[] = [];
    for (let i = 0; i < 1_000_000; i++) {
      const e = { offset: i * 65536, length: 4096 };
      data.push(e);
      m.add(e.offset, e.length);
    }
    const out = m.extents();
    expect(out.length).toBeLessThanOrEqual(max);
    expect(covers(out, data)).toBe(true);
    // bounded by widening the granule, not by giving up: far less than the whole 64 GiB span is data
    expect(out.reduce((n, e) => n + e.length, 0)).toBeLessThan(1_000_000 * 65536);
  });

  it('refuses a line that is no map entry rather than buffering it', () => {
    const m = new ExtentMap(100);
    expect(() => m.line('x'.repeat(10_000))).toThrow(/not an extent entry/);
    expect(() => m.line('{ "length": 5 }')).toThrow(/without start and length/);
  });

  it('real qemu-img: a fragmented sparse file mapped line by line matches the whole-JSON parse, and a small bound still covers its data', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmops-extents-'));
    try {
      const file = join(dir, 'frag.img');
      const fd = openSync(file, 'w');
      ftruncateSync(fd, 256 << 20);
      const block = Buffer.alloc(4096, 0xa5);
      for (let i = 0; i < 2000; i++) writeSync(fd, block, 0, block.length, i * 3 * 4096);
      closeSync(fd);
      const text = execFileSync('qemu-img', ['map', '-U', '-f', 'raw', '--output=json', file]).toString();
      const whole = (JSON.parse(text) as { start: number; length: number; data: boolean }[]).filter((e) => e.data).map((e) => ({ offset: e.start, length: e.length }));
      const streamed = new ExtentMap(256 << 20);
      for (const l of text.split('\n')) streamed.line(l);
      expect(streamed.extents()).toEqual(whole);
      const small = new ExtentMap(256 << 20, 100);
      for (const l of text.split('\n')) small.line(l);
      expect(small.extents().length).toBeLessThanOrEqual(100);
      expect(covers(small.extents(), whole)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
