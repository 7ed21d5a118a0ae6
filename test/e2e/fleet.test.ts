/**
 * Fleet evacuation end to end: 4 environments × 7 no-OS QEMU VMs on host01, evacuated by the real
 * operator onto targets it chooses (host02, host03) with maxParallelEnvironments 2, then moved back,
 * then evacuated again at parallelism 1 — watchers on the guest nodes, checksums, placement policy,
 * and the two wall times side by side (printed, not asserted: timing is the benchmark's business).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, CustomObjectsApi, KubeConfig, Watch, type V1Node } from '@kubernetes/client-node';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import type { EnvironmentSpec } from '../../src/api/inventory.js';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { createGuestNodes, VmLivenessBridge } from '../world/guestCluster.js';
import { adoptHostFile, startHosts, type TestHosts } from '../world/hosts.js';
import { createDiskImage, sha256File } from '../world/images.js';
import { kubectlRun } from '../world/kubectl.js';
import { freePort, REPO_ROOT, SECRET_NAMESPACE, studentEnvironment, operatorEnv } from '../world/sandbox.js';

const ENVS = ['fleet-a', 'fleet-b', 'fleet-c', 'fleet-d'];
let dir: string;
let cp: ControlPlane;
let hosts: TestHosts;
let kc: KubeConfig;
let envs: EnvironmentSpec[];
let bridge: VmLivenessBridge;
let operator: ChildProcess;
const conns: HostConnection[] = [];
const hv = new Map<string, Hypervisor>();
const checksums = new Map<string, string>();

const kubectl = (args: string[], stdin?: string) => kubectlRun(cp.kubeconfigPath, args, stdin);

async function getVmm(name: string): Promise<VMMigration> {
  return (await kc.makeApiClient(CustomObjectsApi).getNamespacedCustomObject({ group: GROUP, version: VERSION, plural: PLURAL, namespace: SECRET_NAMESPACE, name })) as VMMigration;
}

/** Applies a migration and waits for it to end; returns the final object and the wall time. */
async function migrate(name: string, spec: Record<string, unknown>): Promise<{ o: VMMigration; seconds: number }> {
  const doc = { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec: { shutdown: { powerdownTimeout: '1s' }, ...spec } };
  const t0 = Date.now();
  const r = await kubectl(['apply', '-f', '-'], JSON.stringify(doc));
  expect(r.code, r.stderr).toBe(0);
  for (;;) {
    const o = await getVmm(name);
    if (o.status?.phase === 'Succeeded' || o.status?.phase === 'Failed') {
      expect(o.status.phase, JSON.stringify(o.status, null, 1)).toBe('Succeeded');
      return { o, seconds: (Date.now() - t0) / 1000 };
    }
    if (Date.now() - t0 > 1_200_000) throw new Error(`${name} did not finish: ${JSON.stringify(o.status)}`);
    await new Promise((res) => setTimeout(res, 500));
  }
}

/** Per environment: nodes down (NotReady or cordoned) at once; across environments: environments disrupted at once. */
async function watchDisruption(): Promise<{ stop(): void; maxDownPerEnv: () => number; maxEnvsDisrupted: () => number; writes: (name: string) => number }> {
  const envOf = new Map(envs.flatMap((e) => e.vms.map((v) => [v.nodeName, e.name] as const)));
  const down = new Map<string, boolean>();
  let perEnv = 0;
  let envsAtOnce = 0;
  const writes = new Map<string, number>();
  const vw = await new Watch(kc).watch(`/apis/${GROUP}/${VERSION}/namespaces/${SECRET_NAMESPACE}/${PLURAL}`, {}, (t: string, o: VMMigration) => {
    if (t === 'MODIFIED') writes.set(o.metadata.name, (writes.get(o.metadata.name) ?? 0) + 1);
  }, () => undefined);
  const w = await new Watch(kc).watch('/api/v1/nodes', {}, (_t: string, n: V1Node) => {
    const name = n.metadata?.name ?? '';
    if (!envOf.has(name)) return;
    down.set(name, n.status?.conditions?.find((c) => c.type === 'Ready')?.status !== 'True' || n.spec?.unschedulable === true);
    const downNodes = [...down].filter(([, d]) => d).map(([k]) => envOf.get(k)!);
    for (const e of ENVS) perEnv = Math.max(perEnv, downNodes.filter((x) => x === e).length);
    envsAtOnce = Math.max(envsAtOnce, new Set(downNodes).size);
  }, () => undefined);
  return { stop: () => { w.abort(); vw.abort(); }, maxDownPerEnv: () => perEnv, maxEnvsDisrupted: () => envsAtOnce, writes: (name: string) => writes.get(name) ?? 0 };
}

/** Where each environment's VMs run now, read from the hosts (QEMU processes), not from the operator. */
async function placement(): Promise<Map<string, Set<string>>> {
  const where = new Map<string, Set<string>>();
  for (const e of envs) {
    const set = new Set<string>();
    for (const vm of e.vms) {
      const running = [];
      for (const [name, h] of hv) if ((await h.vmStatus(e.name, vm)).state === 'running') running.push(name);
      expect(running, `${e.name}/${vm.name} must run on exactly one host`).toHaveLength(1);
      set.add(running[0]!);
    }
    where.set(e.name, set);
  }
  return where;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmop-fleet-e2e-'));
  [cp, hosts] = await Promise.all([startControlPlane({ dataDir: join(dir, 'cp') }), startHosts({ count: 3, baseDir: join(dir, 'hosts'), firstAddress: 90 })]);
  kc = new KubeConfig();
  kc.loadFromString(cp.kubeconfigYaml);
  expect((await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml'])).code).toBe(0);
  await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);
  for (const h of hosts.hosts) {
    const c = await HostConnection.connect(h, { privateKey: hosts.identity.privateKey });
    conns.push(c);
    // the test's own VM starts and probes log below warn nowhere (the operator's log goes to its file)
    hv.set(h.name, new Hypervisor(h, c).withLogger(pino({ level: 'warn' })));
  }
  envs = ENVS.map((n) => studentEnvironment(n, 'host01'));
  const h01 = hv.get('host01')!;
  let seed = 100;
  for (const e of envs) {
    for (const vm of e.vms) {
      const d = h01.vmDir(e.name, vm);
      mkdirSync(d, { recursive: true });
      await createDiskImage(join(d, 'disk0.qcow2'), { sizeMiB: 16, format: 'qcow2', seed: seed++, regions: 4 });
      await createDiskImage(join(d, 'seed.img'), { sizeMiB: 1, format: 'raw', seed: seed++, regions: 2 });
      for (const f of vm.files) {
        await adoptHostFile(join(d, f.name));
        checksums.set(`${e.name}/${vm.name}/${f.name}`, await sha256File(join(d, f.name)));
      }
      await h01.startVm(e.name, vm);
    }
    await createGuestNodes(kc, e);
    await kc.makeApiClient(CoreV1Api).createNamespacedSecret({ namespace: SECRET_NAMESPACE, body: { metadata: { name: e.kubeconfigSecret.name }, stringData: { kubeconfig: cp.kubeconfigYaml } } });
  }
  bridge = new VmLivenessBridge(kc, envs.flatMap((e) => e.vms.map((v) => ({ nodeName: v.nodeName, qemuName: `${e.name}.${v.name}` }))));
  bridge.start();
  expect((await kubectl(['wait', '--for=condition=Ready', ...envs.flatMap((e) => e.vms.map((v) => `node/${v.nodeName}`)), '--timeout=180s'])).code).toBe(0);

  const inventoryPath = join(dir, 'inventory.yaml');
  writeFileSync(inventoryPath, stringify({ hosts: hosts.hosts, environments: envs }));
  const metricsPort = await freePort();
  operator = spawn(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'run', '--kubeconfig', cp.kubeconfigPath, '--inventory', inventoryPath,
    '--db', join(dir, 'operator.db'), '--ssh-key', hosts.identity.privateKeyPath, '--namespace', SECRET_NAMESPACE, '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1'],
  { cwd: REPO_ROOT, stdio: ['ignore', openSync(join(dir, 'operator.log'), 'a'), openSync(join(dir, 'operator.log'), 'a')], env: operatorEnv({ LOG_LEVEL: 'info' }) });
  for (let i = 0; !(await fetch(`http://127.0.0.1:${metricsPort}/readyz`).then((r) => r.ok, () => false)); i++) {
    if (operator.exitCode !== null || i > 300) throw new Error(`operator did not start; see ${dir}/operator.log`);
    await new Promise((r) => setTimeout(r, 200));
  }
}, 900_000);

afterAll(async () => {
  operator?.kill('SIGTERM');
  await bridge?.stop();
  for (const e of envs ?? []) for (const vm of e.vms) for (const h of hv.values()) await h.stopVm(e.name, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
  for (const c of conns) c.close();
  await hosts?.stop();
  await cp?.stop();
  if (dir && !process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
});

describe('fleet evacuation (4 × 7 VMs, real operator, real QEMU, real sshd, real kube-apiserver)', () => {
  it('evacuates host01 at parallelism 2 onto targets it chose, one VM per environment down, policy held, data intact; then the same at parallelism 1', async () => {
    // guest VMs are 1-vCPU TCG guests on a 2-core machine: the placement allows 16 vCPUs per CPU here
    // dry run first: the plan and the reasons, nothing moves
    const dry = await migrate('evacuate-dry', { sourceHost: 'host01', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50, cpuOvercommitRatio: 16 }, dryRun: true });
    expect(dry.o.status?.environments?.map((e) => `${e.name}→${e.target}`)).toEqual(['fleet-a→host02', 'fleet-b→host03', 'fleet-c→host02', 'fleet-d→host03']);
    for (const e of dry.o.status!.environments!) expect(e.reason).toMatch(/^best of 2 candidate\(s\); [12]\/2 environments after; .* memory free after; .* disk free after; \d+\/\d+ vCPUs(; not host0[23] \(placement policy: it would hold 3 environments, at most 2 allowed \(50% of 4\)\))?$/);
    for (const [, where] of await placement()) expect([...where]).toEqual(['host01']);

    const w2 = await watchDisruption();
    const p2 = await migrate('evacuate-p2', { sourceHost: 'host01', maxParallelEnvironments: 2, placement: { maxEnvironmentsPercentPerHost: 50, cpuOvercommitRatio: 16 } });
    w2.stop();
    expect(w2.maxDownPerEnv()).toBe(1);
    expect(w2.maxEnvsDisrupted()).toBeLessThanOrEqual(2);
    expect(p2.o.status?.environmentProgress).toBe('4/4');
    expect(p2.o.status?.progress).toBe('28/28');
    // parallelism really happened: VM moves of two environments overlapped in time
    const spans = p2.o.status!.vms!.map((v) => ({ env: v.environment, a: Date.parse(v.startedAt!), b: Date.parse(v.finishedAt!) }));
    expect(spans.some((x) => spans.some((y) => y.env !== x.env && y.a < x.b && x.a < y.b))).toBe(true);
    // placement policy: 50% of 4 = at most 2 environments per host, each environment whole on one host, host01 empty
    const where = await placement();
    const perHost = new Map<string, number>();
    for (const [e, set] of where) {
      expect(set.size, `${e} whole on one host`).toBe(1);
      const h = [...set][0]!;
      expect(h).not.toBe('host01');
      perHost.set(h, (perHost.get(h) ?? 0) + 1);
    }
    expect([...perHost.values()].every((n) => n <= 2)).toBe(true);
    for (const e of envs) {
      const h = hv.get([...where.get(e.name)!][0]!)!;
      for (const vm of e.vms) for (const f of vm.files) expect(await sha256File(`${h.vmDir(e.name, vm)}/${f.name}`), `${e.name}/${vm.name}/${f.name}`).toBe(checksums.get(`${e.name}/${vm.name}/${f.name}`));
    }

    // back to host01 (named target), then the same evacuation at parallelism 1
    await migrate('back', { environments: ENVS, targetHost: 'host01', maxParallelEnvironments: 2, placement: { cpuOvercommitRatio: 16 } });
    for (const [, set] of await placement()) expect([...set]).toEqual(['host01']);
    const w1 = await watchDisruption();
    const p1 = await migrate('evacuate-p1', { sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 50, cpuOvercommitRatio: 16 } });
    w1.stop();
    expect(w1.maxDownPerEnv()).toBe(1);
    expect(w1.maxEnvsDisrupted()).toBe(1);
    const after1 = await placement();
    for (const e of envs) {
      const h = hv.get([...after1.get(e.name)!][0]!)!;
      for (const vm of e.vms) for (const f of vm.files) expect(await sha256File(`${h.vmDir(e.name, vm)}/${f.name}`)).toBe(checksums.get(`${e.name}/${vm.name}/${f.name}`));
    }
    console.log(`[fleet e2e] evacuation of 4 × 7 VMs: parallelism 1 ${p1.seconds.toFixed(1)} s, parallelism 2 ${p2.seconds.toFixed(1)} s (${(p1.seconds / p2.seconds).toFixed(2)}× faster); environments disrupted at once: p1 ${w1.maxEnvsDisrupted()}, p2 ${w2.maxEnvsDisrupted()}; status writes: p1 ${w1.writes('evacuate-p1')} (${(w1.writes('evacuate-p1') / p1.seconds).toFixed(2)}/s), p2 ${w2.writes('evacuate-p2')} (${(w2.writes('evacuate-p2') / p2.seconds).toFixed(2)}/s)`);
  }, 3_000_000);
});
