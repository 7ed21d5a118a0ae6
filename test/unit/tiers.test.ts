import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { orderOf, TIERS } from '../tiers.js';

const testFiles = (dir: string): string[] =>
  readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? testFiles(join(dir, e.name)) : e.name.endsWith('.test.ts') ? [join(dir, e.name)] : []));

describe('test tiers (scripts/test.sh runs them one at a time, in this order)', () => {
  it('every test file is in exactly one tier, and every listed file exists', () => {
    const files = testFiles('test');
    const owners = (f: string) => TIERS.flatMap((t) => t.files.filter((x) => f === x || (!x.endsWith('.ts') && f.startsWith(`${x}/`))).map(() => t.name));
    expect(files.filter((f) => owners(f).length !== 1).map((f) => `${f}: ${owners(f).join(', ') || 'no tier'}`)).toEqual([]);
    const listed = TIERS.flatMap((t) => t.files.filter((x) => x.endsWith('.ts')));
    expect(listed.filter((f) => !files.includes(f))).toEqual([]);
  });

  it('the order is total: no two listed files share a position; the HA end-to-end test runs last', () => {
    const listed = TIERS.flatMap((t) => t.files.filter((x) => x.endsWith('.ts')));
    expect(new Set(listed.map(orderOf)).size).toBe(listed.length);
    expect(listed.at(-1)).toBe('test/e2e/ha.test.ts');
  });
});
