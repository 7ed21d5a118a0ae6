import type { V1Pod } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { decidePod, selectorMatches, type DrainPolicy } from '../../src/guest/drain.js';
import { settingsFrom } from '../../src/api/types.js';

const NOW = Date.parse('2026-01-01T00:00:00Z');
const owner = (kind: string, apiVersion = kind === 'DaemonSet' || kind === 'ReplicaSet' ? 'apps/v1' : 'batch/v1') => ({ kind, apiVersion, name: 'o', uid: 'u', controller: true });

function pod(opts: { owner?: string; ownerApiVersion?: string; mirror?: boolean; emptyDir?: boolean; phase?: string; deletedSecondsAgo?: number } = {}): V1Pod {
  return {
    metadata: {
      name: 'p',
      namespace: 'ns',
      ownerReferences: opts.owner ? [owner(opts.owner, opts.ownerApiVersion)] : undefined,
      annotations: opts.mirror ? { 'kubernetes.io/config.mirror': 'hash' } : undefined,
      deletionTimestamp: opts.deletedSecondsAgo === undefined ? undefined : new Date(NOW - opts.deletedSecondsAgo * 1000),
    },
    spec: { containers: [], volumes: opts.emptyDir ? [{ name: 'v', emptyDir: {} }] : [] },
    status: { phase: opts.phase ?? 'Running' },
  };
}

const decide = (p: V1Pod, policy: DrainPolicy = {}, dsExists = true) => decidePod(p, policy, async () => dsExists, NOW);

describe('decidePod: kubectl drain filters in kubectl order', () => {
  it('evicts a ReplicaSet pod without warning', async () => {
    expect(await decide(pod({ owner: 'ReplicaSet' }))).toEqual({ action: 'evict' });
  });

  it('DaemonSet pods: refused by default, skipped with ignoreDaemonSets; a finished one goes on through the filters', async () => {
    expect(await decide(pod({ owner: 'DaemonSet' }))).toMatchObject({ action: 'refuse', reason: expect.stringContaining('DaemonSet') });
    expect(await decide(pod({ owner: 'DaemonSet' }), { ignoreDaemonSets: true })).toEqual({ action: 'skip', reason: 'daemonset' });
    expect(await decide(pod({ owner: 'DaemonSet', phase: 'Succeeded' }))).toEqual({ action: 'evict' });
    // DaemonSet gone: only force removes its orphan, ignoreDaemonSets does not help (kubectl's daemonSetFilter)
    expect(await decide(pod({ owner: 'DaemonSet' }), { ignoreDaemonSets: true }, false)).toMatchObject({ action: 'refuse' });
    expect(await decide(pod({ owner: 'DaemonSet' }), { force: true }, false)).toMatchObject({ action: 'evict' });
    // kind DaemonSet of another API group is not a DaemonSet to kubectl
    expect(await decide(pod({ owner: 'DaemonSet', ownerApiVersion: 'example.com/v1' }))).toEqual({ action: 'evict' });
  });

  it('mirror pods are skipped, before the emptyDir and unmanaged checks', async () => {
    expect(await decide(pod({ mirror: true, emptyDir: true }))).toEqual({ action: 'skip', reason: 'mirror' });
  });

  it('emptyDir pods: refused unless deleteEmptyDirData; finished ones may go', async () => {
    expect(await decide(pod({ owner: 'ReplicaSet', emptyDir: true }))).toMatchObject({ action: 'refuse', reason: expect.stringContaining('local storage') });
    expect(await decide(pod({ owner: 'ReplicaSet', emptyDir: true }), { deleteEmptyDirData: true })).toMatchObject({ action: 'evict', warning: expect.stringContaining('local storage') });
    expect(await decide(pod({ owner: 'ReplicaSet', emptyDir: true, phase: 'Failed' }))).toEqual({ action: 'evict' });
  });

  it('pods without a controller: refused unless force; finished ones may go', async () => {
    expect(await decide(pod())).toMatchObject({ action: 'refuse', reason: expect.stringContaining('no controller') });
    expect(await decide(pod(), { force: true })).toMatchObject({ action: 'evict', warning: expect.stringContaining('no controller') });
    expect(await decide(pod({ phase: 'Succeeded', emptyDir: true }))).toEqual({ action: 'evict' });
  });

  it('pods deleted longer ago than skipWaitForDeleteTimeoutSeconds are skipped first of all; 0 never skips', async () => {
    expect(await decide(pod({ deletedSecondsAgo: 30 }), { skipWaitForDeleteTimeoutSeconds: 10 })).toEqual({ action: 'skip', reason: 'deleted' });
    expect(await decide(pod({ deletedSecondsAgo: 5, owner: 'ReplicaSet' }), { skipWaitForDeleteTimeoutSeconds: 10 })).toEqual({ action: 'evict' });
    expect(await decide(pod({ deletedSecondsAgo: 3000, owner: 'ReplicaSet' }))).toEqual({ action: 'evict' });
  });
});

describe('selectorMatches (PDB → pods)', () => {
  it('matchLabels and matchExpressions; an empty selector selects all, none selects nothing', () => {
    const labels = { app: 'db', tier: 'data' };
    expect(selectorMatches({ matchLabels: { app: 'db' } }, labels)).toBe(true);
    expect(selectorMatches({ matchLabels: { app: 'web' } }, labels)).toBe(false);
    expect(selectorMatches({ matchExpressions: [{ key: 'tier', operator: 'In', values: ['data', 'cache'] }] }, labels)).toBe(true);
    expect(selectorMatches({ matchExpressions: [{ key: 'tier', operator: 'NotIn', values: ['data'] }] }, labels)).toBe(false);
    expect(selectorMatches({ matchExpressions: [{ key: 'x', operator: 'DoesNotExist' }, { key: 'app', operator: 'Exists' }] }, labels)).toBe(true);
    expect(selectorMatches({}, labels)).toBe(true);
    expect(selectorMatches(undefined, labels)).toBe(false);
  });
});

describe('drain defaults', () => {
  it("are kubectl's, except ignoreDaemonSets", () => {
    const s = settingsFrom({ targetHost: 'h', environments: ['e'] });
    expect(s).toMatchObject({ drainGracePeriodSeconds: -1, deleteEmptyDirData: false, drainForce: false, drainIgnoreDaemonSets: true, drainSkipWaitForDeleteTimeoutSeconds: 0 });
  });
});
