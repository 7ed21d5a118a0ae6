/**
 * The fleet fields of the VMMigration CRD against a real kube-apiserver and the real kubectl:
 * targetHost optional, the CEL rules about targets and the window, defaults, printer columns.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { kubectlRun } from '../world/kubectl.js';

const NS = 'vm-migration-system';
let dir: string;
let cp: ControlPlane;

const kubectl = (args: string[], stdin?: string) => kubectlRun(cp.kubeconfigPath, args, stdin);
const apply = (name: string, spec: Record<string, unknown>) =>
  kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: NS }, spec }));

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmop-fleetcrd-'));
  cp = await startControlPlane({ dataDir: join(dir, 'cp') });
  const r = await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml']);
  expect(r.code, r.stderr).toBe(0);
  expect((await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s'])).code).toBe(0);
}, 600_000);

afterAll(async () => {
  await cp?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('VMMigration fleet fields (real kube-apiserver)', () => {
  it('accepts an evacuation without targetHost and applies the fleet defaults', async () => {
    const r = await apply('evacuate', { sourceHost: 'host01', targetHosts: ['host02', 'host03'], cancel: ['student-42', 'student-43/node-1'], window: { notBefore: '2026-11-27T06:00:00Z', notAfter: '2026-11-28T08:00:00Z', daily: { start: '22:00', end: '04:00' } } });
    expect(r.code, r.stderr).toBe(0);
    const o = JSON.parse((await kubectl(['get', 'vmm', '-n', NS, 'evacuate', '-o', 'json'])).stdout) as { spec: Record<string, unknown> };
    expect(o.spec).toMatchObject({
      maxParallelEnvironments: 1, maxDisruptedEnvironments: 0,
      placement: { maxEnvironmentsPercentPerHost: 15, cpuOvercommitRatio: 4, memoryReserveMiB: 512, diskReserveMiB: 1024 },
      hostLimits: { maxOutboundPerHost: 2, maxInboundPerHost: 2, bandwidthMiBpsPerHost: 0 },
    });
    const cols = await kubectl(['get', 'vmm', '-n', NS, 'evacuate']);
    expect(cols.stdout.split('\n')[0]).toMatch(/^NAME\s+PHASE\s+ENVS\s+PROGRESS\s+CURRENT\s+TARGET\s+AGE/);
  });

  it('rejects targetHosts containing the source, targetHost together with targetHosts, a window that ends before it starts', async () => {
    const a = await apply('bad-targets', { sourceHost: 'host01', targetHosts: ['host02', 'host01'] });
    expect(a.code).not.toBe(0);
    expect(a.stderr).toContain('spec.targetHosts must not contain spec.sourceHost');
    const b = await apply('bad-both', { sourceHost: 'host01', targetHost: 'host02', targetHosts: ['host03'] });
    expect(b.stderr).toContain('set either spec.targetHost (one target for everything) or spec.targetHosts');
    const c = await apply('bad-window', { sourceHost: 'host01', window: { notBefore: '2026-11-27T08:00:00Z', notAfter: '2026-11-27T06:00:00Z' } });
    expect(c.stderr).toContain('spec.window.notAfter must be later than spec.window.notBefore');
    const d = await apply('bad-window-format', { sourceHost: 'host01', window: { notBefore: 'tomorrow morning' } });
    expect(d.stderr).toMatch(/spec.window.notBefore: Invalid value: "tomorrow morning"/);
    const e = await apply('bad-percent', { sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 0 }, maxParallelEnvironments: 0, cancel: ['Bad Name'] });
    expect(e.stderr).toMatch(/spec.placement.maxEnvironmentsPercentPerHost: Invalid value: 0: .*greater than or equal to 1/);
    expect(e.stderr).toMatch(/spec.maxParallelEnvironments: Invalid value: 0/);
    expect(e.stderr).toMatch(/spec.cancel\[0\]: Invalid value: "Bad Name"/);
    const h = await apply('bad-daily', { sourceHost: 'host01', window: { daily: { start: '22:00', end: '22:00' } } });
    expect(h.stderr).toContain('spec.window.daily.start and end must differ');
    const i = await apply('bad-daily-format', { sourceHost: 'host01', window: { daily: { start: '25:00', end: '4:00' } } });
    expect(i.stderr).toMatch(/spec.window.daily.start: Invalid value: "25:00"/);
    expect(i.stderr).toMatch(/spec.window.daily.end: Invalid value: "4:00"/);
    const g = await apply('bad-cancel', { sourceHost: 'host01', cancel: ['student-42/node-1/x', 'student-42/'] });
    expect(g.stderr).toMatch(/spec.cancel\[0\]: Invalid value: "student-42\/node-1\/x"/);
    expect(g.stderr).toMatch(/spec.cancel\[1\]: Invalid value: "student-42\/"/);
    const f = await apply('bad-budget', { sourceHost: 'host01', hostLimits: { bandwidthMiBpsPerHost: -5 } });
    expect(f.stderr).toMatch(/spec.hostLimits.bandwidthMiBpsPerHost: Invalid value: -5: .*greater than or equal to 0/);
  });

  it('keeps targetHost equal to sourceHost refused, and targets immutable once created', async () => {
    const a = await apply('same', { sourceHost: 'host01', targetHost: 'host01' });
    expect(a.stderr).toContain('spec.targetHost must differ from spec.sourceHost');
    expect((await apply('fixed', { sourceHost: 'host01', targetHost: 'host02' })).code).toBe(0);
    const b = await apply('fixed', { sourceHost: 'host01' });
    expect(b.stderr).toContain('spec.targetHost is immutable');
    const c = await apply('evacuate', { sourceHost: 'host01', targetHosts: ['host02'] });
    expect(c.stderr).toContain('spec.targetHosts is immutable');
    // cancel and parallelism may change while it runs
    const d = await apply('evacuate', { sourceHost: 'host01', targetHosts: ['host02', 'host03'], window: { notBefore: '2026-11-27T06:00:00Z', notAfter: '2026-11-27T08:00:00Z' }, cancel: ['student-1'], maxParallelEnvironments: 3 });
    expect(d.code, d.stderr).toBe(0);
  });
});
