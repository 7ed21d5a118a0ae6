/**
 * The test world's real guest: Debian's kernel + an initramfs of busybox and guestd
 * (scripts/guest/guestd.c), built once by scripts/build-guest.sh and cached under
 * ~/.cache/vm-migration-operator/guest/<key>/. A VM boots it directly (-kernel/-initrd/-append);
 * kernel and initrd are VM files, so they are copied and verified with the VM like its disks.
 *
 * What the guest does (details in guestd.c): a heartbeat line every 10 ms on ttyS1 (the VM's
 * heartbeat.sock; see guestObserver.ts), a writer appending checksummed, fsync'd records to a ring
 * in the first `logMiB` MiB of its first disk, optionally a RAM dirtier (`dirtyMiB`), a log verification at boot and on request, and a clean
 * power-off on the ACPI power button (unless `acpi: 'ignore'`).
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import type { VMFile, VMSpec } from '../../src/api/inventory.js';
import { adoptHostFile } from './hosts.js';
import { createDiskImage } from './images.js';

const execFileP = promisify(execFile);
const REPO_ROOT = path.resolve(import.meta.dirname, '../..');

export const GUEST_KERNEL = 'vmlinuz';
export const GUEST_INITRD = 'initrd.img';

let buildP: Promise<string> | undefined;

/** Directory with vmlinuz and initrd.img; builds them first if the cache has none (setup.sh normally did). */
export function guestImageDir(): Promise<string> {
  buildP ??= execFileP('bash', [path.join(REPO_ROOT, 'scripts/build-guest.sh')], { maxBuffer: 1 << 20 }).then((r) => r.stdout.trim().split('\n').pop() as string);
  return buildP;
}

export interface GuestOptions {
  /** log records per second written and fsync'd by the guest (0 = writer idle) */
  writesPerSecond?: number;
  /** size of the log ring at the start of the first disk */
  logMiB?: number;
  /** 'ignore': the guest does not answer the ACPI power button (stopVm must fall back to quit/kill) */
  acpi?: 'on' | 'ignore';
  heartbeatMs?: number;
  /** RAM the guest keeps rewriting (one word per page), MiB; 0 = none */
  dirtyMiB?: number;
  /** how fast it rewrites it, MiB/s (0 = as fast as it can) */
  dirtyMiBps?: number;
  /** eth0's address, ADDR/PREFIX (the VM needs a NIC) */
  ip?: string;
  /** a TCP port on which guestd answers each line with "ECHO <boot> <line>" */
  echoPort?: number;
}

/** Kernel command line of the test guest. */
export function guestAppend(o: GuestOptions = {}): string {
  const words = ['console=ttyS0', 'quiet', 'panic=-1', `vmops.rate=${o.writesPerSecond ?? 50}`, `vmops.logmib=${o.logMiB ?? 8}`, `vmops.hb=${o.heartbeatMs ?? 10}`];
  if (o.acpi === 'ignore') words.push('vmops.acpi=ignore');
  if (o.dirtyMiB) words.push(`vmops.dirtymib=${o.dirtyMiB}`, `vmops.dirtyrate=${o.dirtyMiBps ?? 0}`);
  if (o.ip) words.push(`vmops.ip=${o.ip}`);
  if (o.echoPort) words.push(`vmops.echo=${o.echoPort}`);
  return words.join(' ');
}

/** A VMSpec that boots the real guest; its first disk is disk0.qcow2 (the log ring lives at its start). */
export function realGuestVm(name: string, o: GuestOptions & { memoryMiB?: number; host?: string; role?: VMSpec['role']; nodeName?: string; extraFiles?: VMFile[]; nics?: VMSpec['nics'] } = {}): VMSpec {
  return {
    name,
    role: o.role ?? 'worker',
    nodeName: o.nodeName ?? name,
    host: o.host ?? 'host01',
    memoryMiB: o.memoryMiB ?? 96,
    cpus: 1,
    files: [
      { name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' },
      ...(o.extraFiles ?? []),
      { name: GUEST_KERNEL, kind: 'file' },
      { name: GUEST_INITRD, kind: 'file' },
    ],
    boot: { kernel: GUEST_KERNEL, initrd: GUEST_INITRD, append: guestAppend(o) },
    ...(o.nics ? { nics: o.nics } : {}),
  };
}

/**
 * Puts the guest's files into a VM directory (as the host user): kernel, initrd and a fresh
 * disk0.qcow2 of `diskMiB` with seeded data regions (the guest's log ring overwrites its start).
 */
export async function installGuest(vmDir: string, o: { diskMiB?: number; seed?: number; regions?: number } = {}): Promise<void> {
  const dir = await guestImageDir();
  await mkdir(vmDir, { recursive: true });
  await adoptHostFile(vmDir);
  for (const f of [GUEST_KERNEL, GUEST_INITRD]) {
    await copyFile(path.join(dir, f), path.join(vmDir, f));
    await adoptHostFile(path.join(vmDir, f));
  }
  await createDiskImage(path.join(vmDir, 'disk0.qcow2'), { sizeMiB: o.diskMiB ?? 64, format: 'qcow2', seed: o.seed ?? 1, regions: o.regions ?? 8 });
}
