import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AppsV1Api, CoordinationV1Api, CoreV1Api, KubeConfig, PatchStrategy, PolicyV1Api, setHeaderOptions, type V1Deployment, type V1Pod } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnvironmentSpec, VMSpec } from '../../src/api/inventory.js';
import type { DrainReport } from '../../src/guest/drain.js';
import { DrainError, GuestCluster } from '../../src/guest/guestCluster.js';
import { TcpProxy } from '../world/tcpProxy.js';
import { recordWatch, startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { createGuestNodes, deployStudentWorkload, startBareQemu, VmLivenessBridge, waitNodesUntainted, type BareQemu } from '../world/guestCluster.js';
import { liveness, timed } from '../world/budget.js';
import { until } from '../world/until.js';

const ENV = 'gst';
const vm = (name: string, role: VMSpec['role']): VMSpec => ({ name, role, nodeName: `${ENV}-${name}`, host: 'h', memoryMiB: 256, cpus: 2, files: [], ...(role === 'controller' ? { address: `10.0.0.1${name.slice(-1)}` } : {}) });
const env: EnvironmentSpec = {
  name: ENV,
  kubeconfigSecret: { namespace: 'x', name: 'x', key: 'kubeconfig' },
  vms: [vm('beachhead', 'beachhead'), vm('controller-1', 'controller'), vm('controller-2', 'controller'), vm('controller-3', 'controller'), vm('node-1', 'worker'), vm('node-2', 'worker'), vm('node-3', 'worker')],
};
const WORKERS = env.vms.filter((v) => v.role === 'worker').map((v) => v.nodeName);
const NS = `${ENV}-apps`;
const REPLICAS = 6;
const MIN_AVAILABLE = 5;
/** pods on KWOK nodes become Ready this long after being scheduled, like real ones after pull + start-up */
const POD_READY_MS = 1500;

const isReadyPod = (p: V1Pod) => !p.metadata?.deletionTimestamp && (p.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false);

describe('GuestCluster against a real control plane with KWOK nodes', () => {
  let dir: string;
  let cp: ControlPlane;
  let kc: KubeConfig;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let guest: GuestCluster;
  let qemu: BareQemu | undefined;
  let bridge: VmLivenessBridge;
  const c2 = `${ENV}-controller-2`;
  const c2Qemu = `${ENV}.controller-2`;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmop-guest-'));
    cp = await startControlPlane({ dataDir: join(dir, 'cp'), podReadyDelayMs: POD_READY_MS });
    kc = new KubeConfig();
    kc.loadFromString(cp.kubeconfigYaml);
    core = kc.makeApiClient(CoreV1Api);
    apps = kc.makeApiClient(AppsV1Api);
    guest = GuestCluster.fromKubeconfigYaml(cp.kubeconfigYaml);
    await createGuestNodes(kc, env);
    // controller-2's "kubelet" follows a real QEMU process (the others are simply managed by KWOK)
    qemu = await startBareQemu(c2Qemu, { logPath: join(dir, 'qemu.log') });
    bridge = new VmLivenessBridge(kc, [{ nodeName: c2, qemuName: c2Qemu }]);
    bridge.start();
    for (const v of env.vms) await timed(`node ${v.nodeName} Ready`, liveness(60_000), () => guest.waitNodeReady(v.nodeName, { timeoutMs: liveness(60_000) }));
    await waitNodesUntainted(kc, WORKERS);
    await deployStudentWorkload(kc, { namespace: NS, name: 'web', replicas: REPLICAS, minAvailable: MIN_AVAILABLE, nodeNames: WORKERS });
    await until('workload available', 90_000, async () => (await apps.readNamespacedDeployment({ name: 'web', namespace: NS })).status?.availableReplicas === REPLICAS);
  }, 3_600_000);

  afterAll(async () => {
    await bridge?.stop();
    await qemu?.kill();
    await cp?.stop();
    if (dir && !process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  it('a node reports the address its VM has in the inventory as its InternalIP (what ties them before a drain), also once KWOK runs it', async () => {
    const c1 = env.vms.find((v) => v.name === 'controller-1')!;
    expect(c1.address).toBeDefined();
    expect(await guest.nodeState(c1.nodeName)).toMatchObject({ exists: true, ready: true, internalIPs: [c1.address] });
    // the student owns the guest: an edited address is what the operator then sees (and refuses to move for)
    await core.patchNodeStatus({ name: c1.nodeName, body: { status: { addresses: [{ type: 'InternalIP', address: '10.99.0.1' }] } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
    expect((await guest.nodeState(c1.nodeName)).internalIPs).toEqual(['10.99.0.1']);
    await core.patchNodeStatus({ name: c1.nodeName, body: { status: { addresses: [{ type: 'InternalIP', address: c1.address! }, { type: 'Hostname', address: c1.nodeName }] } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
  });

  it('after a reboot, Ready counts only from the new boot: renews and a Ready condition of the old kubelet do not end the wait', async () => {
    const n3 = `${ENV}-node-3`;
    const coordination = kc.makeApiClient(CoordinationV1Api);
    const renewTime = async () => String((await coordination.readNamespacedLease({ name: n3, namespace: 'kube-node-lease' })).spec?.renewTime);
    const setBoot = (bootID: string) => core.patchNodeStatus({ name: n3, body: { status: { nodeInfo: { bootID } } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
    const renewsAfter = async (from: string, n: number) => {
      const seen = new Set([from]);
      await until(`${n} renews of ${n3}'s Lease`, liveness(30_000), async () => (seen.add(await renewTime()).size > n ? true : undefined), 100);
    };
    await setBoot('boot-a');
    // KWOK keeps running the node (renewing its Lease every second) and keeps the boot it was given
    await renewsAfter(await renewTime(), 2);
    expect((await guest.nodeState(n3)).bootId).toBe('boot-a');

    // control: without a boot to compare, the next renew ends the wait
    await guest.waitNodeReady(n3, { timeoutMs: liveness(30_000), pollMs: 100 });

    let newBoot = false;
    const waited = guest.waitNodeReady(n3, { timeoutMs: liveness(60_000), pollMs: 100, notBoot: 'boot-a' }).then(() => newBoot);
    // the old kubelet's renews (KWOK's, here) and its Ready condition go on while the guest "reboots"
    await renewsAfter(await renewTime(), 3);
    newBoot = true;
    await setBoot('boot-b');
    // it returned only once the node reported the new boot
    expect(await waited).toBe(true);
  }, liveness(150_000));

  it('places the student workload on workers only, spread over them', async () => {
    const pods = (await core.listNamespacedPod({ namespace: NS })).items;
    const perNode = new Map<string, number>();
    for (const p of pods) perNode.set(p.spec!.nodeName!, (perNode.get(p.spec!.nodeName!) ?? 0) + 1);
    expect([...perNode.keys()].sort()).toEqual(WORKERS);
    expect([...perNode.values()]).toEqual([2, 2, 2]);
  });

  it('cordons and uncordons', async () => {
    const n = `${ENV}-node-2`;
    expect(await guest.nodeState(n)).toMatchObject({ exists: true, ready: true, unschedulable: false });
    await guest.cordon(n);
    expect(await guest.nodeState(n)).toMatchObject({ exists: true, ready: true, unschedulable: true });
    await guest.uncordon(n);
    expect(await guest.nodeState(n)).toMatchObject({ exists: true, ready: true, unschedulable: false });
    expect(await guest.nodeState('no-such-node')).toEqual({ exists: false, ready: false, unschedulable: false });
  });

  it('drains through the Eviction API honouring the PDB: 429s are retried until replacements are available elsewhere', async () => {
    const node = `${ENV}-node-1`;
    const listed = await core.listNamespacedPod({ namespace: NS });
    const before = listed.items.filter((p) => p.spec?.nodeName === node);
    expect(before.length).toBe(2);
    const deployment = await apps.readNamespacedDeployment({ name: 'web', namespace: NS });

    // Watch the workload during the drain, every change in the API server's order: Ready, non-terminating pods
    // must never drop below minAvailable, and the order of evictions and replacements is the server's.
    const podWatch = await recordWatch<V1Pod>(kc, `/api/v1/namespaces/${NS}/pods`, listed.metadata!.resourceVersion!);
    const deployWatch = await recordWatch<V1Deployment>(kc, `/apis/apps/v1/namespaces/${NS}/deployments`, deployment.metadata!.resourceVersion!);
    const progress: number[] = [];
    const t0 = Date.now();
    let result: DrainReport;
    let podsEnd: ReturnType<typeof podWatch.stop>;
    let deployEnd: ReturnType<typeof deployWatch.stop>;
    try {
      result = await guest.drain(node, { timeoutMs: 60_000, gracePeriodSeconds: 5, deleteEmptyDirData: false, onProgress: (n) => progress.push(n) });
    } finally {
      podsEnd = podWatch.stop();
      deployEnd = deployWatch.stop();
    }
    const drainMs = Date.now() - t0;
    expect(podsEnd.endedEarly, `pod watch ended early: ${String(podsEnd.error)}`).toBe(false);
    expect(deployEnd.endedEarly, `Deployment watch ended early: ${String(deployEnd.error)}`).toBe(false);

    // replay the pod events: the Ready count after each, and the event at which each pod was evicted
    // (deletionTimestamp set) or first Ready
    const pods = new Map(listed.items.map((p) => [p.metadata!.name!, p]));
    let minReady = [...pods.values()].filter(isReadyPod).length;
    const evictedAt = new Map<string, number>();
    const readyAt = new Map<string, number>();
    podWatch.events.forEach(({ type, obj }, i) => {
      expect(type, JSON.stringify(obj)).not.toBe('ERROR');
      const name = obj.metadata!.name!;
      if (type === 'DELETED') pods.delete(name);
      else pods.set(name, obj);
      if ((type === 'DELETED' || obj.metadata?.deletionTimestamp) && !evictedAt.has(name)) evictedAt.set(name, i);
      if (isReadyPod(obj) && !readyAt.has(name)) readyAt.set(name, i);
      minReady = Math.min(minReady, [...pods.values()].filter(isReadyPod).length);
    });
    let minDeploymentAvailable = deployment.status?.availableReplicas ?? 0;
    for (const { obj } of deployWatch.events) if (obj.metadata?.name === 'web') minDeploymentAvailable = Math.min(minDeploymentAvailable, obj.status?.availableReplicas ?? 0);

    const after = (await core.listNamespacedPod({ namespace: NS })).items;
    const readyElsewhere = after.filter((p) => isReadyPod(p) && p.spec?.nodeName !== node).length;
    console.log(`drain: ${JSON.stringify(result)} in ${drainMs} ms; progress ${progress.join('→')}; ${podWatch.events.length} pod events; min Ready pods ${minReady}, min Deployment available ${minDeploymentAvailable}; Ready elsewhere at return ${readyElsewhere}`);
    expect(result.evicted).toBe(2);
    expect(result.pdbRetries).toBeGreaterThanOrEqual(1); // the second eviction hit HTTP 429 at least once
    // ...and got through only after the first pod's replacement had become Ready elsewhere: in the API server's
    // order of events, a pod that was not there before the drain turned Ready before the second eviction
    const evictions = before.map((p) => evictedAt.get(p.metadata!.name!)).sort((a, b) => (a ?? Infinity) - (b ?? Infinity));
    expect(evictions.every((i) => i !== undefined), 'both pods of the node evicted, as the watch saw').toBe(true);
    const beforeNames = new Set(listed.items.map((p) => p.metadata!.name!));
    const replacementsReady = [...readyAt].filter(([name]) => !beforeNames.has(name)).map(([, i]) => i);
    expect(Math.min(...replacementsReady), 'a replacement Ready before the second eviction').toBeLessThan(evictions[1]!);
    expect(after.filter((p) => p.spec?.nodeName === node)).toHaveLength(0);
    expect(readyElsewhere).toBeGreaterThanOrEqual(MIN_AVAILABLE);
    expect(minReady).toBeGreaterThanOrEqual(MIN_AVAILABLE);
    expect(minDeploymentAvailable).toBeGreaterThanOrEqual(MIN_AVAILABLE);
    expect(progress[0]).toBe(2);
    expect(progress.at(-1)).toBe(0);
    expect((await guest.nodeState(node)).unschedulable).toBe(true);
    // the PDB object itself never reported a violation
    const pdb = await kc.makeApiClient(PolicyV1Api).readNamespacedPodDisruptionBudget({ name: 'web', namespace: NS });
    expect(pdb.status?.currentHealthy).toBeGreaterThanOrEqual(MIN_AVAILABLE);
    await guest.uncordon(node);
  }, liveness(60_000 + 60_000));

  it('the guest API unreachable during a drain (requests hang, as behind a powered-off controller): a short outage is ridden out; a longer one fails the drain cleanly at its timeout, naming the API', async () => {
    const upstream = new URL(cp.server);
    const proxy = await TcpProxy.start({ host: upstream.hostname, port: Number(upstream.port) });
    try {
      const cut = GuestCluster.fromKubeconfigYaml(cp.kubeconfigYaml.replace(cp.server, `https://127.0.0.1:${proxy.port}`), { requestTimeoutMs: 1500 });
      const podsOn = async (n: string) => (await core.listNamespacedPod({ namespace: NS })).items.filter((p) => p.spec?.nodeName === n && !p.metadata?.deletionTimestamp);

      // a 3 s outage while the PDB lets the node's pods go one at a time
      const node = `${ENV}-node-3`;
      const before = await podsOn(node);
      expect(before.length).toBeGreaterThan(0);
      let outage: Promise<void> | undefined;
      const r = await cut.drain(node, {
        timeoutMs: 60_000, gracePeriodSeconds: 5, deleteEmptyDirData: false,
        onProgress: () => { outage ??= (async () => { proxy.blackhole(); await new Promise((res) => setTimeout(res, 3000)); proxy.restore(); })(); },
      });
      await outage;
      expect(r.evicted).toBe(before.length);
      expect(await podsOn(node)).toHaveLength(0);
      await guest.uncordon(node);

      // An outage that outlasts the drain's timeout: a DrainError naming the API, not a hang. The drain must
      // settle by itself while the API is still cut (the proxy is restored only after it settled, so nothing but
      // its own deadline and request timeouts can end it) — within a liveness budget (~10.5 s nominal: the
      // deadline + the last listing's 2 s + the request in flight + one uncordon attempt of 2 s), far from the
      // kernel's TCP timeout of minutes that a hang would take.
      const node2 = `${ENV}-node-2`;
      const t0 = Date.now();
      const HUNG = Symbol('hung');
      const settleBudget = liveness(60_000);
      let giveUp: NodeJS.Timeout | undefined;
      const err = await timed('drain with the API cut settles by itself', settleBudget, () =>
        Promise.race([
          cut.drain(node2, { timeoutMs: 5000, gracePeriodSeconds: 5, deleteEmptyDirData: false, onProgress: () => proxy.blackhole() }).then(() => undefined, (e: unknown) => e),
          new Promise<typeof HUNG>((res) => (giveUp = setTimeout(() => res(HUNG), settleBudget))),
        ]).finally(() => clearTimeout(giveUp)),
      );
      const ms = Date.now() - t0;
      proxy.restore();
      console.log(`drain with the API cut: settled after ${ms} ms (test clock): ${err === HUNG ? 'no, still hanging' : (err as Error).message}`);
      expect(err, `the drain did not settle within ${settleBudget} ms with the API cut`).not.toBe(HUNG);
      expect(err).toBeInstanceOf(DrainError);
      expect(err).toMatchObject({ reason: 'APIUnreachable' });
      expect((err as Error).message).toMatch(/drain of gst-node-2 failed: the guest API server did not answer for [0-9]+ s/);
      expect((err as Error).message).toMatch(/could not be returned to its prior schedulability/);
      // the operator's rollback uncordons once the API answers again
      await guest.uncordon(node2);
      expect((await guest.nodeState(node2)).unschedulable).toBe(false);
    } finally {
      await proxy.close();
    }
  }, liveness(60_000 + 3_000 + 60_000 + 30_000));

  it('refuses pods with emptyDir data unless allowed, before evicting anything', async () => {
    const node = `${ENV}-node-3`;
    await core.createNamespacedPod({
      namespace: NS,
      body: {
        metadata: { name: 'scratch' },
        spec: { nodeName: node, containers: [{ name: 'c', image: 'registry.k8s.io/pause:3.10' }], volumes: [{ name: 'tmp', emptyDir: {} }] },
      },
    });
    const podsBefore = (await core.listNamespacedPod({ namespace: NS })).items.filter((p) => p.spec?.nodeName === node).length;
    await expect(guest.drain(node, { timeoutMs: 10_000, gracePeriodSeconds: 5, deleteEmptyDirData: false, force: true })).rejects.toThrow(/emptyDir.*scratch/);
    const podsAfter = (await core.listNamespacedPod({ namespace: NS })).items.filter((p) => p.spec?.nodeName === node && !p.metadata?.deletionTimestamp).length;
    expect(podsAfter).toBe(podsBefore);
    await guest.uncordon(node);
    await core.deleteNamespacedPod({ name: 'scratch', namespace: NS, gracePeriodSeconds: 0 });
  });

  // A PDB allowing no disruption: test/integration/drain.test.ts (library) and drain-operator.test.ts (operator).

  it('quorum check: OK with all controllers Ready, refuses while another controller is NotReady', async () => {
    const c1 = `${ENV}-controller-1`;
    expect(await guest.controlPlaneQuorum(c1)).toMatchObject({ ok: true, controllers: 3, healthy: 2 });
    expect(await guest.controlPlaneQuorum(`${ENV}-node-1`)).toMatchObject({ ok: true, controllers: 3, healthy: 3 });

    // controller-2's VM dies; the real node-lifecycle controller marks its node NotReady
    const t0 = Date.now();
    await qemu!.kill();
    qemu = undefined;
    await until('controller-2 NotReady', 60_000, async () => !(await guest.nodeState(c2)).ready);
    const notReadyMs = Date.now() - t0;
    const q = await guest.controlPlaneQuorum(c1);
    expect(q).toMatchObject({ ok: false, controllers: 3, healthy: 1 });
    expect(q.reason).toContain(c2);
    // moving controller-2 itself is still fine: the other two are Ready and a majority
    expect((await guest.controlPlaneQuorum(c2)).ok).toBe(true);

    const t1 = Date.now();
    qemu = await startBareQemu(c2Qemu, { logPath: join(dir, 'qemu.log') });
    await timed('controller-2 Ready again', liveness(60_000), () => guest.waitNodeReady(c2, { timeoutMs: liveness(60_000) }));
    const readyMs = Date.now() - t1;
    console.log(`controller-2: VM killed → NotReady ${notReadyMs} ms, restarted → Ready ${readyMs} ms`);
    expect((await guest.controlPlaneQuorum(c1)).ok).toBe(true);
  }, liveness(60_000 + 60_000 + 30_000));
});
