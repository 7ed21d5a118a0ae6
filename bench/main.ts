/**
 * `npm run bench`: copy speed of the relay against the manual ways, on two local test hosts (real
 * sshd on 127.0.0.x, user vmhost). Prints a Markdown table; asserts nothing.
 *
 *   BENCH_SCALE=0.1 npm run bench     # 0.1 = 205 MiB qcow2 + 2 GiB sparse raw (205 MiB allocated)
 *   BENCH_METHODS=b,c,d               # subset of a,b,c,d,e,f (f = transfer mode Direct; b also runs b' = b then sync)
 *   BENCH_IMAGES=dense                # transfer part: subset of dense (the mixed qcow2), sparse (the sparse raw)
 *   BENCH_DIR=/var/tmp/x              # where hosts and the bastion live (default: a temp dir)
 *   BENCH_PARTS=transfer,downtime     # which parts to run (default both); downtime: see bench/downtime.ts; scale: bench/scale.ts; fleet: bench/fleet.ts; environment: bench/environment.ts; ha: bench/ha.ts
 *   BENCH_STRATEGIES=cold,precopy,precopy-verify,live   # downtime part: subset of strategies
 */
import { execFile, spawn } from 'node:child_process';
import { chown, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { HostSpec } from '../src/api/inventory.js';
import { HostConnection } from '../src/hosts/ssh.js';
import { relayFile } from '../src/transfer/relay.js';
import { ensureHostUser, startHosts } from '../test/world/hosts.js';
import { allocatedBytes, createMixedFile, createSparseFile } from '../test/world/images.js';
import { downtimeTable, runDowntime, type DowntimeRow } from './downtime.js';
import { runEnvironment } from './environment.js';
import { runFleet } from './fleet.js';
import { runHa } from './ha.js';
import { runScale } from './scale.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const scale = Number(process.env.BENCH_SCALE ?? '1');
const methods = (process.env.BENCH_METHODS ?? 'a,b,c,d,e,f').split(',').map((m) => m.trim());
const imageKinds = (process.env.BENCH_IMAGES ?? 'dense,sparse').split(',').map((m) => m.trim());
const parts = (process.env.BENCH_PARTS ?? 'transfer,downtime').split(',').map((m) => m.trim());

interface Row {
  image: string;
  method: string;
  seconds: number;
  size: number;
  wire: number;
  /** CPU seconds the whole machine spent during the run (both hosts, the operator, ssh, the kernel) */
  cpuSeconds: number;
  note?: string;
}

/** Busy CPU seconds of the whole machine so far (/proc/stat: everything but idle and iowait). */
async function machineCpuSeconds(): Promise<number> {
  const [, ...fields] = (await readFile('/proc/stat', 'utf8')).split('\n')[0]!.trim().split(/\s+/);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = fields.map(Number);
  // USER_HZ is 100 on Linux (what /proc/stat counts in, whatever the kernel's HZ)
  return (user + nice + system + irq + softirq + steal) / 100;
}

function sh(cmd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn('bash', ['-o', 'pipefail', '-c', cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd}: exit ${code}: ${err}`))));
  });
}

const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

async function main(): Promise<void> {
  const baseDir = process.env.BENCH_DIR ?? (await mkdtemp(path.join(tmpdir(), 'vmop-bench-')));
  await mkdir(baseDir, { recursive: true });
  let failed: unknown;
  try {
    if (parts.includes('transfer')) await runTransfer(baseDir).catch((err: unknown) => (failed = err));
    if (parts.includes('scale')) console.log(`\n${await runScale({ baseDir })}`);
    if (parts.includes('fleet')) console.log(`\n${await runFleet()}`);
    if (parts.includes('environment')) console.log(`\n${await runEnvironment()}`);
    if (parts.includes('ha')) console.log(`\n${await runHa()}`);
    if (parts.includes('downtime')) {
      let rows: DowntimeRow[] = [];
      try {
        const strategies = process.env.BENCH_STRATEGIES?.split(',').map((x) => x.trim());
        rows = await runDowntime({ baseDir, scale, strategies });
      } catch (err) {
        failed ??= err;
      }
      console.log(`\n${downtimeTable(rows, scale)}`);
    }
  } finally {
    if (!process.env.BENCH_DIR) await rm(baseDir, { recursive: true, force: true });
  }
  if (failed) throw failed;
}

async function runTransfer(baseDir: string): Promise<void> {
  const world = await startHosts({ count: 2, baseDir, firstAddress: 60 });
  const [h1, h2] = world.hosts as [HostSpec, HostSpec];
  const rows: Row[] = [];
  const conns: HostConnection[] = [];
  try {
    const c1 = await HostConnection.connect(h1, world.identity);
    const c2 = await HostConnection.connect(h2, world.identity);
    conns.push(c1, c2);

    // known_hosts from the inventory's pinned keys: the manual methods verify host keys too.
    const kh = path.join(baseDir, 'known_hosts');
    await writeFile(kh, world.hosts.map((h) => `[${h.address}]:${h.port} ${h.hostKey}`).join('\n') + '\n');
    const sshOpts = `-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=${q(kh)} -i ${q(world.identity.privateKeyPath)}`;
    const sshTo = (h: HostSpec): string => `ssh ${sshOpts} -p ${h.port} ${h.user}@${h.address}`;

    // (e) only: a temporary key that lets host01's user push to host02.
    const directKey = path.join(baseDir, 'direct_ed25519');
    await execFileP('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'bench-direct', '-f', directKey]);
    const hostUser = await ensureHostUser();
    await chown(directKey, hostUser.uid, hostUser.gid);
    const ak = h2.authorizedKeysFile as string;
    const akBefore = await readFile(ak, 'utf8');

    const bastion = path.join(baseDir, 'bastion');
    await mkdir(bastion, { recursive: true });

    console.error(`creating images (scale ${scale})…`);
    const images: Array<{ name: string; file: string }> = [];
    if (imageKinds.includes('dense')) {
      const qcow = path.join(h1.vmDir, 'mixed.qcow2');
      await createMixedFile(qcow, { sizeBytes: Math.round((2 * GiB * scale) / MiB) * MiB, seed: 11, qcow2: true });
      images.push({ name: `qcow2 mixed ${((2 * scale * 1024) | 0)} MiB`, file: qcow });
    }
    if (imageKinds.includes('sparse')) {
      const sparse = path.join(h1.vmDir, 'sparse.img');
      await createSparseFile(sparse, { sizeBytes: Math.round((20 * GiB * scale) / MiB) * MiB, dataBytes: 2 * GiB * scale, seed: 12 });
      images.push({ name: `raw sparse ${(20 * scale).toFixed(1)} GiB`, file: sparse });
    }

    for (const img of images) {
      const size = Number((await execFileP('stat', ['-c', '%s', img.file])).stdout.trim());
      const alloc = await allocatedBytes(img.file);
      const dst = path.join(h2.vmDir, path.basename(img.file));
      // same page-cache state for every method
      await sh(`cat ${q(img.file)} > /dev/null`);
      const run = async (method: string, fn: () => Promise<{ wire: number; note?: string }>): Promise<void> => {
        if (!methods.includes(method[0] as string)) return;
        await rm(dst, { force: true });
        await sh('sync');
        console.error(`${img.name}: ${method}…`);
        const cpu0 = await machineCpuSeconds();
        const t0 = performance.now();
        const r = await fn();
        const seconds = (performance.now() - t0) / 1000;
        const cpuSeconds = (await machineCpuSeconds()) - cpu0;
        rows.push({ image: `${img.name} (allocated ${(alloc / MiB).toFixed(0)} MiB)`, method, seconds, size, wire: r.wire, cpuSeconds, note: r.note });
      };
      await run('a) scp via bastion (2 hops)', async () => {
        const mid = path.join(bastion, path.basename(img.file));
        await sh(`scp -q ${sshOpts} -P ${h1.port} ${h1.user}@${h1.address}:${q(img.file)} ${q(mid)}`);
        await sh(`scp -q ${sshOpts} -P ${h2.port} ${q(mid)} ${h2.user}@${h2.address}:${q(dst)}`);
        await rm(mid, { force: true });
        return { wire: 2 * size, note: 'file size per hop' };
      });
      await run('b) ssh cat \\| ssh cat', async () => {
        await sh(`${sshTo(h1)} cat ${q(img.file)} | ${sshTo(h2)} ${q(`cat > ${q(dst)}`)}`);
        return { wire: size };
      });
      // (b) ends with its data still in the target's page cache; a relay copy ends fsync'd. This row
      // shows what durability costs the baseline (the ratios stay against (b)).
      await run("b') (b), then sync", async () => {
        await sh(`${sshTo(h1)} cat ${q(img.file)} | ${sshTo(h2)} ${q(`cat > ${q(dst)}`)}`);
        await sh('sync');
        return { wire: size };
      });
      await run('c) relay', async () => {
        const r = await relayFile({ source: c1, sourcePath: img.file, target: c2, targetPath: dst, compression: 'none' });
        return { wire: r.wireBytes };
      });
      await run('d) relay + zstd', async () => {
        const r = await relayFile({ source: c1, sourcePath: img.file, target: c2, targetPath: dst, compression: 'zstd' });
        return { wire: r.wireBytes, note: r.compression === 'zstd' ? undefined : 'zstd unavailable' };
      });
      await run('e) direct host→host ssh cat', async () => {
        await writeFile(ak, `${akBefore.trim()}\n${(await readFile(`${directKey}.pub`, 'utf8')).trim()}\n`);
        try {
          const inner = `cat ${q(img.file)} | ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=${q(kh)} -i ${q(directKey)} -p ${h2.port} ${h2.user}@${h2.address} ${q(`cat > ${q(dst)}`)}`;
          await c1.execOk(['sh', '-c', inner], { timeoutMs: 3_600_000 });
        } finally {
          await writeFile(ak, akBefore);
        }
        return { wire: size };
      });
      await run('f) transfer mode Direct', async () => {
        const r = await relayFile({ source: c1, sourcePath: img.file, target: c2, targetPath: dst, direct: { environment: 'bench', vm: 'direct' } });
        return { wire: r.wireBytes, note: 'per-copy key, segments hashed on both hosts; wire = bytes through the operator' };
      });
      await rm(dst, { force: true });
    }
  } finally {
    for (const c of conns) c.close();
    await world.stop();
    // what was measured is printed even when a later method failed
    print(rows);
  }
}

function print(rows: Row[]): void {
  const lines = [
    `BENCH_SCALE=${scale}, ${new Date().toISOString()}, node ${process.version}`,
    '',
    '| image | method | wall s | MiB/s (file size) | × (b) | × (a) | CPU s (machine) | bytes on the wire | wire / file size | note |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---|',
  ];
  for (const r of rows) {
    const ratio = (m: string): string => {
      const base = rows.find((x) => x.image === r.image && x.method.startsWith(m));
      return base ? `${(base.seconds / r.seconds).toFixed(2)}×` : '–';
    };
    const rate = r.size / MiB / r.seconds;
    lines.push(`| ${r.image} | ${r.method} | ${r.seconds.toFixed(2)} | ${rate.toFixed(1)} | ${ratio('b)')} | ${ratio('a)')} | ${r.cpuSeconds.toFixed(1)} | ${(r.wire / MiB).toFixed(1)} MiB | ${(r.wire / r.size).toFixed(3)} | ${r.note ?? ''} |`);
  }
  console.log(lines.join('\n'));
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
