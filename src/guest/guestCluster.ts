/**
 * The operator's view of ONE student guest cluster, reached through the
 * kubeconfig stored in the environment's Secret. It knows Kubernetes only
 * (nodes, pods, evictions, PDBs, leases) and nothing about QEMU or hosts.
 */
import { request, type RequestOptions } from 'node:https';
import { request as httpRequest } from 'node:http';
import {
  ApiException,
  AppsV1Api,
  CoordinationV1Api,
  CoreV1Api,
  KubeConfig,
  PolicyV1Api,
  type V1Node,
  type V1Pod,
} from '@kubernetes/client-node';
import pRetry, { AbortError } from 'p-retry';
import { NodeDrainer, type DrainOptions, type DrainPolicy, type DrainReport, type PodDecision } from './drain.js';

export { DrainError, type DrainFailure, type DrainOptions, type DrainPolicy, type DrainReport, type DrainResult, type PodDecision } from './drain.js';

export const CONTROL_PLANE_LABEL = 'node-role.kubernetes.io/control-plane';

export interface NodeState {
  exists: boolean;
  ready: boolean;
  unschedulable: boolean;
  /** the addresses the node reports as InternalIP (what ties it to a VM: the inventory's address) */
  internalIPs?: string[];
  /** the boot its kubelet reports (status.nodeInfo.bootID: the guest kernel's random boot_id, new at every boot) */
  bootId?: string;
}

export interface QuorumResult {
  ok: boolean;
  /** nodes labelled node-role.kubernetes.io/control-plane */
  controllers: number;
  /** Ready controllers other than the excluded node: what remains while it is away */
  healthy: number;
  reason: string;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((res, rej) => {
    if (signal?.aborted) return rej(abortError(signal));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      res();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      rej(abortError(signal!));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });

function abortError(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  return r instanceof Error ? r : new Error('aborted');
}

function statusCode(err: unknown): number | undefined {
  return err instanceof ApiException ? err.code : undefined;
}

/** Errors worth retrying: network failures, API server overload/unavailability, timeouts. */
export function isTransient(err: unknown): boolean {
  const code = statusCode(err);
  if (code === undefined) return !(err instanceof AbortError);
  return code === 429 || code === 408 || code >= 500;
}

/** Default bound of one guest API request (a list of a node's pods answers in milliseconds when the API is up). */
const REQUEST_TIMEOUT_MS = 10_000;

/**
 * The generated clients send no timeout: a request to an address that drops packets waits for the
 * kernel's TCP timeout (minutes). KubeConfig is the hook every request passes through (it applies
 * the credentials), so each request gets its abort signal there.
 */
export function withRequestTimeout(kc: KubeConfig, ms: number): void {
  const apply = kc.applySecurityAuthentication.bind(kc);
  kc.applySecurityAuthentication = async (context) => {
    await apply(context);
    if (!context.getSignal()) context.setSignal(AbortSignal.timeout(ms));
  };
}

function isReady(node: V1Node): boolean {
  return node.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false;
}

export class GuestCluster {
  private readonly core: CoreV1Api;
  private readonly drainer: NodeDrainer;
  private readonly coordination: CoordinationV1Api;

  /** `requestTimeoutMs` bounds every API request: a guest API that hangs (its controller powered off) fails the attempt, which is then retried */
  constructor(private readonly kc: KubeConfig, opts: { requestTimeoutMs?: number } = {}) {
    withRequestTimeout(kc, opts.requestTimeoutMs ?? REQUEST_TIMEOUT_MS);
    this.core = kc.makeApiClient(CoreV1Api);
    this.drainer = new NodeDrainer(
      { core: this.core, apps: kc.makeApiClient(AppsV1Api), policy: kc.makeApiClient(PolicyV1Api) },
      (fn, signal) => this.call(fn, signal),
    );
    this.coordination = kc.makeApiClient(CoordinationV1Api);
  }

  static fromKubeconfigYaml(yaml: string, opts: { requestTimeoutMs?: number } = {}): GuestCluster {
    const kc = new KubeConfig();
    kc.loadFromString(yaml);
    if (!kc.getCurrentCluster()) throw new Error('guest kubeconfig has no current cluster');
    return new GuestCluster(kc, opts);
  }

  /** An API call retried on transient errors (connection failures, 5xx, throttling). */
  private call<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return pRetry(fn, { retries: 5, minTimeout: 200, maxTimeout: 3000, signal, shouldRetry: ({ error }) => isTransient(error) });
  }

  /** Marks the node unschedulable, remembering on the node whether the operator did it (see drain.ts). */
  async cordon(node: string): Promise<void> {
    await this.drainer.cordon(node);
  }

  /** Returns the node to its schedulability before the operator's cordon: a node someone else cordoned stays cordoned. */
  async uncordon(node: string): Promise<void> {
    await this.drainer.restore(node);
  }

  async nodeState(node: string): Promise<NodeState> {
    try {
      const n = await this.call(() => this.core.readNode({ name: node }));
      const internalIPs = (n.status?.addresses ?? []).filter((a) => a.type === 'InternalIP').map((a) => a.address).slice(0, 16);
      const bootId = n.status?.nodeInfo?.bootID ? n.status.nodeInfo.bootID.slice(0, 128) : undefined;
      return { exists: true, ready: isReady(n), unschedulable: n.spec?.unschedulable === true, internalIPs, ...(bootId ? { bootId } : {}) };
    } catch (err) {
      if (statusCode(err) === 404) return { exists: false, ready: false, unschedulable: false };
      throw err;
    }
  }

  /** The node's heartbeat Lease renew time (kube-node-lease), if the kubelet uses leases. */
  private async leaseRenewTime(node: string): Promise<string | undefined> {
    try {
      const l = await this.call(() => this.coordination.readNamespacedLease({ name: node, namespace: 'kube-node-lease' }));
      const t: unknown = l.spec?.renewTime;
      return t instanceof Date ? t.toISOString() : typeof t === 'string' ? t : undefined;
    } catch (err) {
      if (statusCode(err) === 404) return undefined;
      throw err;
    }
  }

  /**
   * Waits until the node is Ready AND its kubelet is demonstrably alive now:
   * a Ready condition can be stale for up to the node-monitor grace period
   * after the kubelet died, so when the node has a heartbeat Lease, its
   * renewTime must also advance while we wait (compared with itself, not with
   * our clock, so guest clock skew does not matter). After the guest was
   * stopped and booted again (`notBoot`: the boot the node reported before the
   * stop), the node must also report another boot: only the kubelet of the new
   * boot proves the guest serves again. A renew that was in flight when the old
   * kubelet died, or a Ready condition nobody has updated yet, does not.
   */
  async waitNodeReady(node: string, opts: { timeoutMs: number; signal?: AbortSignal; pollMs?: number; notBoot?: string }): Promise<void> {
    const deadline = Date.now() + opts.timeoutMs;
    const firstRenew = await this.leaseRenewTime(node);
    let last: NodeState | undefined;
    for (;;) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      last = await this.nodeState(node);
      if (last.ready && (opts.notBoot === undefined || (last.bootId !== undefined && last.bootId !== opts.notBoot))) {
        const renew = firstRenew === undefined ? undefined : await this.leaseRenewTime(node);
        if (firstRenew === undefined || (renew !== undefined && renew !== firstRenew)) return;
      }
      if (Date.now() >= deadline) {
        const boot = opts.notBoot === undefined ? '' : `, new boot=${last.bootId !== undefined && last.bootId !== opts.notBoot}`;
        throw new Error(`node ${node} did not become Ready within ${opts.timeoutMs} ms (exists=${last.exists}, ready=${last.ready}${boot})`);
      }
      await sleep(opts.pollMs ?? 500, opts.signal);
    }
  }

  /**
   * GET /readyz of the guest API server (true only for HTTP 200). `timeoutMs` bounds the whole
   * exchange, not just idle time: a student's API server that drips one byte every half second would
   * otherwise keep a move (and the worker running it) waiting for ever. The body is not kept.
   */
  async apiHealthy(timeoutMs = 5000, signal?: AbortSignal): Promise<boolean> {
    const cluster = this.kc.getCurrentCluster();
    if (!cluster) return false;
    const url = new URL('/readyz', cluster.server);
    const opts: RequestOptions = { method: 'GET', timeout: timeoutMs };
    try {
      await this.kc.applyToHTTPSOptions(opts);
    } catch {
      return false;
    }
    if (signal?.aborted) return false;
    return new Promise<boolean>((res) => {
      let done = false;
      const finish = (ok: boolean): void => {
        if (done) return;
        done = true;
        clearTimeout(deadline);
        signal?.removeEventListener('abort', onAbort);
        req.destroy();
        res(ok);
      };
      const onAbort = (): void => finish(false);
      const req = (url.protocol === 'https:' ? request : httpRequest)(url, opts, (resp) => {
        let bytes = 0;
        resp.on('data', (d: Buffer) => {
          bytes += d.length;
          if (bytes > 64 << 10) finish(false);
        });
        resp.on('end', () => finish(resp.statusCode === 200));
        resp.on('error', () => finish(false));
      });
      const deadline = setTimeout(() => finish(false), timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
      req.on('timeout', () => finish(false));
      req.on('error', () => finish(false));
      req.end();
    });
  }

  /**
   * May `excludingNode` go away for a while without the guest control plane
   * losing quorum? Controllers are the nodes labelled
   * node-role.kubernetes.io/control-plane; each runs one etcd member. OK only
   * if every OTHER controller is Ready, the Ready ones left are a strict
   * majority of all controllers, and the API server answers /readyz.
   *
   * Note: the operator cannot see etcd member health through the Kubernetes
   * API of a student cluster, so a controller node's readiness stands for its
   * etcd member's health (in the simulated guest of the tests, each
   * controller's etcd member is exactly as healthy as its node).
   */
  async controlPlaneQuorum(excludingNode: string): Promise<QuorumResult> {
    const list = await this.call(() => this.core.listNode({ labelSelector: CONTROL_PLANE_LABEL }));
    const controllers = list.items;
    const others = controllers.filter((n) => n.metadata?.name !== excludingNode);
    const notReady = others.filter((n) => !isReady(n)).map((n) => n.metadata?.name ?? '?');
    const healthy = others.length - notReady.length;
    const total = controllers.length;
    const result = (ok: boolean, reason: string): QuorumResult => ({ ok, controllers: total, healthy, reason });
    if (total === 0) return result(false, `no nodes labelled ${CONTROL_PLANE_LABEL}: cannot judge etcd quorum`);
    if (notReady.length > 0) return result(false, `other controller(s) not Ready: ${notReady.join(', ')}`);
    if (!(healthy > total / 2)) {
      return result(false, `only ${healthy} of ${total} controller(s) would remain; quorum needs more than ${total / 2}`);
    }
    if (!(await this.apiHealthy())) return result(false, 'the API server /readyz does not answer 200');
    return result(true, `${healthy} of ${total} controller(s) remain Ready without ${excludingNode}`);
  }

  /** `kubectl drain` (see drain.ts); on failure the node is back to its prior schedulability. */
  drain(node: string, opts: DrainOptions): Promise<DrainReport> {
    return this.drainer.drain(node, opts);
  }

  /** What a drain with this policy would do with each pod on the node now, nothing changed (kubectl drain --dry-run). */
  drainPlan(node: string, policy: DrainPolicy): Promise<{ pod: V1Pod; decision: PodDecision }[]> {
    return this.drainer.plan(node, policy);
  }
}
