/**
 * Guest text (pod names, API error bodies, etcd member names) is bounded and made harmless before it
 * reaches status, Events, the journal and a terminal.
 */
import { describe, expect, it } from 'vitest';
import { history } from '../../src/cli/history.js';
import { Store } from '../../src/store/store.js';
import { boundedStrings, boundedText } from '../../src/util/text.js';

describe('boundedText', () => {
  it('shows control characters as \\xNN (an escape sequence never reaches a terminal) and keeps newlines and tabs', () => {
    expect(boundedText('pod \u001b[2J\u001b]0;owned\u0007 ok\u007f\u009b\tx\ny')).toBe('pod \\x1b[2J\\x1b]0;owned\\x07 ok\\x7f\\x9b\tx\ny');
  });

  it('cuts what is longer than its bound and says how much it cut', () => {
    const t = boundedText('p'.repeat(5000), 1024);
    expect(t.startsWith('p'.repeat(1024))).toBe(true);
    expect(t).toMatch(/… \(3976 more characters\)$/);
  });

  it('bounds every string of a status, however deep (a 10 MiB eviction answer stays ~1 KiB)', () => {
    const status = { phase: 'Running', vms: [{ name: 'node-1', message: `eviction refused: ${'x'.repeat(10 << 20)}` }], conditions: [{ type: 'Ready', message: 'ok', observedGeneration: 3 }] };
    const b = boundedStrings(status);
    expect(JSON.stringify(b).length).toBeLessThan(2000);
    expect(b.conditions[0]).toEqual({ type: 'Ready', message: 'ok', observedGeneration: 3 });
    expect(b.vms[0]?.name).toBe('node-1');
  });
});

describe('the journal and history', () => {
  it('a step message with escape sequences and 100 KiB of pod names is stored bounded and printed escaped', async () => {
    const store = await Store.open(':memory:');
    await store.journal('u', 'e', 'node-1', 'drain', 'begin', { migration: 'ns/m' });
    await store.journal('u', 'e', 'node-1', 'drain', 'fail', { message: `refused: \u001b]0;pwned\u0007 ${'ns/pod-x, '.repeat(10_000)}` });
    const printed: string[] = [];
    await history(store, 'u', (l) => printed.push(l));
    const line = printed.find((l) => l.includes('drain'))!;
    expect(line.includes('\u001b')).toBe(false);
    expect(line).toContain('\\x1b]0;pwned\\x07');
    expect(line.length).toBeLessThan(2300);
    await store.close();
  });
});
