/**
 * Transfer mode Direct between two real sshd hosts: the source streams to the target with a key it
 * made for this one copy, authorized on the target only while the copy runs (restrict, from=,
 * expiry-time, a forced WRITER into one file). Checked: identical data with holes kept, no byte
 * through the operator, what the key can and cannot do while it exists, nothing left afterwards,
 * a corrupted segment caught, stale lines of a crashed copy removed, the bandwidth bound.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmDirectory, type VMSpec } from '../../src/api/inventory.js';
import { directTag, sweepDirect } from '../../src/transfer/direct.js';
import { relayFile, relayVmFiles, SegmentVerifyError } from '../../src/transfer/relay.js';
import { adoptHostFile, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { createDiskImage, sha256File } from '../world/images.js';
import { LOOPBACK } from '../world/loopback.js';

const ENV = 'env-direct';
const vm: VMSpec = {
  name: 'vm1',
  role: 'worker',
  nodeName: 'vm1',
  host: 'host01',
  memoryMiB: 64,
  cpus: 1,
  files: [
    { name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' },
    { name: 'disk1.img', kind: 'disk', format: 'raw' },
  ],
};

describe('transfer mode Direct between two real hosts', () => {
  let two: TwoHosts;
  let srcDir: string;
  let dstDir: string;
  let keysBefore: string;

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-direct-', firstAddress: LOOPBACK.direct.first });
    srcDir = vmDirectory(two.h1, ENV, vm.name);
    dstDir = vmDirectory(two.h2, ENV, vm.name);
    await mkdir(srcDir, { recursive: true });
    await createDiskImage(path.join(srcDir, 'disk0.qcow2'), { sizeMiB: 96, format: 'qcow2', seed: 11, regions: 24 });
    await createDiskImage(path.join(srcDir, 'disk1.img'), { sizeMiB: 48, format: 'raw', seed: 5 });
    await adoptHostFile(path.join(srcDir, 'disk0.qcow2'));
    await two.hv2.ensureDir(dstDir);
    keysBefore = await readFile(two.h2.authorizedKeysFile!, 'utf8');
  });

  afterAll(async () => {
    await two?.stop();
  });

  const keyDirsOnSource = async (): Promise<string[]> =>
    (await two.c1.execOk(['sh', '-c', 'for d in /tmp/vmops-direct+"$1"+*; do [ -d "$d" ] && echo "$d"; done; true', 'ls', `${ENV}+${vm.name}`])).toString().split('\n').filter(Boolean);

  /** ssh from the source host with the copy's key, as the source's own stream does, from `bind` */
  const sshWithKey = (keyDir: string, bind: string, command: string) =>
    two.c1.exec(['ssh', '-F', '/dev/null', '-T', '-i', `${keyDir}/key`, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=yes', '-o', `UserKnownHostsFile=${keyDir}/known_hosts`, '-b', bind, '-p', String(two.h2.port), '-l', two.h2.user, two.h2.address, command], { timeoutMs: 30_000 });

  it('copies a qcow2 host to host, identical with its holes, no byte through the operator; the key works only as the forced writer, only from the source, only during the copy', async () => {
    const src = path.join(srcDir, 'disk0.qcow2');
    const dst = `${dstDir}/disk0.qcow2`;
    const during: { keyDirs: string[]; lines: string[]; asOther?: { code: number; stdout: string }; fromElsewhere?: number } = { keyDirs: [], lines: [] };
    const r = await relayFile({
      source: two.c1,
      sourcePath: src,
      target: two.c2,
      targetPath: dst,
      segmentBytes: 8 * 1048576,
      direct: { environment: ENV, vm: vm.name },
      beforeVerify: async (segment) => {
        if (segment !== 0) return;
        during.keyDirs = await keyDirsOnSource();
        during.lines = (await readFile(two.h2.authorizedKeysFile!, 'utf8')).split('\n').filter((l) => l.includes(directTag(ENV, vm.name)));
        const keyDir = during.keyDirs[0]!;
        // any command asked for runs the forced writer instead, which got no frames: it writes nothing
        const r1 = await sshWithKey(keyDir, two.h1.address, 'id; cat /etc/passwd');
        during.asOther = { code: r1.code, stdout: r1.stdout.toString() };
        // the same key from another address of the same machine: refused (from=)
        during.fromElsewhere = (await sshWithKey(keyDir, '127.0.0.1', 'id')).code;
      },
    });
    expect(await sha256File(dst)).toBe(await sha256File(src));
    expect(r.wireBytes).toBe(0);
    expect(r.bytes).toBeGreaterThan(0);
    expect(r.attempts).toHaveLength(1);
    // holes stay holes: the copy allocates no more than the source
    const du = async (c: typeof two.c1, p: string) => Number((await c.execOk(['du', '-k', '--', p])).toString().split(/\s/)[0]);
    expect(await du(two.c2, dst)).toBeLessThanOrEqual((await du(two.c1, src)) + 64);

    expect(during.keyDirs).toHaveLength(1);
    expect(during.lines).toHaveLength(1);
    const line = during.lines[0]!;
    expect(line).toMatch(new RegExp(`^restrict,from="${two.h1.address.replace(/\./g, '\\.')}",expiry-time="\\d{12}Z",command="perl -e 'eval pack\\(q\\(H\\*\\), q\\([0-9a-f]+\\)\\); if \\(\\$@\\) \\{ print STDERR \\$@; exit 1 \\}'" ssh-ed25519 \\S+ vmops-direct:${ENV}/${vm.name}:[0-9a-f]{12}$`));
    // the forced program names the one partial file
    const hex = /q\(([0-9a-f]+)\)\); if/.exec(line)![1]!;
    expect(Buffer.from(hex, 'hex').toString()).toContain(`q(${Buffer.from(`${dst}.partial`).toString('hex')})`);
    expect(during.asOther).toEqual({ code: 0, stdout: 'END\n' });
    expect(during.fromElsewhere).toBe(255);

    // afterwards: the target's authorized_keys is as before, the source holds no key
    expect(await readFile(two.h2.authorizedKeysFile!, 'utf8')).toBe(keysBefore);
    expect(await keyDirsOnSource()).toEqual([]);
  });

  it('a segment corrupted on the target is caught (hashes of both hosts compared), the partial removed, the key revoked', async () => {
    // dense: every offset of a segment is data, so a flipped byte anywhere in it is in what is hashed
    const src = path.join(srcDir, 'dense.img');
    await two.c1.execOk(['dd', 'if=/dev/urandom', `of=${src}`, 'bs=1M', 'count=24', 'status=none']);
    const dst = `${dstDir}/corrupt.img`;
    let corrupted: number | undefined;
    const err = await relayFile({
      source: two.c1,
      sourcePath: src,
      target: two.c2,
      targetPath: dst,
      segmentBytes: 8 * 1048576,
      retries: 0,
      direct: { environment: ENV, vm: vm.name },
      // flip bytes at the start of the first segment the target reports (it holds data: it was sent)
      beforeVerify: async (segment, partial) => {
        if (corrupted !== undefined) return;
        corrupted = segment;
        await two.c2.execOk(['sh', '-c', 'printf "\\377\\377\\377\\377" | dd of="$1" bs=1 seek=$2 conv=notrunc status=none', 'corrupt', partial, String(segment * 8 * 1048576)]);
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SegmentVerifyError);
    expect((err as SegmentVerifyError).segments).toEqual([corrupted]);
    expect((await two.c2.exec(['test', '-e', dst])).code).toBe(1);
    expect((await two.c2.exec(['test', '-e', `${dst}.partial`])).code).toBe(1);
    expect(await readFile(two.h2.authorizedKeysFile!, 'utf8')).toBe(keysBefore);
    expect(await keyDirsOnSource()).toEqual([]);
  });

  it('lines a crashed copy of this VM left behind are removed by its next direct copy; other lines stay; a bandwidth bound holds the stream back', async () => {
    const file = two.h2.authorizedKeysFile!;
    const stale = `restrict,command="false" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDZQ3Y2m0cQ3Vb9ZQ1m2x6n8p9s0t1u2v3w4x5y6z7a8 ${directTag(ENV, vm.name)}0123456789ab`;
    const other = `restrict,command="false" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDZQ3Y2m0cQ3Vb9ZQ1m2x6n8p9s0t1u2v3w4x5y6z7a8 ${directTag(ENV, 'vm1-other')}0123456789ab`;
    await writeFile(file, `${keysBefore}${stale}\n${other}\n`);
    // and a key directory on the source, as a crash leaves it
    await two.c1.execOk(['sh', '-c', 'umask 077; mkdir "$1" && echo stale > "$1/key"', 'stale', `/tmp/vmops-direct+${ENV}+${vm.name}+stale1`]);
    const t0 = performance.now();
    const results = await relayVmFiles({ source: two.hv1, target: two.hv2, environment: ENV, vm, direct: { bytesPerSec: 32 * 1048576 } });
    const seconds = (performance.now() - t0) / 1000;
    for (const f of vm.files) expect(await sha256File(`${dstDir}/${f.name}`)).toBe(await sha256File(path.join(srcDir, f.name)));
    expect(results.every((r) => r.wireBytes === 0)).toBe(true);
    // a lower bound only: the throttle sleeps at least bytes / rate
    const bytes = results.reduce((n, r) => n + r.bytes, 0);
    expect(seconds).toBeGreaterThanOrEqual(bytes / (32 * 1048576) - 0.05);
    expect(await readFile(file, 'utf8')).toBe(`${keysBefore}${other}\n`);
    expect(await keyDirsOnSource()).toEqual([]);
    await writeFile(file, keysBefore);
  });

  it('a new leader sweeps what killed copies of any VM left on a host: every vmops-direct line and key directory, nothing else', async () => {
    const file = two.h2.authorizedKeysFile!;
    const line = (tag: string) => `restrict,command="false" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDZQ3Y2m0cQ3Vb9ZQ1m2x6n8p9s0t1u2v3w4x5y6z7a8 ${tag}0123456789ab`;
    // two VMs' copies killed mid-way (their next direct copy may never come), beside an administrator's own key
    const admin = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDZQ3Y2m0cQ3Vb9ZQ1m2x6n8p9s0t1u2v3w4x5y6z7a8 admin@bastion';
    await writeFile(file, `${keysBefore}${line(directTag(ENV, 'vm-a'))}\n${admin}\n${line(directTag('env-other', 'vm-b'))}\n`);
    for (const d of [`/tmp/vmops-direct+${ENV}+vm-a+x1`, '/tmp/vmops-direct+env-other+vm-b+x2']) await two.c1.execOk(['sh', '-c', 'umask 077; mkdir "$1" && echo stale > "$1/key"', 'stale', d]);
    await Promise.all([sweepDirect(two.c1), sweepDirect(two.c2)]);
    expect(await readFile(file, 'utf8')).toBe(`${keysBefore}${admin}\n`);
    expect((await two.c1.execOk(['sh', '-c', 'ls -d /tmp/vmops-direct+* 2>/dev/null; true'])).toString().trim()).toBe('');
    await writeFile(file, keysBefore);
  });
});
