import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { KubeConfig, type KubernetesListObject, type V1ConfigMap } from '@kubernetes/client-node';
import { ResilientInformer, type InformerFactory, type ResilientInformerOptions } from '../../src/controller/runtime/informer.js';

type Verb = 'add' | 'update' | 'delete' | 'connect' | 'error';

/** Minimal stand-in for client-node's ListWatch with the same callback contract. */
class FakeListWatch {
  cbs: Record<Verb, Array<(x?: unknown) => void>> = { add: [], update: [], delete: [], connect: [], error: [] };
  stopped = false;
  constructor(
    readonly path: string,
    private readonly listFn: () => Promise<KubernetesListObject<V1ConfigMap>>,
  ) {}
  on(verb: Verb, cb: (x?: unknown) => void): void {
    this.cbs[verb].push(cb);
  }
  off(): void {}
  async start(): Promise<void> {
    this.cbs.connect.forEach((c) => c());
    try {
      const l = await this.listFn();
      for (const o of l.items) this.cbs.add.forEach((c) => c(o));
    } catch (err) {
      this.cbs.error.forEach((c) => c(err));
    }
  }
  async stop(): Promise<void> {
    this.stopped = true;
  }
  fire(verb: Verb, x?: unknown): void {
    this.cbs[verb].forEach((c) => c(x));
  }
}

let rv = 100;
function cm(name: string, data = 'v'): V1ConfigMap {
  return { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name, namespace: 'ns', resourceVersion: String(++rv) }, data: { k: data } };
}

interface Harness {
  informer: ResilientInformer<V1ConfigMap>;
  server: Map<string, V1ConfigMap>;
  gens: FakeListWatch[];
  events: string[];
  restarts: string[];
  listCalls: () => number;
  failLists: (n: number) => void;
  current: () => FakeListWatch;
}

function harness(opts: Partial<ResilientInformerOptions<V1ConfigMap>> = {}): Harness {
  const server = new Map<string, V1ConfigMap>();
  const gens: FakeListWatch[] = [];
  const events: string[] = [];
  const restarts: string[] = [];
  let calls = 0;
  let failNext = 0;
  const list = async (): Promise<KubernetesListObject<V1ConfigMap>> => {
    calls++;
    if (failNext > 0) {
      failNext--;
      throw new Error('list failed');
    }
    return { apiVersion: 'v1', kind: 'ConfigMapList', metadata: { resourceVersion: String(rv) }, items: [...server.values()] };
  };
  const factory: InformerFactory<V1ConfigMap> = (_kc, path, listFn) => {
    const f = new FakeListWatch(path, listFn);
    gens.push(f);
    return f as unknown as ReturnType<InformerFactory<V1ConfigMap>>;
  };
  const informer = new ResilientInformer<V1ConfigMap>({
    kubeConfig: new KubeConfig(),
    path: '/api/v1/namespaces/ns/configmaps',
    list,
    informerFactory: factory,
    backoff: { initialMs: 1000, maxMs: 8000, jitter: 0 },
    relistIntervalMs: 0,
    watchdogTimeoutMs: 0,
    onRestart: (r) => restarts.push(r),
    ...opts,
  });
  informer.on('add', (o) => events.push(`add ${o.metadata!.name} ${o.metadata!.resourceVersion}`));
  informer.on('update', (o) => events.push(`update ${o.metadata!.name} ${o.metadata!.resourceVersion}`));
  informer.on('delete', (o) => events.push(`delete ${o.metadata!.name}`));
  return {
    informer,
    server,
    gens,
    events,
    restarts,
    listCalls: () => calls,
    failLists: (n) => {
      failNext = n;
    },
    current: () => gens[gens.length - 1]!,
  };
}

const put = (h: Harness, o: V1ConfigMap) => h.server.set(o.metadata!.name!, o);

describe('ResilientInformer', () => {
  beforeEach(() => {
    rv = 100;
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('lists, syncs, serves list()/get() and adds timeoutSeconds to the watch path', async () => {
    const h = harness();
    put(h, cm('a'));
    put(h, cm('b'));
    expect(h.informer.hasSynced).toBe(false);
    h.informer.start();
    expect(await h.informer.waitForSync(1000)).toBe(true);
    expect(h.informer.hasSynced).toBe(true);
    expect(h.events.sort()).toEqual(['add a 101', 'add b 102']);
    expect(h.informer.list().map((o) => o.metadata!.name).sort()).toEqual(['a', 'b']);
    expect(h.informer.list('ns')).toHaveLength(2);
    expect(h.informer.list('other')).toHaveLength(0);
    expect(h.informer.get('a', 'ns')?.data?.k).toBe('v');
    expect(h.current().path).toBe('/api/v1/namespaces/ns/configmaps?timeoutSeconds=60');
    await h.informer.stop();
  });

  it('delivers watch add/update/delete, ignoring same-resourceVersion repeats', async () => {
    const h = harness();
    h.informer.start();
    await h.informer.waitForSync();
    const w = h.current();
    const a1 = cm('a');
    w.fire('add', a1);
    w.fire('update', a1); // same rv → no event
    const a2 = cm('a', 'changed');
    w.fire('update', a2);
    w.fire('delete', a2);
    w.fire('delete', a2); // already gone → no event
    expect(h.events).toEqual(['add a 101', 'update a 102', 'delete a']);
    expect(h.informer.list()).toEqual([]);
    await h.informer.stop();
  });

  it('restarts after an error with capped exponential backoff and emits only real differences on relist', async () => {
    const h = harness();
    const a = cm('a');
    const b = cm('b');
    put(h, a);
    put(h, b);
    const errors: unknown[] = [];
    h.informer.on('error', (e) => errors.push(e));
    h.informer.start();
    await h.informer.waitForSync();
    h.events.length = 0;

    // while the watch is broken: b changes, a is deleted, c is created
    h.server.delete('a');
    const b2 = cm('b', 'changed');
    put(h, b2);
    put(h, cm('c'));
    h.failLists(2); // the first two restarts fail their list too
    h.current().fire('error', new Error('watch broken'));
    expect(errors).toHaveLength(1);
    expect(h.gens).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(999);
    expect(h.gens).toHaveLength(1); // backoff 1 s
    await vi.advanceTimersByTimeAsync(1);
    expect(h.gens).toHaveLength(2); // restart #1: list fails → backoff 2 s
    await vi.advanceTimersByTimeAsync(1999);
    expect(h.gens).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.gens).toHaveLength(3); // restart #2: list fails → backoff 4 s
    await vi.advanceTimersByTimeAsync(3999);
    expect(h.gens).toHaveLength(3);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.gens).toHaveLength(4); // restart #3 succeeds
    expect(h.restarts).toEqual(['error', 'error', 'error']);
    expect(h.informer.restarts).toBe(3);
    expect(h.informer.status()).toMatchObject({ watching: true, errors: 3, restarts: 3 });
    expect(h.events.sort()).toEqual(['add c 104', 'delete a', 'update b 103']);
    // old generations were stopped
    expect(h.gens.slice(0, 3).every((g) => g.stopped)).toBe(true);
    await h.informer.stop();
  });

  it('caps the backoff and resets it after a generation was stable', async () => {
    const h = harness({ stableAfterMs: 30_000 });
    expect([0, 1, 2, 3, 4, 9].map((n) => h.informer.backoffDelay(n))).toEqual([1000, 2000, 4000, 8000, 8000, 8000]);
    h.informer.start();
    await h.informer.waitForSync();
    h.current().fire('error', new Error('x'));
    await vi.advanceTimersByTimeAsync(1000);
    expect(h.gens).toHaveLength(2);
    h.current().fire('error', new Error('x')); // failed quickly → 2 s
    await vi.advanceTimersByTimeAsync(1999);
    expect(h.gens).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1);
    expect(h.gens).toHaveLength(3);
    await vi.advanceTimersByTimeAsync(30_000); // stable for a while
    h.current().fire('error', new Error('x')); // → back to 1 s
    await vi.advanceTimersByTimeAsync(1000);
    expect(h.gens).toHaveLength(4);
    await h.informer.stop();
  });

  it('ignores and re-stops callbacks from a stale generation', async () => {
    const h = harness();
    h.informer.start();
    await h.informer.waitForSync();
    const old = h.current();
    old.fire('error', new Error('broken'));
    await vi.advanceTimersByTimeAsync(1000);
    old.stopped = false;
    old.fire('add', cm('ghost')); // late event from the dead watch
    old.fire('error', new Error('AbortError')); // what ListWatch.stop() produces
    expect(h.events).toEqual([]);
    expect(old.stopped).toBe(true);
    expect(h.informer.status().errors).toBe(1);
    await h.informer.stop();
  });

  it('watchdog restarts a watch with no activity; connects (watch timeouts) keep it alive', async () => {
    const h = harness({ watchdogTimeoutMs: 10_000 });
    h.informer.start();
    await h.informer.waitForSync();
    for (let i = 0; i < 5; i++) {
      await vi.advanceTimersByTimeAsync(6_000);
      h.current().fire('connect'); // server-side watch timeout → reconnect
    }
    expect(h.restarts).toEqual([]);
    await vi.advanceTimersByTimeAsync(12_000); // silent: stalled
    expect(h.restarts).toEqual(['stalled']);
    expect(h.gens).toHaveLength(2);
    expect(h.gens[0]!.stopped).toBe(true);
    await h.informer.stop();
  });

  it('periodic relist resyncs every object as an update and repairs missed events', async () => {
    const h = harness({ relistIntervalMs: 5_000 });
    put(h, cm('a'));
    h.informer.start();
    await h.informer.waitForSync();
    h.events.length = 0;
    await vi.advanceTimersByTimeAsync(5_000);
    expect(h.events).toEqual(['update a 101']); // resync of an unchanged object
    h.events.length = 0;
    put(h, cm('missed')); // the watch never tells us
    await vi.advanceTimersByTimeAsync(5_000);
    expect(h.events.sort()).toEqual(['add missed 102', 'update a 101']);
    expect(h.informer.status().missedEvents).toBe(1);
    expect(h.restarts).toEqual([]);
    h.server.delete('a'); // missed again on the next relist → the watch is considered broken
    await vi.advanceTimersByTimeAsync(5_000);
    expect(h.events).toContain('delete a');
    expect(h.restarts).toEqual(['missed-events']);
    await h.informer.stop();
  });

  it('a relist does not undo newer watch events that arrived while it was in flight', async () => {
    const h = harness();
    const a = cm('a');
    put(h, a);
    h.informer.start();
    await h.informer.waitForSync();
    // Simulate a slow list: snapshot taken now, watch events arrive before the response.
    const snapshot = [...h.server.values()];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const inf = h.informer as unknown as { opts: { list: () => Promise<KubernetesListObject<V1ConfigMap>> } };
    inf.opts.list = async () => {
      await gate;
      return { items: snapshot, metadata: {} };
    };
    const p = h.informer.relist();
    const a2 = cm('a', 'newer');
    h.current().fire('update', a2);
    const b = cm('b');
    h.current().fire('add', b);
    h.current().fire('delete', b);
    release();
    expect(await p).toBe(0);
    expect(h.informer.get('a', 'ns')?.data?.k).toBe('newer');
    expect(h.informer.get('b', 'ns')).toBeUndefined();
    await h.informer.stop();
  });

  it('treats a watch that reconnects in a tight loop as a failure', async () => {
    const h = harness();
    h.informer.start();
    await h.informer.waitForSync();
    for (let i = 0; i < 11; i++) h.current().fire('connect');
    expect(h.informer.status().errors).toBe(1);
    await vi.advanceTimersByTimeAsync(1000);
    expect(h.restarts).toEqual(['flapping']);
    await h.informer.stop();
  });

  it('handler exceptions do not break delivery to other handlers', async () => {
    const h = harness();
    const seen: string[] = [];
    h.informer.on('add', () => {
      throw new Error('bad handler');
    });
    h.informer.on('add', (o) => seen.push(o.metadata!.name!));
    put(h, cm('a'));
    h.informer.start();
    await h.informer.waitForSync();
    expect(seen).toEqual(['a']);
    await h.informer.stop();
  });

  it('stop() stops the current generation, pending restarts and waiters', async () => {
    const h = harness({ watchdogTimeoutMs: 1000, relistIntervalMs: 1000 });
    h.failLists(100);
    h.informer.start();
    const sync = h.informer.waitForSync();
    await vi.advanceTimersByTimeAsync(0);
    await h.informer.stop();
    expect(await sync).toBe(false);
    const n = h.gens.length;
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.gens.length).toBe(n);
  });
});
