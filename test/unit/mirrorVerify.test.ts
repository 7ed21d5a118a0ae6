import { describe, expect, it } from 'vitest';
import { dirtyExtents, mergeRanges } from '../../src/transfer/mirrorVerify.js';

const MiB = 1024 * 1024;

describe('incremental mirror verification: which ranges the cut-over compares', () => {
  it('reads dirty extents from qemu-img map over x-dirty-bitmap (dirty is reported as "data": false)', () => {
    // output of qemu-img 7.2 for a bitmap with 64 KiB at 1 MiB and 256 KiB at 10 MiB dirty
    const map = `[{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0},
{ "start": 1048576, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 1114112, "length": 9371648, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1114112},
{ "start": 10485760, "length": 262144, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 10747904, "length": 56360960, "depth": 0, "present": true, "zero": false, "data": true, "offset": 10747904}]`;
    expect(dirtyExtents(map)).toEqual([[MiB, 65536], [10 * MiB, 262144]]);
  });

  it('merges mismatched chunks and dirty extents, joins near neighbours, clips to the disk', () => {
    const size = 64 * MiB + 4096;
    // chunk 1 (4–8 MiB) differed; dirty blocks inside it, right after it (within the gap) and far away; the last chunk is short
    const r = mergeRanges([1, 16], [[5 * MiB, 65536], [8 * MiB + 512 * 1024, 65536], [40 * MiB, 65536]], size, 4 * MiB, MiB);
    expect(r).toEqual([
      [4 * MiB, 4 * MiB + 512 * 1024 + 65536],
      [40 * MiB, 65536],
      [64 * MiB, 4096],
    ]);
  });

  it('nothing changed and nothing differed: nothing to compare', () => {
    expect(mergeRanges([], [], 64 * MiB)).toEqual([]);
  });
});
