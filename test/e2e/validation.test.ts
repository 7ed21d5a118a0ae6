/**
 * What the API server itself refuses, proven with the real kubectl against a real kube-apiserver
 * with the shipped CRD: minimums for durations, live settings outside LiveMigrate, hostile names,
 * fields that must not change once a migration exists, and a bogus status.plan.
 * The same documents go through `vm-migration-operator plan`'s validator, which must agree.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { validateMigrationManifest } from '../../src/api/validate.js';
import { startControlPlane, type ControlPlane } from '../world/controlPlane.js';
import { kubectlRun } from '../world/kubectl.js';

const NS = 'vm-migration-system';
let cp: ControlPlane;
let dataDir: string;

beforeAll(async () => {
  dataDir = mkdtempSync(join(tmpdir(), 'vmop-validation-'));
  cp = await startControlPlane({ dataDir });
  await kubectl(['apply', '-f', 'crds/', '-f', 'manifests/namespace.yaml'], undefined, true);
  await kubectl(['wait', '--for=condition=Established', 'crd/vmmigrations.vmops.dev', '--timeout=60s'], undefined, true);
}, 600_000);

afterAll(async () => {
  await cp?.stop();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function kubectl(args: string[], stdin?: string, mustSucceed = false): Promise<Run> {
  const r = await kubectlRun(cp.kubeconfigPath, args, stdin);
  if (mustSucceed && r.code !== 0) throw new Error(`kubectl ${args.join(' ')}: ${r.stderr}`);
  return r;
}

function manifest(name: string, spec: Record<string, unknown>): Record<string, unknown> {
  return { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: NS }, spec };
}

const apply = (doc: Record<string, unknown>) => kubectl(['apply', '-f', '-'], JSON.stringify(doc));

/** The API server refuses the document with every expected message, and so does the plan command's validator. */
async function expectRejected(doc: Record<string, unknown>, messages: Array<string | RegExp>): Promise<void> {
  const r = await apply(doc);
  expect(r.code, r.stdout).not.toBe(0);
  for (const m of messages) expect(r.stderr).toMatch(m);
  const local = validateMigrationManifest(doc);
  expect(local.ok, `plan validator accepted what the API server refused: ${r.stderr}`).toBe(false);
  for (const m of messages) expect(local.ok ? '' : local.problems.join('\n')).toMatch(m);
}

async function expectAccepted(doc: Record<string, unknown>): Promise<void> {
  const r = await apply(doc);
  expect(r.code, r.stderr).toBe(0);
  expect(validateMigrationManifest(doc)).toMatchObject({ ok: true });
}

const base = { environments: ['student-42'], targetHost: 'host02' };

describe('spec rules (real kubectl, real kube-apiserver)', () => {
  it('accepts a sane spec, with the minimum durations', async () => {
    await expectAccepted(manifest('ok-minimums', { ...base, drain: { timeout: '10s' }, nodeReadyTimeout: '10s', shutdown: { powerdownTimeout: '1s' } }));
    await expectAccepted(manifest('ok-live', { ...base, strategy: 'LiveMigrate', live: { downtimeLimit: '50ms', convergenceTimeout: '30s', fallback: 'None' } }));
  });
  it('refuses zero and too-short durations', async () => {
    await expectRejected(manifest('bad-drain', { ...base, drain: { timeout: '0s' } }), ['spec.drain.timeout must be at least 10s']);
    await expectRejected(manifest('bad-ready', { ...base, nodeReadyTimeout: '0s' }), ['spec.nodeReadyTimeout must be at least 10s']);
    await expectRejected(manifest('bad-powerdown', { ...base, shutdown: { powerdownTimeout: '0ms' } }), ['spec.shutdown.powerdownTimeout must be at least 1s']);
    await expectRejected(manifest('bad-conv', { ...base, strategy: 'LiveMigrate', live: { convergenceTimeout: '0s' } }), ['spec.live.convergenceTimeout must be at least 10s']);
    await expectRejected(manifest('bad-downtime', { ...base, strategy: 'LiveMigrate', live: { downtimeLimit: '0ms' } }), ['spec.live.downtimeLimit must be between 10ms and 10s']);
  });
  it('refuses live settings with Rolling and pre-copy with LiveMigrate', async () => {
    await expectRejected(manifest('bad-live-rolling', { ...base, strategy: 'Rolling', live: { fallback: 'None' } }), ['spec.live applies only to strategy LiveMigrate']);
    await expectRejected(manifest('bad-live-default', { ...base, live: { downtimeLimit: '1s' } }), ['spec.live applies only to strategy LiveMigrate']);
    await expectRejected(manifest('bad-precopy-live', { ...base, strategy: 'LiveMigrate', transfer: { precopy: true } }), ['spec.transfer.precopy applies only to strategy Rolling']);
  });
  it('transfer mode Direct: accepted, but not with compression (a direct stream is not compressed)', async () => {
    await expectAccepted(manifest('ok-direct', { ...base, transfer: { mode: 'Direct' } }));
    await expectRejected(manifest('bad-direct-zstd', { ...base, transfer: { mode: 'Direct', compression: 'Zstd' } }), ['spec.transfer.compression applies to Relay copies only']);
    await expectRejected(manifest('bad-mode', { ...base, transfer: { mode: 'Teleport' } }), [/spec\.transfer\.mode: Unsupported value: "Teleport"/]);
  });

  it('refuses hostile names before anything runs', async () => {
    for (const bad of ['a;reboot', '$(reboot)', '`id`', '../etc', 'a b', 'a\nb', 'x'.repeat(300)]) {
      await expectRejected(manifest('hostile', { environments: [bad], targetHost: 'host02' }), [/spec\.environments\[0\]/]);
      await expectRejected(manifest('hostile', { environments: ['student-42'], targetHost: bad }), [/spec\.targetHost/]);
      await expectRejected(manifest('hostile', { environments: ['student-42'], sourceHost: bad, targetHost: 'host02' }), [/spec\.sourceHost/]);
    }
  });
  it('refuses an empty spec, an unknown strategy and target == source in the plan validator too', async () => {
    await expectRejected(manifest('bad-empty', { targetHost: 'host02' }), ['spec must name the environments to move']);
    await expectRejected(manifest('bad-strategy', { ...base, strategy: 'Teleport' }), [/spec\.strategy: Unsupported value: "Teleport"/]);
    await expectRejected(manifest('bad-same', { ...base, sourceHost: 'host02' }), ['spec.targetHost must differ from spec.sourceHost']);
  });
});

describe('fields that must not change once the migration exists', () => {
  const name = 'immutable';
  beforeAll(async () => {
    const r = await apply(manifest(name, { ...base, transfer: { precopy: false } }));
    expect(r.code, r.stderr).toBe(0);
  });
  const patch = (p: unknown, subresource?: string) =>
    kubectl(['patch', '-n', NS, 'vmmigration', name, '--type=merge', '-p', JSON.stringify(p), ...(subresource ? [`--subresource=${subresource}`] : [])]);

  const cases: Array<[string, unknown, string]> = [
    ['sourceHost (added)', { spec: { sourceHost: 'host01' } }, 'spec.sourceHost is immutable'],
    ['environments', { spec: { environments: ['student-43'] } }, 'spec.environments is immutable'],
    ['strategy', { spec: { strategy: 'LiveMigrate' } }, 'spec.strategy is immutable'],
    ['transfer.precopy', { spec: { transfer: { precopy: true } } }, 'spec.transfer.precopy is immutable'],
    ['targetHost', { spec: { targetHost: 'host03' } }, 'spec.targetHost is immutable'],
  ];
  for (const [what, p, message] of cases) {
    it(`refuses a change of ${what}`, async () => {
      const r = await patch(p);
      expect(r.code, r.stdout).not.toBe(0);
      expect(r.stderr).toContain(message);
    });
  }
  it('still allows pausing and tuning the bandwidth', async () => {
    const r = await patch({ spec: { paused: true, transfer: { bandwidthLimitMiBps: 50 } } });
    expect(r.code, r.stderr).toBe(0);
  });

  const entry = { order: 1, environment: 'student-42', vm: 'node-1', role: 'worker', node: 'student-42-node-1', from: 'host01', to: 'host02' };
  it('accepts a well-formed status.plan through the status subresource', async () => {
    const r = await patch({ status: { plan: [entry] } }, 'status');
    expect(r.code, r.stderr).toBe(0);
  });
  it('refuses a status.plan entry with from == to, a hostile name or an unknown role', async () => {
    const same = await patch({ status: { plan: [{ ...entry, to: 'host01' }] } }, 'status');
    expect(same.code).not.toBe(0);
    expect(same.stderr).toContain('a plan entry must move the VM to another host (from != to)');
    const hostile = await patch({ status: { plan: [{ ...entry, vm: '$(reboot)' }] } }, 'status');
    expect(hostile.code).not.toBe(0);
    expect(hostile.stderr).toMatch(/status\.plan\[0\]\.vm/);
    const role = await patch({ status: { plan: [{ ...entry, role: 'root' }] } }, 'status');
    expect(role.code).not.toBe(0);
    expect(role.stderr).toMatch(/status\.plan\[0\]\.role: Unsupported value/);
    const missing = await patch({ status: { plan: [{ order: 1, vm: 'node-1' }] } }, 'status');
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/status\.plan\[0\]\.(from|to|environment): Required value/);
  });
});
