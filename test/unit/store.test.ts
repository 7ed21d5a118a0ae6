import { describe, expect, it } from 'vitest';
import { Store } from '../../src/store/store.js';
import type { Inventory } from '../../src/api/inventory.js';

const inventory: Inventory = {
  hosts: [
    { name: 'host01', address: '127.0.0.2', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: '/a' },
    { name: 'host02', address: '127.0.0.3', port: 22, user: 'root', hostKey: 'ssh-ed25519 BBBB', vmDir: '/b' },
  ],
  environments: [{ name: 'e1', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [{ name: 'node-1', role: 'worker', nodeName: 'e1-node-1', host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'd.qcow2', kind: 'disk', format: 'qcow2' }] }] }],
};

describe('Store (SQLite)', () => {
  it('keeps the placement learned from a move when the inventory file is reloaded', async () => {
    const s = await Store.open(':memory:');
    await s.loadInventory(inventory);
    await s.setPlacement('e1', 'node-1', 'host02');
    await s.loadInventory(inventory);
    expect((await s.environment('e1'))!.vms[0]!.host).toBe('host02');
    await s.close();
  });

  it('journals steps in order and keeps one move row per VM and migration', async () => {
    const s = await Store.open(':memory:');
    await s.loadInventory(inventory);
    const key = { migrationUid: 'u1', environment: 'e1', vm: 'node-1', fromHost: 'host01', toHost: 'host02' };
    const m1 = await s.ensureMove(key);
    await s.updateMove('u1', 'e1', 'node-1', { phase: 'Running', attempts: 1 });
    const m2 = await s.ensureMove(key);
    expect(m1.phase).toBe('Pending');
    expect(m2).toMatchObject({ phase: 'Running', attempts: 1 });
    expect(await s.moves('u1')).toHaveLength(1);
    await s.journal('u1', 'e1', 'node-1', 'stop', 'begin');
    await s.journal('u1', 'e1', 'node-1', 'stop', 'end', { durationMs: 5 });
    const j = await s.journalEntries('u1');
    expect(j.map((e) => `${e.step}:${e.event}`)).toEqual(['stop:begin', 'stop:end']);
    expect(JSON.parse(j[1]!.detail_json!)).toEqual({ durationMs: 5 });
    await s.close();
  });
});
