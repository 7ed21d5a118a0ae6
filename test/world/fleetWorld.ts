/**
 * A fleet on real parts: N student environments × 7 no-OS QEMU VMs on host01 of three sshd test
 * hosts, their guest nodes (KWOK) following their QEMUs, and the real operator as its own process
 * against a real kube-apiserver. Used by the fleet e2e (test/e2e/fleet.test.ts) and by the fleet
 * benchmark (bench/fleet.ts), which moves the same fleet at several parallelisms.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, CustomObjectsApi, KubeConfig, Watch, type V1Node } from '@kubernetes/client-node';
import { pino } from 'pino';
import { stringify } from 'yaml';
import type { EnvironmentSpec } from '../../src/api/inventory.js';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startControlPlane, type ControlPlane } from './controlPlane.js';
import { createGuestNodes, VmLivenessBridge } from './guestCluster.js';
import { adoptHostFile, startHosts, type TestHosts } from './hosts.js';
import { createDiskImage, sha256File } from './images.js';
import { kubectlRun } from './kubectl.js';
import { freePort, operatorEnv, REPO_ROOT, SECRET_NAMESPACE, studentEnvironment } from './sandbox.js';
import { cliArgs } from './cli.js';

export interface Disruption {
  stop(): void;
  /** most nodes of one environment down (NotReady or cordoned) at once */
  maxDownPerEnv(): number;
  /** most environments with a node down at once */
  maxEnvsDisrupted(): number;
  /** status writes (watch MODIFIED events) seen for a VMMigration */
  writes(name: string): number;
}

export interface FleetWorld {
  dir: string;
  kc: KubeConfig;
  envs: EnvironmentSpec[];
  hv: Map<string, Hypervisor>;
  /** sha256 of every VM file before any move, by `env/vm/file` */
  checksums: Map<string, string>;
  /** Applies a VMMigration and waits for it to end (throws unless Succeeded); returns it and the wall time. */
  /** applies the VMMigration and waits until it Succeeded; `afterApply` runs right after the apply (e.g. to edit it while it runs) */
  migrate(name: string, spec: Record<string, unknown>, opts?: { afterApply?: (kubectl: (args: string[], stdin?: string) => Promise<{ code: number; stderr: string }>) => Promise<void> }): Promise<{ o: VMMigration; seconds: number }>;
  watchDisruption(): Promise<Disruption>;
  /** Where each environment's VMs run, read from the hosts (QEMU processes); throws if a VM runs on ≠ 1 host. */
  placement(): Promise<Map<string, Set<string>>>;
  /** Files whose checksum differs from before the moves (empty = data intact), wherever each VM runs now. */
  changedFiles(): Promise<string[]>;
  stop(): Promise<void>;
}

/** diskMiB: each VM's qcow2 size (default 16); denseMiB: data written from its start (default: a few scattered MiB) */
export async function startFleetWorld(opts: { environments: string[]; firstAddress: number; log?: (line: string) => void; diskMiB?: number; denseMiB?: number }): Promise<FleetWorld> {
  const say = opts.log ?? (() => undefined);
  const dir = await mkdtemp(join(tmpdir(), 'vmop-fleet-'));
  let cp: ControlPlane | undefined;
  let hosts: TestHosts | undefined;
  let bridge: VmLivenessBridge | undefined;
  let operator: ChildProcess | undefined;
  const conns: HostConnection[] = [];
  const hv = new Map<string, Hypervisor>();
  const checksums = new Map<string, string>();
  const envs = opts.environments.map((n) => studentEnvironment(n, 'host01'));

  const stop = async () => {
    operator?.kill('SIGTERM');
    await bridge?.stop();
    for (const e of envs) for (const vm of e.vms) for (const h of hv.values()) await h.stopVm(e.name, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
    for (const c of conns) c.close();
    await hosts?.stop();
    await cp?.stop();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  };

  try {
    say(`starting a control plane and 3 hosts; ${envs.length} × 7 VMs on host01…`);
    [cp, hosts] = await Promise.all([startControlPlane({ dataDir: join(dir, 'cp') }), startHosts({ count: 3, baseDir: join(dir, 'hosts'), firstAddress: opts.firstAddress })]);
    const kubeconfigPath = cp.kubeconfigPath;
    const kubectl = (args: string[], stdin?: string) => kubectlRun(kubeconfigPath, args, stdin);
    const kc = new KubeConfig();
    kc.loadFromString(cp.kubeconfigYaml);
    const applied = await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml']);
    if (applied.code !== 0) throw new Error(`kubectl apply of the CRDs failed: ${applied.stderr}`);
    await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);
    for (const h of hosts.hosts) {
      const c = await HostConnection.connect(h, { privateKey: hosts.identity.privateKey });
      conns.push(c);
      // the world's own VM starts and probes log below warn nowhere (the operator's log goes to its file)
      hv.set(h.name, new Hypervisor(h, c).withLogger(pino({ level: 'warn' })));
    }
    const h01 = hv.get('host01')!;
    let seed = 100;
    for (const e of envs) {
      for (const vm of e.vms) {
        const d = h01.vmDir(e.name, vm);
        mkdirSync(d, { recursive: true });
        await createDiskImage(join(d, 'disk0.qcow2'), { sizeMiB: opts.diskMiB ?? 16, format: 'qcow2', seed: seed++, regions: 4, ...(opts.denseMiB ? { denseMiB: opts.denseMiB } : {}) });
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
    const ready = await kubectl(['wait', '--for=condition=Ready', ...envs.flatMap((e) => e.vms.map((v) => `node/${v.nodeName}`)), '--timeout=180s']);
    if (ready.code !== 0) throw new Error(`guest nodes not Ready: ${ready.stderr}`);

    const inventoryPath = join(dir, 'inventory.yaml');
    writeFileSync(inventoryPath, stringify({ hosts: hosts.hosts, environments: envs }));
    const metricsPort = await freePort();
    const logFile = join(dir, 'operator.log');
    const proc = spawn(process.execPath, [...cliArgs('run'), '--kubeconfig', kubeconfigPath, '--inventory', inventoryPath,
      '--db', join(dir, 'operator.db'), '--ssh-key', hosts.identity.privateKeyPath, '--namespace', SECRET_NAMESPACE, '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1'],
    { cwd: REPO_ROOT, stdio: ['ignore', openSync(logFile, 'a'), openSync(logFile, 'a')], env: operatorEnv({ LOG_LEVEL: 'info' }) });
    operator = proc;
    for (let i = 0; !(await fetch(`http://127.0.0.1:${metricsPort}/readyz`).then((r) => r.ok, () => false)); i++) {
      if (proc.exitCode !== null || i > 300) throw new Error(`operator did not start; see ${logFile}`);
      await new Promise((r) => setTimeout(r, 200));
    }

    const getVmm = async (name: string) =>
      (await kc.makeApiClient(CustomObjectsApi).getNamespacedCustomObject({ group: GROUP, version: VERSION, plural: PLURAL, namespace: SECRET_NAMESPACE, name })) as VMMigration;

    const migrate: FleetWorld['migrate'] = async (name, spec, opts) => {
      const doc = { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec: { shutdown: { powerdownTimeout: '1s' }, ...spec } };
      const t0 = Date.now();
      const r = await kubectl(['apply', '-f', '-'], JSON.stringify(doc));
      if (r.code !== 0) throw new Error(`kubectl apply of ${name} failed: ${r.stderr}`);
      await opts?.afterApply?.(kubectl);
      for (;;) {
        const o = await getVmm(name);
        if (o.status?.phase === 'Failed') throw new Error(`${name} failed: ${JSON.stringify(o.status, null, 1)}`);
        if (o.status?.phase === 'Succeeded') return { o, seconds: (Date.now() - t0) / 1000 };
        if (Date.now() - t0 > 1_200_000) throw new Error(`${name} did not finish: ${JSON.stringify(o.status)}`);
        await new Promise((res) => setTimeout(res, 500));
      }
    };

    const watchDisruption = async (): Promise<Disruption> => {
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
        for (const e of envs) perEnv = Math.max(perEnv, downNodes.filter((x) => x === e.name).length);
        envsAtOnce = Math.max(envsAtOnce, new Set(downNodes).size);
      }, () => undefined);
      return { stop: () => { w.abort(); vw.abort(); }, maxDownPerEnv: () => perEnv, maxEnvsDisrupted: () => envsAtOnce, writes: (name) => writes.get(name) ?? 0 };
    };

    const placement = async () => {
      const where = new Map<string, Set<string>>();
      for (const e of envs) {
        const set = new Set<string>();
        for (const vm of e.vms) {
          const running: string[] = [];
          for (const [name, h] of hv) if ((await h.vmStatus(e.name, vm)).state === 'running') running.push(name);
          if (running.length !== 1) throw new Error(`${e.name}/${vm.name} runs on ${running.length} hosts (${running.join(', ')}), not exactly one`);
          set.add(running[0]!);
        }
        where.set(e.name, set);
      }
      return where;
    };

    const changedFiles = async () => {
      const where = await placement();
      const changed: string[] = [];
      for (const e of envs) {
        for (const vm of e.vms) {
          for (const f of vm.files) {
            const key = `${e.name}/${vm.name}/${f.name}`;
            // an environment may be split across hosts mid-move; after a move it is whole on one host
            for (const host of where.get(e.name)!) {
              const h = hv.get(host)!;
              if ((await h.vmStatus(e.name, vm)).state !== 'running') continue;
              if ((await sha256File(`${h.vmDir(e.name, vm)}/${f.name}`)) !== checksums.get(key)) changed.push(`${key} on ${host}`);
            }
          }
        }
      }
      return changed;
    };

    return { dir, kc, envs, hv, checksums, migrate, watchDisruption, placement, changedFiles, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
