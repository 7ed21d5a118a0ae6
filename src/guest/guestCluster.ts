/**
 * The operator's view of ONE student guest cluster, reached through the
 * kubeconfig stored in the environment's Secret. It knows Kubernetes only
 * (nodes, pods, evictions, PDBs, leases) and nothing about QEMU or hosts.
 */
import { request, type RequestOptions } from 'node:https';
import { request as httpRequest } from 'node:http';
import {
  ApiException,
  CoordinationV1Api,
  CoreV1Api,
  KubeConfig,
  PatchStrategy,
  PolicyV1Api,
  setHeaderOptions,
  type V1Node,
  type V1Pod,
} from '@kubernetes/client-node';
import pRetry, { AbortError } from 'p-retry';

export const CONTROL_PLANE_LABEL = 'node-role.kubernetes.io/control-plane';
const MIRROR_POD_ANNOTATION = 'kubernetes.io/config.mirror';

export interface NodeState {
  exists: boolean;
  ready: boolean;
  unschedulable: boolean;
}

export interface DrainOptions {
  /** whole drain: evictions (incl. PDB back-off) and waiting for the pods to be gone */
  timeoutMs: number;
  /** grace period passed to every eviction's DeleteOptions */
  gracePeriodSeconds: number;
  /** evict pods using emptyDir volumes (their data is lost); refused otherwise */
  deleteEmptyDirData: boolean;
  /** evict pods that no controller will re-create (like kubectl drain --force); refused otherwise */
  force?: boolean;
  /** called with the number of pods still on the node whenever it changes */
  onProgress?: (remaining: number) => void;
  signal?: AbortSignal;
}

export interface DrainResult {
  /** pods evicted (eviction accepted by the API server) */
  evicted: number;
  /** evictions refused with HTTP 429 because a PodDisruptionBudget did not allow them (each was retried later) */
  pdbRetries: number;
}

export interface QuorumResult {
  ok: boolean;
  /** nodes labelled node-role.kubernetes.io/control-plane */
  controllers: number;
  /** Ready controllers other than the excluded node: what remains while it is away */
  healthy: number;
  reason: string;
}

export class DrainError extends Error {
  constructor(
    message: string,
    readonly pods: string[],
  ) {
    super(message);
    this.name = 'DrainError';
  }
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

function errorText(err: unknown): string {
  if (err instanceof ApiException) {
    const body: unknown = err.body;
    let msg = '';
    if (typeof body === 'string') {
      try {
        msg = (JSON.parse(body) as { message?: string }).message ?? body;
      } catch {
        msg = body;
      }
    } else if (body && typeof body === 'object') {
      msg = (body as { message?: string }).message ?? '';
    }
    return `HTTP ${err.code}${msg ? `: ${msg}` : ''}`;
  }
  return err instanceof Error ? err.message : String(err);
}

function podKey(p: V1Pod): string {
  return `${p.metadata?.namespace}/${p.metadata?.name}`;
}

function isReady(node: V1Node): boolean {
  return node.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false;
}

export class GuestCluster {
  private readonly core: CoreV1Api;
  private readonly policy: PolicyV1Api;
  private readonly coordination: CoordinationV1Api;

  constructor(private readonly kc: KubeConfig) {
    this.core = kc.makeApiClient(CoreV1Api);
    this.policy = kc.makeApiClient(PolicyV1Api);
    this.coordination = kc.makeApiClient(CoordinationV1Api);
  }

  static fromKubeconfigYaml(yaml: string): GuestCluster {
    const kc = new KubeConfig();
    kc.loadFromString(yaml);
    if (!kc.getCurrentCluster()) throw new Error('guest kubeconfig has no current cluster');
    return new GuestCluster(kc);
  }

  /** An API call retried on transient errors (connection failures, 5xx, throttling). */
  private call<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return pRetry(fn, { retries: 5, minTimeout: 200, maxTimeout: 3000, signal, shouldRetry: ({ error }) => isTransient(error) });
  }

  private setUnschedulable(node: string, unschedulable: boolean): Promise<unknown> {
    return this.call(() =>
      this.core.patchNode({ name: node, body: { spec: { unschedulable } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch)),
    );
  }

  async cordon(node: string): Promise<void> {
    await this.setUnschedulable(node, true);
  }

  async uncordon(node: string): Promise<void> {
    await this.setUnschedulable(node, false);
  }

  async nodeState(node: string): Promise<NodeState> {
    try {
      const n = await this.call(() => this.core.readNode({ name: node }));
      return { exists: true, ready: isReady(n), unschedulable: n.spec?.unschedulable === true };
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
   * our clock, so guest clock skew does not matter).
   */
  async waitNodeReady(node: string, opts: { timeoutMs: number; signal?: AbortSignal; pollMs?: number }): Promise<void> {
    const deadline = Date.now() + opts.timeoutMs;
    const firstRenew = await this.leaseRenewTime(node);
    let last: NodeState | undefined;
    for (;;) {
      if (opts.signal?.aborted) throw abortError(opts.signal);
      last = await this.nodeState(node);
      if (last.ready) {
        const renew = firstRenew === undefined ? undefined : await this.leaseRenewTime(node);
        if (firstRenew === undefined || (renew !== undefined && renew !== firstRenew)) return;
      }
      if (Date.now() >= deadline) {
        throw new Error(`node ${node} did not become Ready within ${opts.timeoutMs} ms (exists=${last.exists}, ready=${last.ready})`);
      }
      await sleep(opts.pollMs ?? 500, opts.signal);
    }
  }

  /** GET /readyz of the guest API server (true only for HTTP 200). */
  async apiHealthy(timeoutMs = 5000): Promise<boolean> {
    const cluster = this.kc.getCurrentCluster();
    if (!cluster) return false;
    const url = new URL('/readyz', cluster.server);
    const opts: RequestOptions = { method: 'GET', timeout: timeoutMs };
    try {
      await this.kc.applyToHTTPSOptions(opts);
    } catch {
      return false;
    }
    return new Promise<boolean>((res) => {
      const req = (url.protocol === 'https:' ? request : httpRequest)(url, opts, (resp) => {
        resp.resume();
        resp.on('end', () => res(resp.statusCode === 200));
        resp.on('error', () => res(false));
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', () => res(false));
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

  /**
   * kubectl-drain semantics: cordons the node, evicts every pod on it through
   * the Eviction API (policy/v1) — never deletes a pod directly, so a
   * PodDisruptionBudget is always honoured — and waits until the pods are gone.
   * DaemonSet pods and mirror (static) pods are left alone. Pods with emptyDir
   * volumes are refused unless deleteEmptyDirData, pods without a controller
   * unless force; the refusal happens before anything is evicted.
   * HTTP 429 (the PDB does not allow a disruption now) is retried with
   * back-off until the timeout: it clears when replacement pods elsewhere
   * become available.
   */
  async drain(node: string, opts: DrainOptions): Promise<DrainResult> {
    const deadline = Date.now() + opts.timeoutMs;
    const { signal } = opts;
    await this.cordon(node);
    const pods = (await this.call(() => this.core.listPodForAllNamespaces({ fieldSelector: `spec.nodeName=${node}` }), signal)).items;

    const targets: V1Pod[] = [];
    const emptyDir: string[] = [];
    const unmanaged: string[] = [];
    for (const p of pods) {
      const owner = p.metadata?.ownerReferences?.find((o) => o.controller);
      if (owner?.kind === 'DaemonSet') continue;
      if (p.metadata?.annotations?.[MIRROR_POD_ANNOTATION] !== undefined) continue;
      const terminal = p.status?.phase === 'Succeeded' || p.status?.phase === 'Failed';
      if (!terminal && p.spec?.volumes?.some((v) => v.emptyDir)) emptyDir.push(podKey(p));
      if (!terminal && !owner) unmanaged.push(podKey(p));
      targets.push(p);
    }
    if (emptyDir.length > 0 && !opts.deleteEmptyDirData) {
      throw new DrainError(`cannot drain ${node}: pods with emptyDir data would lose it (deleteEmptyDirData is off): ${emptyDir.join(', ')}`, emptyDir);
    }
    if (unmanaged.length > 0 && !opts.force) {
      throw new DrainError(`cannot drain ${node}: pods not managed by a controller would not come back (force is off): ${unmanaged.join(', ')}`, unmanaged);
    }

    const uids = new Set(targets.map((p) => p.metadata?.uid ?? ''));
    let remaining = targets.length;
    let remainingNames = targets.map(podKey);
    opts.onProgress?.(remaining);
    let evicted = 0;
    let pdbRetries = 0;
    const timedOut = (what: string) =>
      new DrainError(`drain of ${node} timed out after ${opts.timeoutMs} ms ${what}; ${remaining} pod(s) left: ${remainingNames.join(', ')}`, remainingNames);

    const evict = async (p: V1Pod): Promise<void> => {
      const name = p.metadata?.name ?? '';
      const namespace = p.metadata?.namespace ?? '';
      if (p.metadata?.deletionTimestamp) return; // already terminating: only wait for it
      let backoff = 500;
      let lastErr = '';
      for (;;) {
        if (signal?.aborted) throw abortError(signal);
        try {
          await this.core.createNamespacedPodEviction({
            name,
            namespace,
            body: { apiVersion: 'policy/v1', kind: 'Eviction', metadata: { name, namespace }, deleteOptions: { gracePeriodSeconds: opts.gracePeriodSeconds } },
          });
          evicted++;
          return;
        } catch (err) {
          const code = statusCode(err);
          if (code === 404) return; // gone already
          if (code === 429) pdbRetries++;
          else if (!isTransient(err)) throw new DrainError(`eviction of ${namespace}/${name} refused: ${errorText(err)}`, [`${namespace}/${name}`]);
          lastErr = errorText(err);
        }
        const left = deadline - Date.now();
        if (left <= 0) throw timedOut(`evicting ${namespace}/${name} (last answer: ${lastErr})`);
        // one last attempt right at the deadline rather than giving up early
        await sleep(Math.min(backoff * (0.8 + Math.random() * 0.4), left), signal);
        backoff = Math.min(backoff * 2, 5000);
      }
    };

    // The watcher stops as soon as an eviction fails for good (or the caller aborts).
    const stopWatching = new AbortController();
    const watchSignal = signal ? AbortSignal.any([signal, stopWatching.signal]) : stopWatching.signal;
    const watchGone = async (evictions: Promise<unknown>) => {
      let evictionsDone = false;
      void evictions.then(
        () => (evictionsDone = true),
        () => undefined,
      );
      for (;;) {
        const now = (await this.call(() => this.core.listPodForAllNamespaces({ fieldSelector: `spec.nodeName=${node}` }), watchSignal)).items.filter((p) =>
          uids.has(p.metadata?.uid ?? ''),
        );
        if (now.length !== remaining) {
          remaining = now.length;
          remainingNames = now.map(podKey);
          opts.onProgress?.(remaining);
        }
        if (remaining === 0 && evictionsDone) return;
        if (Date.now() >= deadline) throw timedOut('waiting for evicted pods to terminate');
        await sleep(500, watchSignal);
      }
    };

    const evictions = Promise.all(targets.map(evict));
    evictions.catch(() => stopWatching.abort(new Error('eviction failed')));
    await Promise.all([evictions, watchGone(evictions)]);
    return { evicted, pdbRetries };
  }
}
