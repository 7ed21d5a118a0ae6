/**
 * ResilientInformer driven through client-node's real makeInformer/ListWatch/Watch against a tiny fake
 * API server (node:http): checks our assumptions about how ListWatch behaves on broken, closed and
 * silent watch connections.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { CoreV1Api, KubeConfig, type V1ConfigMap } from '@kubernetes/client-node';
import { ResilientInformer } from '../../src/controller/runtime/informer.js';

class FakeApiServer {
  rv = 1;
  objects = new Map<string, V1ConfigMap>();
  watchers = new Set<ServerResponse>();
  watchQueries: URLSearchParams[] = [];
  lists = 0;
  silent = false;
  server!: Server;
  port = 0;

  async start(port = 0): Promise<void> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((r) => this.server.listen(port, '127.0.0.1', r));
    this.port = (this.server.address() as AddressInfo).port;
  }
  async stop(): Promise<void> {
    for (const w of this.watchers) w.destroy();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname !== '/api/v1/namespaces/ns/configmaps') {
      res.writeHead(404).end();
      return;
    }
    if (url.searchParams.get('watch') === 'true') {
      this.watchQueries.push(url.searchParams);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.flushHeaders();
      this.watchers.add(res);
      res.on('close', () => this.watchers.delete(res));
      return;
    }
    this.lists++;
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kind: 'ConfigMapList', apiVersion: 'v1', metadata: { resourceVersion: String(this.rv) }, items: [...this.objects.values()] }));
  }
  private send(type: string, obj: V1ConfigMap): void {
    if (this.silent) return;
    const line = JSON.stringify({ type, object: obj }) + '\n';
    for (const w of this.watchers) w.write(line);
  }
  put(name: string, value: string): void {
    const existed = this.objects.has(name);
    const obj: V1ConfigMap = { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name, namespace: 'ns', resourceVersion: String(++this.rv) }, data: { v: value } };
    this.objects.set(name, obj);
    this.send(existed ? 'MODIFIED' : 'ADDED', obj);
  }
  del(name: string): void {
    const obj = this.objects.get(name);
    if (!obj) return;
    this.objects.delete(name);
    this.send('DELETED', { ...obj, metadata: { ...obj.metadata, resourceVersion: String(++this.rv) } });
  }
  /** reset the TCP connections of all watches (network failure) */
  breakWatches(): void {
    for (const w of this.watchers) w.socket?.destroy();
  }
  /** end all watches cleanly (server-side timeout) */
  endWatches(): void {
    for (const w of this.watchers) w.end();
  }
}

function kubeConfig(port: number): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [{ name: 'fake', server: `http://127.0.0.1:${port}`, skipTLSVerify: true }],
    users: [{ name: 'u' }],
    contexts: [{ name: 'fake', cluster: 'fake', user: 'u' }],
    currentContext: 'fake',
  });
  return kc;
}

async function until(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

let api: FakeApiServer | undefined;
let informer: ResilientInformer<V1ConfigMap> | undefined;
afterEach(async () => {
  await informer?.stop();
  await api?.stop();
  informer = api = undefined;
});

async function setup(opts: { watchdogTimeoutMs?: number } = {}) {
  api = new FakeApiServer();
  await api.start();
  const kc = kubeConfig(api.port);
  const core = kc.makeApiClient(CoreV1Api);
  const events: string[] = [];
  const restarts: string[] = [];
  informer = new ResilientInformer<V1ConfigMap>({
    kubeConfig: kc,
    path: '/api/v1/namespaces/ns/configmaps',
    list: () => core.listNamespacedConfigMap({ namespace: 'ns' }),
    watchTimeoutSeconds: 30,
    watchdogTimeoutMs: opts.watchdogTimeoutMs ?? 0,
    relistIntervalMs: 0,
    backoff: { initialMs: 50, maxMs: 200, jitter: 0 },
    onRestart: (r) => restarts.push(r),
  });
  informer.on('add', (o) => events.push(`add ${o.metadata!.name}=${o.data!.v}`));
  informer.on('update', (o) => events.push(`update ${o.metadata!.name}=${o.data!.v}`));
  informer.on('delete', (o) => events.push(`delete ${o.metadata!.name}`));
  return { api, informer, events, restarts };
}

describe('ResilientInformer over client-node ListWatch (fake API server)', () => {
  it('lists, watches with timeoutSeconds, and delivers add/update/delete', async () => {
    const { api, informer, events } = await setup();
    api.put('a', '1');
    informer.start();
    expect(await informer.waitForSync(5000)).toBe(true);
    await until(() => api.watchers.size === 1);
    expect(api.watchQueries[0]!.get('timeoutSeconds')).toBe('30');
    expect(api.watchQueries[0]!.get('resourceVersion')).toBe(String(api.rv));
    api.put('b', '1');
    api.put('a', '2');
    api.del('b');
    await until(() => events.length === 4);
    expect(events).toEqual(['add a=1', 'add b=1', 'update a=2', 'delete b']);
  });

  it('a cleanly ended watch is resumed by ListWatch itself from the last resourceVersion (no relist, no restart)', async () => {
    const { api, informer, events, restarts } = await setup();
    informer.start();
    await informer.waitForSync(5000);
    await until(() => api.watchers.size === 1);
    api.put('a', '1');
    await until(() => events.length === 1);
    const rvBefore = String(api.rv);
    api.endWatches();
    await until(() => api.watchQueries.length === 2 && api.watchers.size === 1);
    expect(api.watchQueries[1]!.get('resourceVersion')).toBe(rvBefore);
    expect(api.lists).toBe(1);
    expect(restarts).toEqual([]);
    api.put('a', '2');
    await until(() => events.length === 2);
  });

  it('a reset watch connection (ListWatch gives up) is restarted with a relist that repairs missed changes', async () => {
    const { api, informer, events, restarts } = await setup();
    api.put('keep', '1');
    api.put('gone', '1');
    informer.start();
    await informer.waitForSync(5000);
    await until(() => api.watchers.size === 1);
    api.silent = true; // the following changes are never sent on the (about to break) watch
    api.put('keep', '2');
    api.del('gone');
    api.put('new', '1');
    api.silent = false;
    api.breakWatches();
    await until(() => restarts.length >= 1 && api.watchers.size === 1);
    await until(() => events.length === 5);
    expect(events.slice(2).sort()).toEqual(['add new=1', 'delete gone', 'update keep=2']);
    expect(restarts[0]).toBe('error');
    expect(api.lists).toBe(2);
    api.put('after', '1');
    await until(() => events.includes('add after=1'));
  });

  it('an unreachable API server is retried with backoff until it comes back', async () => {
    const { api, informer, events, restarts } = await setup();
    const port = api.port;
    await api.stop();
    informer.start();
    await until(() => restarts.length >= 3, 5000);
    expect(informer.hasSynced).toBe(false);
    expect(informer.status().consecutiveFailures).toBeGreaterThanOrEqual(3);
    // the API server comes back on the same address
    const again = new FakeApiServer();
    again.put('x', '1');
    await again.start(port);
    try {
      expect(await informer.waitForSync(5000)).toBe(true);
      expect(events).toEqual(['add x=1']);
      await until(() => again.watchers.size === 1);
    } finally {
      await informer.stop();
      await again.stop();
    }
  });

  it('the watchdog restarts a watch that went silent', async () => {
    const { api, informer, events, restarts } = await setup({ watchdogTimeoutMs: 400 });
    informer.start();
    await informer.waitForSync(5000);
    await until(() => api.watchers.size === 1);
    api.silent = true; // connection stays open but nothing arrives any more (half-open TCP)
    api.put('a', '1');
    await until(() => restarts.includes('stalled'), 3000);
    await until(() => events.includes('add a=1'));
    api.silent = false;
  });
});
