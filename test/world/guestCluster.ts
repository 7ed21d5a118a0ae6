/**
 * A student environment's guest cluster, simulated on the test control plane
 * (test/world/controlPlane.ts): one Node per VM, "kubelet" = KWOK, and a
 * liveness bridge that lets KWOK act as a node's kubelet only while the VM's
 * QEMU process is alive. Node conditions are never written here: when a VM
 * stops, KWOK stops renewing the node's Lease and the real node-lifecycle
 * controller of kube-controller-manager marks the node NotReady (Unknown).
 *
 * Why a label and not KWOK's annotation selector: KWOK v0.7.0 filters
 * `--manage-nodes-with-annotation-selector` on the client side and drops the
 * update in which a node *stops* matching (informer UpdateFunc filters the new
 * object), so removing the annotation never releases the node lease and the
 * node stays Ready forever. `--manage-nodes-with-label-selector` is a
 * server-side watch selector: the API server sends DELETED when the label goes
 * away, KWOK releases the lease and stops heartbeating (and sends ADDED when
 * it comes back, so KWOK re-initialises the node to Ready).
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import {
  ApiException,
  AppsV1Api,
  CoreV1Api,
  KubeConfig,
  PatchStrategy,
  PolicyV1Api,
  setHeaderOptions,
  type V1Node,
  type V1Taint,
} from '@kubernetes/client-node';
import type { EnvironmentSpec, VMSpec } from '../../src/api/inventory.js';
import { withRequestTimeout } from '../../src/guest/guestCluster.js';
import { KWOK_MANAGE_LABEL, KWOK_MANAGE_VALUE } from './controlPlane.js';
import { until } from './until.js';

export const CONTROL_PLANE_LABEL = 'node-role.kubernetes.io/control-plane';
export const ROLE_LABEL = 'vmops.dev/role';
export const BEACHHEAD_TAINT = 'vmops.dev/beachhead';

function isStatus(err: unknown, code: number): boolean {
  return err instanceof ApiException && err.code === code;
}

function taintsFor(vm: VMSpec): V1Taint[] {
  if (vm.role === 'controller') return [{ key: CONTROL_PLANE_LABEL, effect: 'NoSchedule' }];
  if (vm.role === 'beachhead') return [{ key: BEACHHEAD_TAINT, effect: 'NoSchedule' }];
  return [];
}

export function guestNode(env: EnvironmentSpec, vm: VMSpec, managed = true): V1Node {
  const labels: Record<string, string> = {
    'kubernetes.io/hostname': vm.nodeName,
    'kubernetes.io/os': 'linux',
    'kubernetes.io/arch': 'amd64',
    [ROLE_LABEL]: vm.role,
    'vmops.dev/environment': env.name,
    'vmops.dev/vm': vm.name,
  };
  if (vm.role === 'controller') labels[CONTROL_PLANE_LABEL] = '';
  if (managed) labels[KWOK_MANAGE_LABEL] = KWOK_MANAGE_VALUE;
  const resources = { cpu: String(vm.cpus), memory: `${vm.memoryMiB}Mi`, pods: '110' };
  return {
    apiVersion: 'v1',
    kind: 'Node',
    metadata: { name: vm.nodeName, labels, annotations: { 'node.alpha.kubernetes.io/ttl': '0' } },
    spec: { taints: taintsFor(vm) },
    // KWOK keeps capacity/allocatable and addresses it finds; the rest of the status is its job. The
    // address is the VM's, as its kubelet would report it (the operator checks the two agree).
    status: { capacity: resources, allocatable: resources, ...(vm.address ? { addresses: [{ type: 'InternalIP', address: vm.address }, { type: 'Hostname', address: vm.nodeName }] } : {}) },
  };
}

/**
 * Registers one Node per VM (like each VM's kubelet would). With `managed`
 * (default) KWOK takes the nodes over at once; otherwise they wait for a
 * VmLivenessBridge to see their VMs running. Existing nodes are left alone.
 */
export async function createGuestNodes(kc: KubeConfig, env: EnvironmentSpec, opts: { managed?: boolean } = {}): Promise<void> {
  const core = kc.makeApiClient(CoreV1Api);
  for (const vm of env.vms) {
    try {
      await core.createNode({ body: guestNode(env, vm, opts.managed ?? true) });
    } catch (err) {
      if (!isStatus(err, 409)) throw err;
    }
  }
}

/** qemu `-name` values of all live qemu-system processes on this machine (all test "hosts" share it). */
export async function liveQemuNames(): Promise<Set<string>> {
  const names = new Set<string>();
  const entries = await readdir('/proc').catch(() => [] as string[]);
  await Promise.all(
    entries
      .filter((e) => /^\d+$/.test(e))
      .map(async (pid) => {
        let raw: string;
        try {
          raw = await readFile(`/proc/${pid}/cmdline`, 'utf8');
        } catch {
          return; // exited meanwhile
        }
        if (!raw) return; // zombie or kernel thread
        const argv = raw.split('\0');
        const exe = argv[0]?.split('/').pop() ?? '';
        if (!exe.startsWith('qemu-system')) return;
        const i = argv.indexOf('-name');
        const name = i >= 0 ? argv[i + 1]?.split(',')[0] : undefined;
        if (name) names.add(name);
      }),
  );
  return names;
}

export interface BridgeTransition {
  nodeName: string;
  alive: boolean;
  /** Date.now() when the bridge saw the change and relabelled the node */
  at: number;
}

/**
 * The simulated kubelet follows its VM: every `intervalMs` the bridge looks
 * for a live QEMU with `-name <qemuName>` and adds/removes KWOK's manage label
 * on the VM's Node. It never touches node conditions.
 */
export class VmLivenessBridge {
  private timer: NodeJS.Timeout | undefined;
  private running = false;
  private ticking: Promise<void> | undefined;
  /** what the node's label is known to say; undefined = unknown, re-read from the API */
  private readonly applied = new Map<string, boolean>();
  /** when the bridge last removed each node's label */
  private readonly removedAt = new Map<string, number>();
  /** the boot each node was last given */
  private readonly appliedBoot = new Map<string, string>();
  readonly transitions: BridgeTransition[] = [];
  private readonly core: CoreV1Api;

  constructor(
    kc: KubeConfig,
    readonly vms: { nodeName: string; qemuName: string }[],
    private readonly opts: {
      intervalMs?: number;
      onTransition?: (t: BridgeTransition) => void;
      onError?: (err: unknown) => void;
      /** qemu names of the VMs that count as alive; default: every live QEMU process (a paused one too) */
      live?: () => Promise<Set<string>>;
      /** the label comes back no sooner than this after it went (default 2000 ms; see tick) */
      minDownMs?: number;
      /** bound of one API request (default 10 s, as the operator's guest requests) */
      requestTimeoutMs?: number;
      /**
       * the boot a live VM's guest runs (undefined: not known yet); reported as the node's
       * status.nodeInfo.bootID, as a kubelet reports its kernel's boot_id, before the node counts as alive
       */
      boot?: (qemuName: string) => string | undefined;
    } = {},
  ) {
    // Bounded requests, on a copy of the kubeconfig (its other users may watch). Tests power the guest
    // API off: a request in flight when its peer vanished behind a blackhole (the FIN dropped with it)
    // is never answered, and stop() awaited it — a fresh-clone run lost guestHa's 600 s afterAll so.
    const own = new KubeConfig();
    own.loadFromString(kc.exportConfig());
    withRequestTimeout(own, opts.requestTimeoutMs ?? 10_000);
    this.core = own.makeApiClient(CoreV1Api);
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    const loop = async () => {
      if (!this.running) return;
      this.ticking = this.tick();
      await this.ticking;
      if (this.running) this.timer = setTimeout(() => void loop(), this.opts.intervalMs ?? 500);
    };
    void loop();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    await this.ticking;
  }

  /** One reconciliation pass (exposed so tests can force one). */
  async tick(): Promise<void> {
    const live = await (this.opts.live ?? liveQemuNames)();
    await Promise.all(
      this.vms.map(async ({ nodeName, qemuName }) => {
        let alive = live.has(qemuName);
        try {
          if (alive && this.opts.boot) {
            // a kubelet posts its boot with its first status: a node never runs on before that
            const boot = this.opts.boot(qemuName);
            if (boot === undefined) alive = false;
            else if (this.appliedBoot.get(nodeName) !== boot) {
              await this.core.patchNodeStatus({ name: nodeName, body: { status: { nodeInfo: { bootID: boot } } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
              this.appliedBoot.set(nodeName, boot);
            }
          }
          let current = this.applied.get(nodeName);
          if (current === undefined) {
            const node = await this.core.readNode({ name: nodeName });
            current = node.metadata?.labels?.[KWOK_MANAGE_LABEL] === KWOK_MANAGE_VALUE;
            this.applied.set(nodeName, current);
          }
          if (current === alive) return;
          // A real kubelet cannot heartbeat before its guest has booted again. And KWOK v0.7.0 lost the
          // node for good when the label came back 0.5 s after it went (fleet e2e: a cold move with
          // 0.3 s of downtime; the node's Lease was never renewed again in 300 s, so nodeReady timed out).
          if (alive && Date.now() - (this.removedAt.get(nodeName) ?? -Infinity) < (this.opts.minDownMs ?? 2000)) return;
          const body = { metadata: { labels: { [KWOK_MANAGE_LABEL]: alive ? KWOK_MANAGE_VALUE : null } } };
          await this.core.patchNode({ name: nodeName, body }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
          this.applied.set(nodeName, alive);
          if (!alive) this.removedAt.set(nodeName, Date.now());
          const t = { nodeName, alive, at: Date.now() };
          this.transitions.push(t);
          this.opts.onTransition?.(t);
        } catch (err) {
          this.applied.delete(nodeName); // re-read next time
          if (!isStatus(err, 404)) this.opts.onError?.(err);
        }
      }),
    );
  }
}

export interface StudentWorkload {
  namespace: string;
  name: string;
  replicas: number;
  minAvailable: number;
}

/**
 * The student's app: a Deployment spread over the worker nodes plus a
 * PodDisruptionBudget. Pods carry no special tolerations, so they land on
 * workers only (controllers and the beachhead are tainted NoSchedule).
 */
export async function deployStudentWorkload(
  kc: KubeConfig,
  opts: { namespace: string; name?: string; replicas: number; minAvailable: number; nodeNames?: string[] },
): Promise<StudentWorkload> {
  const core = kc.makeApiClient(CoreV1Api);
  const apps = kc.makeApiClient(AppsV1Api);
  const policy = kc.makeApiClient(PolicyV1Api);
  const name = opts.name ?? 'web';
  const { namespace } = opts;
  const labels = { app: name };
  try {
    await core.createNamespace({ body: { metadata: { name: namespace } } });
  } catch (err) {
    if (!isStatus(err, 409)) throw err;
  }
  const nodeAffinity = opts.nodeNames?.length
    ? { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: 'kubernetes.io/hostname', operator: 'In', values: opts.nodeNames }] }] } }
    : undefined;
  await apps.createNamespacedDeployment({
    namespace,
    body: {
      metadata: { name, labels },
      spec: {
        replicas: opts.replicas,
        selector: { matchLabels: labels },
        strategy: { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 0, maxSurge: 1 } },
        template: {
          metadata: { labels },
          spec: {
            terminationGracePeriodSeconds: 5,
            ...(nodeAffinity ? { affinity: { nodeAffinity } } : {}),
            // Even spreading over schedulable workers: cordoned or tainted (NotReady) nodes do not count as
            // domains (nodeTaintsPolicy Honor), so replacements of a drained node's pods can always be placed.
            topologySpreadConstraints: [
              { maxSkew: 1, topologyKey: 'kubernetes.io/hostname', whenUnsatisfiable: 'DoNotSchedule', labelSelector: { matchLabels: labels }, nodeTaintsPolicy: 'Honor' },
            ],
            containers: [{ name: 'web', image: 'registry.k8s.io/pause:3.10', resources: { requests: { cpu: '10m', memory: '4Mi' } } }],
          },
        },
      },
    },
  });
  await policy.createNamespacedPodDisruptionBudget({
    namespace,
    body: { metadata: { name }, spec: { minAvailable: opts.minAvailable, selector: { matchLabels: labels } } },
  });
  return { namespace, name, replicas: opts.replicas, minAvailable: opts.minAvailable };
}

export interface BareQemu {
  pid: number;
  /** SIGKILL, like a VM that dies or is powered off; resolves when the process is gone */
  kill(): Promise<void>;
}

/**
 * A real, diskless QEMU process that tests can kill and restart: the "VM"
 * whose liveness the VmLivenessBridge follows (nothing boots; SeaBIOS idles).
 */
export async function startBareQemu(name: string, opts: { logPath?: string } = {}): Promise<BareQemu> {
  const fd = opts.logPath ? openSync(opts.logPath, 'a') : 'ignore';
  const child = spawn('qemu-system-x86_64', ['-name', `${name},process=${name}`, '-machine', 'pc,accel=tcg', '-m', '32', '-nodefaults', '-display', 'none'], {
    stdio: ['ignore', fd, fd],
  });
  if (typeof fd === 'number') closeSync(fd);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((res, rej) => {
    child.once('spawn', () => res());
    child.once('error', rej);
  });
  const onExit = () => child.kill('SIGKILL');
  process.once('exit', onExit);
  return {
    pid: child.pid!,
    kill: async () => {
      process.removeListener('exit', onExit);
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/**
 * Waits until the named nodes carry none of the node lifecycle controller's taints
 * (`node.kubernetes.io/not-ready`, `…/unreachable`). A node reports Ready before the controller
 * removes its not-ready taint; a workload with topology spread (nodeTaintsPolicy Honor) created in
 * that gap sees fewer domains and may land on one node only.
 */
export async function waitNodesUntainted(kc: KubeConfig, nodeNames: string[], timeoutMs = 60_000): Promise<void> {
  const core = kc.makeApiClient(CoreV1Api);
  const lifecycle = new Set(['node.kubernetes.io/not-ready', 'node.kubernetes.io/unreachable']);
  await until(`nodes ${nodeNames.join(', ')} without not-ready/unreachable taints`, timeoutMs, async () => {
    const nodes = await Promise.all(nodeNames.map((name) => core.readNode({ name })));
    return nodes.every((n) => !(n.spec?.taints ?? []).some((t) => lifecycle.has(t.key))) || undefined;
  });
}
