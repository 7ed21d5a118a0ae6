/**
 * The store's repositories on both backends: SQLite (embedded default) and a
 * real PostgreSQL server started for this file (test/world/postgres.ts).
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Inventory } from '../../src/api/inventory.js';
import { InventoryConflictError, Store, StoreOpenError, redactLocation } from '../../src/store/store.js';
import { stringify } from 'yaml';
import { startPostgres, type TestPostgres } from '../world/postgres.js';
import { REPO_ROOT } from '../world/sandbox.js';
import { cliArgs } from '../world/cli.js';
import { liveness } from '../world/budget.js';

const execFileP = promisify(execFile);

const inventory: Inventory = {
  hosts: [
    { name: 'host01', address: '127.0.0.2', port: 22, user: 'root', hostKey: 'ssh-ed25519 AAAA', vmDir: '/a' },
    { name: 'host02', address: '127.0.0.3', port: 22, user: 'root', hostKey: 'ssh-ed25519 BBBB', vmDir: '/b' },
  ],
  environments: [{ name: 'e1', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'k' }, vms: [{ name: 'node-1', role: 'worker', nodeName: 'e1-node-1', host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'd.qcow2', kind: 'disk', format: 'qcow2' }] }] }],
};

let pg: TestPostgres;
const tmp = mkdtempSync(join(tmpdir(), 'vmops-store-'));
let dbCounter = 0;
const wall: Record<string, number> = {};

beforeAll(async () => {
  pg = await startPostgres();
});
afterAll(async () => {
  await pg?.stop();
  rmSync(tmp, { recursive: true, force: true });
  console.log(`[store] wall time per backend (same tests): ${Object.entries(wall).map(([k, v]) => `${k} ${(v / 1000).toFixed(2)} s`).join(', ')}`);
});

const backends = [
  { name: 'sqlite', fresh: async () => join(tmp, `s${++dbCounter}.db`) },
  { name: 'postgres', fresh: async () => pg.createDatabase(`t${++dbCounter}`) },
];

describe.each(backends)('Store on $name', ({ name, fresh }) => {
  let started = 0;
  beforeAll(() => {
    started = Date.now();
  });
  afterAll(() => {
    wall[name] = Date.now() - started;
  });

  it('keeps the placement learned from a move when the inventory file is reloaded, also after reopening', async () => {
    const location = await fresh();
    const s = await Store.open(location);
    expect(s.backend).toBe(name);
    await s.loadInventory(inventory);
    await s.setPlacement('e1', 'node-1', 'host02');
    await s.loadInventory(inventory);
    expect((await s.environment('e1'))!.vms[0]!.host).toBe('host02');
    await s.close();
    const again = await Store.open(location);
    await again.loadInventory(inventory);
    expect((await again.environment('e1'))!.vms[0]).toMatchObject({ host: 'host02', files: [{ name: 'd.qcow2', kind: 'disk', format: 'qcow2' }] });
    expect((await again.hosts()).map((h) => [h.name, h.user, h.port])).toEqual([['host01', 'root', 22], ['host02', 'root', 22]]);
    await again.close();
  });

  it('gives back every host and VM detail of the inventory: QEMU settings, authorizedKeysFile, direct kernel boot, VM address', async () => {
    const s = await Store.open(await fresh());
    const detailed: Inventory = {
      hosts: [
        { ...inventory.hosts[0]!, qemu: { binary: 'qemu-system-x86_64', machine: 'q35', accel: 'tcg' }, authorizedKeysFile: '/root/.ssh/authorized_keys' },
        inventory.hosts[1]!,
      ],
      environments: [{ ...inventory.environments[0]!, vms: [{ ...inventory.environments[0]!.vms[0]!, boot: { kernel: 'vmlinuz', initrd: 'initrd.img', append: 'console=ttyS0' }, address: '10.0.0.5' }] }],
    };
    await s.loadInventory(detailed);
    expect(await s.hosts()).toEqual(detailed.hosts);
    expect((await s.environment('e1'))!.vms).toEqual(detailed.environments[0]!.vms);
    // a reload without them removes them (the file is the truth for descriptions)
    await s.loadInventory(inventory);
    expect(await s.hosts()).toEqual(inventory.hosts);
    expect((await s.environment('e1'))!.vms).toEqual(inventory.environments[0]!.vms);
    await s.close();
  });

  it('journals steps in order with the acting replica, and keeps one move row per VM and migration', async () => {
    const s = await Store.open(await fresh(), { actor: 'replica-a' });
    await s.loadInventory(inventory);
    const key = { migrationUid: 'u1', environment: 'e1', vm: 'node-1', fromHost: 'host01', toHost: 'host02' };
    const m1 = await s.ensureMove(key);
    await s.updateMove('u1', 'e1', 'node-1', { phase: 'Running', attempts: 1 });
    const m2 = await s.ensureMove(key);
    expect(m1.phase).toBe('Pending');
    expect(m2).toMatchObject({ phase: 'Running', attempts: 1 });
    expect(await s.moves('u1')).toHaveLength(1);
    expect((await s.unfinishedMoves('u1')).map((m) => m.vm)).toEqual(['node-1']);
    await s.journal('u1', 'e1', 'node-1', 'stop', 'begin');
    await s.journal('u1', 'e1', 'node-1', 'stop', 'end', { durationMs: 5 });
    const j = await s.journalEntries('u1');
    expect(j.map((e) => `${e.step}:${e.event}:${e.actor}`)).toEqual(['stop:begin:replica-a', 'stop:end:replica-a']);
    expect(JSON.parse(j[1]!.detail_json!)).toEqual({ durationMs: 5 });
    await s.close();
  });

  it('stores byte counts beyond 32 bits (multi-GiB disks) exactly', async () => {
    const s = await Store.open(await fresh());
    await s.ensureMove({ migrationUid: 'u1', environment: 'e1', vm: 'node-1', fromHost: 'host01', toHost: 'host02' });
    const bytes = 5 * 2 ** 40 + 12345;
    await s.updateMove('u1', 'e1', 'node-1', { bytes, stopToStartMs: 2 ** 33, outageMs: 2 ** 33 + 1, phase: 'Succeeded' });
    const m = (await s.move('u1', 'e1', 'node-1'))!;
    expect(m.bytes).toBe(bytes);
    expect(m.stopToStartMs).toBe(2 ** 33);
    expect(m.outageMs).toBe(2 ** 33 + 1);
    expect(await s.unfinishedMoves('u1')).toEqual([]);
    await s.close();
  });

  it('two replicas (processes) start on the same store at once: schema migrated once, each sees the other\'s journal', async () => {
    const location = await fresh();
    const inventoryPath = join(tmp, 'inventory.yaml');
    const keyFile = join(tmp, `k${++dbCounter}`);
    await execFileP('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', keyFile]);
    const key = readFileSync(`${keyFile}.pub`, 'utf8');
    const hostKey = key.trim().split(' ').slice(0, 2).join(' ');
    writeFileSync(inventoryPath, stringify({ ...inventory, hosts: inventory.hosts.map((h) => ({ ...h, hostKey })) }));
    const cli = () => execFileP(process.execPath, cliArgs('inventory', '--db', location, '--inventory', inventoryPath), { cwd: REPO_ROOT });
    const [one, two] = await Promise.all([cli(), cli()]);
    for (const out of [one, two]) expect(out.stdout).toMatch(/^ {2}node-1 +worker +node=e1-node-1 +host=host01$/m);
    const a = await Store.open(location, { actor: 'a' });
    const b = await Store.open(location, { actor: 'b' });
    await a.journal('u1', 'e1', 'node-1', 'stop', 'begin');
    await b.journal('u1', 'e1', 'node-1', 'stop', 'end');
    for (const s of [a, b]) expect((await s.journalEntries('u1')).map((e) => `${e.actor}:${e.event}`)).toEqual(['a:begin', 'b:end']);
    await Promise.all([a.close(), b.close()]);
  });

  it('tells a deletion what it must wait for: moves in flight, and moves the journal does not show resolved', async () => {
    const s = await Store.open(await fresh());
    const vms = { done: 'Succeeded', flying: 'Running', rolled: 'RolledBack', stuck: 'Failed', untouched: 'Failed', halfway: 'Failed', waiting: 'Pending', interruptedWait: 'Pending', killedInPrecheck: 'Running' };
    for (const [vm, phase] of Object.entries(vms)) {
      await s.ensureMove({ migrationUid: 'u1', environment: 'e1', vm, fromHost: 'host01', toHost: 'host02' });
      await s.updateMove('u1', 'e1', vm, { phase });
    }
    const journal: Record<string, string[]> = {
      done: ['precheck:begin', 'precheck:end', 'cleanup:begin', 'cleanup:end'],
      flying: ['precheck:begin', 'precheck:end', 'stop:begin'],
      rolled: ['stop:begin', 'stop:end', 'transfer:begin', 'transfer:fail', 'rollback:begin', 'rollback:end'],
      stuck: ['stop:begin', 'stop:end', 'rollback:begin', 'rollback:fail'],
      untouched: ['precheck:begin', 'precheck:fail'],
      // a resumed move whose precheck failed: the earlier run had stopped the VM, nothing put it back
      halfway: ['stop:begin', 'stop:end', 'precheck:begin', 'precheck:fail'],
      // a resumed move sent back to wait (guest API down) after the earlier run had cordoned the node
      interruptedWait: ['cordon:begin', 'cordon:end', 'precheck:begin', 'precheck:fail'],
      killedInPrecheck: ['precheck:begin', 'quorum:begin'],
    };
    for (const [vm, entries] of Object.entries(journal)) {
      for (const e of entries) await s.journal('u1', 'e1', vm, e.split(':')[0]!, e.split(':')[1] as 'begin' | 'end' | 'fail');
    }
    const { inFlight, stuck } = await s.unresolvedMoves('u1');
    expect(inFlight.map((m) => m.vm)).toEqual(['flying', 'interruptedWait']);
    expect(stuck.map((m) => m.vm)).toEqual(['stuck', 'halfway']);
    await s.close();
  });

  describe('an inventory that contradicts the store is refused and changes nothing', () => {
    async function withMoveInFlight(): Promise<Store> {
      const s = await Store.open(await fresh());
      await s.loadInventory(inventory);
      await s.ensureMove({ migrationUid: 'u1', environment: 'e1', vm: 'node-1', fromHost: 'host01', toHost: 'host02' });
      await s.updateMove('u1', 'e1', 'node-1', { phase: 'Running', step: 'transfer' });
      return s;
    }

    it('a VM placed by the store on a host the file no longer has', async () => {
      const s = await Store.open(await fresh());
      await s.loadInventory(inventory);
      await s.setPlacement('e1', 'node-1', 'host02');
      const withoutHost02: Inventory = { ...inventory, hosts: [inventory.hosts[0]!, { ...inventory.hosts[1]!, name: 'host03' }] };
      const err = await s.loadInventory(withoutHost02, 'inventory /etc/vmops/inventory.yaml').catch((e: Error) => e);
      expect(err).toBeInstanceOf(InventoryConflictError);
      expect((err as Error).message).toBe('inventory /etc/vmops/inventory.yaml contradicts the store: VM e1/node-1 runs on host host02 according to the store, but the inventory has no host host02. Nothing was changed');
      expect((await s.hosts()).map((h) => h.name)).toEqual(['host01', 'host02']);
      await s.close();
    });

    it('a host whose address or VM directory changes while a move on it is in flight', async () => {
      const s = await withMoveInFlight();
      const moved: Inventory = { ...inventory, hosts: [inventory.hosts[0]!, { ...inventory.hosts[1]!, address: '10.9.9.9', vmDir: '/srv/other' }] };
      const err = await s.loadInventory(moved).catch((e: Error) => e);
      expect(err).toBeInstanceOf(InventoryConflictError);
      expect((err as Error).message).toContain('host host02 changes address 127.0.0.3 → 10.9.9.9, vmDir /b → /srv/other while the move of e1/node-1 from host01 to host02 (VMMigration uid u1) is in flight');
      expect((await s.host('host02'))).toMatchObject({ address: '127.0.0.3', vmDir: '/b' });
      await s.close();
    });

    it('a host of a move in flight removed from the file', async () => {
      const s = await withMoveInFlight();
      const err = await s.loadInventory({ ...inventory, hosts: [inventory.hosts[0]!] }).catch((e: Error) => e);
      expect((err as Error).message).toContain('(VMMigration uid u1) is in flight, but the inventory has no host host02');
      await s.close();
    });

    it('but a changed address with no move in flight, or a rotated host key during one, is taken', async () => {
      const s = await withMoveInFlight();
      const rotated: Inventory = { ...inventory, hosts: [inventory.hosts[0]!, { ...inventory.hosts[1]!, hostKey: 'ssh-ed25519 CCCC' }] };
      await s.loadInventory(rotated);
      expect((await s.host('host02'))!.hostKey).toBe('ssh-ed25519 CCCC');
      await s.updateMove('u1', 'e1', 'node-1', { phase: 'Succeeded' });
      const readdressed: Inventory = { ...inventory, hosts: [inventory.hosts[0]!, { ...inventory.hosts[1]!, address: '10.9.9.9' }] };
      await s.loadInventory(readdressed);
      expect((await s.host('host02'))!.address).toBe('10.9.9.9');
      await s.close();
    });
  });
});

describe('start-up faults name the location, never its password', () => {
  it('SQLite: a file that is not a database is refused and left as it was', async () => {
    const path = join(tmp, 'corrupt.db');
    writeFileSync(path, Buffer.alloc(8192, 0x5a));
    const before = createHash('sha256').update(readFileSync(path)).digest('hex');
    const err = await Store.open(path).catch((e: Error) => e);
    expect(err).toBeInstanceOf(StoreOpenError);
    expect((err as Error).message).toBe(`cannot open the store ${path}: SQLite: file is not a database`);
    expect(createHash('sha256').update(readFileSync(path)).digest('hex')).toBe(before);
  });

  it('PostgreSQL: a wrong password is refused with the URL redacted', async () => {
    const wrong = pg.url.replace(encodeURIComponent(pg.password), 'not-the-password-42');
    const err = await Store.open(wrong).catch((e: Error) => e);
    expect(err).toBeInstanceOf(StoreOpenError);
    const msg = (err as Error).message;
    expect(msg).toContain(`cannot open the store postgres://vmops:***@127.0.0.1:${pg.port}/postgres: PostgreSQL: password authentication failed for user "vmops"`);
    expect(msg).not.toContain('not-the-password-42');
  });

  it('PostgreSQL: an unreachable server fails fast, redacted', async () => {
    const unreachable = pg.url.replace(`:${pg.port}/`, ':1/');
    // refused at once by the kernel (ECONNREFUSED), not after a timeout: the connect timeout is only the guard
    // against a hang, a liveness budget — on a stalled event loop an expired timer runs before the socket's error
    const err = await Store.open(unreachable, { connectTimeoutMs: liveness(10_000) }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(StoreOpenError);
    expect((err as Error).message).toMatch(/^cannot open the store postgres:\/\/vmops:\*\*\*@127\.0\.0\.1:1\/postgres: PostgreSQL: connect ECONNREFUSED 127\.0\.0\.1:1/);
    expect((err as Error).message).not.toContain(pg.password);
    expect((err as Error).message).not.toContain(encodeURIComponent(pg.password));
  });

  it('redacts passwords in URLs and query parameters, and unparseable URLs entirely', () => {
    expect(redactLocation('postgres://u:s3cret@db:5432/x?sslmode=require&password=p2')).toBe('postgres://u:***@db:5432/x?sslmode=require&password=***');
    expect(redactLocation('postgresql://u@db/x')).toBe('postgresql://u@db/x');
    expect(redactLocation('postgres://u:pa ss@[bad')).toBe('postgres://***');
    expect(redactLocation('/var/lib/vmops/operator.db')).toBe('/var/lib/vmops/operator.db');
  });
});
