import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AppsV1Api, CoordinationV1Api, CoreV1Api, KubeConfig, type V1Node } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnvironmentSpec } from '../../src/api/inventory.js';
import { GuestCluster } from '../../src/guest/guestCluster.js';
import { KWOK_MANAGE_LABEL, startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { createGuestNodes, deployStudentWorkload, startBareQemu, VmLivenessBridge, waitNodesUntainted, type BareQemu } from '../world/guestCluster.js';
import { liveness } from '../world/budget.js';
import { until } from '../world/until.js';

const GRACE_S = 8;

const env: EnvironmentSpec = {
  name: 'cp-env',
  kubeconfigSecret: { namespace: 'x', name: 'x', key: 'kubeconfig' },
  vms: [
    { name: 'node-1', role: 'worker', nodeName: 'cp-env-node-1', host: 'h', memoryMiB: 64, cpus: 2, files: [] },
    { name: 'node-2', role: 'worker', nodeName: 'cp-env-node-2', host: 'h', memoryMiB: 64, cpus: 2, files: [] },
  ],
};
const vmEnv: EnvironmentSpec = {
  ...env,
  name: 'cpq',
  vms: [{ name: 'node-q', role: 'worker', nodeName: 'cpq-node-q', host: 'h', memoryMiB: 64, cpus: 1, files: [] }],
};
const QEMU_NAME = 'cpq.node-q';

function readyCondition(n: V1Node) {
  return n.status?.conditions?.find((c) => c.type === 'Ready');
}

/** A server-side timestamp (metav1.Time: whole seconds; MicroTime: microseconds) in ms since the epoch. */
function serverMs(t: Date | string | undefined, what: string): number {
  const v = t === undefined ? NaN : new Date(t).getTime();
  if (!Number.isFinite(v)) throw new Error(`${what}: no timestamp (${String(t)})`);
  return v;
}

describe('test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)', () => {
  let dir: string;
  let cp: ControlPlane;
  let kc: KubeConfig;
  let core: CoreV1Api;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmop-cp-'));
    cp = await startControlPlane({ dataDir: join(dir, 'cp'), nodeMonitorGracePeriodSeconds: GRACE_S });
    console.log(`control plane ready in ${cp.startupMs} ms at ${cp.server} (logs in ${cp.dataDir})`);
    kc = new KubeConfig();
    kc.loadFromString(cp.kubeconfigYaml);
    core = kc.makeApiClient(CoreV1Api);
  }, 3_600_000);

  afterAll(async () => {
    await cp?.stop();
    if (dir && !process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  it('serves the API with the admin token and answers /readyz', async () => {
    expect(await GuestCluster.fromKubeconfigYaml(cp.kubeconfigYaml).apiHealthy()).toBe(true);
    const ns = await core.readNamespace({ name: 'kube-system' });
    expect(ns.metadata?.name).toBe('kube-system');
    // the controller-manager's ServiceAccount controller ran
    expect((await core.readNamespacedServiceAccount({ name: 'default', namespace: 'default' })).metadata?.name).toBe('default');
  });

  it('KWOK-managed nodes become Ready and a Deployment gets scheduled and Running', async () => {
    // budgets: two nodes Ready (60 s each), untainted, 4 replicas available (90 s)
    await createGuestNodes(kc, env);
    const t0 = Date.now();
    for (const vm of env.vms) {
      await until(`node ${vm.nodeName} Ready`, 60_000, async () => {
        const n = await core.readNode({ name: vm.nodeName });
        return readyCondition(n)?.status === 'True';
      });
    }
    console.log(`kwok nodes Ready ${Date.now() - t0} ms after creation`);
    await waitNodesUntainted(kc, env.vms.map((v) => v.nodeName));
    await deployStudentWorkload(kc, { namespace: 'cp-apps', name: 'web', replicas: 4, minAvailable: 3 });
    const apps = kc.makeApiClient(AppsV1Api);
    await until('4 available replicas', 90_000, async () => {
      const d = await apps.readNamespacedDeployment({ name: 'web', namespace: 'cp-apps' });
      return d.status?.availableReplicas === 4;
    });
    const pods = (await core.listNamespacedPod({ namespace: 'cp-apps' })).items;
    expect(pods).toHaveLength(4);
    for (const p of pods) {
      expect(p.status?.phase).toBe('Running');
      expect(env.vms.map((v) => v.nodeName)).toContain(p.spec?.nodeName);
      expect(p.status?.podIP).toBeTruthy();
    }
    // spread over both workers by the scheduler
    expect(new Set(pods.map((p) => p.spec?.nodeName)).size).toBe(2);
  }, liveness(2 * 60_000 + 60_000 + 90_000 + 30_000));

  const QEMU_WAITS = { ready: 60_000, notReady: 60_000, taint: 30_000, readyAgain: 60_000, untainted: 30_000 };
  it('a node follows its QEMU process: killed → NotReady by node-lifecycle, restarted → Ready', async () => {
    await createGuestNodes(kc, vmEnv, { managed: false });
    let qemu: BareQemu | undefined = await startBareQemu(QEMU_NAME, { logPath: join(dir, 'qemu.log') });
    const bridge = new VmLivenessBridge(kc, [{ nodeName: 'cpq-node-q', qemuName: QEMU_NAME }]);
    try {
      bridge.start();
      let t = Date.now();
      await until('node Ready after its VM started', QEMU_WAITS.ready, async () => readyCondition(await core.readNode({ name: 'cpq-node-q' }))?.status === 'True');
      const firstReadyMs = Date.now() - t;
      expect((await core.readNode({ name: 'cpq-node-q' })).metadata?.labels?.[KWOK_MANAGE_LABEL]).toBe('fake');

      // The VM dies: the bridge takes the node away from KWOK; nobody renews its Lease any more.
      t = Date.now();
      await qemu.kill();
      qemu = undefined;
      const notReady = await until('node NotReady after its VM was killed', QEMU_WAITS.notReady, async () => {
        const n = await core.readNode({ name: 'cpq-node-q' });
        const c = readyCondition(n);
        return c && c.status !== 'True' ? { n, c } : undefined;
      });
      const notReadyMs = Date.now() - t;
      // Written by the real node-lifecycle controller, not by the test world:
      expect(notReady.c.status).toBe('Unknown');
      expect(notReady.c.reason).toBe('NodeStatusUnknown');
      expect(notReady.c.message).toMatch(/Kubelet stopped posting node status/);
      expect(notReady.n.metadata?.labels?.[KWOK_MANAGE_LABEL]).toBeUndefined();
      await until('unreachable taint', QEMU_WAITS.taint, async () =>
        (await core.readNode({ name: 'cpq-node-q' })).spec?.taints?.some((x) => x.key === 'node.kubernetes.io/unreachable'),
      );
      // Not before the grace period after the last heartbeat: heartbeats really stopped, the controller waited
      // for them. Both ends are the API server's records, not the test's clock: the node Lease's last renewal
      // (renewTime, written by KWOK; nothing renews it once the bridge took the node from KWOK) and the Ready
      // condition's lastTransitionTime (written by node-lifecycle when it gave up on the node). node-lifecycle
      // counts the grace period from when it *saw* that renewal, never earlier, so the transition is at least
      // GRACE_S after renewTime; lastTransitionTime is kept in whole seconds (truncated), hence GRACE_S − 1.
      // Load can only delay the transition: this bound cannot be failed by a slow machine, only by a controller
      // that did not wait.
      const lease = await kc.makeApiClient(CoordinationV1Api).readNamespacedLease({ name: 'cpq-node-q', namespace: 'kube-node-lease' });
      const renewedAt = serverMs(lease.spec?.renewTime, 'node Lease renewTime');
      const transitionAt = serverMs(notReady.c.lastTransitionTime, 'Ready condition lastTransitionTime');
      console.log(`node NotReady ${notReadyMs} ms after the kill (test clock); by the API server's records ${transitionAt - renewedAt} ms after the last Lease renewal`);
      expect(transitionAt - renewedAt).toBeGreaterThanOrEqual((GRACE_S - 1) * 1000);

      // The VM runs again: KWOK resumes heartbeats and initialises the node → Ready.
      t = Date.now();
      qemu = await startBareQemu(QEMU_NAME, { logPath: join(dir, 'qemu.log') });
      await GuestCluster.fromKubeconfigYaml(cp.kubeconfigYaml).waitNodeReady('cpq-node-q', { timeoutMs: liveness(QEMU_WAITS.readyAgain) });
      const readyAgainMs = Date.now() - t;
      await until('unreachable taint removed', QEMU_WAITS.untainted, async () =>
        !(await core.readNode({ name: 'cpq-node-q' })).spec?.taints?.some((x) => x.key.startsWith('node.kubernetes.io/')),
      );
      console.log(`latencies: first Ready ${firstReadyMs} ms; VM killed → NotReady ${notReadyMs} ms (grace ${GRACE_S} s); VM restarted → Ready ${readyAgainMs} ms`);
      expect(bridge.transitions.map((x) => x.alive)).toEqual([true, false, true]);
    } finally {
      await bridge.stop();
      await qemu?.kill();
    }
  }, liveness(Object.values(QEMU_WAITS).reduce((x, y) => x + y) + 30_000));
});
