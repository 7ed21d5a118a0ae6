/**
 * The operator's finalizer, end to end on real parts (kube-apiserver, sshd
 * hosts, QEMU), with the operator running under the shipped ServiceAccount
 * and RBAC: deleting a VMMigration mid-move rolls the move back before the
 * object goes — also when the operator was down at the time of the delete.
 * Store: SQLite, or PostgreSQL with VMOPS_TEST_DB=postgres.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { V1Node } from '@kubernetes/client-node';
import type { VMMigration } from '../../src/api/types.js';
import { FINALIZER } from '../../src/controller/finalizer.js';
import { Store } from '../../src/store/store.js';
import { sha256File } from '../world/images.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { getVmm, kubectlStdin, migrationManifest, serviceAccountKubeconfig, waitVmm, watchSplitBrain } from '../world/vmm.js';
import { LOOPBACK } from '../world/loopback.js';

let sb: Sandbox;
let operator: OperatorProcess;
let saKubeconfig: string;

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e-finalizer'), environment: 'student-fin', firstAddress: LOOPBACK.finalizer.first, log: (l) => console.log(`[sandbox] ${l}`) });
  saKubeconfig = await serviceAccountKubeconfig(sb);
  operator = await sb.startOperator({ kubeconfigPath: saKubeconfig });
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
});

/**
 * Applies a move of the whole environment to host02 and returns once a VM is mid-move (stopping or
 * copying: before the target ran). The no-OS VMs ignore the power button, so each stop lasts the whole
 * powerdownTimeout: 20 s leaves a loaded machine's kubectl (2–4 s) ample time to delete mid-move.
 */
async function startMoveAndCatchInFlight(name: string): Promise<{ uid: string; vm: string }> {
  const r = await kubectlStdin(sb, ['apply', '-f', '-'], migrationManifest(name, { environments: [sb.environment.name], targetHost: 'host02', shutdown: { powerdownTimeout: '20s' } }));
  expect(r.code, r.stderr).toBe(0);
  let vm = '';
  const o = await waitVmm(sb, name, 'a VM in stop/transfer', (x) => {
    const v = x?.status?.vms?.find((s) => s.phase === 'Running' && ['stop', 'transfer'].includes(s.step ?? ''));
    vm = v?.name ?? '';
    return !!v;
  }, 300_000, 100);
  expect(o!.metadata.finalizers, 'finalizer added before the first side effect').toContain(FINALIZER);
  return { uid: o!.metadata.uid, vm };
}

async function expectAllOnSource(): Promise<void> {
  const h01 = await sb.hypervisor('host01');
  const h02 = await sb.hypervisor('host02');
  for (const vm of sb.environment.vms) {
    expect((await h01.vmStatus(sb.environment.name, vm)).state, `${vm.name} on host01`).toBe('running');
    expect((await h02.vmStatus(sb.environment.name, vm)).state, `${vm.name} on host02`).toBe('absent');
    for (const f of vm.files) expect(await sha256File(`${h01.vmDir(sb.environment.name, vm)}/${f.name}`), `${vm.name}/${f.name}`).toBe(sb.checksums.get(`${vm.name}/${f.name}`));
  }
  const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
  for (const n of nodes.items) expect(n.spec?.unschedulable ?? false, `${n.metadata?.name} schedulable`).toBe(false);
}

async function storedMove(uid: string, vm: string) {
  const store = await Store.open(sb.dbPath);
  try {
    const move = await store.move(uid, sb.environment.name, vm);
    const journal = (await store.journalEntries(uid, sb.environment.name, vm)).map((e) => `${e.step}:${e.event}`);
    return { move, journal };
  } finally {
    await store.close();
  }
}

/** The object disappears only after the move rolled back: all VMs on host01 with their data, never one live twice. */
async function expectGoneAndRolledBack(name: string, watcher: ReturnType<typeof watchSplitBrain>, uid: string, vm: string) {
  await waitVmm(sb, name, 'the object to be gone', (o) => o === undefined, 180_000);
  const split = await watcher.stop();
  expect(split.worst, `VMs live on two hosts: ${split.offenders.join(', ')}`).toBeLessThanOrEqual(1);
  await expectAllOnSource();
  const stored = await storedMove(uid, vm);
  expect(stored.move?.phase, JSON.stringify(stored.move)).toBe('RolledBack');
  expect(stored.journal.at(-1)).toBe('rollback:end');
  return stored;
}

describe('deleting a VMMigration with a move in flight (finalizer)', () => {
  it('rolls the move back, VM on the source again, and only then lets the object go', async () => {
    const watcher = watchSplitBrain(sb.environment.name);
    const { uid, vm } = await startMoveAndCatchInFlight('cancel-live');
    const del = await sb.kubectl(['delete', 'vmm', '-n', SECRET_NAMESPACE, 'cancel-live', '--wait=false']);
    expect(del.code).toBe(0);
    const { journal } = await expectGoneAndRolledBack('cancel-live', watcher, uid, vm);
    console.log(`[e2e] deleted while ${vm} was in flight: journal ${journal.join(' ')}`);
  }, 600_000);

  it('operator down during the delete: the object waits; the next operator rolls the move back, then releases it', async () => {
    const watcher = watchSplitBrain(sb.environment.name);
    const { uid, vm } = await startMoveAndCatchInFlight('cancel-down');
    operator.child.kill('SIGKILL');
    await new Promise((res) => (operator.child.exitCode !== null || operator.child.signalCode !== null ? res(undefined) : operator.child.once('exit', res)));
    const del = await sb.kubectl(['delete', 'vmm', '-n', SECRET_NAMESPACE, 'cancel-down', '--wait=false']);
    expect(del.code).toBe(0);
    const held = (await getVmm(sb, 'cancel-down')) as VMMigration;
    expect(held.metadata.deletionTimestamp, 'deletion waits for the finalizer').toBeTruthy();
    expect(held.metadata.finalizers).toContain(FINALIZER);
    const before = await storedMove(uid, vm);
    expect(before.move?.phase, 'the move is left in flight by the killed operator').toBe('Running');

    operator = await sb.startOperator({ kubeconfigPath: saKubeconfig });
    const { journal } = await expectGoneAndRolledBack('cancel-down', watcher, uid, vm);
    // The second run located the VM and rolled back; it never moved on to another step.
    const resumed = journal.slice(before.journal.length);
    expect(resumed).toEqual(['precheck:begin', 'precheck:end', 'rollback:begin', 'rollback:end']);
    console.log(`[e2e] operator killed while ${vm} was in flight, deleted while down; journal after restart: ${resumed.join(' ')}`);
  }, 600_000);

  it('a finished VMMigration is released at once', async () => {
    const r = await kubectlStdin(sb, ['apply', '-f', '-'], migrationManifest('finished', { environments: [sb.environment.name], targetHost: 'host02', dryRun: true }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitVmm(sb, 'finished', 'Succeeded', (x) => x?.status?.phase === 'Succeeded', 120_000);
    expect(o!.metadata.finalizers).toContain(FINALIZER);
    const del = await sb.kubectl(['delete', 'vmm', '-n', SECRET_NAMESPACE, 'finished', '--timeout=30s']);
    expect(del.code).toBe(0);
    expect(await getVmm(sb, 'finished')).toBeUndefined();
  }, 200_000);
});
