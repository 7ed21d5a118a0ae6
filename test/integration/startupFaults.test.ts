/**
 * Start-up faults, through the real command line as a child process: a
 * corrupt or unwritable SQLite file, an unreachable PostgreSQL, an inventory
 * that contradicts the store. Each must end with a clear message on stderr
 * naming the file / URL (password redacted) / entry, a non-zero exit, and
 * nothing touched: no connection to the API server or any SSH host (a
 * listener stands in for both and counts connections), the store unchanged.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import type { Inventory } from '../../src/api/inventory.js';
import { Store } from '../../src/store/store.js';
import { REPO_ROOT, operatorEnv } from '../world/sandbox.js';
import { cliArgs } from '../world/cli.js';
import { liveness } from '../world/budget.js';

const execFileP = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'vmops-startup-'));
let listener: Server;
let listener2: Server;
let port = 0;
/** host02's own endpoint: the inventory refuses two hosts on one address and port */
let port2 = 0;
let connections = 0;
let hostKey = '';
const keyPath = join(dir, 'id_ed25519');
const kubeconfigPath = join(dir, 'kubeconfig');

function inventory(h02: Partial<Inventory['hosts'][number]> = {}, withHost02 = true): Inventory {
  const host = (name: string) => ({ name, address: name === 'host02' ? '127.0.0.2' : '127.0.0.1', port: name === 'host02' ? port2 : port, user: 'vmhost', hostKey, vmDir: `/srv/${name}` });
  return {
    hosts: [host('host01'), ...(withHost02 ? [{ ...host('host02'), ...h02 }] : [])],
    environments: [{ name: 'e1', kubeconfigSecret: { namespace: 'ns', name: 's', key: 'kubeconfig' }, vms: [{ name: 'node-1', role: 'worker', nodeName: 'e1-node-1', host: 'host01', memoryMiB: 64, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] }] }],
  };
}

function writeInventory(name: string, inv: Inventory): string {
  const path = join(dir, name);
  writeFileSync(path, stringify(inv));
  return path;
}

interface Result { code: number | null; stderr: string; stdout: string }

async function runOperator(db: string, inventoryPath: string, opts: { env?: Record<string, string> } = {}): Promise<Result> {
  const args = [...cliArgs('run'), '--kubeconfig', kubeconfigPath, '--inventory', inventoryPath,
    '--ssh-key', keyPath, '--metrics-port', '0', '--metrics-host', '127.0.0.1', ...(db ? ['--db', db] : [])];
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, {
      cwd: REPO_ROOT, env: operatorEnv({ LOG_LEVEL: 'info', ...opts.env }),
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    // a liveness budget (scaled): an operator that neither fails nor exits is killed, and the test says so
    const budget = liveness(60_000);
    const timer = setTimeout(() => {
      stderr += `\n[test] operator still running after ${budget} ms: killed\n`;
      child.kill('SIGKILL');
    }, budget);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

beforeAll(async () => {
  const counting = () => createServer((s) => {
    connections++;
    s.destroy();
  });
  listener = counting();
  listener2 = counting();
  await new Promise<void>((r) => listener.listen(0, '127.0.0.1', () => r()));
  await new Promise<void>((r) => listener2.listen(0, '127.0.0.2', () => r()));
  port = (listener.address() as { port: number }).port;
  port2 = (listener2.address() as { port: number }).port;
  await execFileP('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', keyPath]);
  hostKey = readFileSync(`${keyPath}.pub`, 'utf8').trim().split(' ').slice(0, 2).join(' ');
  // A syntactically valid kubeconfig whose server is the counting listener: any API call would show up.
  writeFileSync(kubeconfigPath, stringify({
    apiVersion: 'v1', kind: 'Config', 'current-context': 'c',
    clusters: [{ name: 'c', cluster: { server: `https://127.0.0.1:${port}`, 'insecure-skip-tls-verify': true } }],
    users: [{ name: 'u', user: { token: 'not-a-real-token' } }],
    contexts: [{ name: 'c', context: { cluster: 'c', user: 'u' } }],
  }));
});

afterAll(async () => {
  await new Promise((r) => listener?.close(r));
  await new Promise((r) => listener2?.close(r));
  rmSync(dir, { recursive: true, force: true });
});

function expectNothingTouched(r: Result): void {
  expect(r.code, r.stderr).toBe(1);
  expect(connections, 'connections to the API server / SSH hosts').toBe(0);
  expect(r.stdout + r.stderr).not.toContain('operator started');
}

describe('operator start-up faults (real CLI, child process)', () => {
  it('a corrupt SQLite file: named on stderr, left byte-for-byte as it was', async () => {
    const db = join(dir, 'corrupt', 'operator.db');
    mkdirSync(join(dir, 'corrupt'));
    writeFileSync(db, Buffer.concat([Buffer.from('SQLite format 3\0'), Buffer.alloc(4080, 0xab)]));
    const before = sha(db);
    const r = await runOperator(db, writeInventory('inv-ok.yaml', inventory()));
    expectNothingTouched(r);
    expect(r.stderr).toContain(`vm-migration-operator run: cannot open the store ${db}: SQLite: file is not a database`);
    expect(sha(db)).toBe(before);
    expect(readdirSync(join(dir, 'corrupt'))).toEqual(['operator.db']);
  });

  it('an SQLite path in a directory that does not exist', async () => {
    const db = join(dir, 'no-such-dir', 'operator.db');
    const r = await runOperator(db, writeInventory('inv-ok.yaml', inventory()));
    expectNothingTouched(r);
    expect(r.stderr).toContain(`cannot open the store ${db}: SQLite: Cannot open database because the directory does not exist`);
    expect(existsSync(join(dir, 'no-such-dir'))).toBe(false);
  });

  it('an SQLite file the operator may read but not write (a read-only volume, or an unprivileged operator)', async () => {
    const roDir = join(dir, 'readonly');
    mkdirSync(roDir);
    const db = join(roDir, 'operator.db');
    const s = await Store.open(db);
    await s.close();
    const inv = writeInventory('inv-ro.yaml', inventory());
    const root = process.getuid?.() === 0;
    // root writes through file modes: the store's directory becomes a read-only mount instead (the
    // checkout may sit below a directory no other user may enter, so the operator stays this user)
    if (root) execFileSync('sh', ['-c', `mount --bind "$1" "$1" && mount -o remount,ro,bind "$1"`, 'ro', roDir]);
    else {
      chmodSync(db, 0o444);
      chmodSync(roDir, 0o555);
    }
    try {
      const before = sha(db);
      const r = await runOperator(db, inv);
      expectNothingTouched(r);
      expect(r.stderr).toMatch(new RegExp(`cannot open the store ${db.replace(/[.]/g, '\\.')}: SQLite: (attempt to write a readonly database|unable to open database file)`));
      expect(sha(db)).toBe(before);
    } finally {
      if (root) execFileSync('umount', [roDir]);
    }
  });

  it('an unreachable PostgreSQL (via VMOPS_DB): URL named with the password redacted', async () => {
    const url = 'postgres://vmops:Hunter2-s3cret@127.0.0.1:1/vmops';
    const r = await runOperator('', writeInventory('inv-ok.yaml', inventory()), { env: { VMOPS_DB: url } });
    expectNothingTouched(r);
    expect(r.stderr).toContain('vm-migration-operator run: cannot open the store postgres://vmops:***@127.0.0.1:1/vmops: PostgreSQL: connect ECONNREFUSED 127.0.0.1:1');
    expect(r.stdout + r.stderr).not.toContain('Hunter2-s3cret');
  });

  it('an inventory without the host a VM runs on by the store: VM and host named, store unchanged', async () => {
    const db = join(dir, 'placed.db');
    const s = await Store.open(db);
    await s.loadInventory(inventory());
    await s.setPlacement('e1', 'node-1', 'host02');
    await s.close();
    const before = JSON.stringify(await snapshot(db));
    const inv = writeInventory('inv-no-host02.yaml', inventory({}, false));
    const r = await runOperator(db, inv);
    expectNothingTouched(r);
    expect(r.stderr).toContain(`vm-migration-operator run: inventory ${inv} contradicts the store: VM e1/node-1 runs on host host02 according to the store, but the inventory has no host host02. Nothing was changed`);
    expect(JSON.stringify(await snapshot(db))).toBe(before);
  });

  it('an inventory that moves a host while a move on it is in flight: host, change and move named, store unchanged', async () => {
    const db = join(dir, 'inflight.db');
    const s = await Store.open(db);
    await s.loadInventory(inventory());
    await s.ensureMove({ migrationUid: 'uid-1', environment: 'e1', vm: 'node-1', fromHost: 'host01', toHost: 'host02' });
    await s.updateMove('uid-1', 'e1', 'node-1', { phase: 'Running', step: 'transfer' });
    await s.close();
    const before = JSON.stringify(await snapshot(db));
    const inv = writeInventory('inv-moved.yaml', inventory({ vmDir: '/srv/elsewhere' }));
    const r = await runOperator(db, inv);
    expectNothingTouched(r);
    expect(r.stderr).toContain(`inventory ${inv} contradicts the store: host host02 changes vmDir /srv/host02 → /srv/elsewhere while the move of e1/node-1 from host01 to host02 (VMMigration uid uid-1) is in flight; finish or cancel the move first`);
    expect(JSON.stringify(await snapshot(db))).toBe(before);
  });
});

async function snapshot(db: string): Promise<unknown> {
  const s = await Store.open(db);
  try {
    return { hosts: await s.hosts(), envs: await s.environments(), moves: await s.moves('uid-1') };
  } finally {
    await s.close();
  }
}
