/**
 * The end-to-end world for the HA guest: a management cluster (test/world/controlPlane.ts) holding the
 * VMMigrations, two hypervisor hosts (real sshd), and on host01 the 7 QEMU VMs of one student environment
 * whose guest cluster is the real HA control plane of haGuest.ts (etcd ×3, kube-apiserver ×3, NGINX on the
 * beachhead, KWOK workers following their VMs). The operator runs as a process with an inventory that
 * describes the environment's control plane and, unless told otherwise, its load balancer.
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { CoreV1Api, KubeConfig } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import type { EnvironmentSpec, Inventory } from '../../src/api/inventory.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startControlPlane, type ControlPlane } from './controlPlane.js';
import { deployStudentWorkload } from './guestCluster.js';
import { startHaGuest, type HaGuest } from './haGuest.js';
import { startHosts, type TestHosts } from './hosts.js';
import { createDiskImage } from './images.js';
import { inventoryForFile, killSandboxQemu, kubectlRunner, SECRET_NAMESPACE, startOperatorProcess, type Kubectl, type OperatorProcess } from './sandbox.js';

export interface HaSandbox {
  dir: string;
  controlPlane: ControlPlane;
  kc: KubeConfig;
  kubectl: Kubectl;
  hosts: TestHosts;
  ha: HaGuest;
  environment: EnvironmentSpec;
  dbPath: string;
  hypervisor(hostName: string): Promise<Hypervisor>;
  /** writes the inventory (with or without the load balancer) and starts the operator with it */
  startOperator(opts: { loadBalancer: boolean; logFile?: string }): Promise<OperatorProcess>;
  stop(): Promise<void>;
}

export async function startHaSandbox(opts: {
  dir: string;
  environment?: string;
  log?: (l: string) => void;
  /** the hypervisor hosts listen on 127.0.0.N and N+1 (default 2) */
  firstAddress?: number;
  /** the guest's load balancer on 127.0.0.N, its controllers on N+1..N+3 (default 30) */
  addressBase?: number;
  /**
   * the controllers' disks (default like every VM's: 16 MiB, ~2 MiB of it written): more data keeps a
   * controller down longer while a capped copy moves it
   */
  controllerDisk?: { sizeMiB: number; denseMiB: number };
}): Promise<HaSandbox> {
  const say = opts.log ?? (() => undefined);
  const dir = resolve(opts.dir);
  await killSandboxQemu(dir);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const cleanups: (() => Promise<void> | void)[] = [];
  const stop = async () => {
    for (const c of cleanups.reverse()) await Promise.resolve().then(c).catch(() => undefined);
    cleanups.length = 0;
  };
  try {
    say('management control plane and two hypervisor hosts…');
    const [controlPlane, hosts] = await Promise.all([startControlPlane({ dataDir: join(dir, 'management') }), startHosts({ count: 2, baseDir: join(dir, 'hosts'), firstAddress: opts.firstAddress })]);
    cleanups.push(() => controlPlane.stop(), () => hosts.stop());
    const kc = new KubeConfig();
    kc.loadFromString(controlPlane.kubeconfigYaml);
    const kubectl = kubectlRunner(controlPlane.kubeconfigPath);
    await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml']);
    await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);

    const conns: HostConnection[] = [];
    cleanups.push(() => conns.forEach((c) => c.close()));
    const hypervisor = async (name: string) => {
      const host = hosts.hosts.find((h) => h.name === name);
      if (!host) throw new Error(`no host ${name}`);
      const conn = await HostConnection.connect(host, { privateKey: hosts.identity.privateKey });
      conns.push(conn);
      return new Hypervisor(host, conn);
    };

    say('HA guest: PKI, beachhead, guest components…');
    const host01 = hosts.hosts[0]!;
    const ha = await startHaGuest({
      dir: join(dir, 'ha'), environment: opts.environment ?? 'ha', host: host01.name, workers: 3, operatorPublicKey: hosts.identity.publicKey, addressBase: opts.addressBase,
      files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }], log: say,
    });
    cleanups.push(() => ha.stop());
    const environment = ha.environment;
    const h01 = await hypervisor(host01.name);
    cleanups.push(() => killSandboxQemu(dir));
    say('VM disks and QEMU on host01…');
    let seed = 100;
    for (const vm of environment.vms) {
      const vmDir = h01.vmDir(environment.name, vm);
      mkdirSync(vmDir, { recursive: true });
      const disk = vm.role === 'controller' && opts.controllerDisk ? opts.controllerDisk : { sizeMiB: 16, denseMiB: 0 };
      await createDiskImage(join(vmDir, 'disk0.qcow2'), { sizeMiB: disk.sizeMiB, denseMiB: disk.denseMiB, format: 'qcow2', seed: seed++, regions: 4 });
      await h01.startVm(environment.name, vm);
    }
    say('waiting for etcd, the API servers, NGINX and the guest nodes…');
    await ha.waitHealthy();
    const workers = environment.vms.filter((v) => v.role === 'worker').map((v) => v.nodeName);
    await deployStudentWorkload(ha.kc, { namespace: `${environment.name}-apps`, replicas: 3, minAvailable: 2, nodeNames: workers });

    // what the operator reads: the guest kubeconfig (through the load balancer) and the etcd client TLS material
    const core = kc.makeApiClient(CoreV1Api);
    await core.createNamespacedSecret({ namespace: SECRET_NAMESPACE, body: { metadata: { name: environment.kubeconfigSecret.name }, stringData: { kubeconfig: ha.kubeconfigYaml } } });
    const etcdSecret = environment.controlPlane!.etcdClientSecret;
    await core.createNamespacedSecret({ namespace: etcdSecret.namespace, body: { metadata: { name: etcdSecret.name }, type: 'kubernetes.io/tls', stringData: { 'ca.crt': ha.etcdClient.ca, 'tls.crt': ha.etcdClient.cert, 'tls.key': ha.etcdClient.key } } });

    const dbPath = join(dir, 'operator.db');
    const startOperator = async (o: { loadBalancer: boolean; logFile?: string }) => {
      const env: EnvironmentSpec = { ...environment };
      if (!o.loadBalancer) delete env.loadBalancer;
      const inventory: Inventory = { hosts: hosts.hosts, environments: [env] };
      const inventoryPath = join(dir, o.loadBalancer ? 'inventory.yaml' : 'inventory-no-lb.yaml');
      writeFileSync(inventoryPath, `# written by the HA sandbox; format: README "Inventory file"\n${stringify(inventoryForFile(inventory))}`);
      const proc = await startOperatorProcess({ dir, kubeconfigPath: controlPlane.kubeconfigPath, inventoryPath, dbPath, sshKeyPath: hosts.identity.privateKeyPath, ...(o.logFile ? { logFile: o.logFile } : {}) });
      cleanups.push(() => proc.stop());
      return proc;
    };
    return { dir, controlPlane, kc, kubectl, hosts, ha, environment, dbPath, hypervisor, startOperator, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
