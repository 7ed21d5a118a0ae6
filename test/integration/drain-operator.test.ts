/**
 * A drain that cannot finish, through the operator on real parts (sandbox: control plane + KWOK,
 * sshd hosts, QEMU VMs, the operator as its own process): a PodDisruptionBudget allowing 0
 * disruptions on a worker's pod fails that VM's step after the drain timeout; the VM is never
 * stopped, the node is back to its prior schedulability, status and an Event name the PDB and
 * pod. A node cordoned by someone before the migration is still cordoned after its VM moved.
 */
import { join } from 'node:path';
import { CoreV1Api, CustomObjectsApi, PolicyV1Api } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { CORDONED_BY_ANNOTATION } from '../../src/guest/drain.js';
import { deployStudentWorkload } from '../world/guestCluster.js';
import { liveness } from '../world/budget.js';
import { until } from '../world/until.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';

const ENV = 'student-77';
const STRICT_NS = `${ENV}-strict`;
let sb: Sandbox;
let operator: OperatorProcess;

/** Liveness budgets of the test's waits (nominal ms, scaled by liveness()): its timeout is their sum. */
const W = {
  /** the student's PDB reports its one pod healthy */
  pdb: 90_000,
  /** the migration fails: the beachhead moves, node-1's drain runs into its 10 s timeout, the rollback */
  failed: 300_000,
  /** the bounded steps around them: kubectl cordon/apply, the workload's objects, API reads */
  steps: 60_000,
};

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'drain-operator'), environment: ENV, firstAddress: LOOPBACK.drainOperator.first, diskMiB: 16 });
  operator = await sb.startOperator();
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
});

describe('a drain blocked by a PodDisruptionBudget, through the operator', () => {
  it('fails the worker step after the drain timeout naming the PDB; the VM is never stopped; prior cordon states are kept', async () => {
    const core = sb.kc.makeApiClient(CoreV1Api);
    const vms = Object.fromEntries(sb.environment.vms.map((v) => [v.name, v]));
    const beachhead = vms['beachhead']!.nodeName;
    const node1 = vms['node-1']!;
    // someone cordoned the beachhead's node before the migration
    await sb.kubectl(['cordon', beachhead]);
    // a database the student protects completely: one replica, minAvailable 1, on node-1
    await deployStudentWorkload(sb.kc, { namespace: STRICT_NS, name: 'db', replicas: 1, minAvailable: 1, nodeNames: [node1.nodeName] });
    await until('db PDB allows 0 disruptions', W.pdb, async () => {
      const pdb = await sb.kc.makeApiClient(PolicyV1Api).readNamespacedPodDisruptionBudget({ name: 'db', namespace: STRICT_NS });
      return pdb.status?.currentHealthy === 1 && pdb.status.disruptionsAllowed === 0;
    });
    const [db] = (await core.listNamespacedPod({ namespace: STRICT_NS })).items;
    const h01 = await sb.hypervisor('host01');
    const pidBefore = (await h01.vmStatus(ENV, node1)).pid;
    expect(pidBefore).toBeGreaterThan(0);

    const name = 'blocked-by-pdb';
    const doc = JSON.stringify({
      apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE },
      // no OS in these VMs answers ACPI: a short powerdown timeout instead of the 60 s default before the quit
      spec: { environments: [ENV], targetHost: 'host02', drain: { timeout: '10s' }, shutdown: { powerdownTimeout: '1s' } },
    });
    const { spawn } = await import('node:child_process');
    await new Promise<void>((res, rej) => {
      const p = spawn('kubectl', ['--kubeconfig', sb.controlPlane.kubeconfigPath, 'apply', '-f', '-'], { cwd: REPO_ROOT });
      let err = '';
      p.stderr.on('data', (d) => (err += d));
      p.on('close', (code) => (code === 0 ? res() : rej(new Error(err))));
      p.stdin.end(doc);
    });
    const api = sb.kc.makeApiClient(CustomObjectsApi);
    const get = async () => (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
    const final = await until('migration Failed', W.failed, async () => {
      const o = await get();
      if (o.status?.phase === 'Succeeded') throw new Error('the migration succeeded although the PDB allows no disruption');
      return o.status?.phase === 'Failed' ? o : undefined;
    });
    const vmStatus = (vm: string) => final.status?.vms?.find((v) => v.name === vm);
    console.log(`migration: ${final.status?.message}`);

    // the beachhead moved first, and its node is still cordoned, as it was before
    expect(vmStatus('beachhead')?.phase).toBe('Succeeded');
    const bNode = await core.readNode({ name: beachhead });
    expect(bNode.spec?.unschedulable).toBe(true);
    expect(bNode.metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();

    // node-1's step failed at the drain, with the PDB and the pod named in status, condition and Event
    const failed = vmStatus('node-1');
    expect(['RolledBack', 'Failed']).toContain(failed?.phase);
    expect(failed?.message).toContain('drain');
    expect(failed?.message).toContain(`PodDisruptionBudget ${STRICT_NS}/db`);
    expect(failed?.message).toContain(db!.metadata!.name);
    expect(final.status?.conditions?.find((c) => c.type === 'Degraded')?.message).toContain(`PodDisruptionBudget ${STRICT_NS}/db`);
    const events = (await core.listNamespacedEvent({ namespace: SECRET_NAMESPACE })).items.filter((e) => e.involvedObject?.name === name);
    const pdbEvents = events.filter((e) => e.type === 'Warning' && e.message?.includes(`PodDisruptionBudget ${STRICT_NS}/db`));
    console.log(`events naming the PDB: ${pdbEvents.map((e) => `${e.reason}: ${e.message}`).join(' | ')}`);
    expect(pdbEvents.length).toBeGreaterThan(0);

    // the VM was never stopped: same QEMU process on host01, never absent on host02, its node never lost its kubelet
    const after = await h01.vmStatus(ENV, node1);
    expect(after.state).toBe('running');
    expect(after.pid).toBe(pidBefore);
    expect((await (await sb.hypervisor('host02')).vmStatus(ENV, node1)).state).toBe('absent');
    expect(sb.bridge.transitions.filter((t) => t.nodeName === node1.nodeName)).toEqual([]);
    // node-1 is schedulable again (as before), the db pod was never evicted
    const n1 = await core.readNode({ name: node1.nodeName });
    expect(n1.spec?.unschedulable ?? false).toBe(false);
    expect(n1.metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();
    const dbNow = (await core.listNamespacedPod({ namespace: STRICT_NS })).items;
    expect(dbNow.map((p) => [p.metadata?.uid, p.metadata?.deletionTimestamp])).toEqual([[db!.metadata!.uid, undefined]]);
  }, liveness(W.pdb + W.failed + W.steps));
});
