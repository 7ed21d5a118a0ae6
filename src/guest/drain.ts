/**
 * `kubectl drain` for one node of a guest cluster, with kubectl's pod filters in kubectl's order
 * (k8s.io/kubectl/pkg/drain: filters.go, drain.go) and the operator's additions: the node's pods
 * are re-listed while the drain runs, a drain that cannot finish puts the node back to the
 * schedulability it had before the operator touched it, and its error names the blocking
 * PodDisruptionBudgets and pods.
 *
 * Prior cordon state lives on the Node itself: cordoning a schedulable node sets
 * `spec.unschedulable` and the annotation CORDONED_BY_ANNOTATION in one optimistic-concurrency
 * patch; restoring clears both only when the annotation is there. A node someone else cordoned
 * never gets the annotation, so the operator never uncordons it — and the fact survives an
 * operator crash or failover without any state in the operator's store.
 */
import {
  ApiException,
  AppsV1Api,
  CoreV1Api,
  PatchStrategy,
  PolicyV1Api,
  setHeaderOptions,
  type V1LabelSelector,
  type V1OwnerReference,
  type V1Pod,
  type V1PodDisruptionBudget,
} from '@kubernetes/client-node';
import { abortReason, sleep } from '../util/sleep.js';

/** Set on a node the operator cordoned; its presence is the proof that the node was schedulable before. */
export const CORDONED_BY_ANNOTATION = 'vmops.dev/cordoned-by';
const CORDONED_BY_VALUE = 'vm-migration-operator';
const MIRROR_POD_ANNOTATION = 'kubernetes.io/config.mirror';
/** pods read per list request, and at most on one node (the guest is the student's) */
const POD_PAGE = 500;
const MAX_PODS_PER_NODE = 5000;

/** kubectl drain's flags, with kubectl's defaults when left out. */
export interface DrainPolicy {
  /** --grace-period: seconds given to each pod; -1 (default) = the pod's own terminationGracePeriodSeconds */
  gracePeriodSeconds?: number;
  /** --delete-emptydir-data: evict pods using emptyDir volumes (their data is lost); refused otherwise */
  deleteEmptyDirData?: boolean;
  /** --force: evict pods no controller will re-create (and pods of a DaemonSet that no longer exists); refused otherwise */
  force?: boolean;
  /** --ignore-daemonsets: leave DaemonSet pods on the node; without it any DaemonSet pod refuses the drain */
  ignoreDaemonSets?: boolean;
  /** --skip-wait-for-delete-timeout: pods deleted longer ago than this are neither evicted nor waited for; 0 = always wait */
  skipWaitForDeleteTimeoutSeconds?: number;
}

export interface DrainOptions extends DrainPolicy {
  /** whole drain: evictions (incl. PDB back-off) and waiting for the pods to be gone */
  timeoutMs: number;
  /** called with the number of pods still to go whenever it changes */
  onProgress?: (remaining: number) => void;
  signal?: AbortSignal;
  /** how often the node's pods are re-listed (default 1000 ms, kubectl's wait interval) */
  pollMs?: number;
}

export type PodDecision =
  | { action: 'evict'; warning?: string }
  | { action: 'skip'; reason: 'deleted' | 'mirror' | 'daemonset' }
  | { action: 'refuse'; reason: string };

export interface DrainResult {
  /** pods evicted (eviction accepted by the API server) */
  evicted: number;
  /** evictions refused with HTTP 429 (a PodDisruptionBudget did not allow them then; each was retried) */
  pdbRetries: number;
}

/** What a finished drain did pod by pod, as kubectl prints it. */
export interface DrainReport extends DrainResult {
  evictedPods: string[];
  /** pods left on the node on purpose, with why (DaemonSet, mirror, deleted long ago) */
  skipped: { pod: string; reason: string }[];
  /** kubectl's warnings: pods evicted although unmanaged / with emptyDir data, DaemonSet pods ignored */
  warnings: string[];
}

export type DrainFailure = 'Refused' | 'Timeout' | 'EvictionFailed' | 'APIUnreachable' | 'TooManyPods';

export class DrainError extends Error {
  constructor(
    message: string,
    readonly pods: string[],
    readonly reason: DrainFailure = 'EvictionFailed',
    /** namespace/name of the PodDisruptionBudgets whose selector matches a pod whose eviction was still refused */
    readonly pdbs: string[] = [],
  ) {
    super(message);
    this.name = 'DrainError';
  }
}

// kubectl's refusal texts, with the operator's setting names instead of kubectl's flags
const DAEMONSET_FATAL = 'DaemonSet-managed Pods (ignoreDaemonSets is off)';
const LOCAL_STORAGE_FATAL = 'Pods with local storage (emptyDir; deleteEmptyDirData is off)';
const UNMANAGED_FATAL = 'Pods that declare no controller (force is off)';

const podKey = (p: V1Pod) => `${p.metadata?.namespace}/${p.metadata?.name}`;
const isFinished = (p: V1Pod) => p.status?.phase === 'Succeeded' || p.status?.phase === 'Failed';
const controllerOf = (p: V1Pod): V1OwnerReference | undefined => p.metadata?.ownerReferences?.find((o) => o.controller === true);

function statusCode(err: unknown): number | undefined {
  return err instanceof ApiException ? err.code : undefined;
}

function apiMessage(err: unknown): string {
  if (err instanceof ApiException) {
    const body: unknown = err.body;
    let msg = '';
    if (typeof body === 'string') {
      try {
        msg = (JSON.parse(body) as { message?: string }).message ?? body;
      } catch {
        msg = body;
      }
    } else if (body && typeof body === 'object') msg = (body as { message?: string }).message ?? '';
    return `HTTP ${err.code}${msg ? `: ${msg}` : ''}`;
  }
  return err instanceof Error ? err.message : String(err);
}

/** Does a PodDisruptionBudget's selector select these labels? (policy/v1: an empty selector selects every pod of the namespace) */
export function selectorMatches(selector: V1LabelSelector | undefined, labels: Record<string, string> | undefined): boolean {
  if (!selector) return false;
  const l = labels ?? {};
  for (const [k, v] of Object.entries(selector.matchLabels ?? {})) if (l[k] !== v) return false;
  for (const e of selector.matchExpressions ?? []) {
    const has = Object.hasOwn(l, e.key);
    const ok =
      e.operator === 'In' ? has && (e.values ?? []).includes(l[e.key]!)
      : e.operator === 'NotIn' ? !has || !(e.values ?? []).includes(l[e.key]!)
      : e.operator === 'Exists' ? has
      : e.operator === 'DoesNotExist' ? !has
      : false;
    if (!ok) return false;
  }
  return true;
}

/** kubectl's shouldSkipPod: deleted more than `seconds` ago (0 = never skip). */
function deletedLongAgo(pod: V1Pod, seconds: number, now: number): boolean {
  const at = pod.metadata?.deletionTimestamp;
  return seconds > 0 && at !== undefined && Math.floor((now - new Date(at).getTime()) / 1000) > seconds;
}

/**
 * kubectl's filters, in kubectl's order; the first that does not let the pod through decides.
 * `daemonSetExists` answers whether the DaemonSet controlling a pod still exists (kubectl asks the API).
 */
export async function decidePod(pod: V1Pod, policy: DrainPolicy, daemonSetExists: (namespace: string, name: string) => Promise<boolean>, now = Date.now()): Promise<PodDecision> {
  let warning: string | undefined;
  // 1. deleted long enough ago: not evicted, not waited for
  if (deletedLongAgo(pod, policy.skipWaitForDeleteTimeoutSeconds ?? 0, now)) return { action: 'skip', reason: 'deleted' };
  // 2. DaemonSet pods stay with their node (a finished one may go)
  const owner = controllerOf(pod);
  if (owner && owner.kind === 'DaemonSet' && owner.apiVersion === 'apps/v1' && !isFinished(pod)) {
    if (!(await daemonSetExists(pod.metadata?.namespace ?? '', owner.name))) {
      if (!policy.force) return { action: 'refuse', reason: `Pods of DaemonSet ${owner.name}, which does not exist (force is off)` };
      warning = `daemonsets.apps "${owner.name}" not found`;
    } else {
      if (!policy.ignoreDaemonSets) return { action: 'refuse', reason: DAEMONSET_FATAL };
      return { action: 'skip', reason: 'daemonset' };
    }
  }
  // 3. mirror pods are the kubelet's copy of a static pod: the API cannot remove them
  if (pod.metadata?.annotations?.[MIRROR_POD_ANNOTATION] !== undefined) return { action: 'skip', reason: 'mirror' };
  // 4. emptyDir data is lost with the pod
  if (pod.spec?.volumes?.some((v) => v.emptyDir) && !isFinished(pod)) {
    if (!policy.deleteEmptyDirData) return { action: 'refuse', reason: LOCAL_STORAGE_FATAL };
    warning = 'deleting Pods with local storage';
  }
  // 5. nothing re-creates an unmanaged pod
  if (!isFinished(pod) && !owner) {
    if (!policy.force) return { action: 'refuse', reason: UNMANAGED_FATAL };
    warning = 'deleting Pods that declare no controller';
  }
  return warning ? { action: 'evict', warning } : { action: 'evict' };
}

function refusalMessage(node: string, refused: Map<string, string[]>): string {
  return `cannot drain ${node}: ${[...refused].map(([reason, pods]) => `cannot delete ${reason}: ${pods.join(', ')}`).join('; ')}`;
}

interface Tracked {
  pod: V1Pod;
  /** evicting: eviction not accepted yet; evicted: accepted, pod still on the node; gone */
  state: 'evicting' | 'evicted' | 'gone';
  lastAnswer?: string;
}

function hasCause(err: unknown, type: string): boolean {
  if (!(err instanceof ApiException)) return false;
  let body: unknown = err.body;
  if (typeof body === 'string') {
    try {
      body = JSON.parse(body);
    } catch {
      return false;
    }
  }
  return ((body as { details?: { causes?: { type?: string }[] } } | undefined)?.details?.causes ?? []).some((c) => c.type === type);
}

/** How long a listing may still take when the drain's deadline has (nearly) come. */
const LAST_LISTING_MS = 2000;

/** Restoring a node's schedulability after the guest API stopped answering: one attempt, not a retry series. */
const RESTORE_WHEN_API_DOWN_MS = 2000;

/** No answer, or the API server's "not now" (408, 429, 5xx): worth asking again; anything else is an answer. */
function noAnswer(err: unknown): boolean {
  const code = statusCode(err);
  return code === undefined || code === 408 || code === 429 || code >= 500;
}

/**
 * Cordons, evicts and waits, re-listing the node's pods every `pollMs` so that pods arriving
 * during the drain are judged too (a refusal then still fails the drain). On any failure except
 * an abort by the caller, the node is put back to the schedulability it had before.
 */
export class NodeDrainer {
  private readonly core: CoreV1Api;
  private readonly apps: AppsV1Api;
  private readonly policyApi: PolicyV1Api;

  /**
   * `retry` wraps each idempotent read or patch (listing, node reads, cordon patches) so that a
   * transient API failure does not fail a drain; evictions have their own loop.
   */
  constructor(
    clients: { core: CoreV1Api; apps: AppsV1Api; policy: PolicyV1Api },
    /** `signal` ends the retrying (an attempt in flight is bounded by the client's request timeout) */
    private readonly retry: <T>(fn: () => Promise<T>, signal?: AbortSignal) => Promise<T> = (fn) => fn(),
  ) {
    this.core = clients.core;
    this.apps = clients.apps;
    this.policyApi = clients.policy;
  }

  /**
   * Marks the node unschedulable. Returns whether it already was; if it was not, the node also
   * gets CORDONED_BY_ANNOTATION in the same patch (guarded by resourceVersion) so that
   * `restore` later knows it may uncordon it.
   */
  async cordon(node: string): Promise<{ alreadyCordoned: boolean }> {
    for (;;) {
      const n = await this.retry(() => this.core.readNode({ name: node }));
      if (n.spec?.unschedulable) return { alreadyCordoned: n.metadata?.annotations?.[CORDONED_BY_ANNOTATION] === undefined };
      try {
        await this.patchNode(node, { metadata: { resourceVersion: n.metadata?.resourceVersion, annotations: { [CORDONED_BY_ANNOTATION]: CORDONED_BY_VALUE } }, spec: { unschedulable: true } });
        return { alreadyCordoned: false };
      } catch (err) {
        if (statusCode(err) !== 409) throw err; // changed under us: look again
      }
    }
  }

  /** Undoes the operator's cordon, and only that: a node cordoned by someone else stays cordoned. Idempotent. */
  async restore(node: string, signal?: AbortSignal): Promise<{ uncordoned: boolean }> {
    for (;;) {
      let n;
      try {
        n = await this.retry(() => this.core.readNode({ name: node }), signal);
      } catch (err) {
        if (statusCode(err) === 404) return { uncordoned: false };
        throw err;
      }
      if (n.metadata?.annotations?.[CORDONED_BY_ANNOTATION] === undefined) return { uncordoned: false };
      try {
        await this.patchNode(node, { metadata: { resourceVersion: n.metadata?.resourceVersion, annotations: { [CORDONED_BY_ANNOTATION]: null } }, spec: { unschedulable: false } });
        return { uncordoned: true };
      } catch (err) {
        if (statusCode(err) !== 409) throw err;
      }
    }
  }

  private patchNode(node: string, body: object): Promise<unknown> {
    return this.retry(() => this.core.patchNode({ name: node, body }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch)));
  }

  /**
   * The pods on a node, read a page at a time and bounded: the guest cluster is the student's, and a
   * node with hundreds of thousands of pods must not grow the operator's memory without limit.
   */
  private async podsOn(node: string, signal?: AbortSignal): Promise<V1Pod[]> {
    const pods: V1Pod[] = [];
    let _continue: string | undefined;
    do {
      const page = await this.retry(() => this.core.listPodForAllNamespaces({ fieldSelector: `spec.nodeName=${node}`, limit: POD_PAGE, ...(_continue ? { _continue } : {}) }), signal);
      pods.push(...page.items);
      if (pods.length > MAX_PODS_PER_NODE) throw new DrainError(`node ${node} has more than ${MAX_PODS_PER_NODE} pods; the operator does not drain such a node`, [], 'TooManyPods');
      _continue = page.metadata?._continue || undefined;
    } while (_continue);
    return pods;
  }

  /** What a drain with this policy would do with each pod on the node now (kubectl drain --dry-run). */
  async plan(node: string, policy: DrainPolicy): Promise<{ pod: V1Pod; decision: PodDecision }[]> {
    const exists = this.daemonSetLookup();
    const pods = await this.podsOn(node);
    return Promise.all(pods.map(async (pod) => ({ pod, decision: await decidePod(pod, policy, exists) })));
  }

  /** DaemonSet existence, asked once per listing round. */
  private daemonSetLookup(): (namespace: string, name: string) => Promise<boolean> {
    const cache = new Map<string, Promise<boolean>>();
    return (namespace, name) => {
      const key = `${namespace}/${name}`;
      let p = cache.get(key);
      if (!p) {
        p = this.retry(() => this.apps.readNamespacedDaemonSet({ name, namespace })).then(
          () => true,
          (err: unknown) => {
            if (statusCode(err) === 404) return false;
            throw err;
          },
        );
        cache.set(key, p);
      }
      return p;
    };
  }

  async drain(node: string, opts: DrainOptions): Promise<DrainReport> {
    const deadline = Date.now() + opts.timeoutMs;
    try {
      await this.cordon(node);
      return await this.evictAll(node, opts, deadline);
    } catch (err) {
      // an abort belongs to the caller (handover or cancel) and is rolled back, or not, by it
      if (opts.signal?.aborted) throw err;
      // with the API gone one attempt is enough: the caller's rollback uncordons again, with its own retries
      const apiDown = err instanceof DrainError && err.reason === 'APIUnreachable';
      const failed = await this.restore(node, apiDown ? AbortSignal.timeout(RESTORE_WHEN_API_DOWN_MS) : undefined).then(() => undefined, (e: unknown) => e);
      // the drain's own failure is the news; a failed restore is added to it, never put in its place
      if (failed !== undefined && err instanceof Error) err.message += `; node ${node} could not be returned to its prior schedulability (${(failed as Error).message})`;
      throw err;
    }
  }

  private async evictAll(node: string, opts: DrainOptions, deadline: number): Promise<DrainReport> {
    const { signal } = opts;
    const skipAfter = opts.skipWaitForDeleteTimeoutSeconds ?? 0;
    const tracked = new Map<string, Tracked>();
    const result: DrainReport = { evicted: 0, evictedPods: [], pdbRetries: 0, skipped: [], warnings: [] };
    const skipped = new Map<string, string>();
    const warnings = new Map<string, Set<string>>();
    const warn = (w: string, pod: V1Pod) => {
      const set = warnings.get(w) ?? new Set<string>();
      warnings.set(w, set.add(podKey(pod)));
    };
    // evictions stop when the drain ends, however it ends
    const stop = new AbortController();
    const evictSignal = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
    let fatal: unknown;
    let lastRemaining = -1;

    const evict = async (t: Tracked): Promise<void> => {
      const name = t.pod.metadata?.name ?? '';
      const namespace = t.pod.metadata?.namespace ?? '';
      const gp = opts.gracePeriodSeconds ?? -1;
      let backoff = 500;
      for (;;) {
        try {
          await this.core.createNamespacedPodEviction({
            name,
            namespace,
            body: { apiVersion: 'policy/v1', kind: 'Eviction', metadata: { name, namespace }, ...(gp >= 0 ? { deleteOptions: { gracePeriodSeconds: gp } } : {}) },
          });
          t.state = 'evicted';
          result.evicted++;
          result.evictedPods.push(podKey(t.pod));
          return;
        } catch (err) {
          const code = statusCode(err);
          if (code === 404) return void (t.state = 'gone');
          t.lastAnswer = apiMessage(err);
          if (code === 429) result.pdbRetries++;
          else if (code === 403 && hasCause(err, 'NamespaceTerminating')) {
            // the namespace is going away: a pod already deleting only needs waiting for, others are retried until it is
            if (t.pod.metadata?.deletionTimestamp) return void (t.state = 'evicted');
          } else if (code !== undefined && code < 500 && code !== 408) {
            throw new DrainError(`eviction of ${podKey(t.pod)} refused: ${t.lastAnswer}`, [podKey(t.pod)], 'EvictionFailed');
          } // else transient (no answer, 408, 5xx): retried like a 429
        }
        const left = deadline - Date.now();
        if (left <= 0) return; // still 'evicting': the main loop reports the timeout with everything blocked
        await sleep(Math.min(backoff * (0.8 + Math.random() * 0.4), left), evictSignal);
        backoff = Math.min(backoff * 2, 5000);
      }
    };

    // the guest API not answering (a controller powered off behind the load balancer, a dropped
    // route): retried until the drain's deadline, then a failure that says so
    let apiDown: { since: number; last: string } | undefined;
    try {
      for (;;) {
        if (signal?.aborted) throw abortReason(signal);
        if (fatal) throw fatal;
        const lookup = this.daemonSetLookup();
        let pods: V1Pod[];
        const asked = Date.now();
        try {
          // retried until the deadline, and past it long enough for one more answer: the last round
          // before the deadline must not be cut short and taken for an API that does not answer
          pods = await this.podsOn(node, AbortSignal.timeout(Math.max(deadline - Date.now(), 0) + LAST_LISTING_MS));
          apiDown = undefined;
        } catch (err) {
          if (signal?.aborted) throw abortReason(signal);
          if (!noAnswer(err)) throw err;
          apiDown ??= { since: asked, last: '' };
          apiDown.last = apiMessage(err);
          if (Date.now() >= deadline) {
            const left = [...tracked.values()].filter((t) => t.state !== 'gone').map((t) => podKey(t.pod));
            throw new DrainError(`drain of ${node} failed: the guest API server did not answer for ${Math.round((Date.now() - apiDown.since) / 1000)} s (last: ${apiDown.last}); ${left.length} pod(s) known to be left${left.length ? `: ${left.join(', ')}` : ''}`, left, 'APIUnreachable');
          }
          await sleep(Math.min(opts.pollMs ?? 1000, Math.max(deadline - Date.now(), 0)), signal);
          continue;
        }
        const now = Date.now();
        const present = new Set<string>();
        const refused = new Map<string, string[]>();
        const fresh: Tracked[] = [];
        for (const pod of pods) {
          const uid = pod.metadata?.uid ?? '';
          present.add(uid);
          const known = tracked.get(uid);
          if (known) {
            // kubectl stops waiting for pods deleted longer ago than skipWaitForDeleteTimeout
            if (known.state === 'evicted' && deletedLongAgo(pod, skipAfter, now)) {
              known.state = 'gone';
              skipped.set(podKey(pod), 'deleted');
            }
            continue;
          }
          const d = await decidePod(pod, opts, lookup, now);
          if (d.action === 'refuse') refused.set(d.reason, [...(refused.get(d.reason) ?? []), podKey(pod)]);
          else if (d.action === 'skip') {
            skipped.set(podKey(pod), d.reason);
            if (d.reason === 'daemonset') warn('ignoring DaemonSet-managed Pods', pod);
          } else {
            if (d.warning) warn(d.warning, pod);
            fresh.push({ pod, state: 'evicting' });
          }
        }
        // like kubectl, nothing of a listing is evicted unless every pod of it passed the filters
        if (refused.size > 0) throw new DrainError(refusalMessage(node, refused), [...refused.values()].flat(), 'Refused');
        for (const t of fresh) {
          tracked.set(t.pod.metadata?.uid ?? '', t);
          evict(t).catch((err: unknown) => {
            if (!evictSignal.aborted) fatal ??= err;
          });
        }
        // a tracked pod missing from the node's list is gone (deleted, or replaced under a new UID)
        for (const [uid, t] of tracked) if (!present.has(uid)) t.state = 'gone';
        const left = [...tracked.values()].filter((t) => t.state !== 'gone');
        if (left.length !== lastRemaining) {
          lastRemaining = left.length;
          opts.onProgress?.(left.length);
        }
        if (left.length === 0) break;
        if (Date.now() >= deadline) throw await this.timeoutError(node, opts.timeoutMs, left);
        await sleep(Math.min(opts.pollMs ?? 1000, Math.max(deadline - Date.now(), 0)), signal);
      }
    } finally {
      stop.abort(new Error('drain finished'));
    }
    result.skipped = [...skipped].map(([pod, reason]) => ({ pod, reason }));
    result.warnings = [...warnings].map(([w, pods]) => `${w}: ${[...pods].join(', ')}`);
    return result;
  }

  /** The timeout error names the pods still there and the PDBs (matched by label) of those whose eviction was refused. */
  private async timeoutError(node: string, timeoutMs: number, left: Tracked[]): Promise<DrainError> {
    const blocked = left.filter((t) => t.state === 'evicting');
    const terminating = left.filter((t) => t.state === 'evicted');
    const pdbs = new Map<string, V1PodDisruptionBudget>();
    const byPdb = new Map<string, string[]>();
    const namespaces = [...new Set(blocked.map((t) => t.pod.metadata?.namespace ?? ''))];
    const lists = await Promise.all(
      namespaces.map((namespace) => this.policyApi.listNamespacedPodDisruptionBudget({ namespace }).then((l) => l.items, () => [] as V1PodDisruptionBudget[])),
    );
    const inNs = new Map(namespaces.map((ns, i) => [ns, lists[i]!]));
    for (const t of blocked) {
      for (const pdb of inNs.get(t.pod.metadata?.namespace ?? '') ?? []) {
        if (!selectorMatches(pdb.spec?.selector, t.pod.metadata?.labels)) continue;
        const key = `${pdb.metadata?.namespace}/${pdb.metadata?.name}`;
        pdbs.set(key, pdb);
        byPdb.set(key, [...(byPdb.get(key) ?? []), podKey(t.pod)]);
      }
    }
    const parts: string[] = [];
    for (const [key, pods] of byPdb) {
      const s = pdbs.get(key)!.status;
      parts.push(`PodDisruptionBudget ${key} (allowed disruptions ${s?.disruptionsAllowed ?? '?'}, healthy ${s?.currentHealthy ?? '?'}/${s?.desiredHealthy ?? '?'} desired) blocks eviction of ${pods.join(', ')}`);
    }
    const unexplained = blocked.filter((t) => !byPdb.size || ![...byPdb.values()].flat().includes(podKey(t.pod)));
    for (const t of unexplained) parts.push(`eviction of ${podKey(t.pod)} not accepted (last answer: ${t.lastAnswer ?? 'none yet'})`);
    if (terminating.length) parts.push(`evicted but still terminating: ${terminating.map((t) => podKey(t.pod)).join(', ')}`);
    const pods = left.map((t) => podKey(t.pod));
    return new DrainError(`drain of ${node} timed out after ${Math.round(timeoutMs / 1000)} s with ${pods.length} pod(s) left: ${parts.join('; ') || pods.join(', ')}`, pods, 'Timeout', [...pdbs.keys()]);
  }
}
