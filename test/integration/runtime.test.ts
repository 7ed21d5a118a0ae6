/**
 * Runtime pieces against a real kube-apiserver (test/world/controlPlane.ts):
 * Lease leader election between two electors, and ResilientInformer on ConfigMaps.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CoordinationV1Api, CoreV1Api, KubeConfig, type V1ConfigMap, type V1Lease } from '@kubernetes/client-node';
import { liveness, timed } from '../world/budget.js';
import { recordWatch, startControlPlane } from '../world/controlPlane.js';
import { until } from '../world/until.js';
import { LeaseLeaderElector } from '../../src/controller/runtime/leaderElection.js';
import { ResilientInformer } from '../../src/controller/runtime/informer.js';

type ControlPlane = Awaited<ReturnType<typeof startControlPlane>>;

let cp: ControlPlane;
let kc: KubeConfig;
let dataDir: string;
const NS = 'default';

/** liveness budget of one wait for an informer event or an elector's move (scaled by VMOPS_TIME_SCALE in until) */
const EVENT_MS = 15_000;

/** A Lease time as written by its holder (MicroTime), in ms since the epoch. */
function leaseMs(t: Date | string | undefined): number {
  const v = t === undefined ? NaN : new Date(t).getTime();
  if (!Number.isFinite(v)) throw new Error(`Lease time missing or unparseable: ${String(t)}`);
  return v;
}

/** Raw TCP proxy in front of the API server so the test can cut or freeze the informer's connections. */
class TcpProxy {
  private server!: Server;
  private readonly pairs = new Set<[Socket, Socket]>();
  frozen = false;
  port = 0;
  /** connections accepted so far: client-node opens a new one for every watch request (a fresh agent each time) */
  accepted = 0;
  constructor(
    private readonly target: { host: string; port: number },
    private readonly listenHost: string,
  ) {}
  async start(): Promise<void> {
    this.server = createServer((client) => {
      this.accepted++;
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
  const LEASE = 'runtime-it-leader';
  const LEASE_S = 20;
  /** renewals of a's Lease that b must see while campaigning (a renews every 0.5 s, b retries every 0.5-0.6 s) */
  const RENEWALS_WATCHED = 8;
  const WAITS = { aLeads: 30_000, renewals: 60_000, bLeads: 30_000, history: EVENT_MS };

  it('only one of two electors leads; release hands over to the other', async () => {
    const leases = kc.makeApiClient(CoordinationV1Api);
    const readLease = (): Promise<V1Lease> => leases.readNamespacedLease({ name: LEASE, namespace: NS });
    const log: string[] = [];
    const mk = (id: string) =>
      new LeaseLeaderElector({
        kubeConfig: kc,
        namespace: NS,
        name: LEASE,
        identity: id,
        // generous: under a fresh-clone run's load one renewal took over a 3 s renewDeadline, and the
        // elector rightly stepped down before the release this test is about
        leaseDurationSeconds: LEASE_S,
        renewDeadlineSeconds: 15,
        retryPeriodSeconds: 0.5,
        onStartedLeading: () => void log.push(`${id} start`),
        onStoppedLeading: (r) => void log.push(`${id} stop ${r}`),
      });
    const a = mk('a');
    const b = mk('b');
    try {
      a.start();
      await until('a leads', WAITS.aLeads, async () => a.isLeader);
      const first = await readLease();
      expect(first.spec?.holderIdentity).toBe('a');
      b.start();
      // While a renews, b never leads. The stretch watched is counted in a's renewals as the API server
      // holds them (renewTime advancing), not in the test's milliseconds: a slow machine stretches it.
      let renewals = 0;
      let lastRenew = leaseMs(first.spec?.renewTime);
      await until(`b campaigning through ${RENEWALS_WATCHED} renewals of a's Lease`, WAITS.renewals, async () => {
        expect(a.isLeader && b.isLeader).toBe(false);
        expect(a.isLeader).toBe(true);
        const l = await readLease();
        expect(l.spec?.holderIdentity).toBe('a');
        expect(l.spec?.leaseTransitions).toBe(first.spec?.leaseTransitions);
        const r = leaseMs(l.spec?.renewTime);
        if (r > lastRenew) [renewals, lastRenew] = [renewals + 1, r];
        return renewals >= RENEWALS_WATCHED && b.leader === 'a';
      }, 100);
      expect(b.isLeader).toBe(false);

      // The handover in the API server's own order: every write to the Lease from here on, by a watch (a read
      // right after the release could already find b's record, b retrying every 0.5 s).
      const held = await readLease();
      expect(held.spec?.holderIdentity).toBe('a');
      const history = await recordWatch<V1Lease>(kc, `/apis/coordination.k8s.io/v1/namespaces/${NS}/leases`, held.metadata!.resourceVersion!, { fieldSelector: `metadata.name=${LEASE}` });
      let end: ReturnType<typeof history.stop>;
      try {
        await a.release();
        await until('b leads after the release', WAITS.bLeads, async () => b.isLeader);
        await until("b's acquisition in the Lease's history", WAITS.history, async () => {
          if (history.endedEarly()) throw new Error('the Lease watch ended early');
          return history.events.some((e) => e.obj.spec?.holderIdentity === 'b');
        }, 50);
      } finally {
        end = history.stop();
      }
      expect(end.endedEarly, `Lease watch: ${String(end.error)}`).toBe(false);
      const records = [held, ...history.events.map((e) => e.obj)];
      const holders = records.map((l) => l.spec?.holderIdentity ?? '').filter((h, i, all) => i === 0 || h !== all[i - 1]);
      // holder a → nobody (the release) → b, and one transition more
      expect(holders).toEqual(['a', '', 'b']);
      const lastOfA = records.filter((l) => l.spec?.holderIdentity === 'a').at(-1)!;
      const released = records.find((l) => !l.spec?.holderIdentity)!;
      const taken = records.find((l) => l.spec?.holderIdentity === 'b')!;
      expect(taken.spec?.leaseTransitions).toBe((released.spec?.leaseTransitions ?? 0) + 1);
      expect(released.spec?.leaseTransitions).toBe(lastOfA.spec?.leaseTransitions);
      // b took over on the release, not on the expiry: its acquireTime (written by b) is before a's Lease could
      // have expired — a's last renewal (the last record of a in the history) + the 20 s duration. Both ends
      // are the electors' own Lease timestamps, not the test's clock; the handover itself is one retry period
      // (0.5-0.6 s), so the whole 20 s is room: only an expiry-driven takeover can break this bound.
      const acquiredAfterRenewMs = leaseMs(taken.spec?.acquireTime) - leaseMs(lastOfA.spec?.renewTime);
      console.log(`handover: b acquired ${acquiredAfterRenewMs} ms after a's last renewal (Lease ${LEASE_S} s); history ${holders.map((h) => h || '(none)').join(' → ')}`);
      expect(acquiredAfterRenewMs).toBeLessThan(LEASE_S * 1000);
      expect(log).toEqual(['a start', 'a stop stopped', 'b start']);
    } finally {
      // both stopped whatever happened: a leader left running would hold the Lease into the next test
      await Promise.all([a.stop(), b.stop()]);
    }
  }, liveness(Object.values(WAITS).reduce((x, y) => x + y) + 30_000));
});

describe('ResilientInformer against kube-apiserver', () => {
  /** the informer's server-side watch timeout (watchTimeoutSeconds) and its watchdog */
  const WATCH_TIMEOUT_S = 5;
  const WATCHDOG_MS = 12_000;
  // liveness budgets: sync, 6 single events, two server-side re-watches, the watchdog restart (its 12 s + backoff)
  const WAITS = { sync: 30_000, events: 6 * EVENT_MS, rewatch: 30_000, stalled: WATCHDOG_MS + 30_000 };

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
      watchTimeoutSeconds: WATCH_TIMEOUT_S,
      watchdogTimeoutMs: WATCHDOG_MS,
      relistIntervalMs: 0,
      backoff: { initialMs: 100, maxMs: 1000 },
      onRestart: (r) => restarts.push(r),
    });
    const seen = (what: string, budget = EVENT_MS) => until(`informer event ${what}`, budget, async () => events.includes(what), 50);
    try {
      const label = { 'runtime-it': 'yes' };
      informer.on('add', (o) => events.push(`add ${o.metadata!.name}=${o.data?.v}`));
      informer.on('update', (o) => events.push(`update ${o.metadata!.name}=${o.data?.v}`));
      informer.on('delete', (o) => events.push(`delete ${o.metadata!.name}`));
      await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'pre', labels: label }, data: { v: '1' } } });
      informer.start();
      expect(await timed('informer synced', liveness(WAITS.sync), () => informer.waitForSync(liveness(WAITS.sync)))).toBe(true);
      expect(events).toEqual(['add pre=1']);

      await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'c1', labels: label }, data: { v: '1' } } });
      await seen('add c1=1');
      await core.replaceNamespacedConfigMap({ name: 'c1', namespace: NS, body: { metadata: { name: 'c1', labels: label }, data: { v: '2' } } });
      await seen('update c1=2');
      await core.deleteNamespacedConfigMap({ name: 'c1', namespace: NS });
      await seen('delete c1');

      // Survives server-side watch timeouts without a restart. The event, not a sleep past the timeout: the API
      // server ends the watch after 5 s and the informer watches again on a new connection (client-node opens
      // one per watch request), twice over, and no restart is counted.
      const connections = proxy.accepted;
      await until('two server-side watch timeouts, each followed by a new watch', WAITS.rewatch, async () => proxy.accepted >= connections + 2, 100);
      expect(restarts).toEqual([]);

      // 1) Reset the watch connection: ListWatch reports an error and stops; we restart and relist.
      proxy.breakAll();
      await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'c2', labels: label }, data: { v: '1' } } });
      await core.deleteNamespacedConfigMap({ name: 'pre', namespace: NS });
      await until('add c2=1 and delete pre after the reset', EVENT_MS, async () => events.includes('add c2=1') && events.includes('delete pre'), 50);
      await until('restart after the reset', EVENT_MS, async () => restarts.includes('error'), 50);

      // 2) Half-open connection: nothing arrives any more and nothing errors → the watchdog restarts it.
      // Frozen only once the restarted watch is live (a fixed 500 ms could pass before its connection
      // existed, leaving it unfrozen): an object created and deleted now reaches the informer through it.
      await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'probe', labels: label }, data: { v: '1' } } });
      await core.deleteNamespacedConfigMap({ name: 'probe', namespace: NS });
      await seen('delete probe');
      proxy.freezeExisting();
      await core.replaceNamespacedConfigMap({ name: 'c2', namespace: NS, body: { metadata: { name: 'c2', labels: label }, data: { v: '2' } } });
      await seen('update c2=2', WAITS.stalled);
      expect(restarts).toContain('stalled');
      expect(informer.list().map((o) => o.metadata!.name)).toEqual(['c2']);
      await core.deleteNamespacedConfigMap({ name: 'c2', namespace: NS });
      await seen('delete c2');
    } finally {
      await informer.stop();
      await proxy.stop();
    }
  }, liveness(Object.values(WAITS).reduce((x, y) => x + y) + 2 * EVENT_MS + 30_000));
});
