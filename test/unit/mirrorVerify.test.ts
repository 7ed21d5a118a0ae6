import { describe, expect, it } from 'vitest';
import type { Hypervisor } from '../../src/hosts/hypervisor.js';
import { changedSincePrepass, dirtyExtents, mergeRanges, type Prepass } from '../../src/transfer/mirrorVerify.js';
import { fakeQemu } from './fakeQmp.js';

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

describe('reading what the guest wrote since the pre-pass (inside the downtime)', () => {
  const prepass: Prepass = {
    ms: 1000,
    disks: [{ file: 'disk0.qcow2', device: 'virtio0', nodeName: 'fmt0', format: 'qcow2', virtualSize: 64 * MiB, targetSocket: '/t/nbd.sock', mismatched: [3], hashedBytes: 32 * MiB }],
  };
  const nodes = (count: unknown) => [{ 'node-name': 'fmt0', 'dirty-bitmaps': [{ name: 'vmops-verify', count, granularity: 65536 }] }, { 'node-name': 'other' }];
  const source = (maps: string[]) => {
    const calls: string[][] = [];
    const hv = { host: { name: 'h1' }, conn: { execOk: async (argv: string[]) => { calls.push(argv); return Buffer.from(maps.join('')); } }, removeFile: async () => undefined };
    return { hv: hv as unknown as Hypervisor, calls };
  };

  it('QEMU counts no dirty byte: no NBD export, no host command; only the chunks the pre-pass found unequal are compared', async () => {
    const { qmp, commands } = await fakeQemu({ 'query-named-block-nodes': nodes(0) });
    const src = source([]);
    const changed = await changedSincePrepass({ qmp, source: src.hv, srcDir: '/s', prepass });
    expect(changed?.bitmapRead).toBe('count');
    expect(changed?.disks[0]?.ranges).toEqual([[12 * MiB, 4 * MiB]]);
    expect(commands).not.toContain('block-export-add');
    expect(src.calls).toEqual([]);
    qmp.close();
  });

  it('dirty bytes counted, or a count QEMU does not give: the bitmap is read over NBD', async () => {
    for (const count of [65536, undefined]) {
      const { qmp, commands } = await fakeQemu({ 'query-named-block-nodes': nodes(count) });
      const src = source(['[{ "start": 0, "length": 1048576, "data": true},{ "start": 1048576, "length": 65536, "data": false}]\n', '--\n']);
      const changed = await changedSincePrepass({ qmp, source: src.hv, srcDir: '/s', prepass });
      expect(changed?.bitmapRead).toBe('export');
      expect(changed?.disks[0]?.ranges).toEqual([[MiB, 65536], [12 * MiB, 4 * MiB]]);
      expect(commands).toContain('block-export-add');
      expect(src.calls).toHaveLength(1);
      qmp.close();
    }
  });
});
