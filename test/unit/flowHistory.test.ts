/** `history`: the journal read back as each VM's steps with timings, found by uid or by name. */
import { describe, expect, it } from 'vitest';
import { history } from '../../src/cli/history.js';
import { Store } from '../../src/store/store.js';

describe('history', () => {
  it('shows each VM step with its duration and outcome, by migration name or uid', async () => {
    const store = await Store.open(':memory:');
    await store.ensureMove({ migrationUid: 'u1', environment: 'e', vm: 'node-1', fromHost: 'h1', toHost: 'h2' });
    await store.journal('u1', 'e', 'node-1', 'precheck', 'begin', { migration: 'ns/move-e' });
    await store.journal('u1', 'e', 'node-1', 'precheck', 'end', { durationMs: 120 });
    await store.journal('u1', 'e', 'node-1', 'stop', 'begin');
    await store.journal('u1', 'e', 'node-1', 'stop', 'fail', { message: 'QMP unreachable' });
    await store.journal('u1', 'e', 'node-1', 'rollback', 'begin');
    const byName: string[] = [];
    expect(await history(store, 'move-e', (l) => byName.push(l))).toBe(true);
    expect(byName[0]).toBe('migration u1');
    expect(byName[1]).toMatch(/e\/node-1 +Pending h1 → h2, attempts 0/);
    expect(byName[2]).toMatch(/precheck +done +0\.12 s$/);
    expect(byName[3]).toMatch(/stop +failed .* QMP unreachable$/);
    expect(byName[4]).toMatch(/rollback +running/);
    const byUid: string[] = [];
    expect(await history(store, 'u1', (l) => byUid.push(l))).toBe(true);
    expect(byUid).toEqual(byName);
    expect(await history(store, 'nope', () => undefined)).toBe(false);
  });
});
