/**
 * A private PostgreSQL server for the tests: Debian's binaries
 * (`/usr/lib/postgresql/<version>/bin`, installed by scripts/setup.sh),
 * a fresh data directory, 127.0.0.1 on a free port, password auth (so
 * redaction is tested with a real password), fsync off. PostgreSQL refuses
 * to run as root: as root it runs as the `postgres` system user the Debian
 * package creates.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, mkdtempSync, openSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { liveness, noteWait } from './budget.js';
import { freePort } from './sandbox.js';

const execFileP = promisify(execFile);

export interface TestPostgres {
  /** superuser URL of the server's default database (contains the password: tests only) */
  url: string;
  port: number;
  password: string;
  dataDir: string;
  /** a new, empty database; returns its URL */
  createDatabase(name: string): Promise<string>;
  stop(): Promise<void>;
}

export function postgresBinDir(): string {
  const root = '/usr/lib/postgresql';
  const versions = readdirSync(root, { withFileTypes: true }).filter((d) => d.isDirectory() && /^\d+$/.test(d.name)).map((d) => Number(d.name));
  if (versions.length === 0) throw new Error(`no PostgreSQL under ${root}; run scripts/setup.sh`);
  return join(root, String(Math.max(...versions)), 'bin');
}

async function runAs(): Promise<{ uid: number; gid: number } | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const [uid, gid] = await Promise.all([execFileP('id', ['-u', 'postgres']), execFileP('id', ['-g', 'postgres'])]);
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

export async function startPostgres(opts: { user?: string } = {}): Promise<TestPostgres> {
  const bin = postgresBinDir();
  const as = await runAs();
  const base = mkdtempSync(join(tmpdir(), 'vmops-pg-'));
  const dataDir = join(base, 'data');
  const user = opts.user ?? 'vmops';
  // Characters that need URL-encoding prove the redaction handles encoded passwords too.
  const password = `pw-${Math.random().toString(36).slice(2, 10)}/+x`;
  const pwFile = join(base, 'pw');
  writeFileSync(pwFile, `${password}\n`, { mode: 0o600 });
  if (as) {
    chownSync(base, as.uid, as.gid);
    chownSync(pwFile, as.uid, as.gid);
  }
  const spawnOpts = { ...as, cwd: base, env: { ...process.env, LC_ALL: 'C.UTF-8', LANG: 'C.UTF-8' } };
  await execFileP(join(bin, 'initdb'), ['-D', dataDir, '-U', user, '--pwfile', pwFile, '--auth-local=scram-sha-256', '--auth-host=scram-sha-256', '-E', 'UTF8', '--no-sync'], spawnOpts)
    .catch((err: { stderr?: string; message: string }) => {
      throw new Error(`initdb failed: ${err.stderr ?? err.message}`);
    });
  const port = await freePort();
  const logFd = openSync(join(base, 'postgres.log'), 'a');
  if (as) chownSync(join(base, 'postgres.log'), as.uid, as.gid);
  const child: ChildProcess = spawn(join(bin, 'postgres'), ['-D', dataDir, '-h', '127.0.0.1', '-p', String(port), '-k', base,
    '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=50'], { ...spawnOpts, stdio: ['ignore', logFd, logFd] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const url = `postgres://${user}:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`;
  // a liveness budget (scaled by VMOPS_TIME_SCALE): the server accepting connections
  const budget = liveness(30_000);
  const t0 = performance.now();
  const deadline = Date.now() + budget;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`postgres exited with ${child.exitCode}; see ${join(base, 'postgres.log')}`);
    const client = new pg.Client({ connectionString: url });
    const ok = await client.connect().then(() => true, () => false);
    await client.end().catch(() => undefined);
    if (ok) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`postgres did not accept connections within ${budget} ms; see ${join(base, 'postgres.log')}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  noteWait('postgres accepting connections', budget, performance.now() - t0);
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGINT'); // fast shutdown: disconnects clients, no waiting for them
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    }
    rmSync(base, { recursive: true, force: true });
  };
  return {
    url, port, password, dataDir,
    async createDatabase(name: string) {
      if (!/^[a-z][a-z0-9_]*$/.test(name)) throw new Error(`bad database name ${name}`);
      const client = new pg.Client({ connectionString: url });
      await client.connect();
      try {
        await client.query(`CREATE DATABASE ${name}`);
      } finally {
        await client.end();
      }
      return url.replace(/\/postgres$/, `/${name}`);
    },
    stop,
  };
}
