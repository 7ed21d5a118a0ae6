/**
 * The Argo CD health check (manifests/argocd/vmmigration-health.lua), run by real Lua 5.1 and 5.4
 * interpreters on VMMigration objects the operator wrote in test runs (test/fixtures/vmmigration/,
 * captured from test/integration/inCluster.test.ts and test/e2e/migration.test.ts, which also run
 * it on the live objects).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { VMMigration } from '../../src/api/types.js';
import { argoHealth, toLua } from '../world/argoHealth.js';

const DIR = join(import.meta.dirname, '../fixtures/vmmigration');
const fixture = (name: string) => JSON.parse(readFileSync(join(DIR, `${name}.json`), 'utf8')) as VMMigration;

const EXPECTED: Record<string, { status: string; message: RegExp }> = {
  'failed-invalid-reference': { status: 'Degraded', message: /unknown environment "env-9"/ },
  'succeeded-dry-run': { status: 'Healthy', message: /^dry run: 1 VM\(s\) would move to h2$/ },
  'running-7vm-move': { status: 'Progressing', message: /^Running: \d\/7 VM\(s\) done, moving student-42\/\S+$/ },
  'succeeded-7vm-move': { status: 'Healthy', message: /^7 VM\(s\) now run on host02$/ },
};

describe('Argo CD health of real VMMigration objects (lua5.1 as in Argo CD, and lua5.4)', () => {
  const files = readdirSync(DIR).filter((f) => f.endsWith('.json')).map((f) => f.replace(/\.json$/, '')).sort();
  it('every captured object has an expectation', () => {
    for (const f of files) expect(EXPECTED[f], f).toBeDefined();
    expect(files).toEqual(expect.arrayContaining(['failed-invalid-reference', 'succeeded-dry-run']));
  });
  for (const name of files) {
    it(`${name} → ${EXPECTED[name]?.status}`, async () => {
      const h = await argoHealth(fixture(name));
      expect(h.status).toBe(EXPECTED[name]!.status);
      expect(h.message).toMatch(EXPECTED[name]!.message);
    });
  }

  it('a spec change the operator has not observed yet is Progressing, whatever the old phase said', async () => {
    const o = fixture('failed-invalid-reference');
    o.metadata.generation = 2;
    expect(await argoHealth(o)).toEqual({ status: 'Progressing', message: 'Waiting for the operator to act on generation 2 (status is for 1)' });
  });

  it('paused is Suspended; no status yet is Progressing', async () => {
    const o = fixture('succeeded-dry-run');
    o.status = { ...o.status, phase: 'Paused', progress: '0/1' };
    o.status.conditions = o.status.conditions?.filter((c) => c.type !== 'Ready');
    expect(await argoHealth(o)).toEqual({ status: 'Suspended', message: 'Paused (spec.paused): 0/1 VM(s) done' });
    expect((await argoHealth({ ...o, status: undefined })).status).toBe('Progressing');
  });

  it('strings reach Lua intact (quotes, backslashes, newlines, UTF-8)', async () => {
    const o = fixture('failed-invalid-reference');
    const nasty = 'a "b" \\ c\nd → é 1\x002';
    o.status!.conditions!.find((c) => c.type === 'Ready')!.message = nasty;
    expect((await argoHealth(o)).message).toBe(nasty);
    expect(toLua({ a: [1, 2.5, true, null] })).toBe('{["a"] = {1, 2.5000000000000000, true, nil}}');
  });
});
