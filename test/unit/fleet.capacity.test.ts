import { describe, expect, it } from 'vitest';
import { parseCapacity } from '../../src/hosts/capacity.js';

describe('parseCapacity', () => {
  it('reads the script output, ignoring directories that are not environment names', () => {
    const c = parseCapacity('host02', 'memkb 24684096 23000000\ncpus 2\ndisk 82678120448\nenv 16797696 env-a\nenv 4096 lost+found\nenv 12 Bad Name\n');
    expect(c).toEqual({ host: 'host02', memTotalBytes: 24684096 * 1024, memAvailableBytes: 23000000 * 1024, cpus: 2, diskFreeBytes: 82678120448, environmentBytes: { 'env-a': 16797696 } });
  });
  it('refuses a reading that lacks a figure instead of planning with NaN', () => {
    expect(() => parseCapacity('host02', 'memkb 1 1\ncpus 2\n')).toThrow('host host02: could not read its free disk');
    expect(() => parseCapacity('host02', 'memkb 2.5e+10 1\ncpus x\ndisk 1\n')).toThrow('could not read its CPUs');
  });
});
