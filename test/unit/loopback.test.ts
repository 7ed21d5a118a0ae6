import { describe, expect, it } from 'vitest';
import { LOOPBACK, overlappingRanges } from '../world/loopback.js';

describe('test-world loopback addresses', () => {
  it('give every file its own range, so that the lanes of scripts/test.sh can run side by side', () => {
    expect(overlappingRanges()).toEqual([]);
    expect(Object.keys(LOOPBACK).length).toBeGreaterThan(10);
  });

  it('names a clash and an address outside 127.0.0.2–254', () => {
    expect(overlappingRanges({ a: { first: 30, count: 4 }, b: { first: 32, count: 2 }, c: { first: 254, count: 2 } })).toEqual([
      'a and b share 127.0.0.32',
      'a and b share 127.0.0.33',
      'c: 127.0.0.255 is not a usable test address',
    ]);
  });
});
