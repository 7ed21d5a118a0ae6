/**
 * What a hypervisor has room for, read over SSH: memory (MemTotal, MemAvailable), CPUs, free space
 * in the filesystem of its VM directory, and the allocated size of every environment directory
 * there (what a move of that environment would have to write elsewhere). One fixed script per
 * reading; data only as positional parameters, paths validated first.
 */
import { SAFE_NAME, assertSafeName, assertSafePath, vmDirectory, type HostSpec } from '../api/inventory.js';
import type { HostCapacity } from '../planner/placement.js';

/** The one thing this module needs from a host connection. */
export interface RemoteExec {
  execOk(argv: string[], opts?: { timeoutMs?: number }): Promise<Buffer>;
}

/**
 * $1 = the host's VM directory. A fresh host may not have it yet: df then measures the nearest
 * existing parent, which is the filesystem the directory will be created on.
 */
const CAPACITY_SCRIPT = [
  'set -e',
  // kB as printed by the kernel: awk arithmetic would print large values as 2.5e+10
  "awk '/^MemTotal:/ {t=$2} /^MemAvailable:/ {a=$2} END {print \"memkb\", t, a}' /proc/meminfo",
  'n=$(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)',
  'echo "cpus $n"',
  'd=$1',
  'while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done',
  "df -P -B1 -- \"$d\" | awk 'NR==2 {print \"disk\", $4}'",
  '[ -d "$1" ] || exit 0',
  'cd -- "$1"',
  'for e in */; do',
  '  [ -d "$e" ] || continue',
  '  b=$(du -s -B1 -- "$e" 2>/dev/null | cut -f1)',
  '  echo "env ${b:-0} ${e%/}"',
  'done',
].join('\n');

export function parseCapacity(host: string, out: string): HostCapacity {
  const c: HostCapacity = { host, memTotalBytes: NaN, memAvailableBytes: NaN, cpus: NaN, diskFreeBytes: NaN, environmentBytes: {} };
  for (const line of out.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[0] === 'memkb') [c.memTotalBytes, c.memAvailableBytes] = [Number(f[1]) * 1024, Number(f[2]) * 1024];
    else if (f[0] === 'cpus') c.cpus = Number(f[1]);
    else if (f[0] === 'disk') c.diskFreeBytes = Number(f[1]);
    // directories that are not environment names (lost+found, ...) are not ours to count
    else if (f[0] === 'env' && f.length === 3 && SAFE_NAME.test(f[2]!)) c.environmentBytes[f[2]!] = Number(f[1]);
  }
  for (const [k, v] of Object.entries({ memory: c.memTotalBytes, 'available memory': c.memAvailableBytes, CPUs: c.cpus, 'free disk': c.diskFreeBytes })) {
    if (!Number.isFinite(v) || v < 0) throw new Error(`host ${host}: could not read its ${k} (got ${JSON.stringify(out.slice(0, 200))})`);
  }
  return c;
}

export async function readCapacity(conn: RemoteExec, host: HostSpec): Promise<HostCapacity> {
  assertSafePath('host vmDir', host.vmDir);
  const out = await conn.execOk(['sh', '-c', CAPACITY_SCRIPT, 'capacity', host.vmDir.replace(/\/+$/, '')], { timeoutMs: 60_000 });
  return parseCapacity(host.name, out.toString('utf8'));
}

/** Allocated bytes of one VM's directory (holes not counted): what its copy writes on the target. */
export async function vmAllocatedBytes(conn: RemoteExec, host: HostSpec, environment: string, vm: string): Promise<number> {
  assertSafeName('environment', environment);
  const dir = vmDirectory(host, environment, vm);
  const out = (await conn.execOk(['du', '-s', '-B1', '--', dir], { timeoutMs: 60_000 })).toString('utf8');
  const bytes = Number(out.split('\t')[0]);
  if (!Number.isFinite(bytes)) throw new Error(`host ${host.name}: unexpected du output for ${dir}: ${JSON.stringify(out.slice(0, 200))}`);
  return bytes;
}

/** Reads every host at once; a host that cannot be read is reported, not fatal (it cannot be a chosen target). */
export async function measureHosts(hosts: HostSpec[], read: { host(h: HostSpec): Promise<HostCapacity> }, log?: { warn(o: object, msg: string): void }): Promise<{ readings: Map<string, HostCapacity>; unreachable: Map<string, string> }> {
  const readings = new Map<string, HostCapacity>();
  const unreachable = new Map<string, string>();
  await Promise.all(hosts.map(async (h) => {
    try {
      readings.set(h.name, await read.host(h));
    } catch (err) {
      unreachable.set(h.name, (err as Error).message);
      log?.warn({ host: h.name, err: (err as Error).message }, 'capacity not readable');
    }
  }));
  return { readings, unreachable };
}
