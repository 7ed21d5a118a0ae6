/**
 * End to end on real parts: kube control plane + KWOK, sshd hosts, QEMU VMs,
 * the operator as a separate process, and the real kubectl.
 */
import { AppsV1Api, CustomObjectsApi, Watch, type V1Deployment, type V1Node } from '@kubernetes/client-node';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { expectSandboxUntouched, kubectlStdin } from '../world/vmm.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { argoHealth } from '../world/argoHealth.js';
import { sha256File } from '../world/images.js';
import { kubeconfigCredentials, leakedFragments, secretFragments } from '../world/secrets.js';
import { startPrometheus, type TestPrometheus } from '../world/prometheus.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';
import { cliArgs } from '../world/cli.js';

let sb: Sandbox;
/** everything the CLI printed during this file (searched for credentials at the end) */
let cliSeen = '';
let operator: OperatorProcess;
let prom: TestPrometheus;

beforeAll(async () => {
  sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'e2e'), firstAddress: LOOPBACK.migration.first, log: (l) => console.log(`[sandbox] ${l}`) });
  // As the Deployment runs it: RBAC from manifests/rbac.yaml, a TokenRequest token at the in-cluster path, no kubeconfig.
  operator = await sb.startOperator({ inCluster: true });
  prom = await startPrometheus({ dir: join(sb.dir, 'prometheus'), targets: [new URL(operator.metricsUrl).host] });
  // increase() only sees a failure whose counter Prometheus had scraped at 0 before
  await prom.waitFor('first scrape', async () => ((await prom.query('vmops_migrations_failed_total')).length > 0 || undefined));
}, 900_000);

afterAll(async () => {
  await prom?.stop();
  await operator?.stop();
  await sb?.stop();
});

async function getVmm(name: string): Promise<VMMigration> {
  const api = sb.kc.makeApiClient(CustomObjectsApi);
  return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
}

async function waitForPhase(name: string, phases: string[], timeoutMs: number): Promise<VMMigration> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const o = await getVmm(name).catch(() => undefined);
    if (o?.status?.phase && phases.includes(o.status.phase)) return o;
    if (Date.now() > deadline) throw new Error(`${name} did not reach ${phases.join('/')} (status: ${JSON.stringify(o?.status)})`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

function manifest(name: string, spec: Record<string, unknown>): string {
  return JSON.stringify({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec });
}

const applyStdin = (doc: string) => kubectlStdin(sb, ['apply', '-f', '-'], doc);

describe('VMMigration validation by the API server (real kubectl)', () => {
  it('rejects a target equal to the source with a readable CEL message', async () => {
    const r = await applyStdin(manifest('bad-same-host', { environments: ['student-42'], sourceHost: 'host01', targetHost: 'host01' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('spec.targetHost must differ from spec.sourceHost');
  });
  it('rejects an unknown strategy and a bad name (targetHost may be left out: the operator chooses)', async () => {
    const r = await applyStdin(manifest('bad-fields', { environments: ['Student_42!'], strategy: 'Teleport' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/spec.strategy: Unsupported value: "Teleport"/);
    expect(r.stderr).toMatch(/spec.environments\[0\]: Invalid value: "Student_42!"/);
  });
  it('rejects a spec naming neither environments nor a source host', async () => {
    const r = await applyStdin(manifest('bad-empty', { targetHost: 'host02' }));
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('spec must name the environments to move');
  });
});

describe('references only the operator can check', () => {
  it('an unknown target host ends Failed with a condition naming it, touching nothing', async () => {
    const r = await applyStdin(manifest('unknown-host', { environments: ['student-42'], targetHost: 'host09' }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('unknown-host', ['Failed', 'Succeeded'], 60_000);
    expect(o.status?.phase).toBe('Failed');
    const ready = o.status?.conditions?.find((c) => c.type === 'Ready');
    expect(ready?.status).toBe('False');
    expect(ready?.message).toContain('target host "host09" is not in the inventory');
    expect(o.status?.conditions?.find((c) => c.type === 'Degraded')?.reason).toBe('InvalidReference');
    await expectUntouched();
  });
  it('an unknown environment ends Failed with a condition naming it, touching nothing', async () => {
    const r = await applyStdin(manifest('unknown-env', { environments: ['student-99'], targetHost: 'host02' }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('unknown-env', ['Failed', 'Succeeded'], 60_000);
    expect(o.status?.phase).toBe('Failed');
    expect(o.status?.conditions?.find((c) => c.type === 'Ready')?.message).toContain('unknown environment "student-99"');
    await expectUntouched();
  });
  it('the failures fire VMOpsMigrationFailed in a real Prometheus scraping the operator', async () => {
    // the alert fires on the first failure; the second reaches Prometheus with its next scrape (once,
    // the operator being faster, the count was read in between)
    await prom.waitFor('both failures scraped', async () => ((await prom.query('sum(vmops_migrations_failed_total)'))[0]?.value[1] === '2' ? true : undefined));
    const alert = await prom.waitFor('VMOpsMigrationFailed firing', async () =>
      (await prom.alerts()).find((a) => a.labels.alertname === 'VMOpsMigrationFailed' && a.state === 'firing'));
    expect(alert.labels).toMatchObject({ severity: 'warning', strategy: 'cold' });
    expect((await prom.query('sum(vmops_migrations_failed_total)'))[0]?.value[1]).toBe('2');
  });
});

const expectUntouched = () => expectSandboxUntouched(sb);

describe('rolling migration of a 7-VM environment', () => {
  it('moves every VM to host02 with one node down at a time, the PDB honoured and data intact', async () => {
    const envNodes = new Set(sb.environment.vms.map((v) => v.nodeName));
    const nodeDown = new Map<string, boolean>();
    let maxDownTogether = 0;
    const downSamples: string[] = [];
    let minAvailable = Number.POSITIVE_INFINITY;
    const watch = new Watch(sb.kc);
    const onNode = (_type: string, n: V1Node) => {
      const name = n.metadata?.name ?? '';
      if (!envNodes.has(name)) return;
      const ready = n.status?.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
      nodeDown.set(name, !ready || n.spec?.unschedulable === true);
      const down = [...nodeDown].filter(([, d]) => d).map(([k]) => k);
      if (down.length > maxDownTogether) {
        maxDownTogether = down.length;
        downSamples.push(down.join(','));
      }
    };
    const onDeployment = (_type: string, d: V1Deployment) => {
      if (d.metadata?.name !== sb.workload.name) return;
      minAvailable = Math.min(minAvailable, d.status?.availableReplicas ?? 0);
    };
    const nodeWatch = await watch.watch('/api/v1/nodes', {}, onNode, () => undefined);
    // one real mid-move status (a VM in flight) for the Argo CD health check
    let midMove: VMMigration | undefined;
    const vmmWatch = await watch.watch(`/apis/${GROUP}/${VERSION}/namespaces/${SECRET_NAMESPACE}/${PLURAL}`, {}, (_t: string, m: VMMigration) => {
      if (!midMove && m.metadata.name === 'move-student-42' && m.status?.phase === 'Running' && m.status.currentVM && m.status.vms?.some((v) => v.phase === 'Running')) midMove = structuredClone(m);
    }, () => undefined);
    const depWatch = await watch.watch(`/apis/apps/v1/namespaces/${sb.workload.namespace}/deployments`, {}, onDeployment, () => undefined);
    const apps = sb.kc.makeApiClient(AppsV1Api);
    onDeployment('INITIAL', await apps.readNamespacedDeployment({ name: sb.workload.name, namespace: sb.workload.namespace }));

    const started = Date.now();
    await sb.kubectl(['apply', '-f', 'manifests/examples/migration.yaml']);
    // what a person watching with `vm-migration-operator status NAME --watch` sees
    const { spawn } = await import('node:child_process');
    const cli = spawn(process.execPath, cliArgs('status', 'move-student-42', '--watch', '--kubeconfig', sb.controlPlane.kubeconfigPath), { cwd: REPO_ROOT });
    let cliOut = '';
    cli.stdout.on('data', (d) => { cliOut += d; cliSeen += d; });
    const cliExit = new Promise<number>((r) => cli.once('exit', (code) => r(code ?? -1)));
    // Fail fast on a Failed migration; then prove `kubectl wait` sees the Ready condition.
    await waitForPhase('move-student-42', ['Succeeded', 'Failed'], 900_000);
    const wait = await sb.kubectl(['wait', '-n', SECRET_NAMESPACE, '--for=condition=Ready', 'vmm/move-student-42', '--timeout=30s'], { allowFail: true });
    const wallSeconds = (Date.now() - started) / 1000;
    nodeWatch.abort();
    depWatch.abort();
    vmmWatch.abort();
    const o = await getVmm('move-student-42');
    expect(wait.code, `kubectl wait failed: ${wait.stderr}\nstatus: ${JSON.stringify(o.status, null, 2)}`).toBe(0);
    // the watch ends by itself once the migration is done; one that does not is killed and fails here, not at the test's timeout
    let killer: NodeJS.Timeout | undefined;
    const cliCode = await Promise.race([cliExit, new Promise<string>((r) => {
      killer = setTimeout(() => {
        cli.kill('SIGKILL');
        r('still watching 60 s after the migration ended');
      }, 60_000);
    })]);
    clearTimeout(killer);
    expect(cliCode, cliOut.slice(-3000)).toBe(0);
    const screens = cliOut.split(/\n(?=VMMigration )/);
    expect(screens.at(-1)).toMatch(/^VMMigration vm-migration-system\/move-student-42 {3}Succeeded {3}7\/7 VMs/);
    // copies here take under a second, so a screen with a copy's rate is not guaranteed; one with a VM in flight is
    expect(cliOut, 'a screen showed a VM in flight').toMatch(/\n {2}\S+\s+Running\s+[a-zA-Z]+\s+\S+\s+\d+%/);
    console.log(`[e2e] status --watch drew ${screens.length} screens; last:\n${screens.at(-1)}`);

    // status
    expect(o.status?.phase).toBe('Succeeded');
    expect(o.status?.progress).toBe('7/7');
    expect(o.status?.vms).toHaveLength(7);
    for (const v of o.status!.vms!) {
      expect(v.phase, `${v.name}: ${v.message}`).toBe('Succeeded');
      // the student's outage runs to node Ready, after the start: the operator's stop→start is only a part of it
      expect(v.outage?.until, v.name).toBe('NodeReady');
      expect(v.outageSeconds).toBeGreaterThanOrEqual(v.outage!.stopToStartSeconds);
      expect(v.outage!.shutdownSeconds! + v.outage!.copySeconds! + v.outage!.bootSeconds!).toBeCloseTo(v.outageSeconds!, 2);
      expect(v.bytesTransferred).toBeGreaterThan(0);
    }
    expect(o.status?.plan?.map((p) => p.vm)).toEqual(['beachhead', 'node-1', 'node-2', 'node-3', 'controller-1', 'controller-2', 'controller-3']);

    // placement and data
    const h01 = await sb.hypervisor('host01');
    const h02 = await sb.hypervisor('host02');
    for (const vm of sb.environment.vms) {
      expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
      expect(['absent', 'stopped']).toContain((await h01.vmStatus(sb.environment.name, vm)).state);
      for (const f of vm.files) {
        const path = `${h02.vmDir(sb.environment.name, vm)}/${f.name}`;
        expect(await sha256File(path), `${vm.name}/${f.name}`).toBe(sb.checksums.get(`${vm.name}/${f.name}`));
      }
    }

    // disruption budget
    expect(maxDownTogether, `nodes down together: ${downSamples.join(' | ')}`).toBe(1);
    expect(minAvailable).toBeGreaterThanOrEqual(sb.workload.minAvailable);

    // nodes end Ready and schedulable
    const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
    for (const n of nodes.items.filter((x) => envNodes.has(x.metadata!.name!))) {
      expect(n.spec?.unschedulable ?? false, n.metadata?.name).toBe(false);
      expect(n.status?.conditions?.find((c) => c.type === 'Ready')?.status, n.metadata?.name).toBe('True');
    }

    // metrics
    const text = await (await fetch(`${operator.metricsUrl}/metrics`)).text();
    expect(text).toMatch(/^vmops_migrations_succeeded_total\{[^}]*\} 1$/m);
    expect(text).toMatch(/^vmops_vm_outage_seconds_count\{until="NodeReady"\} 7$/m);
    expect(text).toMatch(/^vmops_vm_stop_to_start_seconds_count 7$/m);
    expect(text).toMatch(/^vmops_vm_moves_total\{result="success"\} 7$/m);
    expect(text).toMatch(/^vmops_leader_is_leader 1$/m);

    // the same numbers as a real Prometheus scraped them
    await prom.waitFor('Prometheus sees 7 moves', async () => ((await prom.query('sum(vmops_vm_moves_total{result="success"})'))[0]?.value[1] === '7' || undefined));
    expect((await prom.query('sum(vmops_vm_outage_seconds_count)'))[0]?.value[1]).toBe('7');
    expect((await prom.query('sum(vmops_vm_outage_seconds_bucket{le="+Inf"})'))[0]?.value[1]).toBe('7');
    expect(Number((await prom.query('sum(vmops_vm_outage_seconds_sum)'))[0]?.value[1])).toBeCloseTo(o.status!.vms!.reduce((a, v) => a + (v.outageSeconds ?? 0), 0), 1);
    expect(Number((await prom.query('sum(vmops_vm_stop_to_start_seconds_sum)'))[0]?.value[1])).toBeCloseTo(o.status!.vms!.reduce((a, v) => a + (v.outage?.stopToStartSeconds ?? 0), 0), 1);
    expect((await prom.query('sum(vmops_migrations_succeeded_total)'))[0]?.value[1]).toBe('1');
    expect(Number((await prom.query('sum(vmops_transfer_bytes_total)'))[0]?.value[1])).toBeGreaterThanOrEqual(o.status!.vms!.reduce((a, v) => a + (v.bytesTransferred ?? 0), 0));
    const p95 = Number((await prom.query('histogram_quantile(0.95, sum by (le) (vmops_vm_outage_seconds_bucket))'))[0]?.value[1]);
    expect(p95).toBeGreaterThan(0);
    console.log(`[e2e] Prometheus: 7 moves, student outage p95 (bucket estimate) ${p95.toFixed(2)} s`);

    // GitOps: kstatus conditions and the Argo CD health check on the real objects
    expect(o.status?.conditions?.find((c) => c.type === 'Reconciling')?.status).toBe('False');
    expect(o.status?.conditions?.find((c) => c.type === 'Stalled')?.status).toBe('False');
    expect(await argoHealth(o)).toEqual({ status: 'Healthy', message: expect.stringContaining('host02') });
    expect(midMove, 'saw a VM copying').toBeDefined();
    expect(midMove!.status?.conditions?.find((c) => c.type === 'Reconciling')?.status).toBe('True');
    expect(await argoHealth(midMove)).toMatchObject({ status: 'Progressing', message: expect.stringMatching(/^Running: \d\/7 VM\(s\) done, moving student-42\//) });
    writeFileSync(join(sb.dir, 'status-running.json'), JSON.stringify(midMove, null, 2));
    writeFileSync(join(sb.dir, 'status-succeeded.json'), JSON.stringify(o, null, 2));

    // Re-applying the unchanged, finished migration does nothing.
    const again = await sb.kubectl(['apply', '-f', 'manifests/examples/migration.yaml']);
    expect(again.stdout).toContain('vmmigration.vmops.dev/move-student-42 unchanged');
    await new Promise((r) => setTimeout(r, 3000));
    const after = await getVmm('move-student-42');
    expect(after.metadata.resourceVersion).toBe(o.metadata.resourceVersion);
    for (const vm of sb.environment.vms) expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');

    console.log(`[e2e] wall ${wallSeconds.toFixed(1)} s; outage per VM (to node Ready; stop→start): ${o.status!.vms!.map((v) => `${v.name}=${v.outageSeconds?.toFixed(2)}s;${v.outage?.stopToStartSeconds.toFixed(2)}s`).join(' ')}`);
  }, 1_000_000);
});


/** Watches the environment's nodes during a move: which went NotReady or unschedulable, and how many at once. */
async function watchNodes(): Promise<{ stop(): void; everDown: Set<string>; maxDownTogether: () => number }> {
  const envNodes = new Set(sb.environment.vms.map((v) => v.nodeName));
  const down = new Map<string, boolean>();
  const everDown = new Set<string>();
  let max = 0;
  const w = await new Watch(sb.kc).watch('/api/v1/nodes', {}, (_t: string, n: V1Node) => {
    const name = n.metadata?.name ?? '';
    if (!envNodes.has(name)) return;
    const isDown = n.status?.conditions?.find((c) => c.type === 'Ready')?.status !== 'True' || n.spec?.unschedulable === true;
    down.set(name, isDown);
    if (isDown) everDown.add(name);
    max = Math.max(max, [...down.values()].filter(Boolean).length);
  }, () => undefined);
  return { stop: () => w.abort(), everDown, maxDownTogether: () => max };
}

describe('downtime strategies through the operator (real QEMU, real kubectl)', () => {
  it('LiveMigrate moves every VM back to host01 while every node stays Ready and schedulable', async () => {
    const nodes = await watchNodes();
    const r = await applyStdin(manifest('live-back', { environments: ['student-42'], targetHost: 'host01', strategy: 'LiveMigrate', live: { fallback: 'None' } }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('live-back', ['Succeeded', 'Failed'], 600_000);
    nodes.stop();
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect([...nodes.everDown]).toEqual([]);
    const h01 = await sb.hypervisor('host01');
    for (const vm of sb.environment.vms) expect((await h01.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
    // the guest was paused, never stopped: its outage ends when it resumes on the target
    for (const v of o.status!.vms!) {
      expect(v.outage?.until, v.name).toBe('GuestResumed');
      expect(v.outageSeconds).toBeGreaterThan(0);
    }
    // QEMU's own figures of each RAM migration, as the status kept them
    for (const v of o.status!.vms!) {
      expect(v.live?.totalBytes, `${v.name}: live figures in status`).toBeGreaterThan(16 * 1048576);
      expect(v.live?.transferredBytes).toBeGreaterThan(0);
      expect(v.live?.remainingBytes).toBeGreaterThanOrEqual(0);
    }
    // and the gauges are back at 0 with no live migration running
    expect(await (await fetch(`${operator.metricsUrl}/metrics`)).text()).toMatch(/^vmops_live_migration_remaining_bytes 0$/m);
    console.log(`[e2e] live outage per VM (the guest's pause: stop on source → running on target): ${o.status!.vms!.map((v) => `${v.name}=${v.outageSeconds?.toFixed(3)}s`).join(' ')}`);
    await expectIncrementalVerification('live-back');
  }, 700_000);

  /** `history`'s step lines (start time, step, outcome) per VM, as the operator journaled them. */
  async function stepsOf(migration: string): Promise<{ text: string; byVm: Map<string, { at: number; step: string }[]> }> {
    const text = await promisify(execFile)(process.execPath, cliArgs('history', migration, '--db', sb.dbPath), { cwd: REPO_ROOT }).then((x) => x.stdout);
    const byVm = new Map<string, { at: number; step: string }[]>();
    let vm = '';
    for (const l of text.split('\n')) {
      const head = /^ {2}\S+\/(\S+)\s/.exec(l);
      if (head) byVm.set((vm = head[1]!), []);
      const step = /^ {4}(\S+)\s+(\w+)\s/.exec(l);
      if (step && vm) byVm.get(vm)!.push({ at: Date.parse(step[1]!), step: step[2]! });
    }
    return { text, byVm };
  }

  /** Each VM's verify compared only what changed since the pre-pass (journaled, shown by `history`). */
  async function expectIncrementalVerification(migration: string): Promise<void> {
    const history = (await stepsOf(migration)).text;
    const verified = history.split('\n').filter((l) => /\bverify\s+done\b/.test(l));
    console.log(`[e2e] ${migration}: verification\n${verified.join('\n')}`);
    expect(verified).toHaveLength(sb.environment.vms.length);
    for (const l of verified) expect(l).toMatch(/guest data verified: \d+ changed range\(s\), [0-9.]+ MiB compared at the cut-over; the rest compared while the guest ran/);
  }

  it('Rolling with pre-copy, the whole environment mirrored warm before its window: one node down at a time, no cut-over before the window, data verified', async () => {
    const nodes = await watchNodes();
    // every VM mirrors at once (mirrorAhead 6), the cut-overs wait for the window, then go one by one
    // all 7 mirrors began within 0.1 s of the apply in a local run: 12 s leaves room for a slow first reconcile
    const notBefore = Math.ceil((Date.now() + 12_000) / 1000) * 1000;
    const r = await applyStdin(manifest('precopy-again', {
      environments: ['student-42'], targetHost: 'host02', transfer: { precopy: true, mirrorAhead: 6 }, hostLimits: { maxOutboundPerHost: 7, maxInboundPerHost: 7 },
      window: { notBefore: new Date(notBefore).toISOString() }, shutdown: { powerdownTimeout: '1s' },
    }));
    expect(r.code, r.stderr).toBe(0);
    const o = await waitForPhase('precopy-again', ['Succeeded', 'Failed'], 600_000);
    nodes.stop();
    expect(o.status?.phase, JSON.stringify(o.status?.vms)).toBe('Succeeded');
    expect(nodes.maxDownTogether()).toBeLessThanOrEqual(1);
    const h02 = await sb.hypervisor('host02');
    for (const vm of sb.environment.vms) expect((await h02.vmStatus(sb.environment.name, vm)).state, vm.name).toBe('running');
    console.log(`[e2e] pre-copy outage per VM (to node Ready; stop→start): ${o.status!.vms!.map((v) => `${v.name}=${v.outageSeconds?.toFixed(2)}s;${v.outage?.stopToStartSeconds.toFixed(3)}s`).join(' ')}`);
    const { byVm } = await stepsOf('precopy-again');
    const first = (vm: string, step: string) => byVm.get(vm)?.find((x) => x.step === step)?.at ?? Number.NaN;
    console.log(`[e2e] precopy-again, relative to the window's opening: ${sb.environment.vms.map((v) => `${v.name} mirror ${((first(v.name, 'mirror') - notBefore) / 1000).toFixed(1)} s, cordon ${((first(v.name, 'cordon') - notBefore) / 1000).toFixed(1)} s`).join('; ')}`);
    for (const vm of sb.environment.vms) {
      expect(first(vm.name, 'mirror'), `${vm.name}: mirror began before the window opened`).toBeLessThan(notBefore);
      expect(first(vm.name, 'cordon'), `${vm.name}: cordon after the window opened`).toBeGreaterThanOrEqual(notBefore);
    }
    // every VM but the first of the plan mirrored ahead and waited for its turn
    expect(sb.environment.vms.filter((vm) => !byVm.get(vm.name)!.some((x) => x.step === 'turn'))).toHaveLength(1);
    await expectIncrementalVerification('precopy-again');
  }, 700_000);
});

describe('nothing secret in anything this file\'s run showed', () => {
  it('the operator\'s log, every Event, every VMMigration, the metrics and the CLI output hold no guest credential, SSH key or ServiceAccount token', async () => {
    const cli = (args: string[]) => promisify(execFile)(process.execPath, cliArgs(...args), { cwd: REPO_ROOT }).then((r) => r.stdout + r.stderr);
    const visible = [
      readFileSync(operator.logPath, 'utf8'),
      (await sb.kubectl(['get', 'events', '-A', '-o', 'json'])).stdout,
      (await sb.kubectl(['get', 'vmm', '-A', '-o', 'json'])).stdout,
      await (await fetch(`${operator.metricsUrl}/metrics`)).text(),
      cliSeen,
      await cli(['history', 'move-student-42', '--db', sb.dbPath]),
      await cli(['status', 'precopy-again', '--kubeconfig', sb.controlPlane.kubeconfigPath]),
    ].join('\n');
    const secrets = [...kubeconfigCredentials(sb.controlPlane.kubeconfigYaml), readFileSync(sb.hosts.identity.privateKeyPath, 'utf8'), operator.serviceAccountToken ?? ''];
    if (sb.dbPath.startsWith('postgres')) secrets.push(decodeURIComponent(new URL(sb.dbPath).password));
    // the search is meaningful: a whole run's worth of text, and the credentials cut into many pieces
    expect(visible).toContain('move-student-42');
    expect(visible.length).toBeGreaterThan(50_000);
    expect(operator.serviceAccountToken).toBeTruthy();
    expect(secretFragments(secrets).length).toBeGreaterThan(50);
    expect(leakedFragments(visible, secrets)).toEqual([]);
    // and it would see one: a 30-character piece from the middle of the SSH key
    const keyLine = readFileSync(sb.hosts.identity.privateKeyPath, 'utf8').split('\n')[3]!;
    expect(leakedFragments(`${visible} ${keyLine.slice(17, 47)}`, secrets)).not.toEqual([]);
  }, 120_000);
});

// SIGKILL of the operator mid-move: test/e2e/faults.test.ts (every step boundary of one VM's cold, pre-copy
// and live move, SQLite) and test/e2e/failover.test.ts (the leader of two replicas mid-environment, PostgreSQL).
