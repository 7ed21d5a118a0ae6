/**
 * The local sandbox: a real control plane (management + guest cluster share
 * it), two hypervisor hosts behind real sshd on 127.0.0.2/3, one student
 * environment of 7 QEMU VMs on host01 with its guest cluster (KWOK nodes
 * whose heartbeats follow their VMs), a PDB-protected workload, the
 * environment's kubeconfig Secret and the inventory file for the operator.
 * Used by `npm run demo` and by the end-to-end test.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, writeFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { CoreV1Api, KubeConfig } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import { vmDirectory, type EnvironmentSpec, type HostSpec, type Inventory, type VMSpec } from '../../src/api/inventory.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startControlPlane, type ControlPlane } from './controlPlane.js';
import { createGuestNodes, deployStudentWorkload, VmLivenessBridge } from './guestCluster.js';
import { inClusterIdentity } from './inCluster.js';
import { adoptHostFile, startHosts, type TestHosts } from './hosts.js';
import { createDiskImage, sha256File } from './images.js';
import { GUEST_INITRD, GUEST_KERNEL, guestAppend, installGuest } from './guestImage.js';
import { GuestObserver } from './guestObserver.js';
import { startPostgres } from './postgres.js';
import { cliArgs } from './cli.js';

const execFileP = promisify(execFile);
export const REPO_ROOT = resolve(import.meta.dirname, '../..');

export interface SandboxOptions {
  dir: string;
  environment?: string;
  /** virtual size of each VM's system disk */
  diskMiB?: number;
  workloadReplicas?: number;
  workloadMinAvailable?: number;
  /**
   * 'linux': every VM boots the real test guest (test/world/guestImage.ts; the demo uses it);
   * 'none' (default while the e2e tests compare disk checksums across moves): no OS, SeaBIOS only
   */
  guest?: 'linux' | 'none';
  /** only these VMs of the student environment (default: all seven) */
  vms?: string[];
  /** the hosts listen on 127.0.0.N and N+1 (default 2; test files take theirs from test/world/loopback.ts) */
  firstAddress?: number;
  log?: (line: string) => void;
  /** the operator's store: SQLite file (default) or a private PostgreSQL server; default from VMOPS_TEST_DB */
  db?: 'sqlite' | 'postgres';
}

export interface Sandbox {
  dir: string;
  controlPlane: ControlPlane;
  kc: KubeConfig;
  hosts: TestHosts;
  environment: EnvironmentSpec;
  inventoryPath: string;
  /** the operator's --db: an SQLite file or a postgres:// URL (test password inside) */
  dbPath: string;
  /** sha256 of every VM file before the move: `${vm}/${file}` → hash */
  checksums: Map<string, string>;
  workload: { namespace: string; name: string; minAvailable: number; replicas: number };
  bridge: VmLivenessBridge;
  /** per VM name, with guest 'linux': the guest's heartbeat/log observer, following it across both hosts */
  observers: Map<string, GuestObserver>;
  kubectl(args: string[], opts?: { allowFail?: boolean }): Promise<{ stdout: string; stderr: string; code: number }>;
  hypervisor(hostName: string): Promise<Hypervisor>;
  startOperator(opts?: OperatorOptions): Promise<OperatorProcess>;
  stop(): Promise<void>;
}

export interface OperatorOptions {
  metricsPort?: number;
  logFile?: string;
  /** run with these credentials instead of the admin kubeconfig (e.g. the shipped ServiceAccount's token) */
  kubeconfigPath?: string;
  /** RBAC from manifests/rbac.yaml, a TokenRequest token mounted where pods have it, no kubeconfig (test/world/inCluster.ts) */
  inCluster?: boolean;
  /** false: no Lease election, so a restarted operator does not wait out a SIGKILLed one's Lease (test/e2e/faults.test.ts) */
  leaderElect?: boolean;
}

export interface OperatorProcess {
  child: ChildProcess;
  /** the Lease identity and journal actor of this process */
  identity: string;
  metricsUrl: string;
  /** its stdout and stderr */
  logPath: string;
  /** in cluster: the ServiceAccount token it runs with */
  serviceAccountToken?: string;
  stop(): Promise<void>;
}

export const SECRET_NAMESPACE = 'vm-migration-system';

export function studentEnvironment(name: string, host: string, guest: 'linux' | 'none' = 'none'): EnvironmentSpec {
  const vm = (vmName: string, role: VMSpec['role']): VMSpec => ({
    name: vmName, role, nodeName: `${name}-${vmName}`, host, memoryMiB: guest === 'linux' ? 96 : 32, cpus: 1,
    files: [
      { name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' },
      // a non-disk file that must travel with the VM (think cloud-init seed / firmware vars)
      { name: 'seed.img', kind: 'file' },
      ...(guest === 'linux' ? [{ name: GUEST_KERNEL, kind: 'file' as const }, { name: GUEST_INITRD, kind: 'file' as const }] : []),
    ],
    ...(guest === 'linux' ? { boot: { kernel: GUEST_KERNEL, initrd: GUEST_INITRD, append: guestAppend({ writesPerSecond: 20 }) } } : {}),
  });
  return {
    name,
    kubeconfigSecret: { namespace: SECRET_NAMESPACE, name: `${name}-kubeconfig`, key: 'kubeconfig' },
    vms: [
      vm('beachhead', 'beachhead'),
      vm('controller-1', 'controller'), vm('controller-2', 'controller'), vm('controller-3', 'controller'),
      vm('node-1', 'worker'), vm('node-2', 'worker'), vm('node-3', 'worker'),
    ],
  };
}

export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, host, () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

export async function startSandbox(opts: SandboxOptions): Promise<Sandbox> {
  const say = opts.log ?? (() => undefined);
  const dir = resolve(opts.dir);
  // VMs of an earlier run that was killed before its cleanup would keep their guest nodes "alive".
  await killSandboxQemu(dir);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const cleanups: Array<() => Promise<void> | void> = [];
  const stop = async () => {
    for (const c of cleanups.reverse()) await Promise.resolve().then(c).catch(() => undefined);
  };
  try {
    say('starting control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)…');
    const [controlPlane, hosts] = await Promise.all([
      startControlPlane({ dataDir: join(dir, 'control-plane') }),
      startHosts({ count: 2, baseDir: join(dir, 'hosts'), firstAddress: opts.firstAddress }),
    ]);
    cleanups.push(() => controlPlane.stop(), () => hosts.stop());
    const kc = new KubeConfig();
    kc.loadFromString(controlPlane.kubeconfigYaml);

    const kubectl = kubectlRunner(controlPlane.kubeconfigPath);
    say('installing the VMMigration CRD and namespace with kubectl…');
    await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml']);
    await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);

    const host01 = hosts.hosts[0]!;
    const guest = opts.guest ?? 'none';
    const full = studentEnvironment(opts.environment ?? 'student-42', host01.name, guest);
    const environment = opts.vms ? { ...full, vms: full.vms.filter((v) => opts.vms!.includes(v.name)) } : full;
    const conns: HostConnection[] = [];
    cleanups.push(() => conns.forEach((c) => c.close()));
    const hypervisor = async (name: string) => {
      const host = hosts.hosts.find((h) => h.name === name);
      if (!host) throw new Error(`no sandbox host ${name}`);
      const conn = await HostConnection.connect(host, { privateKey: hosts.identity.privateKey });
      conns.push(conn);
      return new Hypervisor(host, conn);
    };

    say(`creating ${environment.vms.length} VM disk images on ${host01.name} and booting the VMs…`);
    const checksums = new Map<string, string>();
    const h01 = await hypervisor(host01.name);
    let seed = 1;
    for (const vm of environment.vms) {
      const vmDir = h01.vmDir(environment.name, vm);
      mkdirSync(vmDir, { recursive: true });
      if (guest === 'linux') await installGuest(vmDir, { diskMiB: opts.diskMiB ?? 64, seed: seed++ });
      else await createDiskImage(join(vmDir, 'disk0.qcow2'), { sizeMiB: opts.diskMiB ?? 64, format: 'qcow2', seed: seed++ });
      await createDiskImage(join(vmDir, 'seed.img'), { sizeMiB: 1, format: 'raw', seed: seed++, regions: 2 });
      for (const f of vm.files) {
        await adoptHostFile(join(vmDir, f.name));
        checksums.set(`${vm.name}/${f.name}`, await sha256File(join(vmDir, f.name)));
      }
    }
    cleanups.push(() => killSandboxQemu(dir));
    const observers = new Map<string, GuestObserver>();
    if (guest === 'linux') {
      for (const vm of environment.vms) {
        observers.set(vm.name, new GuestObserver(hosts.hosts.map((h) => join(vmDirectory(h, environment.name, vm.name), 'heartbeat.sock'))));
      }
      cleanups.push(() => observers.forEach((o) => o.stop()));
    }
    for (const vm of environment.vms) await h01.startVm(environment.name, vm);
    if (guest === 'linux') {
      say('waiting for the guests to boot (log verified, heartbeat)…');
      for (const [name, o] of observers) {
        const v = await o.bootVerdict(join(vmDirectory(h01.host, environment.name, name), 'serial.log'), { timeoutMs: 180_000 });
        if (!v.ok) throw new Error(`a guest's log is not intact at first boot: ${v.reason}`);
        if (v.via === 'console') say(`${name}: the heartbeat port missed the boot verdict; read it from the console`);
      }
    }

    say('registering the guest cluster nodes (KWOK) and the student workload with its PodDisruptionBudget…');
    await createGuestNodes(kc, environment);
    // With a real guest a node is Ready while its guest serves (beats), as a kubelet would be — not
    // while a QEMU process merely exists: a booting or shutting-down guest is down for the student.
    const serving = async () => new Set([...observers].filter(([, o]) => o.isBeating(2000)).map(([name]) => `${environment.name}.${name}`));
    // and its kubelet reports the guest's boot (guestd's boot count, new at every boot) as the node's bootID
    const bootOf = (qemuName: string) => {
      const b = observers.get(qemuName.slice(environment.name.length + 1))?.lastBeat();
      return b && b.boot > 0 ? `${qemuName}-boot-${b.boot}` : undefined;
    };
    const bridge = new VmLivenessBridge(kc, environment.vms.map((v) => ({ nodeName: v.nodeName, qemuName: `${environment.name}.${v.name}` })), guest === 'linux' ? { live: serving, boot: bootOf } : {});
    bridge.start();
    cleanups.push(() => bridge.stop());
    await kubectl(['wait', '--for=condition=Ready', ...environment.vms.map((v) => `node/${v.nodeName}`), '--timeout=120s']);
    const workload = { namespace: `${environment.name}-apps`, name: 'web', replicas: opts.workloadReplicas ?? 6, minAvailable: opts.workloadMinAvailable ?? 4 };
    await deployStudentWorkload(kc, { namespace: workload.namespace, name: workload.name, replicas: workload.replicas, minAvailable: workload.minAvailable, nodeNames: environment.vms.filter((v) => v.role === 'worker').map((v) => v.nodeName) });
    await kubectl(['rollout', 'status', '-n', workload.namespace, `deployment/${workload.name}`, '--timeout=120s']);

    // The operator reaches the guest cluster only through this Secret.
    const core = kc.makeApiClient(CoreV1Api);
    await core.createNamespacedSecret({
      namespace: SECRET_NAMESPACE,
      body: { metadata: { name: environment.kubeconfigSecret.name }, type: 'Opaque', stringData: { kubeconfig: controlPlane.kubeconfigYaml } },
    });

    const inventory: Inventory = { hosts: hosts.hosts, environments: [environment] };
    const inventoryPath = join(dir, 'inventory.yaml');
    writeFileSync(inventoryPath, `# written by the sandbox; format: README "Inventory file"\n${stringify(inventoryForFile(inventory))}`);
    let dbPath = join(dir, 'operator.db');
    if ((opts.db ?? process.env.VMOPS_TEST_DB ?? 'sqlite') === 'postgres') {
      say('starting a private PostgreSQL for the operator store…');
      const pg = await startPostgres();
      cleanups.push(() => pg.stop());
      dbPath = await pg.createDatabase('vmops');
    }

    const startOperator = async (o: OperatorOptions = {}): Promise<OperatorProcess> => {
      const proc = await startOperatorProcess({
        dir, inventoryPath, dbPath, sshKeyPath: hosts.identity.privateKeyPath, ...o,
        kubeconfigPath: o.kubeconfigPath ?? controlPlane.kubeconfigPath, adminKubeconfigPath: controlPlane.kubeconfigPath,
      });
      cleanups.push(() => proc.stop());
      return proc;
    };

    return { dir, controlPlane, kc, hosts, environment, inventoryPath, dbPath, checksums, workload, bridge, observers, kubectl, hypervisor, startOperator, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

export type Kubectl = (args: string[], opts?: { allowFail?: boolean }) => Promise<{ stdout: string; stderr: string; code: number }>;

/** The machine's real kubectl against one cluster. */
export function kubectlRunner(kubeconfigPath: string): Kubectl {
  return async (args, o = {}) => {
    try {
      const { stdout, stderr } = await execFileP('kubectl', ['--kubeconfig', kubeconfigPath, ...args], { cwd: REPO_ROOT, maxBuffer: 32 << 20 });
      return { stdout, stderr, code: 0 };
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string; code?: number };
      if (!o.allowFail) throw new Error(`kubectl ${args.join(' ')} failed: ${e.stderr ?? String(err)}`);
      return { stdout: e.stdout ?? '', stderr: e.stderr ?? '', code: typeof e.code === 'number' ? e.code : 1 };
    }
  };
}

/** The operator as a child process (`src/cli/main.ts run`), ready once its /readyz answers; stop() = SIGTERM, then SIGKILL. */
/**
 * Environment for an operator child process: its log goes to its own stdout (the test's operator.log),
 * so the test process's VMOPS_LOG_FILE (vitest.config.ts) is not passed on.
 */
export function operatorEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, LOG_LEVEL: process.env.LOG_LEVEL ?? 'info', ...extra };
  delete env.VMOPS_LOG_FILE;
  return env;
}

/**
 * The operator as a child process, ready (/readyz) when this returns. `kubeconfigPath` is what it runs
 * with; `inCluster` instead applies manifests/rbac.yaml and mounts a TokenRequest token where pods have
 * it (test/world/inCluster.ts), using `adminKubeconfigPath` for that setup only.
 */
export async function startOperatorProcess(o: OperatorOptions & { dir: string; kubeconfigPath: string; adminKubeconfigPath?: string; inventoryPath: string; dbPath: string; sshKeyPath: string }): Promise<OperatorProcess> {
  const metricsPort = o.metricsPort ?? (await freePort());
  const logPath = o.logFile ?? join(o.dir, 'operator.log');
  const logFd = openSync(logPath, 'a');
  let argv = [process.execPath, ...cliArgs('run'),
    ...(o.inCluster ? [] : ['--kubeconfig', o.kubeconfigPath]), '--inventory', o.inventoryPath, '--db', o.dbPath,
    '--ssh-key', o.sshKeyPath, '--namespace', SECRET_NAMESPACE,
    '--metrics-port', String(metricsPort), '--metrics-host', '127.0.0.1', ...(o.leaderElect === false ? [] : ['--leader-elect'])];
  // the operator's own log (stdout) is its log file here; VMOPS_LOG_FILE is the test process's
  let env: NodeJS.ProcessEnv = operatorEnv();
  let serviceAccountToken: string | undefined;
  if (o.inCluster) {
    const admin = o.adminKubeconfigPath ?? o.kubeconfigPath;
    await kubectlRunner(admin)(['apply', '-f', 'manifests/rbac.yaml']);
    const id = await inClusterIdentity({ kubeconfigPath: admin, dir: join(o.dir, 'in-cluster'), namespace: SECRET_NAMESPACE, serviceAccount: 'vm-migration-operator' });
    argv = id.wrap(argv);
    serviceAccountToken = id.token;
    env = id.env(env);
  }
  const child = spawn(argv[0]!, argv.slice(1), { cwd: REPO_ROOT, stdio: ['ignore', logFd, logFd], env });
  const metricsUrl = `http://127.0.0.1:${metricsPort}`;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const proc: OperatorProcess = {
    child, metricsUrl, logPath, identity: `${hostname()}-${child.pid}`, ...(serviceAccountToken ? { serviceAccountToken } : {}),
    stop: async () => {
      const running = () => child.exitCode === null && child.signalCode === null;
      if (running()) child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
      if (running()) child.kill('SIGKILL');
    },
  };
  for (let i = 0; ; i++) {
    if (child.exitCode !== null) throw new Error(`operator exited with ${child.exitCode}; see ${logPath}`);
    const ok = await fetch(`${metricsUrl}/readyz`).then((r) => r.ok, () => false);
    if (ok) break;
    if (i > 300) {
      await proc.stop();
      throw new Error('operator did not become ready within 60 s');
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return proc;
}

export function inventoryForFile(inv: Inventory): unknown {
  return {
    hosts: inv.hosts.map((h: HostSpec) => ({ name: h.name, address: h.address, port: h.port, user: h.user, hostKey: h.hostKey, vmDir: h.vmDir, qemu: h.qemu, authorizedKeysFile: h.authorizedKeysFile })),
    environments: inv.environments,
  };
}

/**
 * Last-resort cleanup: no QEMU or qemu-nbd of this sandbox (its disks live under `dir`) may outlive
 * it — a test that failed mid-mirror leaves a qemu-nbd that the next run in the same directory would
 * count as its own leftover; other sandboxes' processes are left alone.
 */
export async function killSandboxQemu(dir: string): Promise<void> {
  const { readdir, readFile } = await import('node:fs/promises');
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid)) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith('qemu-system') || cmd.includes('/qemu-system') || cmd.startsWith('qemu-nbd\0')) {
      if (cmd.includes(`${dir}/`)) {
        try {
          process.kill(Number(pid), 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
  }
}
