/**
 * `vm-migration-operator plan` (the real CLI process) refuses what the API server refuses, from the
 * CRD's schema and CEL rules, before planning: it used to print a plan for an unknown strategy,
 * sourceHost == targetHost or an empty spec.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { cliArgs } from '../world/cli.js';

const ROOT = resolve(import.meta.dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'vmop-plan-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro';
const inventory = join(dir, 'inventory.yaml');
writeFileSync(inventory, stringify({
  hosts: [
    { name: 'host01', address: '10.0.0.1', hostKey: KEY, vmDir: '/srv/vms' },
    { name: 'host02', address: '10.0.0.2', hostKey: KEY, vmDir: '/srv/vms' },
  ],
  environments: [{ name: 'student-42', kubeconfigSecret: { namespace: 'ns', name: 'kc' }, vms: [
    { name: 'beachhead', role: 'beachhead', host: 'host01', files: [{ name: 'disk0.qcow2', format: 'qcow2' }] },
    { name: 'node-1', role: 'worker', host: 'host01', files: [{ name: 'disk0.qcow2', format: 'qcow2' }] },
  ] }],
}));

async function plan(spec: unknown): Promise<{ code: number; stdout: string; stderr: string }> {
  const file = join(dir, `m-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, stringify({ apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name: 'm', namespace: 'ns' }, spec }));
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, cliArgs('plan', '-f', file, '--inventory', inventory), { cwd: ROOT, env: { ...process.env, LOG_LEVEL: 'warn' } });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

describe.concurrent('vm-migration-operator plan', () => {
  it('prints the plan of a valid manifest', async () => {
    const r = await plan({ environments: ['student-42'], targetHost: 'host02' });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/1\s+student-42\s+beachhead\s+beachhead\s+host01\s+host02/);
    expect(r.stdout).toMatch(/2\s+student-42\s+node-1\s+worker/);
  });
  const bad: Array<[string, unknown, RegExp]> = [
    ['an unknown strategy', { environments: ['student-42'], targetHost: 'host02', strategy: 'Teleport' }, /error: spec\.strategy: Unsupported value: "Teleport"/],
    ['sourceHost == targetHost', { sourceHost: 'host02', targetHost: 'host02' }, /error: spec\.targetHost: .*spec\.targetHost must differ from spec\.sourceHost/],
    ['an empty spec', {}, /error: spec: .*spec must name the environments to move/],
    ['no environments and no source host', { targetHost: 'host02' }, /spec must name the environments to move/],
    ['a zero drain timeout', { environments: ['student-42'], targetHost: 'host02', drain: { timeout: '0s' } }, /spec\.drain\.timeout must be at least 10s/],
    ['live settings with Rolling', { environments: ['student-42'], targetHost: 'host02', live: { fallback: 'None' } }, /spec\.live applies only to strategy LiveMigrate/],
    ['a hostile environment name', { environments: ['$(reboot)'], targetHost: 'host02' }, /error: spec\.environments\[0\]: Invalid value: "\$\(reboot\)"/],
  ];
  for (const [what, spec, message] of bad) {
    it(`refuses ${what} without printing a plan`, async () => {
      const r = await plan(spec);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(message);
      expect(r.stdout).not.toContain('ORDER');
    });
  }
});
