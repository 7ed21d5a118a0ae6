/**
 * End to end on real parts: kube control plane + KWOK, sshd hosts, QEMU VMs,
 * the operator as a separate process, and the real kubectl.
 */
import { AppsV1Api, CustomObjectsApi, Watch, type V1Deployment, type V1Node } from '@kubernetes/client-node';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { sha256File } from '../world/images.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';

let sb: Sandbox;
let operator: OperatorProcess;

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e'), log: (l) => console.log(`[sandbox] ${l}`) });
  operator = await sb.startOperator();
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
});

async function getVmm(name: string): Promise<VMMigration> {
  const api = sb.kc.makeApiClient(CustomObjectsApi);
  return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
}

async function waitForPhase(name: string, phases: string[], timeoutMs: number): Promise<VMMigration> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const o = await getVmm(name).catch(() => undefined);
    if (o?.status?.phase && phases.includes(o.status.phase)) return o;
    if (Date.now() > deadline) throw new Error(`${name} did not reach ${phases.join('/')} (status: ${JSON.stringify(o?.status)})`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

function manifest(name: string, spec: Record<string, unknown>): string {
  return JSON.stringify({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec });
}

async function applyStdin(doc: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const { spawn } = await import('node:child_process');
  return new Promise((resolve) => {
    const p = spawn('kubectl', ['--kubeconfig', sb.controlPlane.kubeconfigPath, 'apply', '-f', '-'], { cwd: REPO_ROOT });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('close', (code) => resolve({ code: code ?? 1, stdout, stderr }));
    p.stdin.end(doc);
  });
}

describe('VMMigration validation by the API server (real kubectl)', () => {
  it('rejects a target equal to the source with a readable CEL message', async () => {
    const r = await applyStdin(manifest('bad-same-host', { environments: ['student-42'], sourceHost: 'host01', targetHost: 'host01' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('spec.targetHost must differ from spec.sourceHost');
  });
  it('rejects an unknown strategy and a bad name (targetHost may be left out: the operator chooses)', async () => {
    const r = await applyStdin(manifest('bad-fields', { environments: ['Student_42!'], strategy: 'Teleport' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/spec.strategy: Unsupported value: "Teleport"/);
    expect(r.stderr).toMatch(/spec.environments\[0\]: Invalid value: "Student_42!"/);
  });
  it('rejects a spec naming neither environments nor a source host', async () => {
    const r = await applyStdin(manifest('bad-empty', { targetHost: 'host02' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('spec must name the environments to move');
  });
});

describe('references only the operator can check', () => {
  it('an unknown target host ends Failed with a condition naming it, touching nothing', async () => {
    const r = await applyStdin(manifest('unknown-host', { environments: ['student-42'], targetHost: 'host09' }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('unknown-host', ['Failed', 'Succeeded'], 60_000);
    expect(o.status?.phase).toBe('Failed');
    const ready = o.status?.conditions?.find((c) => c.type === 'Ready');
    expect(ready?.status).toBe('False');
    expect(ready?.message).toContain('target host "host09" is not in the inventory');
    expect(o.status?.conditions?.find((c) => c.type === 'Degraded')?.reason).toBe('InvalidReference');
    await expectUntouched();
  });
  it('an unknown environment ends Failed with a condition naming it, touching nothing', async () => {
    const r = await applyStdin(manifest('unknown-env', { environments: ['student-99'], targetHost: 'host02' }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('unknown-env', ['Failed', 'Succeeded'], 60_000);
    expect(o.status?.phase).toBe('Failed');
    expect(o.status?.conditions?.find((c) => c.type === 'Ready')?.message).toContain('unknown environment "student-99"');
    await expectUntouched();
  });
});

async function expectUntouched(): Promise<void> {
  const h01 = await sb.hypervisor('host01');
  const h02 = await sb.hypervisor('host02');
  for (const vm of sb.environment.vms) {
    expect((await h01.vmStatus(sb.environment.name, vm)).state).toBe('running');
    expect((await h02.vmStatus(sb.environment.name, vm)).state).toBe('absent');
  }
  const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
  for (const n of nodes.items) expect(n.spec?.unschedulable ?? false).toBe(false);
}

describe('rolling migration of a 7-VM environment', () => {
  it('moves every VM to host02 with one node down at a time, the PDB honoured and data intact', async () => {
    const envNodes = new Set(sb.environment.vms.map((v) => v.nodeName));
    const nodeDown = new Map<string, boolean>();
    let maxDownTogether = 0;
    const downSamples: string[] = [];
    let minAvailable = Number.POSITIVE_INFINITY;
    const watch = new Watch(sb.kc);
    const onNode = (_type: string, n: V1Node) => {
      const name = n.metadata?.name ?? '';
      if (!envNodes.has(name)) return;
      const ready = n.status?.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
      nodeDown.set(name, !ready || n.spec?.unschedulable === true);
      const down = [...nodeDown].filter(([, d]) => d).map(([k]) => k);
      if (down.length > maxDownTogether) {
        maxDownTogether = down.length;
        downSamples.push(down.join(','));
      }
    };
    const onDeployment = (_type: string, d: V1Deployment) => {
      if (d.metadata?.name !== sb.workload.name) return;
      minAvailable = Math.min(minAvailable, d.status?.availableReplicas ?? 0);
    };
    const nodeWatch = await watch.watch('/api/v1/nodes', {}, onNode, () => undefined);
    const depWatch = await watch.watch(`/apis/apps/v1/namespaces/${sb.workload.namespace}/deployments`, {}, onDeployment, () => undefined);
    const apps = sb.kc.makeApiClient(AppsV1Api);
    onDeployment('INITIAL', await apps.readNamespacedDeployment({ name: sb.workload.name, namespace: sb.workload.namespace }));

    const started = Date.now();
    await sb.kubectl(['apply', '-f', 'manifests/examples/migration.yaml']);
    // Fail fast on a Failed migration; then prove `kubectl wait` sees the Ready condition.
    await waitForPhase('move-student-42', ['Succeeded', 'Failed'], 900_000);
    const wait = await sb.kubectl(['wait', '-n', SECRET_NAMESPACE, '--for=condition=Ready', 'vmm/move-student-42', '--timeout=30s'], { allowFail: true });
    const wallSeconds = (Date.now() - started) / 1000;
    nodeWatch.abort();
    depWatch.abort();
    const o = await getVmm('move-student-42');
    expect(wait.code, `kubectl wait failed: ${wait.stderr}\nstatus: ${JSON.stringify(o.status, null, 2)}`).toBe(0);

    // status
    expect(o.status?.phase).toBe('Succeeded');
    expect(o.status?.progress).toBe('7/7');
    expect(o.status?.vms).toHaveLength(7);
    for (const v of o.status!.vms!) {
      expect(v.phase, `${v.name}: ${v.message}`).toBe('Succeeded');
      expect(v.downtimeSeconds).toBeGreaterThan(0);
      expect(v.bytesTransferred).toBeGreaterThan(0);
    }
    expect(o.status?.plan?.map((p) => p.vm)).toEqual(['beachhead', 'node-1', 'node-2', 'node-3', 'controller-1', 'controller-2', 'controller-3']);

    // placement and data
    const h01 = await sb.hypervisor('host01');
    const h02 = await sb.hypervisor('host02');
    for (const vm of sb.environment.vms) {
      expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
      expect(['absent', 'stopped']).toContain((await h01.vmStatus(sb.environment.name, vm)).state);
      for (const f of vm.files) {
        const path = `${h02.vmDir(sb.environment.name, vm)}/${f.name}`;
        expect(await sha256File(path), `${vm.name}/${f.name}`).toBe(sb.checksums.get(`${vm.name}/${f.name}`));
      }
    }

    // disruption budget
    expect(maxDownTogether, `nodes down together: ${downSamples.join(' | ')}`).toBe(1);
    expect(minAvailable).toBeGreaterThanOrEqual(sb.workload.minAvailable);

    // nodes end Ready and schedulable
    const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
    for (const n of nodes.items.filter((x) => envNodes.has(x.metadata!.name!))) {
      expect(n.spec?.unschedulable ?? false, n.metadata?.name).toBe(false);
      expect(n.status?.conditions?.find((c) => c.type === 'Ready')?.status, n.metadata?.name).toBe('True');
    }

    // metrics
    const text = await (await fetch(`${operator.metricsUrl}/metrics`)).text();
    expect(text).toMatch(/^vmops_migrations_succeeded_total\{[^}]*\} 1$/m);
    expect(text).toMatch(/^vmops_vm_downtime_seconds_count 7$/m);
    expect(text).toMatch(/^vmops_vm_moves_total\{result="success"\} 7$/m);
    expect(text).toMatch(/^vmops_leader_is_leader 1$/m);

    console.log(`[e2e] wall ${wallSeconds.toFixed(1)} s; downtime per VM: ${o.status!.vms!.map((v) => `${v.name}=${v.downtimeSeconds?.toFixed(2)}s`).join(' ')}`);
  }, 1_000_000);
});


/** Watches the environment's nodes during a move: which went NotReady or unschedulable, and how many at once. */
async function watchNodes(): Promise<{ stop(): void; everDown: Set<string>; maxDownTogether: () => number }> {
  const envNodes = new Set(sb.environment.vms.map((v) => v.nodeName));
  const down = new Map<string, boolean>();
  const everDown = new Set<string>();
  let max = 0;
  const w = await new Watch(sb.kc).watch('/api/v1/nodes', {}, (_t: string, n: V1Node) => {
    const name = n.metadata?.name ?? '';
    if (!envNodes.has(name)) return;
    const isDown = n.status?.conditions?.find((c) => c.type === 'Ready')?.status !== 'True' || n.spec?.unschedulable === true;
    down.set(name, isDown);
    if (isDown) everDown.add(name);
    max = Math.max(max, [...down.values()].filter(Boolean).length);
  }, () => undefined);
  return { stop: () => w.abort(), everDown, maxDownTogether: () => max };
}

describe('downtime strategies through the operator (real QEMU, real kubectl)', () => {
  it('LiveMigrate moves every VM back to host01 while every node stays Ready and schedulable', async () => {
    const nodes = await watchNodes();
    const r = await applyStdin(manifest('live-back', { environments: ['student-42'], targetHost: 'host01', strategy: 'LiveMigrate', live: { fallback: 'None' } }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('live-back', ['Succeeded', 'Failed'], 600_000);
    nodes.stop();
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect([...nodes.everDown]).toEqual([]);
    const h01 = await sb.hypervisor('host01');
    for (const vm of sb.environment.vms) expect((await h01.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
    const downs = o.status!.vms!.map((v) => v.downtimeSeconds ?? Number.NaN);
    for (const d of downs) expect(d).toBeGreaterThan(0);
    console.log(`[e2e] live downtime per VM (stop on source → running on target): ${o.status!.vms!.map((v) => `${v.name}=${v.downtimeSeconds?.toFixed(3)}s`).join(' ')}`);
  }, 700_000);

  it('Rolling with pre-copy moves the environment to host02 again, one node down at a time, data verified', async () => {
    const nodes = await watchNodes();
    const r = await applyStdin(manifest('precopy-again', { environments: ['student-42'], targetHost: 'host02', transfer: { precopy: true }, shutdown: { powerdownTimeout: '1s' } }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('precopy-again', ['Succeeded', 'Failed'], 600_000);
    nodes.stop();
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect(nodes.maxDownTogether()).toBeLessThanOrEqual(1);
    const h02 = await sb.hypervisor('host02');
    for (const vm of sb.environment.vms) expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
    console.log(`[e2e] pre-copy downtime per VM: ${o.status!.vms!.map((v) => `${v.name}=${v.downtimeSeconds?.toFixed(3)}s`).join(' ')}`);
  }, 700_000);
});

describe('crash safety (journal + idempotent steps)', () => {
  it('an operator killed with SIGKILL in the middle of a VM move resumes and finishes: no VM lost or doubled', async () => {
    const r = await applyStdin(manifest('crash-back', { environments: ['student-42'], targetHost: 'host01', shutdown: { powerdownTimeout: '1s' } }));
    expect(r.code, r.stderr).toBe(0);
    let killedAt = '';
    for (const deadline = Date.now() + 300_000; !killedAt; ) {
      const o = await getVmm('crash-back').catch(() => undefined);
      const done = o?.status?.vms?.filter((v) => v.phase === 'Succeeded').length ?? 0;
      const inFlight = o?.status?.vms?.find((v) => v.phase === 'Running' && ['stop', 'transfer', 'start'].includes(v.step ?? ''));
      if (done >= 2 && inFlight) {
        operator.child.kill('SIGKILL');
        killedAt = `${inFlight.name}@${inFlight.step}`;
      }
      if (Date.now() > deadline) throw new Error(`never saw a VM in stop/transfer/start: ${JSON.stringify(o?.status?.vms)}`);
      await new Promise((res) => setTimeout(res, 100));
    }
    // A signalled child has signalCode set and exitCode null.
    await new Promise((res) => (operator.child.exitCode !== null || operator.child.signalCode !== null ? res(undefined) : operator.child.once('exit', res)));
    console.log(`[e2e] operator killed at ${killedAt}`);

    // While no operator runs, the fencing invariant must already hold.
    const h01 = await sb.hypervisor('host01');
    const h02 = await sb.hypervisor('host02');
    const live = (s: string) => s === 'running' || s === 'paused' || s === 'other';
    for (const vm of sb.environment.vms) {
      const [a, b] = await Promise.all([h01.vmStatus(sb.environment.name, vm), h02.vmStatus(sb.environment.name, vm)]);
      expect(live(a.state) && live(b.state), `${vm.name} live on both hosts after the crash`).toBe(false);
    }

    console.log('[e2e] fencing holds while no operator runs; restarting the operator');
    operator = await sb.startOperator();
    console.log('[e2e] operator restarted');
    const o = await waitForPhase('crash-back', ['Succeeded', 'Failed'], 600_000);
    expect(o.status?.phase, `killed at ${killedAt}: ${JSON.stringify(o.status?.vms)}`).toBe('Succeeded');
    for (const vm of sb.environment.vms) {
      expect((await h01.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
      expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('absent');
    }
    const interrupted = o.status!.vms!.find((v) => v.name === killedAt.split('@')[0]);
    expect(interrupted?.attempts).toBeGreaterThanOrEqual(2);
    const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
    for (const n of nodes.items) expect(n.spec?.unschedulable ?? false, n.metadata?.name).toBe(false);
    console.log(`[e2e] operator killed at ${killedAt}; resumed and finished`);
  }, 900_000);
});
