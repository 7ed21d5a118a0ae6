/**
 * `BENCH_PARTS=scale npm run bench`: the operator at fleet scale — an inventory of 100 student
 * environments (700 VMs) across 10 hosts.
 *
 * 1. Planning time (in process): target selection for an evacuation of one host and for moving
 *    all 100 environments, against the fixed-target plan of the same VMs as the baseline. Host
 *    capacities here are synthetic (stated in the output).
 * 2. The real operator (compiled, `node dist/src/cli/main.js run`) against a real kube-apiserver,
 *    with 10 real sshd hosts (capacity read over SSH) and the 100-environment inventory: RSS idle,
 *    RSS after dry-run plans of the evacuation and of all 100 environments, the status object's
 *    size in bytes, and the status writes it made (audited from the API server's view: the
 *    object's resourceVersion changes). The moves themselves are planned, not run.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdirSync, openSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { KubeConfig, Watch } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import type { EnvironmentSpec, HostSpec } from '../src/api/inventory.js';
import { settingsFrom, type VMMigration } from '../src/api/types.js';
import { planMigration } from '../src/planner/plan.js';
import type { HostCapacity } from '../src/planner/placement.js';
import { startControlPlane } from '../test/world/controlPlane.js';
import { startHosts } from '../test/world/hosts.js';
import { freePort, REPO_ROOT } from '../test/world/sandbox.js';

const execFileP = promisify(execFile);
const GiB = 1024 ** 3;
const HOSTS = 10;
const ENVS = 100;
const NS = 'vm-migration-system';

export function fleetInventory(hosts: HostSpec[], opts: { memoryMiB: number; cpus: number }): EnvironmentSpec[] {
  const roles = [['beachhead', 'beachhead'], ['controller-1', 'controller'], ['controller-2', 'controller'], ['controller-3', 'controller'], ['node-1', 'worker'], ['node-2', 'worker'], ['node-3', 'worker']] as const;
  return Array.from({ length: ENVS }, (_, i) => {
    const name = `student-${String(i + 1).padStart(3, '0')}`;
    const host = hosts[i % hosts.length]!.name;
    return {
      name,
      kubeconfigSecret: { namespace: NS, name: `${name}-kubeconfig`, key: 'kubeconfig' },
      vms: roles.map(([vm, role]) => ({ name: vm, role, nodeName: `${name}-${vm}`, host, memoryMiB: opts.memoryMiB, cpus: opts.cpus, files: [{ name: 'disk0.qcow2', kind: 'disk' as const, format: 'qcow2' as const }] })),
    };
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function timeIt(fn: () => unknown, runs: number): number {
  fn(); // warm-up (JIT)
  const t: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    fn();
    t.push(performance.now() - t0);
  }
  return median(t);
}

function planningTable(): string {
  const hosts: HostSpec[] = Array.from({ length: HOSTS }, (_, i) => ({ name: `host${String(i + 1).padStart(2, '0')}`, address: '10.0.0.1', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: '/srv/vms' }));
  const envs = fleetInventory(hosts, { memoryMiB: 4096, cpus: 2 });
  // synthetic, stated: a 512 GiB / 64-core host with 8 TiB free, 18 GiB allocated per environment (the seed's figure)
  const capacity = new Map<string, HostCapacity>(hosts.map((h) => [h.name, {
    host: h.name, memTotalBytes: 512 * GiB, memAvailableBytes: 400 * GiB, cpus: 64, diskFreeBytes: 8192 * GiB,
    environmentBytes: Object.fromEntries(envs.filter((e) => e.vms[0]!.host === h.name).map((e) => [e.name, 18 * GiB])),
  }]));
  const runs = 50;
  const rows: Array<[string, number, number]> = [];
  const cases: Array<[string, () => ReturnType<typeof planMigration>]> = [
    ['(b) baseline: evacuate host01 → host02 (named target, no capacity)', () => planMigration(hosts, envs, settingsFrom({ sourceHost: 'host01', targetHost: 'host02' }))],
    ['evacuate host01, targets chosen, capacity + 15% policy', () => planMigration(hosts, envs, settingsFrom({ sourceHost: 'host01' }), capacity)],
    ['all 100 environments, targets chosen, capacity + 15% policy', () => planMigration(hosts, envs, settingsFrom({ environments: envs.map((e) => e.name) }), capacity)],
  ];
  for (const [name, fn] of cases) {
    const r = fn();
    if (r.problems.length > 0) throw new Error(`${name}: ${r.problems[0]}`);
    rows.push([`${name}: ${r.entries.length} VMs`, timeIt(fn, runs), 0]);
  }
  const baseline = rows[0]![1];
  for (const r of rows) r[2] = r[1] / baseline;
  return [
    `Planning, ${ENVS} environments × 7 VMs on ${HOSTS} hosts (median of ${runs}; synthetic capacity 512 GiB, 64 CPUs, 8 TiB per host, 18 GiB per environment):`,
    '',
    '| plan | ms | × (b) |',
    '|---|---:|---:|',
    ...rows.map(([n, ms, x]) => `| ${n} | ${ms.toFixed(2)} | ${x.toFixed(2)} |`),
  ].join('\n');
}

async function rssBytes(pid: number): Promise<number> {
  const s = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(s)![1]) * 1024;
}

async function operatorTable(baseDir: string): Promise<string> {
  const lines: string[] = [];
  const [cp, world] = await Promise.all([
    startControlPlane({ dataDir: path.join(baseDir, 'control-plane') }),
    startHosts({ count: HOSTS, baseDir: path.join(baseDir, 'hosts'), firstAddress: 70 }),
  ]);
  const kubectl = (args: string[]) => execFileP('kubectl', ['--kubeconfig', cp.kubeconfigPath, ...args], { cwd: REPO_ROOT, maxBuffer: 64 << 20 });
  let child: ReturnType<typeof spawn> | undefined;
  let watchReq: { abort(): void } | undefined;
  try {
    await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml']);
    await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);
    // small VMs as in the test world; each host's VM directory holds its environments' directories (du reads them)
    const envs = fleetInventory(world.hosts, { memoryMiB: 32, cpus: 1 });
    for (const e of envs) {
      const h = world.hosts.find((x) => x.name === e.vms[0]!.host)!;
      for (const vm of e.vms) {
        const dir = path.join(h.vmDir, e.name, vm.name);
        mkdirSync(dir, { recursive: true });
        writeFileSync(path.join(dir, 'disk0.qcow2'), Buffer.alloc(64 * 1024, 1));
      }
    }
    await execFileP('chown', ['-R', 'vmhost:vmhost', ...world.hosts.map((h) => h.vmDir)]);
    await execFileP('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: REPO_ROOT });
    const startOperator = async (tag: string, environments: EnvironmentSpec[]) => {
      const inventoryPath = path.join(baseDir, `inventory-${tag}.yaml`);
      writeFileSync(inventoryPath, stringify({ hosts: world.hosts, environments }));
      const metricsPort = await freePort();
      const logFd = openSync(path.join(baseDir, 'operator.log'), 'a');
      const c = spawn(process.execPath, [path.join(REPO_ROOT, 'dist/src/cli/main.js'), 'run', '--kubeconfig', cp.kubeconfigPath, '--inventory', inventoryPath,
        '--db', path.join(baseDir, `operator-${tag}.db`), '--ssh-key', world.identity.privateKeyPath, '--namespace', NS, '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1'],
      { cwd: REPO_ROOT, stdio: ['ignore', logFd, logFd], env: { ...process.env, LOG_LEVEL: 'warn' } });
      for (let i = 0; ; i++) {
        if (c.exitCode !== null) throw new Error(`operator exited with ${c.exitCode}; see ${baseDir}/operator.log`);
        if (await fetch(`http://127.0.0.1:${metricsPort}/readyz`).then((r) => r.ok, () => false)) break;
        if (i > 300) throw new Error('operator not ready within 60 s');
        await new Promise((r) => setTimeout(r, 200));
      }
      await new Promise((r) => setTimeout(r, 3000));
      return c;
    };
    // baseline in the same run: the same operator with a one-environment inventory
    const small = await startOperator('one', envs.slice(0, 1));
    const baselineRss = await rssBytes(small.pid!);
    small.kill('SIGTERM');
    await new Promise((r) => small.once('exit', r));
    child = await startOperator('hundred', envs);
    // every write of a VMMigration, as the API server's watch reports it
    const kc = new KubeConfig();
    kc.loadFromString(cp.kubeconfigYaml);
    const writes = new Map<string, number>();
    watchReq = await new Watch(kc).watch(`/apis/vmops.dev/v1alpha1/namespaces/${NS}/vmmigrations`, {}, (type: string, obj: VMMigration) => {
      if (type === 'MODIFIED') writes.set(obj.metadata.name, (writes.get(obj.metadata.name) ?? 0) + 1);
    }, () => undefined);
    const idle = await rssBytes(child.pid!);
    lines.push(`Operator process (compiled JS, Node ${process.version}) against a real kube-apiserver and ${HOSTS} real sshd hosts, inventory of ${ENVS} environments / ${ENVS * 7} VMs loaded:`, '');
    const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} (${(b / baselineRss).toFixed(2)}× (b))`;
    lines.push('| what | RSS MiB | status bytes | status writes | plan ms (operator) |', '|---|---:|---:|---:|---:|');
    lines.push(`| (b) baseline: idle, 1 environment in the inventory | ${mib(baselineRss)} | | | |`);
    lines.push(`| idle, ${ENVS} environments loaded | ${mib(idle)} | | | |`);

    const apply = async (name: string, spec: VMMigration['spec']) => {
      const doc = { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: NS }, spec };
      const p = execFileP('kubectl', ['--kubeconfig', cp.kubeconfigPath, 'apply', '-f', '-']);
      p.child.stdin!.end(JSON.stringify(doc));
      await p;
      const t0 = Date.now();
      for (;;) {
        const { stdout } = await kubectl(['get', 'vmm', '-n', NS, name, '-o', 'json']);
        const o = JSON.parse(stdout) as VMMigration;
        if (o.status?.phase === 'Succeeded' || o.status?.phase === 'Failed') {
          if (o.status.phase === 'Failed') throw new Error(`${name}: ${o.status.message}`);
          const statusBytes = Buffer.byteLength(JSON.stringify(o.status));
          const objectBytes = Buffer.byteLength(stdout);
          const rss = await rssBytes(child!.pid!);
          lines.push(`| dry run "${name}": ${o.status.plan?.length} VMs, ${o.status.environments?.length ?? '?'} environments planned (capacity read over SSH) | ${mib(rss)} | ${statusBytes} (object ${objectBytes}) | ${writes.get(name) ?? 0} | ${Date.now() - t0} (incl. 100 ms polling) |`);
          return;
        }
        if (Date.now() - t0 > 120_000) throw new Error(`${name} did not finish`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const placement = { maxEnvironmentsPercentPerHost: 15, cpuOvercommitRatio: 64, memoryReserveMiB: 0, diskReserveMiB: 0 };
    await apply('evacuate-host01', { sourceHost: 'host01', placement, dryRun: true });
    await apply('all-100', { environments: envs.map((e) => e.name), placement, dryRun: true });
    lines.push('', '"status writes": MODIFIED events of the object on an API watch (every status patch the operator made).');
  } finally {
    watchReq?.abort();
    child?.kill('SIGTERM');
    await cp.stop();
    await world.stop();
  }
  return lines.join('\n');
}

export async function runScale(opts: { baseDir: string }): Promise<string> {
  const out = [planningTable()];
  console.error(`${out[0]}\n`);
  out.push(await operatorTable(opts.baseDir));
  return out.join('\n\n');
}
