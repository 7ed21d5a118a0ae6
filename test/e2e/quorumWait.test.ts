/**
 * Waiting is a state (issue 6): a controller whose quorum check fails at first does not fail the
 * migration. Another controller's VM is stopped by the test; the move of controller-1 waits with
 * Progressing=False / WaitingForQuorum, then proceeds once that VM runs again, and completes.
 * Real parts throughout: control plane + KWOK, sshd hosts, QEMU, the operator as a process.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CoreV1Api, CustomObjectsApi, type V1Node } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { until } from '../world/until.js';
import { getVmm as getVmmOf } from '../world/vmm.js';
import { GROUP, PLURAL, VERSION } from '../../src/api/types.js';
import { Store } from '../../src/store/store.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';

let sb: Sandbox;
let operator: OperatorProcess;

beforeAll(async () => {
  // Its own environment name: the simulated kubelets match a VM's QEMU by -name, so a student-42 VM of
  // any other sandbox on the machine would keep this sandbox's stopped controller "alive".
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e-quorum'), environment: 'student-q', log: (l) => console.log(`[sandbox] ${l}`) });
  operator = await sb.startOperator();
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
});

const getVmm = (name: string) => getVmmOf(sb, name);

async function nodeReady(name: string): Promise<boolean> {
  const n: V1Node = await sb.kc.makeApiClient(CoreV1Api).readNode({ name });
  return n.status?.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
}

describe('a controller move waits for quorum instead of failing', () => {
  it('waits with WaitingForQuorum while another controller is down, proceeds once it is back, completes', async () => {
    const env = sb.environment.name;
    const other = sb.environment.vms.find((v) => v.name === 'controller-2')!;
    const h01 = await sb.hypervisor('host01');
    await h01.stopVm(env, other, { powerdownTimeoutMs: 0 });
    await until(`${other.nodeName} NotReady`, 60_000, async () => ((await nodeReady(other.nodeName)) ? undefined : true));

    const doc = { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'quorum-wait', namespace: SECRET_NAMESPACE }, spec: { environments: [env], targetHost: 'host02', strategy: 'LiveMigrate', live: { fallback: 'None' } } };
    await sb.kc.makeApiClient(CustomObjectsApi).createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body: doc });

    // beachhead and workers move; controller-1's quorum gate holds the migration
    const waiting = await until('Progressing=False/WaitingForQuorum', 600_000, async () => {
      const o = await getVmm('quorum-wait');
      if (o?.status?.phase === 'Failed') throw new Error(`failed instead of waiting: ${o.status.message}`);
      const c = o?.status?.conditions?.find((x) => x.type === 'Progressing');
      return c?.status === 'False' && c.reason === 'WaitingForQuorum' ? o : undefined;
    });
    expect(waiting.status?.phase).toBe('Running');
    expect(waiting.status?.waitingSince).toBeDefined();
    expect(waiting.status?.conditions?.find((c) => c.type === 'Progressing')?.message).toMatch(/controller-2/);
    expect(waiting.status?.conditions?.find((c) => c.type === 'Degraded')?.status).toBe('False');
    const c1 = waiting.status?.vms?.find((v) => v.name === 'controller-1');
    expect(c1?.phase).toBe('Pending');
    expect((await h01.vmStatus(env, sb.environment.vms.find((v) => v.name === 'controller-1')!)).state).toBe('running');
    // re-checked with backoff (2 s at first), not failed: more quorum checks are journaled while it waits.
    // The bound is far above the backoff and below the informer's 120 s relist, which once was the only
    // thing that woke a wait up (a status write's event cancelled the delayed re-queue).
    const uid = waiting.metadata.uid;
    const quorumFails = async () => {
      const store = await Store.open(sb.dbPath);
      try {
        return (await store.journalEntries(uid, env, 'controller-1')).filter((e) => e.step === 'quorum' && e.event === 'fail').length;
      } finally {
        await store.close();
      }
    };
    await until('controller-1 quorum re-checked twice more', 60_000, async () => ((await quorumFails()) >= 3 ? true : undefined));
    const still = await getVmm('quorum-wait');
    expect(still?.status?.phase).toBe('Running');
    expect(still?.status?.conditions?.find((c) => c.type === 'Progressing')?.reason).toBe('WaitingForQuorum');

    // the other controller comes back: the move proceeds and completes
    await h01.startVm(env, other);
    await until(`${other.nodeName} Ready`, 60_000, async () => ((await nodeReady(other.nodeName)) ? true : undefined));
    const done = await until('Succeeded', 600_000, async () => {
      const o = await getVmm('quorum-wait');
      if (o?.status?.phase === 'Failed') throw new Error(`failed: ${o.status.message}`);
      return o?.status?.phase === 'Succeeded' ? o : undefined;
    });
    expect(done.status?.progress).toBe('7/7');
    expect(done.status?.waitingSince).toBeUndefined();
    const h02 = await sb.hypervisor('host02');
    for (const vm of sb.environment.vms) expect((await h02.vmStatus(env, vm)).state, vm.name).toBe('running');

    // the wait was announced as an Event, and the gauge of running migrations is back to 0
    const events = await sb.kc.makeApiClient(CoreV1Api).listNamespacedEvent({ namespace: SECRET_NAMESPACE, fieldSelector: 'involvedObject.name=quorum-wait' });
    expect(events.items.map((e) => e.reason)).toEqual(expect.arrayContaining(['WaitingForQuorum', 'Succeeded']));
    const metrics = await (await fetch(`${operator.metricsUrl}/metrics`)).text();
    expect(metrics).toMatch(/^vmops_migrations_active 0$/m);

    // `history` reads the journal back: controller-1's quorum gate and its steps with timings
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'history', 'quorum-wait', '--db', sb.dbPath], { cwd: REPO_ROOT });
    const from = stdout.indexOf(`${env}/controller-1`);
    const section = stdout.slice(from, stdout.indexOf(`${env}/controller-2`, from));
    expect(section).toMatch(/quorum +failed .*controller-2/);
    expect(section).toMatch(/quorum +done/);
    expect(section).toMatch(/live +done +\d+\.\d\d s/);
    expect(section).toMatch(/start +done/);
  }, 1_200_000);
});
