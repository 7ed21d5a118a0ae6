/**
 * The shipped manifests on a real API server, and the operator run exactly as its Deployment runs
 * it: RBAC from manifests/ applied with the real kubectl, credentials only from a ServiceAccount
 * token issued by the API server (TokenRequest) mounted at the in-cluster path, no kubeconfig.
 * A real Prometheus scrapes it with the shipped rules. No VMs here: the 7-VM move in cluster mode
 * is in test/e2e/migration.test.ts.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { promisify } from 'node:util';
import { CoordinationV1Api, CoreV1Api, CustomObjectsApi, KubeConfig, PatchStrategy, setHeaderOptions } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { argoHealth } from '../world/argoHealth.js';
import { startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { inClusterIdentity, type InClusterIdentity } from '../world/inCluster.js';
import { monitoringCrdFiles } from '../world/monitoringCrds.js';
import { startPrometheus, type TestPrometheus } from '../world/prometheus.js';
import { freePort, REPO_ROOT, operatorEnv } from '../world/sandbox.js';
import { cliArgs } from '../world/cli.js';
import { liveness } from '../world/budget.js';
import { kubectlRun } from '../world/kubectl.js';
import { until as untilTruthy } from '../world/until.js';

const execFileP = promisify(execFile);
const NS = 'vm-migration-system';
const SA = 'vm-migration-operator';
const DIR = join(REPO_ROOT, '.sandbox', 'in-cluster');

let cp: ControlPlane;
let id: InClusterIdentity;
let sa: KubeConfig;
let operator: ChildProcess | undefined;
let metricsUrl = '';
let prom: TestPrometheus | undefined;

async function kubectl(args: string[], opts: { stdin?: string } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return kubectlRun(cp.kubeconfigPath, args, opts.stdin);
}

/**
 * HTTP status of a request made with the ServiceAccount's token (200-299 → 200). A 429 is API
 * Priority and Fairness shedding load (this machine is shared), not an authorization answer: it
 * is retried, as client-go does.
 */
async function statusOf(call: () => Promise<unknown>): Promise<number> {
  for (let attempt = 0; ; attempt++) {
    try {
      await call();
      return 200;
    } catch (err) {
      const code = (err as { code?: number }).code ?? -1;
      if (code !== 429 || attempt >= 10) return code;
      await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
    }
  }
}

/** Polls `fn` (an error counts as "not yet") within a liveness budget (test/world/until.ts). */
async function until<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>): Promise<T> {
  return untilTruthy(what, timeoutMs, () => fn().catch(() => undefined), 250);
}

beforeAll(async () => {
  rmSync(DIR, { recursive: true, force: true });
  mkdirSync(DIR, { recursive: true });
  cp = await startControlPlane({ dataDir: join(DIR, 'control-plane') });
  // Until the API server has created its suggested FlowSchemas, ServiceAccount requests fall into
  // the tiny "catch-all" priority level and are shed with 429 under load.
  await until('FlowSchema service-accounts', 60_000, async () => ((await kubectl(['get', 'flowschema', 'service-accounts'])).code === 0 || undefined));
}, 900_000);

afterAll(async () => {
  await prom?.stop();
  if (operator && operator.exitCode === null && operator.signalCode === null) {
    operator.kill('SIGTERM');
    await new Promise((r) => { operator!.once('exit', r); setTimeout(r, 15_000); });
    if (operator.exitCode === null && operator.signalCode === null) operator.kill('SIGKILL');
  }
  await cp?.stop();
});

describe('manifests/ on a real API server (kubectl apply -k)', () => {
  it('installs CRD, namespace, RBAC, Deployment, PDB and Service without a PodSecurity warning, and the pods pass restricted admission', async () => {
    const r = await kubectl(['apply', '-k', 'manifests/']);
    expect(r.code, r.stderr).toBe(0);
    for (const what of ['customresourcedefinition.apiextensions.k8s.io/vmmigrations.vmops.dev', 'namespace/vm-migration-system', 'serviceaccount/vm-migration-operator',
      'role.rbac.authorization.k8s.io/vm-migration-operator', 'rolebinding.rbac.authorization.k8s.io/vm-migration-operator', 'deployment.apps/vm-migration-operator',
      'poddisruptionbudget.policy/vm-migration-operator', 'service/vm-migration-operator-metrics']) {
      expect(r.stdout).toContain(`${what} created`);
    }
    // The namespace enforces and warns "restricted": any violation in the pod template would be printed here.
    expect(r.stderr).not.toMatch(/PodSecurity/);
    // The ReplicaSet's pods are admitted (restricted enforcement happens at pod creation); they stay
    // Pending since this cluster has no node to run them on.
    const pods = await until('2 operator pods created', 60_000, async () => {
      const out = await kubectl(['get', 'pods', '-n', NS, '-l', 'app.kubernetes.io/name=vm-migration-operator', '-o', 'json']);
      const items = (JSON.parse(out.stdout) as { items: Array<{ spec: { securityContext: Record<string, unknown> } }> }).items;
      return items.length === 2 ? items : undefined;
    });
    expect(pods[0]!.spec.securityContext).toMatchObject({ runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } });
    const events = await kubectl(['get', 'events', '-n', NS, '-o', 'json']);
    expect(events.stdout).not.toContain('FailedCreate');
    await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s']);
  }, liveness(2 * 60_000 + 30_000));

  it('with the monitoring and sqlite components: ServiceMonitor and PrometheusRule validate against the Prometheus Operator\'s own CRDs', async () => {
    const crds = await monitoringCrdFiles();
    const c = await kubectl(['apply', '--server-side', ...crds.flatMap((f) => ['-f', f])]);
    expect(c.code, c.stderr).toBe(0);
    await kubectl(['wait', '--for=condition=Established', 'crd/servicemonitors.monitoring.coreos.com', 'crd/prometheusrules.monitoring.coreos.com', '--timeout=60s']);
    const site = join(DIR, 'site');
    mkdirSync(site, { recursive: true });
    // a site's own kustomization: the base plus the optional components (kustomize wants relative paths)
    const up = relative(site, REPO_ROOT);
    writeFileSync(join(site, 'kustomization.yaml'), stringify({
      resources: [join(up, 'manifests')],
      components: [join(up, 'manifests/monitoring'), join(up, 'manifests/components/sqlite')],
    }));
    const dry = await kubectl(['apply', '-k', site, '--dry-run=server']);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout).toContain('servicemonitor.monitoring.coreos.com/vm-migration-operator created (server dry run)');
    expect(dry.stdout).toContain('prometheusrule.monitoring.coreos.com/vm-migration-operator created (server dry run)');
    expect(dry.stdout).toContain('configmap/vm-migration-operator-dashboard created (server dry run)');
    expect(dry.stdout).toContain('persistentvolumeclaim/vm-migration-state created (server dry run)');
    // The schemas are real: a mistake in the PrometheusRule is refused by the API server.
    const bad = parse(readFileSync(join(REPO_ROOT, 'manifests/monitoring/prometheusrule.yaml'), 'utf8')) as { spec: { groups: Array<{ rules: Array<Record<string, unknown>> }> } };
    bad.spec.groups[1]!.rules[0]!.for = 'five minutes';
    const refused = await kubectl(['apply', '--dry-run=server', '-f', '-'], { stdin: JSON.stringify(bad) });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/spec.groups\[1\].rules\[0\].for/);
  });
});

describe('the ServiceAccount of manifests/rbac.yaml, with a token from TokenRequest', () => {
  beforeAll(async () => {
    id = await inClusterIdentity({ kubeconfigPath: cp.kubeconfigPath, dir: DIR, namespace: NS, serviceAccount: SA });
    sa = id.kubeConfig();
    // what the operator needs to find: a guest kubeconfig Secret, and one Secret it has no business reading
    const admin = new KubeConfig();
    admin.loadFromString(cp.kubeconfigYaml);
    const core = admin.makeApiClient(CoreV1Api);
    await core.createNamespacedSecret({ namespace: NS, body: { metadata: { name: 'env-1-kubeconfig' }, stringData: { kubeconfig: cp.kubeconfigYaml } } });
    await core.createNamespacedSecret({ namespace: 'default', body: { metadata: { name: 'elsewhere' }, stringData: { password: 'x' } } });
  });

  it('is who the API server says: system:serviceaccount:vm-migration-system:vm-migration-operator', async () => {
    const who = await execFileP('kubectl', ['--kubeconfig', '/dev/null', '--server', `https://${id.serviceEnv.KUBERNETES_SERVICE_HOST}:${id.serviceEnv.KUBERNETES_SERVICE_PORT}`,
      '--certificate-authority', join(id.root, '/var/run/secrets/kubernetes.io/serviceaccount/ca.crt'), '--token', id.token, 'auth', 'whoami', '-o', 'jsonpath={.status.userInfo.username}']);
    expect(who.stdout).toBe(`system:serviceaccount:${NS}:${SA}`);
  });

  it('can do what the operator does: watch VMMigrations, write their status, hold its Lease, emit Events, read a Secret by name', async () => {
    const crd = sa.makeApiClient(CustomObjectsApi);
    const core = sa.makeApiClient(CoreV1Api);
    const coord = sa.makeApiClient(CoordinationV1Api);
    expect(await statusOf(() => crd.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: NS, plural: PLURAL }))).toBe(200);
    expect(await statusOf(() => core.readNamespacedSecret({ namespace: NS, name: 'env-1-kubeconfig' }))).toBe(200);
    expect(await statusOf(() => core.createNamespacedEvent({ namespace: NS, body: { metadata: { generateName: 'probe.' }, involvedObject: { kind: 'VMMigration', namespace: NS, name: 'x' }, reason: 'Probe', message: 'rbac check', type: 'Normal' } }))).toBe(200);
    expect(await statusOf(() => coord.createNamespacedLease({ namespace: NS, body: { metadata: { name: 'rbac-probe' }, spec: { holderIdentity: 'test' } } }))).toBe(200);
    // its own Lease by name (404 while no replica has created it yet is an answer, not a refusal)
    expect([200, 404]).toContain(await statusOf(() => coord.readNamespacedLease({ namespace: NS, name: 'vm-migration-operator' })));
  });

  it('cannot do anything else: list Secrets, touch other namespaces, delete or create VMMigrations, run pods (403 from the API server)', async () => {
    const crd = sa.makeApiClient(CustomObjectsApi);
    const core = sa.makeApiClient(CoreV1Api);
    const coord = sa.makeApiClient(CoordinationV1Api);
    const vmm = { group: GROUP, version: VERSION, plural: PLURAL };
    const denied: Record<string, () => Promise<unknown>> = {
      'list Secrets cluster-wide': () => core.listSecretForAllNamespaces(),
      'list Secrets in its own namespace': () => core.listNamespacedSecret({ namespace: NS }),
      'watch Secrets in its own namespace': () => core.listNamespacedSecret({ namespace: NS, watch: true, timeoutSeconds: 1 }),
      'read a Secret in another namespace': () => core.readNamespacedSecret({ namespace: 'default', name: 'elsewhere' }),
      'create a Secret': () => core.createNamespacedSecret({ namespace: NS, body: { metadata: { name: 'planted' } } }),
      'delete a Secret': () => core.deleteNamespacedSecret({ namespace: NS, name: 'env-1-kubeconfig' }),
      'list VMMigrations cluster-wide': () => crd.listClusterCustomObject(vmm),
      'list VMMigrations in another namespace': () => crd.listNamespacedCustomObject({ ...vmm, namespace: 'default' }),
      'create a VMMigration': () => crd.createNamespacedCustomObject({ ...vmm, namespace: NS, body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'planted' }, spec: { environments: ['e'], targetHost: 'h' } } }),
      'delete a VMMigration': () => crd.deleteNamespacedCustomObject({ ...vmm, namespace: NS, name: 'anything' }),
      'delete all VMMigrations': () => crd.deleteCollectionNamespacedCustomObject({ ...vmm, namespace: NS }),
      'create a Pod': () => core.createNamespacedPod({ namespace: NS, body: { metadata: { name: 'x' }, spec: { containers: [{ name: 'x', image: 'x' }] } } }),
      'exec into a Pod (pods/exec)': () => core.connectPostNamespacedPodExec({ namespace: NS, name: 'x', command: 'id' }),
      'read ConfigMaps': () => core.listNamespacedConfigMap({ namespace: NS }),
      'list Nodes': () => core.listNode(),
      'list Namespaces': () => core.listNamespace(),
      'delete its Lease': () => coord.deleteNamespacedLease({ namespace: NS, name: 'rbac-probe' }),
      'read another Lease in its namespace': () => coord.readNamespacedLease({ namespace: NS, name: 'rbac-probe' }),
      'update another Lease in its namespace': () => coord.replaceNamespacedLease({ namespace: NS, name: 'rbac-probe', body: { metadata: { name: 'rbac-probe' }, spec: { holderIdentity: 'stolen' } } }),
      'take a Lease in kube-system': () => coord.createNamespacedLease({ namespace: 'kube-system', body: { metadata: { name: 'x' }, spec: {} } }),
      'create Events in another namespace': () => core.createNamespacedEvent({ namespace: 'default', body: { metadata: { generateName: 'x.' }, involvedObject: {}, reason: 'x', message: 'x' } }),
      'widen its own Role': () => crd.patchNamespacedCustomObject(
        { group: 'rbac.authorization.k8s.io', version: 'v1', namespace: NS, plural: 'roles', name: 'vm-migration-operator', body: { rules: [{ apiGroups: ['*'], resources: ['*'], verbs: ['*'] }] } },
        setHeaderOptions('Content-Type', PatchStrategy.MergePatch)),
    };
    const results: Record<string, number> = {};
    for (const [what, call] of Object.entries(denied)) results[what] = await statusOf(call);
    console.log(`[in-cluster] denied with the operator's token: ${Object.entries(results).map(([k, v]) => `${k}=${v}`).join('; ')}`);
    for (const [what, code] of Object.entries(results)) expect(code, what).toBe(403);
  });
});

describe('narrowing the Secret rule with resourceNames (a site-specific step, see README)', () => {
  it('the token then reads the listed guest kubeconfig Secret only, not the SSH key Secret next to it', async () => {
    const admin = new KubeConfig();
    admin.loadFromString(cp.kubeconfigYaml);
    await admin.makeApiClient(CoreV1Api).createNamespacedSecret({ namespace: NS, body: { metadata: { name: 'vm-migration-ssh' }, stringData: { id_ed25519: 'not a key' } } });
    const core = sa.makeApiClient(CoreV1Api);
    expect(await statusOf(() => core.readNamespacedSecret({ namespace: NS, name: 'vm-migration-ssh' })), 'the shipped Role: get on every Secret of the namespace').toBe(200);
    const role = JSON.parse((await kubectl(['get', 'role', '-n', NS, 'vm-migration-operator', '-o', 'json'])).stdout) as { rules: Array<{ resources?: string[] }> };
    const i = role.rules.findIndex((r) => r.resources?.includes('secrets'));
    const patch = await kubectl(['patch', 'role', '-n', NS, 'vm-migration-operator', '--type=json', '-p', JSON.stringify([{ op: 'add', path: `/rules/${i}/resourceNames`, value: ['env-1-kubeconfig'] }])]);
    expect(patch.code, patch.stderr).toBe(0);
    await until('narrowed rule in effect', 30_000, async () => ((await statusOf(() => core.readNamespacedSecret({ namespace: NS, name: 'vm-migration-ssh' }))) === 403 || undefined));
    expect(await statusOf(() => core.readNamespacedSecret({ namespace: NS, name: 'env-1-kubeconfig' }))).toBe(200);
  });
});

describe('the operator in cluster mode, scraped by a real Prometheus with the shipped rules', () => {
  beforeAll(async () => {
    // A one-VM inventory; nothing here reaches a hypervisor (invalid references and dry runs stop before SSH).
    writeFileSync(join(DIR, 'inventory.yaml'), stringify({
      hosts: ['h1', 'h2'].map((name, i) => ({ name, address: `127.0.0.${20 + i}`, port: 22, user: 'vmhost', vmDir: `/srv/vms/${name}`, hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIfzlB6tBOjjqU4c2JQtbHyh2hU0mWgz6zaV7mcm9nXn' })),
      environments: [{ name: 'env-1', kubeconfigSecret: { namespace: NS, name: 'env-1-kubeconfig', key: 'kubeconfig' },
        vms: [{ name: 'node-1', role: 'worker', nodeName: 'env-1-node-1', host: 'h1', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] }] }],
    }));
    await execFileP('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(DIR, 'id_ed25519')]);
    const port = await freePort();
    metricsUrl = `http://127.0.0.1:${port}`;
    const argv = id.wrap([process.execPath, ...cliArgs('run'),
      '--inventory', join(DIR, 'inventory.yaml'), '--db', join(DIR, 'operator.db'), '--ssh-key', join(DIR, 'id_ed25519'),
      '--namespace', NS, '--metrics-port', String(port), '--metrics-host', '127.0.0.1', '--leader-elect', '--lease-namespace', NS]);
    const log = openSync(join(DIR, 'operator.log'), 'a');
    operator = spawn(argv[0]!, argv.slice(1), { cwd: REPO_ROOT, stdio: ['ignore', log, log], env: id.env(operatorEnv({ LOG_LEVEL: 'info' })) });
    await untilTruthy('operator /readyz', 60_000, async () => {
      // an operator that exited fails at once, with its log (not after the whole budget)
      if (operator!.exitCode !== null) throw new Error(`operator exited ${operator!.exitCode}: ${readFileSync(join(DIR, 'operator.log'), 'utf8').slice(-2000)}`);
      return fetch(`${metricsUrl}/readyz`).then((r) => r.ok, () => false);
    }, 250);
    prom = await startPrometheus({ dir: join(DIR, 'prometheus'), targets: [`127.0.0.1:${port}`] });
  }, liveness(60_000 + 60_000 + 30_000));

  it('runs on the mounted token alone: informer synced, Lease taken, and its /metrics pass promtool check metrics', async () => {
    const text = await (await fetch(`${metricsUrl}/metrics`)).text();
    expect(text).toMatch(/^vmops_informer_synced 1$/m);
    await until('leader', 30_000, async () => (/^vmops_leader_is_leader 1$/m.test(await (await fetch(`${metricsUrl}/metrics`)).text()) || undefined));
    const lease = await kubectl(['get', 'lease', '-n', NS, 'vm-migration-operator', '-o', 'jsonpath={.spec.holderIdentity}']);
    expect(lease.stdout).not.toBe('');
    const check = await new Promise<{ code: number; out: string }>((resolve) => {
      const p = spawn('promtool', ['check', 'metrics']);
      let out = '';
      p.stdout.on('data', (d) => (out += d));
      p.stderr.on('data', (d) => (out += d));
      p.on('close', (code) => resolve({ code: code ?? 1, out }));
      p.stdin.end(text);
    });
    expect(check.out).toBe('');
    expect(check.code).toBe(0);
  });

  it('a failed migration fires VMOpsMigrationFailed in Prometheus; status, Event and Argo CD health say why', async () => {
    // Prometheus must have seen the counter at 0 before the failure, as it would in production.
    await prom!.waitFor('vmops_migrations_failed_total scraped', async () => ((await prom!.query('vmops_migrations_failed_total{strategy="cold"}')).length === 1 || undefined));
    const r = await kubectl(['apply', '-f', '-'], { stdin: JSON.stringify({ apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'to-nowhere', namespace: NS }, spec: { environments: ['env-9'], targetHost: 'h2' } }) });
    expect(r.code, r.stderr).toBe(0);
    const crd = sa.makeApiClient(CustomObjectsApi);
    const failed = await until('Failed', 60_000, async () => {
      const o = (await crd.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: NS, plural: PLURAL, name: 'to-nowhere' })) as VMMigration;
      return o.status?.phase === 'Failed' ? o : undefined;
    });
    const cond = (t: string) => failed.status?.conditions?.find((c) => (c.type as string) === t);
    expect(cond('Ready')).toMatchObject({ status: 'False', reason: 'InvalidReference' });
    expect(cond('Stalled')).toMatchObject({ status: 'True', reason: 'InvalidReference' });
    expect(cond('Reconciling')).toMatchObject({ status: 'False' });
    expect(await argoHealth(failed)).toEqual({ status: 'Degraded', message: expect.stringContaining('env-9') });
    writeFileSync(join(DIR, 'status-failed.json'), JSON.stringify(failed, null, 2));
    const ev = await kubectl(['get', 'events', '-n', NS, '--field-selector', 'involvedObject.name=to-nowhere', '-o', 'jsonpath={.items[*].reason}']);
    expect(ev.stdout).toContain('InvalidReference');

    const t0 = Date.now();
    const alert = await prom!.waitFor('VMOpsMigrationFailed firing', async () =>
      (await prom!.alerts()).find((a) => a.labels.alertname === 'VMOpsMigrationFailed' && a.state === 'firing'), 60_000);
    console.log(`[in-cluster] VMOpsMigrationFailed firing ${Date.now() - t0} ms after the Failed status: ${JSON.stringify(alert.labels)}`);
    expect(alert.labels).toMatchObject({ severity: 'warning', strategy: 'cold', job: 'vm-migration-operator' });
    expect(alert.annotations.runbook).toContain('kubectl describe vmm');
    const [failedTotal] = await prom!.query('sum(vmops_migrations_failed_total)');
    expect(failedTotal?.value[1]).toBe('1');
  }, liveness(3 * 60_000 + 30_000));

  it('a dry run succeeds (Ready, Argo CD Healthy) and re-applying the finished migration unchanged does nothing', async () => {
    const doc = JSON.stringify({ apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'dry', namespace: NS }, spec: { environments: ['env-1'], targetHost: 'h2', dryRun: true } });
    expect((await kubectl(['apply', '-f', '-'], { stdin: doc })).code).toBe(0);
    const w = await kubectl(['wait', '-n', NS, '--for=condition=Ready', 'vmm/dry', '--timeout=60s']);
    expect(w.code, w.stderr).toBe(0);
    const get = async () => JSON.parse((await kubectl(['get', 'vmm', '-n', NS, 'dry', '-o', 'json'])).stdout) as VMMigration;
    const done = await get();
    expect(done.status?.phase).toBe('Succeeded');
    expect(await argoHealth(done)).toEqual({ status: 'Healthy', message: expect.stringContaining('dry run') });
    writeFileSync(join(DIR, 'status-dryrun.json'), JSON.stringify(done, null, 2));
    // the status command renders it from the resource alone; exit codes tell scripts the outcome
    const cli = (args: string[]) => execFileP(process.execPath, cliArgs('status', ...args, '--kubeconfig', cp.kubeconfigPath, '--namespace', NS), { cwd: REPO_ROOT })
      .then((r) => ({ code: 0, ...r }), (e: { code: number; stdout: string; stderr: string }) => e);
    const shown = await cli(['dry', '--watch']);
    expect(shown.code, shown.stderr).toBe(0);
    expect(shown.stdout).toMatch(/^VMMigration vm-migration-system\/dry {3}Succeeded {3}0\/1 VMs {3}target h2/);
    expect(shown.stdout).toContain('ENVIRONMENT env-1');
    expect(shown.stdout).toMatch(/node-1\s+Pending/);
    const failedCli = await cli(['to-nowhere']);
    expect(failedCli.code).toBe(1);
    expect(failedCli.stdout).toContain('Stalled      True   InvalidReference');
    const missing = await cli(['nope']);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain('VMMigration vm-migration-system/nope not found');

    const again = await kubectl(['apply', '-f', '-'], { stdin: doc });
    expect(again.stdout).toContain('vmmigration.vmops.dev/dry unchanged');
    const started = await prom!.waitFor('started_total scraped', async () => {
      const r = await prom!.query('sum(vmops_migrations_started_total)');
      return r.length > 0 ? r : undefined;
    });
    // The operator has had its chance to react to the re-apply — an event, not a sleep: a later VMMigration
    // (another dry run), applied after it, is handled through to Ready; and Prometheus has scraped the operator
    // after that (a sample timestamp later than the later one's Ready transition, as the operator wrote it).
    const afterDoc = JSON.stringify({ apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name: 'dry-after', namespace: NS }, spec: { environments: ['env-1'], targetHost: 'h2', dryRun: true } });
    expect((await kubectl(['apply', '-f', '-'], { stdin: afterDoc })).code).toBe(0);
    const wa = await kubectl(['wait', '-n', NS, '--for=condition=Ready', 'vmm/dry-after', `--timeout=${Math.round(liveness(60_000) / 1000)}s`]);
    expect(wa.code, wa.stderr).toBe(0);
    const afterObj = JSON.parse((await kubectl(['get', 'vmm', '-n', NS, 'dry-after', '-o', 'json'])).stdout) as VMMigration;
    const afterReadyAt = Date.parse(String(afterObj.status?.conditions?.find((c) => (c.type as string) === 'Ready')?.lastTransitionTime));
    expect(Number.isFinite(afterReadyAt), 'dry-after has a Ready transition time').toBe(true);
    await prom!.waitFor('a scrape of the operator after dry-after was Ready', async () => {
      const [t] = await prom!.query('min(timestamp(vmops_migrations_started_total))');
      return t && Number(t.value[1]) * 1000 > afterReadyAt ? true : undefined;
    });
    const later = await get();
    expect(later.metadata.resourceVersion).toBe(done.metadata.resourceVersion);
    expect(later.status).toEqual(done.status);
    expect(await prom!.query('sum(vmops_migrations_started_total)')).toMatchObject([{ value: [expect.any(Number), started[0]!.value[1]] }]);
  }, liveness(60_000 + 3 * 60_000 + 60_000 + 60_000 + 60_000));

  it('every query of the Grafana dashboard is valid PromQL that this Prometheus answers', async () => {
    const dash = JSON.parse(readFileSync(join(REPO_ROOT, 'manifests/monitoring/grafana-dashboard.json'), 'utf8')) as { panels: Array<{ title: string; targets?: Array<{ expr: string }> }> };
    const exprs = dash.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ title: p.title, expr: t.expr.replaceAll('$__rate_interval', '1m').replaceAll('$job', '.+') })));
    expect(exprs.length).toBeGreaterThan(15);
    // rate()/increase() need two samples of a series in their window
    await prom!.waitFor('5 scrapes', async () => (Number((await prom!.query('count_over_time(up[1m])'))[0]?.value[1]) >= 5 || undefined));
    let withData = 0;
    for (const { title, expr } of exprs) {
      const res = await prom!.query(expr).catch((err: Error) => err);
      expect(res, `${title}: ${expr}`).not.toBeInstanceOf(Error);
      if ((res as unknown[]).length > 0) withData++;
    }
    expect(withData, 'most panels show data from the live operator').toBeGreaterThan(exprs.length / 2);
  });
});
