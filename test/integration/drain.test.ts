/**
 * kubectl-drain parity on real parts: the test control plane (kube-apiserver, controller-manager with
 * the disruption controller, scheduler) with KWOK as the kubelet of the guest nodes, and the real
 * `kubectl drain` run on the same pods (dry run) or on a twin node holding the same kinds of pods.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { AppsV1Api, BatchV1Api, CoreV1Api, KubeConfig, PatchStrategy, PolicyV1Api, setHeaderOptions, type V1Pod } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnvironmentSpec, VMSpec } from '../../src/api/inventory.js';
import { settingsFrom } from '../../src/api/types.js';
import { CORDONED_BY_ANNOTATION, type DrainOptions, type DrainPolicy, type PodDecision } from '../../src/guest/drain.js';
import { DrainError, GuestCluster } from '../../src/guest/guestCluster.js';
import { liveness } from '../world/budget.js';
import { until } from '../world/until.js';
import { AUDIT_MARK_NAMESPACE, auditEvents, startControlPlane, type AuditEvent, type ControlPlane } from '../world/controlPlane.js';
import { createGuestNodes, deployStudentWorkload, guestNode } from '../world/guestCluster.js';

const execFileP = promisify(execFile);
const ENV = 'drn';
const vm = (name: string): VMSpec => ({ name, role: 'worker', nodeName: `${ENV}-${name}`, host: 'h', memoryMiB: 256, cpus: 2, files: [] });
const env: EnvironmentSpec = {
  name: ENV,
  kubeconfigSecret: { namespace: 'x', name: 'x', key: 'kubeconfig' },
  vms: ['a', 'b', 'w1', 'w2', 'w3', 'w4'].map(vm),
};
/** twins without a kubelet (not KWOK-managed): their pods never finish terminating, as on a dead node */
const DEAD = ['x', 'y'].map(vm);
const NODE = (n: string) => `${ENV}-${n}`;
const KINDS_NS = `${ENV}-kinds`;
const TWIN_LABEL = 'vmops.dev/drain-twin';
const PAUSE = 'registry.k8s.io/pause:3.10';
const OP = settingsFrom({ targetHost: 'h', environments: [ENV] });
/** the operator's drain options as a VMMigration with default settings would pass them */
const operatorDrain = (timeoutMs: number): DrainOptions => ({
  timeoutMs,
  gracePeriodSeconds: OP.drainGracePeriodSeconds,
  deleteEmptyDirData: OP.deleteEmptyDirData,
  force: OP.drainForce,
  ignoreDaemonSets: OP.drainIgnoreDaemonSets,
  skipWaitForDeleteTimeoutSeconds: OP.drainSkipWaitForDeleteTimeoutSeconds,
  pollMs: 300,
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const mergePatch = setHeaderOptions('Content-Type', PatchStrategy.MergePatch);
/** the kind of pod, from its name: ds, mirror, scratch, web, bare, job, done, gone, stuck */
const role = (podName: string) => podName.split('-')[0]!;
const refusalKind = (text: string) => (/DaemonSet/.test(text) ? 'daemonset' : /local storage/.test(text) ? 'emptydir' : /no controller/.test(text) ? 'unmanaged' : `other: ${text}`);

type Outcome = { refused: Record<string, string> } | { evicted: string[]; untouched: string[] };

/** An audit timestamp of the API server (RFC 3339, microseconds) in microseconds since the epoch, exactly. */
function serverUs(ts: string): number {
  const m = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?Z$/.exec(ts);
  if (!m) throw new Error(`unexpected audit timestamp ${ts}`);
  return Date.parse(`${m[1]}Z`) * 1000 + Number((m[2] ?? '').padEnd(6, '0'));
}

describe('drain: kubectl drain parity against the real kubectl on the same pods', () => {
  let dir: string;
  let cp: ControlPlane;
  let kc: KubeConfig;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let guest: GuestCluster;

  const kubectl = async (...args: string[]) => {
    try {
      const { stdout, stderr } = await execFileP('kubectl', ['--kubeconfig', cp.kubeconfigPath, ...args], { maxBuffer: 8 << 20 });
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      return { code: e.code ?? 1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
    }
  };
  const podsOn = async (node: string) => (await core.listPodForAllNamespaces({ fieldSelector: `spec.nodeName=${node}` })).items;
  const node = async (name: string) => core.readNode({ name });
  /** the workload is up and the disruption controller says its PDB allows no eviction */
  const pdbAllowsNone = (namespace: string, name: string) =>
    until(`${namespace}/${name} available, its PDB allowing 0 disruptions`, 60_000, async () => {
      const pdb = await kc.makeApiClient(PolicyV1Api).readNamespacedPodDisruptionBudget({ name, namespace });
      return pdb.status?.currentHealthy === 1 && pdb.status.disruptionsAllowed === 0;
    });

  /** The kinds of pods kubectl drain distinguishes, all on `n`. */
  async function seedKinds(n: string): Promise<void> {
    const nodeObj = await node(n);
    const pin = { 'kubernetes.io/hostname': n };
    const pod = (name: string, extra: Partial<V1Pod['spec']> = {}, meta: V1Pod['metadata'] = {}): V1Pod => ({
      metadata: { name, ...meta },
      spec: { nodeName: n, terminationGracePeriodSeconds: 1, containers: [{ name: 'c', image: PAUSE }], ...extra },
    });
    // a static pod's mirror, as the kubelet registers it: annotation + the Node as controller
    await core.createNamespacedPod({
      namespace: KINDS_NS,
      body: pod('mirror-' + n, {}, {
        annotations: { 'kubernetes.io/config.mirror': 'static-hash' },
        ownerReferences: [{ apiVersion: 'v1', kind: 'Node', name: n, uid: nodeObj.metadata!.uid!, controller: true }],
      }),
    });
    await core.createNamespacedPod({ namespace: KINDS_NS, body: pod('bare-' + n) });
    await core.createNamespacedPod({ namespace: KINDS_NS, body: pod('done-' + n, { restartPolicy: 'Never', volumes: [{ name: 'tmp', emptyDir: {} }] }) });
    for (const [name, volumes] of [[`web-${n}`, []], [`scratch-${n}`, [{ name: 'tmp', emptyDir: {} }]]] as const) {
      await apps.createNamespacedDeployment({
        namespace: KINDS_NS,
        body: {
          metadata: { name },
          spec: {
            replicas: 1,
            selector: { matchLabels: { app: name } },
            template: { metadata: { labels: { app: name } }, spec: { nodeSelector: pin, terminationGracePeriodSeconds: 1, containers: [{ name: 'c', image: PAUSE }], volumes: [...volumes] } },
          },
        },
      });
    }
    await kc.makeApiClient(BatchV1Api).createNamespacedJob({
      namespace: KINDS_NS,
      body: { metadata: { name: `job-${n}` }, spec: { backoffLimit: 0, template: { spec: { nodeSelector: pin, restartPolicy: 'Never', containers: [{ name: 'c', image: PAUSE }] } } } },
    });
    // the kubelet reports the unmanaged emptyDir pod's container as failed (KWOK only finishes Job pods by itself)
    await until(`done-${n} Running`, 60_000, async () => (await core.readNamespacedPod({ name: `done-${n}`, namespace: KINDS_NS })).status?.phase === 'Running');
    await core.patchNamespacedPodStatus({ name: `done-${n}`, namespace: KINDS_NS, body: { status: { phase: 'Failed' } } }, mergePatch);
    await until(`all kinds of pods on ${n}`, 90_000, async () => {
      const pods = await podsOn(n);
      const byRole = new Map(pods.map((p) => [role(p.metadata!.name!), p.status?.phase]));
      return ['ds', 'mirror', 'bare', 'done', 'web', 'scratch', 'job'].every((r) => byRole.has(r)) && byRole.get('job') === 'Succeeded' && byRole.get('done') === 'Failed' && byRole.get('web') === 'Running';
    });
  }

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmop-drain-'));
    cp = await startControlPlane({ dataDir: join(dir, 'cp'), podReadyDelayMs: 300 });
    kc = new KubeConfig();
    kc.loadFromString(cp.kubeconfigYaml);
    core = kc.makeApiClient(CoreV1Api);
    apps = kc.makeApiClient(AppsV1Api);
    guest = GuestCluster.fromKubeconfigYaml(cp.kubeconfigYaml);
    await createGuestNodes(kc, env);
    for (const v of DEAD) await core.createNode({ body: guestNode({ ...env, vms: DEAD }, v, false) });
    for (const v of env.vms) await guest.waitNodeReady(v.nodeName, { timeoutMs: 60_000 });
    await core.createNamespace({ body: { metadata: { name: KINDS_NS } } });
    for (const n of [NODE('a'), NODE('b')]) await core.patchNode({ name: n, body: { metadata: { labels: { [TWIN_LABEL]: 'true' } } } }, mergePatch);
    await apps.createNamespacedDaemonSet({
      namespace: KINDS_NS,
      body: {
        metadata: { name: 'ds' },
        spec: {
          selector: { matchLabels: { app: 'ds' } },
          template: { metadata: { labels: { app: 'ds' } }, spec: { nodeSelector: { [TWIN_LABEL]: 'true' }, containers: [{ name: 'c', image: PAUSE }] } },
        },
      },
    });
    await seedKinds(NODE('a'));
    await seedKinds(NODE('b'));
  }, 3_600_000);

  afterAll(async () => {
    await cp?.stop();
    if (dir && !process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  /** kubectl's verdict from `kubectl drain --dry-run=server` output */
  function kubectlOutcome(r: { code: number; stdout: string; stderr: string }, allRoles: string[]): Outcome {
    const refused: Record<string, string> = {};
    for (const m of r.stderr.matchAll(/cannot delete (.*?\)): (.*?)(?=, cannot delete |\]|\n|$)/g)) {
      for (const p of m[2]!.matchAll(new RegExp(`${KINDS_NS}/([a-z0-9.-]+)`, 'g'))) refused[role(p[1]!)] = refusalKind(m[1]!);
    }
    if (Object.keys(refused).length > 0) return { refused };
    expect(r.code, r.stderr).toBe(0);
    const evicted = [...r.stdout.matchAll(/evicting pod (\S+)\/(\S+)/g)].map((m) => role(m[1] === KINDS_NS ? m[2]! : m[1]!));
    return { evicted: [...new Set(evicted)].sort(), untouched: allRoles.filter((x) => !evicted.includes(x)).sort() };
  }

  function ourOutcome(plan: { pod: V1Pod; decision: PodDecision }[]): Outcome {
    const refused: Record<string, string> = {};
    for (const { pod, decision } of plan) if (decision.action === 'refuse') refused[role(pod.metadata!.name!)] = refusalKind(decision.reason);
    if (Object.keys(refused).length > 0) return { refused };
    const roles = (a: string) => plan.filter((x) => x.decision.action === a).map((x) => role(x.pod.metadata!.name!)).sort();
    return { evicted: roles('evict'), untouched: roles('skip') };
  }

  const flags = (p: DrainPolicy) => [
    ...(p.ignoreDaemonSets ? ['--ignore-daemonsets'] : []),
    ...(p.deleteEmptyDirData ? ['--delete-emptydir-data'] : []),
    ...(p.force ? ['--force'] : []),
  ];

  it('decides every kind of pod as kubectl drain --dry-run=server does, for all 8 combinations of its flags', async () => {
    const n = NODE('a');
    const allRoles = (await podsOn(n)).map((p) => role(p.metadata!.name!)).sort();
    expect(allRoles).toEqual(['bare', 'done', 'ds', 'job', 'mirror', 'scratch', 'web']);
    const table: string[] = [];
    for (let bits = 0; bits < 8; bits++) {
      const policy: DrainPolicy = { ignoreDaemonSets: !!(bits & 1), deleteEmptyDirData: !!(bits & 2), force: !!(bits & 4) };
      const k = kubectlOutcome(await kubectl('drain', n, '--dry-run=server', '--timeout=30s', ...flags(policy)), allRoles);
      const ours = ourOutcome(await guest.drainPlan(n, policy));
      table.push(`${flags(policy).join(' ') || '(no flags)'} → kubectl ${JSON.stringify(k)} | ours ${JSON.stringify(ours)}`);
      expect(ours, table.at(-1)).toEqual(k);
    }
    console.log(`drain decisions, kubectl vs ours:\n${table.join('\n')}`);
    // the dry runs changed nothing
    expect((await node(n)).spec?.unschedulable).toBeFalsy();
    expect((await podsOn(n)).filter((p) => p.metadata?.deletionTimestamp)).toHaveLength(0);
  });

  it('a real drain removes and keeps the same pods as a real kubectl drain of the twin node', async () => {
    const [a, b] = [NODE('a'), NODE('b')];
    const before = new Map((await podsOn(a)).map((p) => [role(p.metadata!.name!), p.metadata!.uid!]));
    const policy: DrainPolicy = { ignoreDaemonSets: true, deleteEmptyDirData: true, force: true };
    const [ours, theirs] = await Promise.all([
      guest.drain(a, { ...operatorDrain(60_000), ...policy }),
      kubectl('drain', b, '--timeout=60s', ...flags(policy)),
    ]);
    expect(theirs.code, theirs.stderr).toBe(0);
    const left = async (n: string) => (await podsOn(n)).map((p) => role(p.metadata!.name!)).sort();
    const [leftA, leftB] = [await left(a), await left(b)];
    const kubectlEvicted = [...theirs.stdout.matchAll(/evicting pod (\S+)\/(\S+)/g)].map((m) => role(m[1] === KINDS_NS ? m[2]! : m[1]!)).sort();
    console.log(`real drain: ours evicted ${ours.evictedPods.join(' ')}, skipped ${JSON.stringify(ours.skipped)}, warnings ${JSON.stringify(ours.warnings)}; left on ${a}: ${leftA.join(' ')}; kubectl evicted ${kubectlEvicted.join(' ')}, left on ${b}: ${leftB.join(' ')}`);
    expect(leftA).toEqual(leftB);
    expect(leftA).toEqual(['ds', 'mirror']);
    // the same kinds; ours may have evicted a replacement too: a scheduler whose node cache lags behind the cordon can
    // still place a replacement on the node, and the re-listing drain evicts it (kubectl, listing once, would leave it)
    expect([...new Set(ours.evictedPods.map((p) => role(p.split('/')[1]!)))].sort()).toEqual(kubectlEvicted);
    expect(kubectlEvicted).toEqual(['bare', 'done', 'job', 'scratch', 'web']);
    // the DaemonSet and mirror pods were not touched (same UIDs, not terminating)
    for (const p of await podsOn(a)) {
      expect(p.metadata?.uid).toBe(before.get(role(p.metadata!.name!)));
      expect(p.metadata?.deletionTimestamp).toBeUndefined();
    }
    // both nodes stay cordoned after a successful drain; ours knows it cordoned a, and restores exactly that
    expect((await node(a)).spec?.unschedulable).toBe(true);
    expect((await node(b)).spec?.unschedulable).toBe(true);
    await guest.uncordon(a);
    expect((await node(a)).spec?.unschedulable).toBeFalsy();
    expect((await node(a)).metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();
  });

  it('pods deleted longer ago than skipWaitForDeleteTimeoutSeconds are neither evicted nor waited for, as kubectl does on a dead node', async () => {
    const twins = DEAD.map((v) => v.nodeName);
    for (const n of twins) {
      for (const name of [`gone-${n}`, `stuck-${n}`]) {
        await core.createNamespacedPod({ namespace: KINDS_NS, body: { metadata: { name }, spec: { nodeName: n, terminationGracePeriodSeconds: 1, containers: [{ name: 'c', image: PAUSE }] } } });
      }
      await core.deleteNamespacedPod({ name: `gone-${n}`, namespace: KINDS_NS });
    }
    // No kubelet: the deleted pods stay, terminating. Both drains (ours and kubectl's) skip a pod once the
    // whole seconds since its deletionTimestamp (the API server's: deletion + its 1 s grace) exceed
    // skip-wait-for-delete-timeout (1 s), i.e. 2 s after it; wait for that, from the server's timestamps.
    const deadlines = await Promise.all(twins.map(async (n) => new Date((await core.readNamespacedPod({ name: `gone-${n}`, namespace: KINDS_NS })).metadata!.deletionTimestamp!).getTime()));
    await until('the deleted pods 2 s past their deletionTimestamp', 30_000, async () => deadlines.every((d) => Date.now() > d + 2000), 100);
    for (const n of twins) expect((await podsOn(n)).map((p) => [role(p.metadata!.name!), !!p.metadata?.deletionTimestamp])).toEqual(expect.arrayContaining([['gone', true], ['stuck', false]]));
    const policy: DrainPolicy = { force: true, skipWaitForDeleteTimeoutSeconds: 1 };
    const [ours, theirs] = await Promise.all([
      guest.drain(twins[0]!, { ...operatorDrain(30_000), ...policy }),
      kubectl('drain', twins[1]!, '--timeout=30s', '--force', '--skip-wait-for-delete-timeout=1'),
    ]);
    expect(theirs.code, theirs.stderr).toBe(0);
    const kubectlEvicted = [...theirs.stdout.matchAll(/evicting pod (\S+)\/(\S+)/g)].map((m) => role(m[1] === KINDS_NS ? m[2]! : m[1]!));
    console.log(`dead node: ours evicted ${ours.evictedPods.join(' ')}, skipped ${JSON.stringify(ours.skipped)}; kubectl evicted ${kubectlEvicted.join(' ')}`);
    expect(ours.evictedPods.map((p) => role(p.split('/')[1]!))).toEqual(kubectlEvicted);
    expect(kubectlEvicted).toEqual(['stuck']);
    expect(ours.skipped.map((s) => `${role(s.pod.split('/')[1]!)}:${s.reason}`).sort()).toEqual(['gone:deleted', 'stuck:deleted']);
  });

  it('a PDB allowing 0 disruptions: the drain fails after its timeout naming the PDB and pod, nothing evicted, the node back to its prior schedulability', async () => {
    const ns = `${ENV}-strict`;
    const n = NODE('w1');
    const TIMEOUT_MS = 5_000;
    await deployStudentWorkload(kc, { namespace: ns, name: 'db', replicas: 1, minAvailable: 1, nodeNames: [n] });
    await pdbAllowsNone(ns, 'db');
    const [db] = (await core.listNamespacedPod({ namespace: ns })).items;
    const dbName = db!.metadata!.name!;
    // watch the whole time: the db pod never starts terminating, the PDB never drops below its minimum
    let watching = true;
    let minHealthy = Infinity;
    let terminatingSeen = false;
    const watchDeadline = Date.now() + liveness(300_000);
    const watcher = (async () => {
      while (watching) {
        if (Date.now() > watchDeadline) throw new Error('the PDB watcher ran past its deadline');
        const [pdb, pods] = await Promise.all([kc.makeApiClient(PolicyV1Api).readNamespacedPodDisruptionBudget({ name: 'db', namespace: ns }), core.listNamespacedPod({ namespace: ns })]);
        minHealthy = Math.min(minHealthy, pdb.status?.currentHealthy ?? 0);
        terminatingSeen ||= pods.items.some((p) => p.metadata?.deletionTimestamp);
        await sleep(100);
      }
    })();

    const attempt = async (k: number, expectCordoned: boolean) => {
      // A mark in the API server's audit log, left before the drain starts (and so before its deadline is set).
      const mark = `drain-attempt-${k}`;
      await core.readNamespacedConfigMap({ name: mark, namespace: AUDIT_MARK_NAMESPACE }).catch(() => undefined);
      const t0 = performance.now();
      const err = await guest.drain(n, operatorDrain(TIMEOUT_MS)).catch((e: unknown) => e);
      const ms = Math.round(performance.now() - t0);
      expect(err).toBeInstanceOf(DrainError);
      const de = err as DrainError;
      console.log(`PDB drain (cordoned before: ${expectCordoned}) failed after ${ms} ms (test clock): ${de.message}`);
      expect(de.reason).toBe('Timeout');
      expect(de.pdbs).toEqual([`${ns}/db`]);
      expect(de.pods).toEqual([`${ns}/${dbName}`]);
      expect(de.message).toContain(`PodDisruptionBudget ${ns}/db`);
      expect(de.message).toContain(dbName);
      // It waited at the PDB for its whole timeout, asking again and again, before it gave up — in the API
      // server's own records (audit log, server clock), not by the test's stopwatch: the eviction of db was
      // refused (429) more than once and never accepted, and the drain's timeout report (its list of the
      // namespace's PDBs, made only once its deadline has passed) reached the server at least the timeout
      // after the mark. Load can only push the report later; only a drain that gave up early fails this.
      const seen = await until(`audit events of drain attempt ${k}`, 15_000, async () => {
        const ev = auditEvents(cp);
        const markEv = ev.find((e) => e.objectRef?.namespace === AUDIT_MARK_NAMESPACE && e.objectRef.name === mark);
        if (!markEv) return undefined;
        const since = serverUs(markEv.requestReceivedTimestamp);
        const later = ev.filter((e) => serverUs(e.requestReceivedTimestamp) > since);
        // the drain's own list (it runs with the admin token), not the API server's list behind each eviction
        const report = later.find((e) => e.user?.username === 'admin' && e.verb === 'list' && e.objectRef?.resource === 'poddisruptionbudgets' && e.objectRef.namespace === ns);
        return report ? { since, later, report } : undefined;
      }, 100);
      const isDbEviction = (e: AuditEvent) => e.user?.username === 'admin' && e.objectRef?.subresource === 'eviction' && e.objectRef.namespace === ns && e.objectRef.name === dbName;
      const reportAt = serverUs(seen.report.requestReceivedTimestamp);
      const evictions = seen.later.filter((e) => isDbEviction(e) && serverUs(e.requestReceivedTimestamp) < reportAt);
      const codes = evictions.map((e) => e.responseStatus?.code);
      console.log(`  server side: ${codes.length} evictions of ${dbName} (codes ${codes.join(' ')}); timeout report ${((reportAt - seen.since) / 1000).toFixed(0)} ms after the mark`);
      expect(codes.filter((c) => c === 429).length, 'evictions refused by the PDB').toBeGreaterThanOrEqual(2);
      expect(codes.filter((c) => c !== 429), 'evictions not refused').toEqual([]);
      expect(reportAt - seen.since).toBeGreaterThanOrEqual(TIMEOUT_MS * 1000);
      const after = await node(n);
      expect(after.spec?.unschedulable ?? false).toBe(expectCordoned);
      expect(after.metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();
    };
    let watchFailure: unknown;
    try {
      await attempt(1, false);
      // someone cordoned the node before: a failed drain leaves it cordoned
      expect((await kubectl('cordon', n)).code).toBe(0);
      await attempt(2, true);
    } finally {
      watching = false;
      await watcher.catch((e: unknown) => void (watchFailure = e));
    }
    if (watchFailure) throw watchFailure;
    expect(terminatingSeen).toBe(false);
    expect(minHealthy).toBe(1);
    const now = (await core.listNamespacedPod({ namespace: ns })).items;
    expect(now.map((p) => p.metadata?.uid)).toEqual([db!.metadata!.uid]);
    expect((await kubectl('uncordon', n)).code).toBe(0);
  }, liveness(60_000 + 60_000 + 2 * (5_000 + 15_000 + 30_000)));

  it('a node cordoned by someone else before the drain stays cordoned after a successful drain; one the operator cordoned is uncordoned', async () => {
    const ns = `${ENV}-app`;
    const [w2, w3] = [NODE('w2'), NODE('w3')];
    await deployStudentWorkload(kc, { namespace: ns, name: 'app', replicas: 2, minAvailable: 1, nodeNames: [w2, w3] });
    await until('app available', 60_000, async () => (await apps.readNamespacedDeployment({ name: 'app', namespace: ns })).status?.availableReplicas === 2);
    expect((await podsOn(w2)).length).toBe(1);
    expect((await kubectl('cordon', w2)).code).toBe(0);
    await guest.cordon(w2); // what a move does first: finds it cordoned, claims nothing
    expect((await node(w2)).metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();
    const r = await guest.drain(w2, operatorDrain(60_000));
    expect(r.evicted).toBe(1);
    expect(await podsOn(w2)).toHaveLength(0);
    // what the move does after the VM is back: restore — someone else's cordon stays
    await guest.uncordon(w2);
    expect((await node(w2)).spec?.unschedulable).toBe(true);
    // the same node, schedulable before: cordoned by the drain, uncordoned by the restore
    expect((await kubectl('uncordon', w2)).code).toBe(0);
    await guest.drain(w2, operatorDrain(60_000));
    expect((await node(w2)).spec?.unschedulable).toBe(true);
    expect((await node(w2)).metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeDefined();
    await guest.uncordon(w2);
    expect((await node(w2)).spec?.unschedulable).toBeFalsy();
    expect((await node(w2)).metadata?.annotations?.[CORDONED_BY_ANNOTATION]).toBeUndefined();
    await guest.uncordon(w2); // idempotent: a second restore (a resumed move) changes nothing
    expect((await node(w2)).spec?.unschedulable).toBeFalsy();
  });

  it('re-lists the node during the drain: a pod that arrives later is judged too (refused without force, evicted with it)', async () => {
    const ns = `${ENV}-late`;
    const n = NODE('w4');
    await deployStudentWorkload(kc, { namespace: ns, name: 'hold', replicas: 1, minAvailable: 1, nodeNames: [n] });
    await pdbAllowsNone(ns, 'hold');
    const late = (name: string) => core.createNamespacedPod({ namespace: ns, body: { metadata: { name }, spec: { nodeName: n, terminationGracePeriodSeconds: 1, containers: [{ name: 'c', image: PAUSE }] } } });

    // 1. without force: the unmanaged pod that shows up while the PDB holds the drain refuses it. It shows
    // up after the drain's first listing (which tracked hold alone and reported it), not after a sleep.
    const firstRound: number[] = [];
    const refused = guest.drain(n, { ...operatorDrain(60_000), onProgress: (x) => firstRound.push(x) }).catch((e: unknown) => e);
    await until('the drain has listed the node and tracks hold', 30_000, async () => firstRound.length > 0, 50);
    expect(firstRound).toEqual([1]);
    await late('late1');
    const err = (await refused) as DrainError;
    expect(err).toBeInstanceOf(DrainError);
    expect(err.reason).toBe('Refused');
    expect(err.pods).toEqual([`${ns}/late1`]);
    expect(err.message).toMatch(/no controller/);
    expect((await node(n)).spec?.unschedulable).toBeFalsy();

    // 2. with force: both late pods are evicted once the PDB allows it
    const progress: number[] = [];
    const done = guest.drain(n, { ...operatorDrain(60_000), force: true, onProgress: (x) => progress.push(x) });
    // its first listing tracks hold and late1; late1 (no PDB) goes, hold stays: the drain is down to hold alone
    await until('the drain down to hold alone, late1 evicted', 30_000, async () => progress.at(-1) === 1, 50);
    const joined = progress.length;
    await late('late2');
    // nobody but the running drain (still held by the PDB) removes late2
    await until('late2 evicted by the running drain', 30_000, async () => !(await podsOn(n)).some((p) => p.metadata?.name === 'late2'));
    // A pod joined the drain on the way: the drain tracks a pod (and reports the count) before it evicts it, so
    // the first count after late2 appeared is hold + late2 — whatever the timing of the drain's listings.
    expect(progress[joined], `progress ${progress.join('→')}`).toBe(2);
    await kc.makeApiClient(PolicyV1Api).patchNamespacedPodDisruptionBudget({ name: 'hold', namespace: ns, body: { spec: { minAvailable: 0 } } }, mergePatch);
    const r = await done;
    console.log(`late pods: progress ${progress.join('→')}, evicted ${r.evictedPods.join(' ')}, 429s ${r.pdbRetries}`);
    expect(r.evictedPods.map((p) => p.split('/')[1]!.replace(/-.*/, '')).sort()).toEqual(['hold', 'late1', 'late2']);
    expect(r.pdbRetries).toBeGreaterThan(0);
    expect(await podsOn(n)).toHaveLength(0);
    expect(progress.at(-1)).toBe(0);
    await guest.uncordon(n);
  }, liveness(60_000 + 30_000 + 60_000 + 2 * 30_000 + 60_000 + 30_000));
});
