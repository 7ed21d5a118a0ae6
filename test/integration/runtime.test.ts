/**
 * Runtime pieces against a real kube-apiserver (test/world/controlPlane.ts):
 * Lease leader election between two electors, and ResilientInformer on ConfigMaps.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CoordinationV1Api, CoreV1Api, KubeConfig, type V1ConfigMap } from '@kubernetes/client-node';
import { startControlPlane } from '../world/controlPlane.js';
import { LeaseLeaderElector } from '../../src/controller/runtime/leaderElection.js';
import { ResilientInformer } from '../../src/controller/runtime/informer.js';

type ControlPlane = Awaited<ReturnType<typeof startControlPlane>>;

let cp: ControlPlane;
let kc: KubeConfig;
let dataDir: string;
const NS = 'default';

async function until(cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Raw TCP proxy in front of the API server so the test can cut or freeze the informer's connections. */
class TcpProxy {
  private server!: Server;
  private readonly pairs = new Set<[Socket, Socket]>();
  frozen = false;
  port = 0;
  constructor(
    private readonly target: { host: string; port: number },
    private readonly listenHost: string,
  ) {}
  async start(): Promise<void> {
    this.server = createServer((client) => {
      const upstream = connect(this.target.port, this.target.host);
      const pair: [Socket, Socket] = [client, upstream];
      this.pairs.add(pair);
      const forward = (from: Socket, to: Socket) =>
        from.on('data', (d) => {
          if (!this.frozen) to.write(d);
        });
      forward(client, upstream);
      forward(upstream, client);
      const close = () => {
        client.destroy();
        upstream.destroy();
        this.pairs.delete(pair);
      };
      client.on('error', close).on('close', close);
      upstream.on('error', close).on('close', close);
    });
    await new Promise<void>((r) => this.server.listen(0, this.listenHost, r));
    this.port = (this.server.address() as AddressInfo).port;
  }
  /** reset every proxied connection */
  breakAll(): void {
    for (const [a, b] of this.pairs) {
      a.resetAndDestroy();
      b.destroy();
    }
  }
  /** silently drop traffic on existing connections (half-open TCP); new connections work */
  freezeExisting(): void {
    for (const [a, b] of this.pairs) {
      for (const s of [a, b]) {
        for (const ev of ['data', 'close', 'error', 'end']) s.removeAllListeners(ev);
        s.on('error', () => {});
      }
    }
  }
  async stop(): Promise<void> {
    this.breakAll();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

/** The same credentials, but talking to the API server through the proxy (same host name, so TLS still verifies). */
function viaProxy(proxyPort: number): KubeConfig {
  const kc2 = new KubeConfig();
  kc2.loadFromString(cp.kubeconfigYaml);
  const current = kc2.getCurrentCluster()!;
  const url = new URL(current.server);
  url.port = String(proxyPort);
  kc2.clusters = kc2.clusters.map((c) => (c.name === current.name ? { ...c, server: url.origin } : c));
  return kc2;
}

beforeAll(async () => {
  dataDir = mkdtempSync(join(tmpdir(), 'vmops-runtime-it-'));
  cp = await startControlPlane({ dataDir });
  kc = new KubeConfig();
  kc.loadFromString(cp.kubeconfigYaml);
});

afterAll(async () => {
  await cp?.stop();
  rmSync(dataDir, { recursive: true, force: true });
});

describe('LeaseLeaderElector against kube-apiserver', () => {
  it('only one of two electors leads; release hands over to the other', async () => {
    const log: string[] = [];
    const mk = (id: string) =>
      new LeaseLeaderElector({
        kubeConfig: kc,
        namespace: NS,
        name: 'runtime-it-leader',
        identity: id,
        // generous: under a fresh-clone run's load one renewal took over a 3 s renewDeadline, and the
        // elector rightly stepped down before the release this test is about
        leaseDurationSeconds: 20,
        renewDeadlineSeconds: 15,
        retryPeriodSeconds: 0.5,
        onStartedLeading: () => void log.push(`${id} start`),
        onStoppedLeading: (r) => void log.push(`${id} stop ${r}`),
      });
    const a = mk('a');
    const b = mk('b');
    a.start();
    await until(() => a.isLeader);
    b.start();
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 250));
      expect(a.isLeader && b.isLeader).toBe(false);
      expect(a.isLeader).toBe(true);
    }
    expect(b.leader).toBe('a');
    const lease = await kc.makeApiClient(CoordinationV1Api).readNamespacedLease({ name: 'runtime-it-leader', namespace: NS });
    expect(lease.spec?.holderIdentity).toBe('a');

    const releasedAt = Date.now();
    await a.release();
    const released = await kc.makeApiClient(CoordinationV1Api).readNamespacedLease({ name: 'runtime-it-leader', namespace: NS });
    expect(released.spec?.holderIdentity || undefined).toBeUndefined();
    await until(() => b.isLeader, 10_000);
    expect(Date.now() - releasedAt).toBeLessThan(10_000); // well before the 20 s lease would have expired: no need to wait for it
    expect(log).toEqual(['a start', 'a stop stopped', 'b start']);
    await b.stop();
  });
});

describe('ResilientInformer against kube-apiserver', () => {
  it('sees add/update/delete, and recovers after its watch is broken', async () => {
    const core = kc.makeApiClient(CoreV1Api);
    const target = new URL(kc.getCurrentCluster()!.server);
    const proxy = new TcpProxy({ host: target.hostname, port: Number(target.port || 443) }, target.hostname.replace(/^\[|\]$/g, ''));
    await proxy.start();
    const pkc = viaProxy(proxy.port);
    const pcore = pkc.makeApiClient(CoreV1Api);
    const events: string[] = [];
    const restarts: string[] = [];
    const informer = new ResilientInformer<V1ConfigMap>({
      kubeConfig: pkc,
      path: `/api/v1/namespaces/${NS}/configmaps`,
      list: () => pcore.listNamespacedConfigMap({ namespace: NS, labelSelector: 'runtime-it=yes' }),
      labelSelector: 'runtime-it=yes',
      watchTimeoutSeconds: 5,
      watchdogTimeoutMs: 12_000,
      relistIntervalMs: 0,
      backoff: { initialMs: 100, maxMs: 1000 },
      onRestart: (r) => restarts.push(r),
    });
    const label = { 'runtime-it': 'yes' };
    informer.on('add', (o) => events.push(`add ${o.metadata!.name}=${o.data?.v}`));
    informer.on('update', (o) => events.push(`update ${o.metadata!.name}=${o.data?.v}`));
    informer.on('delete', (o) => events.push(`delete ${o.metadata!.name}`));
    await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'pre', labels: label }, data: { v: '1' } } });
    informer.start();
    expect(await informer.waitForSync(10_000)).toBe(true);
    expect(events).toEqual(['add pre=1']);

    await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'c1', labels: label }, data: { v: '1' } } });
    await until(() => events.includes('add c1=1'));
    await core.replaceNamespacedConfigMap({ name: 'c1', namespace: NS, body: { metadata: { name: 'c1', labels: label }, data: { v: '2' } } });
    await until(() => events.includes('update c1=2'));
    await core.deleteNamespacedConfigMap({ name: 'c1', namespace: NS });
    await until(() => events.includes('delete c1'));

    // Survives server-side watch timeouts (5 s) without a restart.
    await new Promise((r) => setTimeout(r, 6000));
    expect(restarts).toEqual([]);

    // 1) Reset the watch connection: ListWatch reports an error and stops; we restart and relist.
    proxy.breakAll();
    await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'c2', labels: label }, data: { v: '1' } } });
    await core.deleteNamespacedConfigMap({ name: 'pre', namespace: NS });
    await until(() => events.includes('add c2=1') && events.includes('delete pre'));
    await until(() => restarts.includes('error'));

    // 2) Half-open connection: nothing arrives any more and nothing errors → the watchdog restarts it.
    // Frozen only once the restarted watch is live (a fixed 500 ms could pass before its connection
    // existed, leaving it unfrozen): an object created and deleted now reaches the informer through it.
    await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'probe', labels: label }, data: { v: '1' } } });
    await core.deleteNamespacedConfigMap({ name: 'probe', namespace: NS });
    await until(() => events.includes('delete probe'));
    proxy.freezeExisting();
    await core.replaceNamespacedConfigMap({ name: 'c2', namespace: NS, body: { metadata: { name: 'c2', labels: label }, data: { v: '2' } } });
    await until(() => events.includes('update c2=2'), 40_000);
    expect(restarts).toContain('stalled');
    expect(informer.list().map((o) => o.metadata!.name)).toEqual(['c2']);
    await core.deleteNamespacedConfigMap({ name: 'c2', namespace: NS });
    await until(() => events.includes('delete c2'));
    await informer.stop();
    await proxy.stop();
  });
});
