/**
 * Small helpers for end-to-end tests around VMMigration objects and the
 * VMs' placement: read/wait on the object, apply a manifest with the real
 * kubectl, count live QEMU processes per VM, and a kubeconfig with the
 * shipped ServiceAccount's token (so the operator runs with the shipped RBAC).
 */
import { readdir, readFile } from 'node:fs/promises';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { CustomObjectsApi, type V1Node } from '@kubernetes/client-node';
import { expect } from 'vitest';
import { parse, stringify } from 'yaml';
import { qemuName } from '../../src/api/inventory.js';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { liveness, noteWait } from './budget.js';
import { kubectlRun } from './kubectl.js';
import { SECRET_NAMESPACE, type Sandbox } from './sandbox.js';

export async function getVmm(sb: Pick<Sandbox, 'kc'>, name: string): Promise<VMMigration | undefined> {
  const api = sb.kc.makeApiClient(CustomObjectsApi);
  try {
    return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
  } catch (err) {
    if ((err as { code?: number }).code === 404) return undefined;
    throw err;
  }
}

/**
 * Polls until `pred` holds for the object (or its absence); returns the last object seen. `timeoutMs` is a
 * liveness budget on an unloaded machine, scaled by VMOPS_TIME_SCALE (test/world/budget.ts).
 */
export async function waitVmm(sb: Sandbox, name: string, what: string, pred: (o: VMMigration | undefined) => boolean, timeoutMs: number, everyMs = 200): Promise<VMMigration | undefined> {
  const budget = liveness(timeoutMs);
  const t0 = performance.now();
  const deadline = Date.now() + budget;
  for (;;) {
    const o = await getVmm(sb, name);
    if (pred(o)) {
      noteWait(`${name}: ${what}`, budget, performance.now() - t0);
      return o;
    }
    if (Date.now() > deadline) throw new Error(`${name}: gave up waiting for ${what} after ${budget} ms; status: ${JSON.stringify(o?.status)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export function migrationManifest(name: string, spec: Record<string, unknown>): string {
  return JSON.stringify({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec });
}

export async function kubectlStdin(sb: Sandbox, args: string[], stdin: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return kubectlRun(sb.controlPlane.kubeconfigPath, args, stdin);
}

/**
 * Hosts on which each VM (`-name`) of `environment` has a live qemu-system process, on this machine
 * (every test host shares it). Counted by the directory of the process's `-pidfile` (one per host and
 * VM), not by process: QEMU's `-daemonize` keeps the parent alive with the same argv until the child
 * has started, so one start on one host briefly shows two processes. Only `environment`'s VMs: the two
 * VM lanes of scripts/test.sh run side by side, and the other lane's live migrations legitimately have
 * two QEMUs (the source and the paused incoming one).
 */
export async function qemuCensus(environment: string): Promise<Map<string, number>> {
  const prefix = qemuName(environment, '');
  const hostsOf = new Map<string, Set<string>>();
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid)) continue;
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!(argv[0]?.split('/').pop() ?? '').startsWith('qemu-system')) continue;
    const i = argv.indexOf('-name');
    const name = i >= 0 ? argv[i + 1]?.split(',')[0] : undefined;
    if (!name?.startsWith(prefix)) continue;
    const p = argv.indexOf('-pidfile');
    const where = p >= 0 ? dirname(argv[p + 1] ?? '') : `pid ${pid}`;
    hostsOf.set(name, (hostsOf.get(name) ?? new Set()).add(where));
  }
  return new Map([...hostsOf].map(([name, where]) => [name, where.size]));
}

/**
 * Samples `environment`'s census until stopped; `worst` is the highest number of hosts any one VM was ever
 * live on at once; `sampled()` is the number of samples so far (a test checks that each phase it cares about
 * was sampled). A sampler left running by a failed test ends at `maxMs` (a liveness budget, scaled), and
 * stop() then says so instead of returning a census with a hole in it.
 */
export function watchSplitBrain(environment: string, everyMs = 150, maxMs = 3_600_000): { sampled(): number; stop(): Promise<{ worst: number; samples: number; offenders: string[] }> } {
  let worst = 0;
  let samples = 0;
  const offenders = new Set<string>();
  let running = true;
  const deadline = Date.now() + liveness(maxMs);
  const loop = (async () => {
    while (running) {
      if (Date.now() > deadline) throw new Error(`split-brain sampler of ${environment} ran past its ${liveness(maxMs)} ms budget`);
      for (const [name, n] of await qemuCensus(environment)) {
        worst = Math.max(worst, n);
        if (n > 1) offenders.add(name);
      }
      samples++;
      await new Promise((r) => setTimeout(r, everyMs));
    }
  })();
  loop.catch(() => undefined); // reported by stop()
  return {
    sampled: () => samples,
    async stop() {
      running = false;
      await loop;
      return { worst, samples, offenders: [...offenders] };
    },
  };
}

/**
 * Applies manifests/rbac.yaml and returns a kubeconfig that authenticates as
 * the shipped ServiceAccount (a TokenRequest token), so that the operator runs
 * with exactly the permissions the manifests grant.
 */
export async function serviceAccountKubeconfig(sb: Sandbox): Promise<string> {
  await sb.kubectl(['apply', '-f', 'manifests/rbac.yaml']);
  const { stdout } = await sb.kubectl(['create', 'token', 'vm-migration-operator', '-n', SECRET_NAMESPACE, '--duration=3h']);
  const kc = parse(sb.controlPlane.kubeconfigYaml) as { users: Array<{ name: string; user: Record<string, unknown> }> };
  for (const u of kc.users) u.user = { token: stdout.trim() };
  const path = join(sb.dir, 'operator-sa.kubeconfig');
  writeFileSync(path, stringify(kc), { mode: 0o600 });
  return path;
}

/** Nothing moved: every VM of the sandbox still runs on host01, none on host02, no node left cordoned. */
export async function expectSandboxUntouched(sb: Sandbox): Promise<void> {
  const h01 = await sb.hypervisor('host01');
  const h02 = await sb.hypervisor('host02');
  for (const vm of sb.environment.vms) {
    expect((await h01.vmStatus(sb.environment.name, vm)).state).toBe('running');
    expect((await h02.vmStatus(sb.environment.name, vm)).state).toBe('absent');
  }
  const nodes = JSON.parse((await sb.kubectl(['get', 'nodes', '-o', 'json'])).stdout) as { items: V1Node[] };
  for (const n of nodes.items) expect(n.spec?.unschedulable ?? false).toBe(false);
}
