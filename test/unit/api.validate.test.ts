/**
 * The plan command's validator is the CRD itself (schema by ajv, CEL rules by cel-js); the real
 * API server's verdicts on the same documents are compared in test/e2e/validation.test.ts.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { crdSchema, validateMigrationManifest } from '../../src/api/validate.js';

const ROOT = resolve(import.meta.dirname, '../..');
const m = (spec: unknown) => ({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name: 'x', namespace: 'n' }, spec });

describe('validateMigrationManifest', () => {
  it('accepts the shipped example and applies the CRD defaults', () => {
    const r = validateMigrationManifest(parse(readFileSync(resolve(ROOT, 'manifests/examples/migration.yaml'), 'utf8')));
    expect(r.ok).toBe(true);
    if (r.ok) expect(r.migration.spec).toMatchObject({ strategy: 'Rolling', transfer: { precopy: false, compression: 'None' }, paused: false });
    // live stays absent for Rolling: the CRD gives it no default
    if (r.ok) expect(r.migration.spec.live).toBeUndefined();
  });
  it('reports every problem with the field path the API server uses', () => {
    const r = validateMigrationManifest(m({ environments: ['ok', 'Bad!'], targetHost: 'h2', strategy: 'X', drain: { timeout: '10' } }));
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.problems).toContain(`spec.environments[1]: Invalid value: "Bad!": should match '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$'`);
      expect(r.problems.some((p) => p.startsWith('spec.strategy: Unsupported value: "X"'))).toBe(true);
      expect(r.problems.some((p) => p.startsWith('spec.drain.timeout: Invalid value: "10"'))).toBe(true);
    }
  });
  it('evaluates CEL rules, skipping transition rules (no stored object)', () => {
    expect(validateMigrationManifest(m({ environments: ['a'], targetHost: 'h2', nodeReadyTimeout: '9s' }))).toEqual({ ok: false, problems: ['spec.nodeReadyTimeout: Invalid value: spec.nodeReadyTimeout must be at least 10s'] });
    expect(validateMigrationManifest(m({ environments: ['a'], targetHost: 'h2', nodeReadyTimeout: '1m' })).ok).toBe(true);
    const rules = JSON.stringify(crdSchema()).match(/oldSelf/g) ?? [];
    expect(rules.length).toBeGreaterThan(0);
  });
  it('refuses a wrong kind or apiVersion, and ignores status on create', () => {
    expect(validateMigrationManifest({ ...m({ environments: ['a'], targetHost: 'h2' }), kind: 'Pod' })).toMatchObject({ ok: false, problems: ['kind must be VMMigration'] });
    expect(validateMigrationManifest({ ...m({ environments: ['a'], targetHost: 'h2' }), status: { plan: [{ from: 'a', to: 'a' }] } }).ok).toBe(true);
    expect(validateMigrationManifest('spec: {}')).toMatchObject({ ok: false });
  });
});
