/**
 * A real, throw-away Kubernetes control plane for tests: etcd, kube-apiserver,
 * kube-controller-manager, kube-scheduler and KWOK (as the "kubelet" of fake
 * nodes), all built from source by scripts/build-control-plane.mjs and run as
 * child processes on free loopback ports. Nothing here imitates a Kubernetes
 * component: every controller, admission plugin and API is the upstream one.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { request as httpRequest } from 'node:http';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { Watch, type KubeConfig } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import { controlPlaneBinDir, ensureControlPlane } from '../../scripts/build-control-plane.mjs';
import { liveness, noteWait } from './budget.js';

export interface ControlPlane {
  /** https://127.0.0.1:<port> */
  server: string;
  /** admin kubeconfig (static token in group system:masters, CA of the API server's self-signed cert) */
  kubeconfigPath: string;
  kubeconfigYaml: string;
  binDir: string;
  /** directory holding the data and one log file per component */
  dataDir: string;
  /** wall-clock time from spawning etcd until the API server was ready and the default ServiceAccount existed */
  startupMs: number;
  /** the API server's audit log (JSON lines): see AUDIT_POLICY for what it records */
  auditLogPath: string;
  stop(): Promise<void>;
}

/** Namespace whose requests the audit log records: a test reads a name here to leave a server-timestamped mark. */
export const AUDIT_MARK_NAMESPACE = 'vmops-audit-mark';

/**
 * What the API server's audit log records: only what tests order by the server's own clock — evictions
 * (accepted or refused by a PodDisruptionBudget), namespaced lists of PodDisruptionBudgets (a drain's
 * timeout report), and marks (any request in AUDIT_MARK_NAMESPACE). Nothing else, so it costs nothing.
 */
const AUDIT_POLICY = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  resources: [{ group: '', resources: ['pods/eviction'] }]
- level: Metadata
  verbs: [list]
  resources: [{ group: policy, resources: [poddisruptionbudgets] }]
- level: Metadata
  namespaces: ['${AUDIT_MARK_NAMESPACE}']
- level: None
`;

/** One audit event (audit.k8s.io/v1 Event, the fields tests use). Timestamps are the API server's, in microseconds. */
export interface AuditEvent {
  verb: string;
  /** who asked: the tests' admin token is `admin`; the API server's own loopback requests (e.g. the PDB list
   * behind every eviction) are `system:apiserver` */
  user?: { username?: string };
  requestURI: string;
  objectRef?: { resource?: string; subresource?: string; namespace?: string; name?: string; apiGroup?: string };
  responseStatus?: { code?: number };
  requestReceivedTimestamp: string;
  stageTimestamp: string;
  stage: string;
}

/** The audit events recorded so far (ResponseComplete stage only). */
export function auditEvents(cp: Pick<ControlPlane, 'auditLogPath'>): AuditEvent[] {
  let text = '';
  try {
    text = readFileSync(cp.auditLogPath, 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as AuditEvent)
    .filter((e) => e.stage === 'ResponseComplete');
}

export interface ControlPlaneOptions {
  dataDir: string;
  /** kube-controller-manager --node-monitor-grace-period: how long a node may miss heartbeats before it goes NotReady (default 8) */
  nodeMonitorGracePeriodSeconds?: number;
  /**
   * How long a pod on a KWOK node takes from scheduled to Running/Ready (image pull, start-up,
   * readiness probe of a real kubelet). 0 (default) = KWOK's default "fast" pod stages.
   */
  podReadyDelayMs?: number;
}

/** Label selecting the nodes KWOK acts as kubelet for (see test/world/guestCluster.ts for why a label and not an annotation). */
export const KWOK_MANAGE_LABEL = 'kwok.x-k8s.io/node';
export const KWOK_MANAGE_VALUE = 'fake';
/** KWOK node lease duration; it renews every quarter of it (1 s), well inside the node-monitor grace period. */
const KWOK_NODE_LEASE_SECONDS = 4;

/**
 * KWOK v0.7.0's default pod stages (kustomize/stage/pod/fast: pod-ready, pod-complete, pod-delete)
 * verbatim, except that pod-ready waits __DELAY__ ms. Given as config, they replace the built-in
 * pod stages; node stages stay KWOK's defaults.
 */
const KWOK_POD_STAGES = `apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.podIP'
      operator: 'DoesNotExist'
  delay:
    durationMilliseconds: __DELAY__
  next:
    statusTemplate: |
      {{ $now := Now }}

      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}

      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}

      initContainerStatuses:
      {{ range .spec.initContainers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        {{ if eq .restartPolicy "Always" }}
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
        {{ else }}
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
        {{ end }}
      {{ end }}

      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values:
      - 'Running'
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values:
      - 'Job'
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $root := . }}
      containerStatuses:
      {{ range $index, $item := .spec.containers }}
      {{ $origin := index $root.status.containerStatuses $index }}
      - image: {{ $item.image | Quote }}
        name: {{ $item.name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    finalizers:
      empty: true
    delete: true
`;

/** What recordWatch gives: every event so far, and a way to end the watch (saying whether the server ended it first). */
export interface RecordedWatch<T> {
  /** events in the API server's order; objects as JSON (timestamps are strings, not Dates) */
  events: Array<{ type: string; obj: T }>;
  /** the server or the connection ended the watch before stop() */
  endedEarly(): boolean;
  stop(): { endedEarly: boolean; error?: unknown };
}

/**
 * Every event of a watch from `resourceVersion` on, in the API server's own order (nothing sampled, nothing
 * missed), until stopped. A watch the server ended early is reported by stop(), never silently short.
 */
export async function recordWatch<T>(kc: KubeConfig, path: string, resourceVersion: string, query: Record<string, string> = {}): Promise<RecordedWatch<T>> {
  const events: Array<{ type: string; obj: T }> = [];
  let stopping = false;
  let ended: { error?: unknown } | undefined;
  const req = await new Watch(kc).watch(path, { ...query, resourceVersion }, (type, obj: T) => void events.push({ type, obj }), (error: unknown) => {
    if (!stopping) ended = { error };
  });
  return {
    events,
    endedEarly: () => ended !== undefined,
    stop() {
      stopping = true;
      req.abort();
      return { endedEarly: ended !== undefined, ...(ended?.error ? { error: ended.error } : {}) };
    },
  };
}

const REPO_ROOT = resolve(import.meta.dirname, '../..');

async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Builds the binaries if needed without blocking this process's event loop (the builder is synchronous and takes many minutes cold). */
export async function ensureBinaries(): Promise<string> {
  if (!existsSync(join(controlPlaneBinDir(), '.complete'))) {
    const script = join(REPO_ROOT, 'scripts/build-control-plane.mjs');
    await new Promise<void>((res, rej) => {
      const child = spawn(process.execPath, [script], { stdio: ['ignore', 'inherit', 'inherit'] });
      child.once('error', rej);
      child.once('exit', (code) => (code === 0 ? res() : rej(new Error(`${script} exited with ${code}`))));
    });
  }
  return ensureControlPlane();
}

interface Proc {
  name: string;
  child: ChildProcess;
  logPath: string;
  exited: Promise<void>;
}

function tail(path: string, lines = 25): string {
  try {
    return readFileSync(path, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/** GET a URL; resolves with the status code (0 when the connection failed). */
function probe(url: string, opts: { ca?: string; token?: string } = {}): Promise<{ status: number; body: string }> {
  return new Promise((res) => {
    const u = new URL(url);
    const req = (u.protocol === 'https:' ? request : httpRequest)(
      u,
      { method: 'GET', ca: opts.ca, headers: opts.token ? { Authorization: `Bearer ${opts.token}` } : {}, timeout: 5000 },
      (resp) => {
        let body = '';
        resp.setEncoding('utf8');
        resp.on('data', (d: string) => (body += d));
        resp.on('end', () => res({ status: resp.statusCode ?? 0, body }));
        resp.on('error', () => res({ status: 0, body }));
      },
    );
    req.on('timeout', () => req.destroy());
    req.on('error', () => res({ status: 0, body: '' }));
    req.end();
  });
}

export async function startControlPlane(opts: ControlPlaneOptions): Promise<ControlPlane> {
  const binDir = await ensureBinaries();
  const dataDir = resolve(opts.dataDir);
  mkdirSync(dataDir, { recursive: true });
  const t0 = Date.now();
  const procs: Proc[] = [];
  let stopped = false;

  const killAllSync = () => {
    for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  };
  // No component may outlive the test process, even when it dies without calling stop().
  process.once('exit', killAllSync);

  const stop = async () => {
    if (stopped) return;
    stopped = true;
    for (const p of [...procs].reverse()) {
      if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGTERM');
      await Promise.race([p.exited, sleep(5000)]);
      if (p.child.exitCode === null && p.child.signalCode === null) {
        p.child.kill('SIGKILL');
        await Promise.race([p.exited, sleep(2000)]);
      }
    }
    process.removeListener('exit', killAllSync);
  };

  const start = (name: string, args: string[]): Proc => {
    const logPath = join(dataDir, `${name}.log`);
    const fd = openSync(logPath, 'a');
    writeFileSync(fd, `\n==== ${new Date().toISOString()} ${name} ${args.join(' ')}\n`);
    const child = spawn(join(binDir, name), args, { stdio: ['ignore', fd, fd], cwd: dataDir, env: { ...process.env, HOME: dataDir } });
    closeSync(fd);
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    child.once('error', () => undefined);
    const p = { name, child, logPath, exited };
    procs.push(p);
    return p;
  };

  const failIfExited = (p: Proc) => {
    if (p.child.exitCode !== null || p.child.signalCode !== null) {
      throw new Error(`${p.name} exited (${p.child.exitCode ?? p.child.signalCode}) during start-up; log ${p.logPath}:\n${tail(p.logPath)}`);
    }
  };

  /** a liveness wait of start-up: `budgetMs` on an unloaded machine, scaled by VMOPS_TIME_SCALE */
  const waitFor = async (what: string, p: Proc[], budgetMs: number, check: () => Promise<boolean>) => {
    const budget = liveness(budgetMs);
    const t0 = performance.now();
    const deadline = Date.now() + budget;
    for (;;) {
      p.forEach(failIfExited);
      if (await check()) {
        noteWait(`control plane start-up: ${what}`, budget, performance.now() - t0);
        return;
      }
      if (Date.now() > deadline) {
        throw new Error(`timed out after ${budget} ms waiting for ${what}; logs: ${p.map((x) => x.logPath).join(', ')}\n${p.map((x) => `--- ${x.name}\n${tail(x.logPath)}`).join('\n')}`);
      }
      await sleep(200);
    }
  };

  try {
    // ---- credentials -------------------------------------------------------------------------
    const pki = join(dataDir, 'pki');
    mkdirSync(pki, { recursive: true });
    const sa = generateKeyPairSync('rsa', {
      modulusLength: 2048,
      publicKeyEncoding: { type: 'spki', format: 'pem' },
      privateKeyEncoding: { type: 'pkcs1', format: 'pem' },
    });
    const saKey = join(pki, 'sa.key');
    const saPub = join(pki, 'sa.pub');
    writeFileSync(saKey, sa.privateKey, { mode: 0o600 });
    writeFileSync(saPub, sa.publicKey);
    const token = randomBytes(24).toString('hex');
    const tokenFile = join(pki, 'tokens.csv');
    writeFileSync(tokenFile, `${token},admin,admin-uid,"system:masters"\n`, { mode: 0o600 });
    const certDir = join(pki, 'apiserver');
    const auditPolicyPath = join(dataDir, 'audit-policy.yaml');
    writeFileSync(auditPolicyPath, AUDIT_POLICY);
    const auditLogPath = join(dataDir, 'audit.log');

    // ---- etcd ----------------------------------------------------------------------------------
    const [etcdClient, etcdPeer, apiPort] = [await freePort(), await freePort(), await freePort()];
    const etcd = start('etcd', [
      '--name=default',
      `--data-dir=${join(dataDir, 'etcd')}`,
      `--listen-client-urls=http://127.0.0.1:${etcdClient}`,
      `--advertise-client-urls=http://127.0.0.1:${etcdClient}`,
      `--listen-peer-urls=http://127.0.0.1:${etcdPeer}`,
      `--initial-advertise-peer-urls=http://127.0.0.1:${etcdPeer}`,
      `--initial-cluster=default=http://127.0.0.1:${etcdPeer}`,
      '--initial-cluster-state=new',
      '--unsafe-no-fsync', // test data only; makes writes ~10x faster on slow disks
      '--log-level=warn',
    ]);
    await waitFor('etcd /health', [etcd], 60_000, async () => {
      const r = await probe(`http://127.0.0.1:${etcdClient}/health`);
      return r.status === 200 && r.body.includes('"health":"true"');
    });

    // ---- kube-apiserver ---------------------------------------------------------------------------
    const server = `https://127.0.0.1:${apiPort}`;
    const apiserver = start('kube-apiserver', [
      `--etcd-servers=http://127.0.0.1:${etcdClient}`,
      '--bind-address=127.0.0.1',
      '--advertise-address=127.0.0.1',
      `--secure-port=${apiPort}`,
      `--cert-dir=${certDir}`, // self-signed serving cert + its CA, generated at start
      `--token-auth-file=${tokenFile}`,
      '--authorization-mode=Node,RBAC',
      `--service-account-key-file=${saPub}`,
      `--service-account-signing-key-file=${saKey}`,
      '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
      '--service-cluster-ip-range=10.96.0.0/16',
      '--allow-privileged=true',
      '--endpoint-reconciler-type=none', // the kubernetes Service cannot point at a loopback address anyway
      '--profiling=false',
      `--audit-policy-file=${auditPolicyPath}`,
      `--audit-log-path=${auditLogPath}`,
      '--audit-log-format=json',
      '--audit-log-mode=blocking', // written as each request completes, not batched
      '--v=1',
    ]);
    const caPath = join(certDir, 'apiserver.crt');
    await waitFor('kube-apiserver /readyz', [etcd, apiserver], 120_000, async () => {
      if (!existsSync(caPath)) return false;
      const r = await probe(`${server}/readyz`, { ca: readFileSync(caPath, 'utf8'), token });
      return r.status === 200;
    });
    const ca = readFileSync(caPath, 'utf8');

    const kubeconfigYaml = stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'test', cluster: { server, 'certificate-authority-data': Buffer.from(ca).toString('base64') } }],
      users: [{ name: 'admin', user: { token } }],
      contexts: [{ name: 'admin@test', context: { cluster: 'test', user: 'admin', namespace: 'default' } }],
      'current-context': 'admin@test',
    });
    const kubeconfigPath = join(dataDir, 'admin.kubeconfig');
    writeFileSync(kubeconfigPath, kubeconfigYaml, { mode: 0o600 });

    // ---- controllers, scheduler, kwok ---------------------------------------------------------------
    const grace = opts.nodeMonitorGracePeriodSeconds ?? 8;
    const kcm = start('kube-controller-manager', [
      `--kubeconfig=${kubeconfigPath}`,
      '--leader-elect=false',
      '--secure-port=0',
      '--controllers=*', // all default controllers: nodelifecycle, disruption, replicaset, deployment, garbagecollector, serviceaccount(-token), namespace, ...
      '--use-service-account-credentials=true',
      `--service-account-private-key-file=${saKey}`,
      `--root-ca-file=${caPath}`,
      `--node-monitor-grace-period=${grace}s`,
      '--node-monitor-period=1s',
      '--v=2',
    ]);
    const scheduler = start('kube-scheduler', [`--kubeconfig=${kubeconfigPath}`, '--leader-elect=false', '--secure-port=0', '--v=1']);
    const kwokConfig: string[] = [];
    if (opts.podReadyDelayMs) {
      const path = join(dataDir, 'kwok-pod-stages.yaml');
      writeFileSync(path, KWOK_POD_STAGES.replace('__DELAY__', String(Math.round(opts.podReadyDelayMs))));
      kwokConfig.push(`--config=${path}`);
    }
    const kwok = start('kwok', [
      ...kwokConfig,
      `--kubeconfig=${kubeconfigPath}`,
      '--manage-all-nodes=false',
      `--manage-nodes-with-label-selector=${KWOK_MANAGE_LABEL}=${KWOK_MANAGE_VALUE}`,
      `--node-lease-duration-seconds=${KWOK_NODE_LEASE_SECONDS}`,
      '--cidr=10.244.0.1/16',
      '--node-ip=127.0.0.1',
    ]);

    const adminHeaders = { ca, token };
    await waitFor('the default ServiceAccount (created by kube-controller-manager)', [etcd, apiserver, kcm, scheduler, kwok], 120_000, async () => {
      const r = await probe(`${server}/api/v1/namespaces/default/serviceaccounts/default`, adminHeaders);
      return r.status === 200;
    });
    const startupMs = Date.now() - t0;
    writeFileSync(join(dataDir, 'startup.json'), JSON.stringify({ startupMs, server, binDir }) + '\n');
    return { server, kubeconfigPath, kubeconfigYaml, binDir, dataDir, startupMs, auditLogPath, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
