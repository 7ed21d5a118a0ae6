/**
 * QEMU helpers for the pre-copy and live strategies: the VM's QEMU command line (the same argv as
 * Hypervisor.startVm, optionally with `-incoming defer -S` for a migration target), the disks a
 * running QEMU has attached (from query-block), disk creation on a host and a fenced QEMU quit.
 *
 * The argv here MUST stay identical to Hypervisor.startVm's (apart from the incoming flags): live
 * migration needs the same device configuration on both ends. test/integration/strategies.test.ts
 * compares the two.
 */
import { assertSafeName, assertSafePath, type VMSpec } from '../api/inventory.js';
import { TIMEOUTS } from '../api/types.js';
import { sleep } from '../util/sleep.js';
import type { Hypervisor } from './hypervisor.js';
import { QmpClient } from './qmp.js';
import { buildQemuArgv, diskFormat } from './qemuArgv.js';

export { buildQemuArgv, type QemuArgvOptions } from './qemuArgv.js';

/** One disk as attached to a running QEMU. */
export interface QemuDisk {
  /** the VMSpec file name (e.g. disk0.qcow2) */
  file: string;
  /** QEMU block device (BlockBackend) name, e.g. virtio0 */
  device: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** the format node QEMU reports for the drive (implicit filters such as a mirror's are skipped) */
  nodeName?: string;
}

interface QueryBlockEntry {
  device: string;
  inserted?: { file?: string; 'node-name'?: string; image?: { 'virtual-size'?: number; format?: string } };
}

/** The VM's disks (VMSpec.files of kind disk) as QEMU has them attached, matched by file path. */
export async function queryDisks(qmp: QmpClient, dir: string, vm: VMSpec): Promise<QemuDisk[]> {
  const blocks = await qmp.execute<QueryBlockEntry[]>('query-block');
  const disks: QemuDisk[] = [];
  for (const f of vm.files) {
    if (f.kind !== 'disk') continue;
    const path = `${dir}/${f.name}`;
    const b = blocks.find((e) => e.inserted?.file === path);
    const size = b?.inserted?.image?.['virtual-size'];
    if (!b || typeof size !== 'number') throw new Error(`QEMU has no drive for ${path} (query-block: ${blocks.map((e) => e.inserted?.file ?? e.device).join(', ')})`);
    const nodeName = b.inserted?.['node-name'];
    disks.push({ file: f.name, device: b.device, format: diskFormat(f), virtualSize: size, ...(nodeName ? { nodeName } : {}) });
  }
  return disks;
}

/** Creates empty images of the given virtual sizes (qemu-img create; qcow2 or sparse raw). Overwrites. */
export async function createDisks(hv: Hypervisor, dir: string, disks: { file: string; format: 'qcow2' | 'raw'; virtualSize: number }[], suffix = ''): Promise<void> {
  for (const d of disks) {
    assertSafeName('disk file', d.file);
    const path = `${dir}/${d.file}${suffix}`;
    assertSafePath('disk', path);
    await hv.conn.execOk(['qemu-img', 'create', '-q', '-f', d.format, '--', path, String(d.virtualSize)], { timeoutMs: 60_000 });
  }
}

export async function openQmpAt(hv: Hypervisor, dir: string, timeoutMs = 10_000): Promise<QmpClient> {
  return QmpClient.open(await hv.conn.openUnixSocket(`${dir}/qmp.sock`), { timeoutMs });
}

export interface IncomingQemu {
  qmp: QmpClient;
  dir: string;
}

/**
 * Starts the VM's QEMU on a (target) host waiting for an incoming migration: `-incoming defer -S`,
 * status inmigrate. Its pidfile and -name are the VM's, so Hypervisor.vmStatus sees it as a live
 * QEMU of the VM (state 'other') — fencing treats the VM as present there from now on.
 */
export async function startIncomingQemu(hv: Hypervisor, environment: string, vm: VMSpec, opts: { paused?: boolean } = {}): Promise<IncomingQemu> {
  const dir = hv.vmDir(environment, vm);
  const st = await hv.vmStatus(environment, vm);
  if (st.state !== 'stopped') throw new Error(`cannot start an incoming QEMU for ${vm.name} on ${hv.host.name}: VM is ${st.state} there`);
  const argv = buildQemuArgv(dir, environment, vm, { qemu: hv.host.qemu, incomingDefer: true, paused: opts.paused ?? true });
  await hv.conn.execOk(argv, { timeoutMs: 60_000 });
  let lastErr: unknown;
  for (let i = 0; i < 50; i++) {
    try {
      const qmp = await openQmpAt(hv, dir);
      const s = await qmp.execute<{ status: string }>('query-status');
      if (s.status !== 'inmigrate') {
        qmp.close();
        throw new Error(`incoming QEMU on ${hv.host.name} is ${s.status}, expected inmigrate`);
      }
      return { qmp, dir };
    } catch (err) {
      lastErr = err;
      if ((err as Error).message.includes('expected inmigrate')) throw err;
      await sleep(100);
    }
  }
  throw new Error(`incoming QEMU on ${hv.host.name} not reachable over QMP: ${(lastErr as Error | undefined)?.message ?? ''}`);
}

/**
 * Ends the VM's QEMU on a host and proves it gone: QMP quit on the given client (if any), then
 * Hypervisor.stopVm without a power-down grace period, which re-checks the process in /proc and
 * escalates to SIGKILL. The guest gets no shutdown: only for QEMUs whose state no longer matters
 * (a migration source after handover, a target being discarded).
 */
export async function quitQemu(hv: Hypervisor, environment: string, vm: VMSpec, qmp?: QmpClient): Promise<void> {
  if (qmp && !qmp.isClosed) {
    // QEMU closes the monitor as it exits: waiting for that lets the process check below see it gone
    // on its first look (one round trip) instead of polling — this sits inside a live handover's downtime.
    const closed = new Promise<void>((r) => qmp.once('close', () => r()));
    await qmp.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => undefined);
    await Promise.race([closed, sleep(2000)]);
    qmp.close();
  }
  // stopVm only returns once the process is proven gone (it throws otherwise)
  await hv.stopVm(environment, vm, { powerdownTimeoutMs: 0, quitTimeoutMs: TIMEOUTS.vmQuitMs });
}

/**
 * SHA-256 of an image's guest-visible content (all virtual bytes, as raw), computed on the host:
 * `qemu-img convert -O raw` into a sparse temporary file next to the image, hashed and removed.
 * Equal digests on two hosts prove equal guest data regardless of format, allocation or
 * zero-cluster layout. -U (force-share) lets it read an image held by a paused/stopped QEMU; the
 * caller must make sure no writer is active and QEMU's caches are flushed (QEMU quit, or
 * postmigrate, or flushed and paused), otherwise the result is meaningless.
 */
/**
 * Hash of the guest-visible content that costs time in proportion to the data, not the virtual
 * size: qemu-img converts the image to a sparse raw temp file, then only its data extents are read,
 * on a fixed 64 KiB grid, and every non-zero block is hashed with its index. Holes and written
 * zeros hash the same, so the result depends only on what the guest sees, not on how either
 * host's image or file system happens to lay it out.
 */
const GUEST_HASH_PL = String.raw`
use strict; use warnings;
my ($path) = @ARGV; my $B = 65536; my %seen; my @blocks;
binmode STDOUT;
while (my $line = <STDIN>) {
  next unless $line =~ /"start":\s*(\d+),\s*"length":\s*(\d+).*"data":\s*true/;
  for (my $i = int($1 / $B); $i * $B < $1 + $2; $i++) { push @blocks, $i unless $seen{$i}++ }
}
open(my $f, '<', $path) or die "open $path: $!\n"; binmode $f;
my $zero = "\0" x $B;
for my $i (@blocks) {
  sysseek($f, $i * $B, 0) or die "seek: $!\n";
  my $n = sysread($f, my $buf, $B); die "read: $!\n" unless defined $n;
  $buf .= "\0" x ($B - $n) if $n < $B;
  next if $buf eq $zero;
  print pack('Q>', $i), $buf;
}
`;

export async function guestContentSha256(hv: Hypervisor, path: string, format: 'qcow2' | 'raw'): Promise<string> {
  assertSafePath('image', path);
  const script = [
    'set -e',
    't=$(mktemp "$1.verify.XXXXXX")',
    'trap \'rm -f "$t"\' EXIT',
    'qemu-img convert -U -f "$2" -O raw "$1" "$t"',
    'if command -v openssl >/dev/null 2>&1; then h="openssl dgst -sha256 -r"; else h="sha256sum -b"; fi',
    'printf "size %s\\n" "$(stat -c %s "$t")"',
    'qemu-img map -f raw --output=json "$t" | perl -e "$3" "$t" | $h',
  ].join('\n');
  const out = await hv.conn.execOk(['sh', '-c', script, 'guest-sha256', path, format, GUEST_HASH_PL], { timeoutMs: 60 * 60_000 });
  const [sizeLine, hashLine] = out.toString('utf8').split('\n');
  const size = /^size (\d+)$/.exec(sizeLine ?? '')?.[1];
  const hex = (hashLine ?? '').split(/\s/)[0] ?? '';
  if (!size || !/^[0-9a-f]{64}$/.test(hex)) throw new Error(`on ${hv.host.name}: unexpected guest hash output for ${path}`);
  return `${hex}:${size}`;
}

export interface DiskVerification {
  file: string;
  sourceSha256: string;
  targetSha256: string;
}

export class GuestDataMismatchError extends Error {
  constructor(readonly results: DiskVerification[]) {
    super(
      `guest data differs between source and target: ${results
        .filter((r) => r.sourceSha256 !== r.targetSha256)
        .map((r) => `${r.file} (source ${r.sourceSha256}, target ${r.targetSha256})`)
        .join('; ')}`,
    );
    this.name = 'GuestDataMismatchError';
  }
}

/**
 * Writes a paused QEMU's cached image data and metadata out to its files, so an outside reader
 * (guestContentSha256) sees what the guest would: for a migrated target before the comparison.
 */
export async function flushDisks(qmp: QmpClient, dir: string, vm: VMSpec): Promise<void> {
  for (const d of await queryDisks(qmp, dir, vm)) await qmp.execute('human-monitor-command', { 'command-line': `qemu-io ${d.device} "flush"` });
}

/** Hashes every disk's guest content on both hosts (in parallel) and throws GuestDataMismatchError on any difference. */
export async function verifyGuestData(source: Hypervisor, target: Hypervisor, environment: string, vm: VMSpec): Promise<DiskVerification[]> {
  const srcDir = source.vmDir(environment, vm);
  const dstDir = target.vmDir(environment, vm);
  const results: DiskVerification[] = [];
  for (const f of vm.files) {
    if (f.kind !== 'disk') continue;
    const fmt = diskFormat(f);
    const [s, t] = await Promise.all([guestContentSha256(source, `${srcDir}/${f.name}`, fmt), guestContentSha256(target, `${dstDir}/${f.name}`, fmt)]);
    results.push({ file: f.name, sourceSha256: s, targetSha256: t });
  }
  if (results.some((r) => r.sourceSha256 !== r.targetSha256)) throw new GuestDataMismatchError(results);
  return results;
}
