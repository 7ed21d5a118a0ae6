import { afterEach, describe, expect, it, vi } from 'vitest';
import { WorkQueue } from '../../src/controller/runtime/workQueue.js';

const tick = () => new Promise<void>((r) => setImmediate(r));

function deferred<T = void>() {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

describe('WorkQueue', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('deduplicates a key queued several times while waiting', async () => {
    const q = new WorkQueue({ concurrency: 2 });
    q.add('a');
    q.add('a');
    q.add('b');
    q.add('a');
    expect(q.length).toBe(2);
    const seen: string[] = [];
    const done = q.run(async (k) => {
      seen.push(k);
    });
    await q.idle();
    expect(seen.sort()).toEqual(['a', 'b']);
    expect(q.counters.adds).toBe(2);
    await q.shutdown();
    await done;
  });

  it('never processes a key concurrently with itself; a re-add during processing runs again afterwards', async () => {
    const q = new WorkQueue({ concurrency: 4 });
    let active = 0;
    let maxActive = 0;
    let runs = 0;
    const gate = deferred();
    const done = q.run(async () => {
      active++;
      maxActive = Math.max(maxActive, active);
      runs++;
      if (runs === 1) await gate.promise;
      active--;
    });
    q.add('x');
    await tick();
    expect(q.processingCount).toBe(1);
    // re-added three times while in flight: must not start a second concurrent run
    q.add('x');
    q.add('x');
    q.add('x');
    await tick();
    expect(runs).toBe(1);
    expect(q.length).toBe(0); // parked as dirty, not queued
    gate.resolve();
    await q.idle();
    expect(runs).toBe(2); // exactly one more run after the first finished
    expect(maxActive).toBe(1);
    await q.shutdown();
    await done;
  });

  it('processes distinct keys in parallel up to the concurrency limit', async () => {
    const q = new WorkQueue({ concurrency: 3 });
    let active = 0;
    let maxActive = 0;
    const gate = deferred();
    const done = q.run(async () => {
      active++;
      maxActive = Math.max(maxActive, active);
      await gate.promise;
      active--;
    });
    for (const k of ['a', 'b', 'c', 'd', 'e']) q.add(k);
    await tick();
    expect(active).toBe(3);
    expect(q.length).toBe(2);
    gate.resolve();
    await q.idle();
    expect(maxActive).toBe(3);
    await q.shutdown();
    await done;
  });

  it('requeues failing keys with per-key exponential backoff, and forgets after success', async () => {
    vi.useFakeTimers();
    const retries: number[] = [];
    const q = new WorkQueue({ baseDelayMs: 100, maxDelayMs: 1000, metrics: { retry: () => retries.push(1) } });
    const calls: number[] = [];
    let fail = 4;
    const done = q.run(async () => {
      calls.push(Date.now());
      if (fail-- > 0) throw new Error('boom');
    });
    const t0 = Date.now();
    q.add('k');
    await vi.advanceTimersByTimeAsync(0);
    expect(calls.length).toBe(1);
    expect(q.numRequeues('k')).toBe(1);
    await vi.advanceTimersByTimeAsync(99);
    expect(calls.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1); // 100
    expect(calls.length).toBe(2);
    await vi.advanceTimersByTimeAsync(200); // 300
    expect(calls.length).toBe(3);
    await vi.advanceTimersByTimeAsync(399);
    expect(calls.length).toBe(3);
    await vi.advanceTimersByTimeAsync(1); // 700
    expect(calls.length).toBe(4);
    await vi.advanceTimersByTimeAsync(800); // 1500
    expect(calls.length).toBe(5); // 4 failures then success
    expect(calls.map((c) => c - t0)).toEqual([0, 100, 300, 700, 1500]);
    expect(q.numRequeues('k')).toBe(0); // forgotten after success
    expect(retries.length).toBe(4);
    expect(q.counters.failed).toBe(4);
    await q.shutdown();
    await done;
  });

  it('caps the backoff delay', () => {
    const q = new WorkQueue({ baseDelayMs: 100, maxDelayMs: 1000 });
    expect([0, 1, 2, 3, 4, 10, 100].map((n) => q.backoffDelay(n))).toEqual([100, 200, 400, 800, 1000, 1000, 1000]);
    const j = new WorkQueue({ baseDelayMs: 100, maxDelayMs: 1000, jitter: 0.5 });
    for (let i = 0; i < 50; i++) {
      const d = j.backoffDelay(2);
      expect(d).toBeGreaterThanOrEqual(200);
      expect(d).toBeLessThanOrEqual(400);
    }
  });

  it('keeps backoff per key', async () => {
    const q = new WorkQueue({ baseDelayMs: 100 });
    q.addRateLimited('a');
    q.addRateLimited('a');
    q.addRateLimited('b');
    expect(q.numRequeues('a')).toBe(2);
    expect(q.numRequeues('b')).toBe(1);
    q.forget('a');
    expect(q.numRequeues('a')).toBe(0);
    await q.shutdown();
  });

  it('addAfter delays a key, the earliest deadline wins, and add() preempts the delay', async () => {
    vi.useFakeTimers();
    const q = new WorkQueue();
    const calls: Array<[string, number]> = [];
    const t0 = Date.now();
    const done = q.run(async (k) => {
      calls.push([k, Date.now() - t0]);
    });
    q.addAfter('a', 500);
    q.addAfter('a', 200); // earlier wins
    q.addAfter('a', 900); // later ignored
    q.addAfter('b', 300);
    q.addAfter('c', 1000);
    expect(q.delayedCount).toBe(3);
    await vi.advanceTimersByTimeAsync(199);
    expect(calls).toEqual([]);
    await vi.advanceTimersByTimeAsync(1);
    expect(calls).toEqual([['a', 200]]);
    await vi.advanceTimersByTimeAsync(100);
    expect(calls).toEqual([
      ['a', 200],
      ['b', 300],
    ]);
    q.add('c'); // immediate add cancels the pending delay
    await vi.advanceTimersByTimeAsync(0);
    await vi.advanceTimersByTimeAsync(2000);
    expect(calls).toEqual([
      ['a', 200],
      ['b', 300],
      ['c', 300],
    ]);
    await q.shutdown();
    await done;
  });

  it('honours requeueAfterMs returned by the handler', async () => {
    vi.useFakeTimers();
    const q = new WorkQueue();
    const times: number[] = [];
    const t0 = Date.now();
    const done = q.run(async () => {
      times.push(Date.now() - t0);
      return times.length < 3 ? { requeueAfterMs: 1000 } : undefined;
    });
    q.add('k');
    await vi.advanceTimersByTimeAsync(5000);
    expect(times).toEqual([0, 1000, 2000]);
    await q.shutdown();
    await done;
  });

  it('reports depth and adds through metrics hooks', async () => {
    const depths: number[] = [];
    let adds = 0;
    const q = new WorkQueue({ metrics: { depth: (n) => depths.push(n), add: () => adds++ } });
    q.add('a');
    q.add('b');
    q.add('a');
    expect(depths).toEqual([1, 2]);
    expect(adds).toBe(2);
    const done = q.run(async () => {});
    await q.idle();
    expect(depths.at(-1)).toBe(0);
    await q.shutdown();
    await done;
  });

  it('shutdown waits for in-flight work, aborts the signal, drops queued and delayed keys, ignores later adds', async () => {
    const q = new WorkQueue({ concurrency: 1 });
    const gate = deferred();
    const seen: string[] = [];
    let signalAborted = false;
    const done = q.run(async (k, signal) => {
      seen.push(k);
      if (k === 'slow') {
        await gate.promise;
        signalAborted = signal.aborted;
      }
    });
    q.add('slow');
    q.add('queued');
    q.addAfter('later', 10);
    await tick();
    let shutDown = false;
    const sd = q.shutdown().then(() => {
      shutDown = true;
    });
    await tick();
    expect(shutDown).toBe(false); // still waiting for 'slow'
    q.add('afterShutdown');
    gate.resolve();
    await sd;
    await done;
    expect(signalAborted).toBe(true);
    expect(seen).toEqual(['slow']);
    expect(q.length).toBe(0);
    expect(q.delayedCount).toBe(0);
    await new Promise((r) => setTimeout(r, 20));
    expect(seen).toEqual(['slow']);
  });

  it('shutdown with drain processes already queued keys', async () => {
    const q = new WorkQueue({ concurrency: 2 });
    const seen: string[] = [];
    q.add('a');
    q.add('b');
    q.add('c');
    const sd = q.shutdown({ drain: true });
    const done = q.run(async (k) => {
      seen.push(k);
    });
    await sd;
    await done;
    expect(seen.sort()).toEqual(['a', 'b', 'c']);
  });

  it('shutdown timeout stops waiting for a stuck handler', async () => {
    const q = new WorkQueue();
    const done = q.run(() => new Promise<void>(() => {}));
    q.add('stuck');
    await tick();
    const t = Date.now();
    await q.shutdown({ timeoutMs: 30 });
    expect(Date.now() - t).toBeGreaterThanOrEqual(25);
    void done;
  });

  it('a failing handler during steady state does not block other keys', async () => {
    const q = new WorkQueue({ baseDelayMs: 5, concurrency: 1 });
    const seen: string[] = [];
    let failed = false;
    const done = q.run(async (k) => {
      seen.push(k);
      if (k === 'bad' && !failed) {
        failed = true;
        throw new Error('first attempt fails');
      }
    });
    q.add('bad');
    q.add('good');
    await q.idle();
    expect(seen).toEqual(['bad', 'good', 'bad']);
    await q.shutdown();
    await done;
  });
});
