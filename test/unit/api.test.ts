import { describe, expect, it } from 'vitest';
import { parseInventory } from '../../src/api/inventoryFile.js';
import { parseDuration, settingsFrom } from '../../src/api/types.js';
import { setCondition } from '../../src/controller/conditions.js';

describe('parseDuration', () => {
  it('parses Go-style durations', () => {
    expect(parseDuration('90s')).toBe(90_000);
    expect(parseDuration('1h30m')).toBe(5_400_000);
    expect(parseDuration('500ms')).toBe(500);
  });
  it('rejects junk', () => {
    expect(() => parseDuration('10')).toThrow(/invalid duration/);
    expect(() => parseDuration('5m junk')).toThrow(/invalid duration/);
    expect(() => parseDuration('')).toThrow(/invalid duration/);
  });
  it('applies the CRD defaults', () => {
    const s = settingsFrom({ targetHost: 'host02', environments: ['a'] });
    expect(s).toMatchObject({ strategy: 'Rolling', drainTimeoutMs: 600_000, powerdownTimeoutMs: 60_000, nodeReadyTimeoutMs: 300_000, paused: false, dryRun: false });
  });
});

describe('inventory file', () => {
  const good = {
    hosts: [{ name: 'host01', address: '127.0.0.2', port: 2222, hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro', vmDir: '/srv/vms' }],
    environments: [{ name: 'student-1', kubeconfigSecret: { namespace: 'ns', name: 'kc' }, vms: [{ name: 'node-1', role: 'worker', host: 'host01', files: [{ name: 'disk0.qcow2', format: 'qcow2' }] }] }],
  };
  it('parses and fills defaults', () => {
    const inv = parseInventory(good);
    expect(inv.hosts[0]).toMatchObject({ user: 'root', port: 2222 });
    expect(inv.environments[0]!.vms[0]).toMatchObject({ nodeName: 'node-1', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] });
    expect(inv.environments[0]!.kubeconfigSecret.key).toBe('kubeconfig');
  });
  it('refuses names that could reach a shell or escape the VM directory', () => {
    const bad = structuredClone(good);
    bad.environments[0]!.vms[0]!.files[0]!.name = '../../etc/passwd';
    expect(() => parseInventory(bad)).toThrow(/files\[0\]\.name .* is not a valid name/);
    const bad2 = structuredClone(good);
    bad2.environments[0]!.name = 'a;rm -rf /';
    expect(() => parseInventory(bad2)).toThrow(/environments\[0\]\.name/);
    const bad3 = structuredClone(good);
    bad3.hosts[0]!.vmDir = '/srv/$(reboot)';
    expect(() => parseInventory(bad3)).toThrow(/vmDir/);
  });
  it('names a VM placed on an unknown host', () => {
    const bad = structuredClone(good);
    bad.environments[0]!.vms[0]!.host = 'host99';
    expect(() => parseInventory(bad)).toThrow(/vms\[0\]\.host "host99" is not a host of the inventory/);
  });
});

describe('setCondition', () => {
  it('keeps lastTransitionTime while the status stays the same', () => {
    const t1 = new Date('2026-01-01T00:00:00Z');
    const t2 = new Date('2026-01-01T00:01:00Z');
    let c = setCondition(undefined, { type: 'Ready', status: 'False', reason: 'A', message: 'a' }, t1);
    c = setCondition(c, { type: 'Ready', status: 'False', reason: 'B', message: 'b' }, t2);
    expect(c).toEqual([{ type: 'Ready', status: 'False', reason: 'B', message: 'b', lastTransitionTime: t1.toISOString() }]);
    c = setCondition(c, { type: 'Ready', status: 'True', reason: 'C', message: 'c' }, t2);
    expect(c[0]!.lastTransitionTime).toBe(t2.toISOString());
  });
});
