/**
 * Test world: N "hypervisor hosts", each a real OpenSSH sshd listening on its own loopback
 * address (127.0.0.N), with its own host key and VM directory under baseDir.
 * The operator logs in as a dedicated unprivileged user (HOST_USER, login shell /bin/sh: no
 * ~/.bashrc, so an exec costs a few ms instead of ~400 ms), which owns every vmDir; QEMU runs as
 * that user with TCG. The hosts differ only by address, port, host key and vmDir, which is exactly
 * what the operator sees of a host. sshd itself runs as root (it must switch users).
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { chmod, chown, copyFile, mkdir, mkdtemp, readFile, stat, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import type { HostQemu, HostSpec } from '../../src/api/inventory.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { liveness } from './budget.js';

const execFileP = promisify(execFile);

/** The host-side account of every test host. */
export const HOST_USER = 'vmhost';

export interface HostUser {
  name: string;
  uid: number;
  gid: number;
}

let hostUserP: Promise<HostUser> | undefined;

/**
 * Runs a shadow-utils command (usermod, groupadd) that another test process may be running at the
 * same moment: the lanes of scripts/test.sh set up their host user side by side, and the loser of the
 * race on /etc/passwd.lock fails at once with "cannot lock" instead of waiting for it.
 */
async function underAccountLock<T>(run: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run();
    } catch (err) {
      const stderr = (err as { stderr?: string }).stderr ?? '';
      if (attempt >= 50 || !/cannot lock/i.test(stderr)) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** Creates HOST_USER once (system user, shell /bin/sh, home dir) and makes it able to log in by key. */
export function ensureHostUser(): Promise<HostUser> {
  hostUserP ??= (async () => {
    const id = async (flag: string): Promise<number> => Number((await execFileP('id', [flag, HOST_USER])).stdout.trim());
    try {
      await id('-u');
    } catch {
      await execFileP('useradd', ['--system', '--shell', '/bin/sh', '--create-home', HOST_USER]).catch(async (err: unknown) => {
        // a concurrent test process may have created it in between
        await id('-u').catch(() => {
          throw err;
        });
      });
    }
    // useradd leaves the password "!" (locked): without PAM, sshd then refuses even key logins. "*" = no password, not locked.
    const password = (await execFileP('getent', ['shadow', HOST_USER])).stdout.split(':')[1];
    if (password !== '*') await underAccountLock(() => execFileP('usermod', ['-p', '*', HOST_USER]));
    return { name: HOST_USER, uid: await id('-u'), gid: await id('-g') };
  })();
  return hostUserP;
}

let accelP: Promise<'kvm' | 'tcg'> | undefined;

/**
 * The accelerator the test hosts use: KVM when HOST_USER can open /dev/kvm (access is granted here:
 * group kvm, /dev/kvm 0660 root:kvm, HOST_USER in kvm — new SSH logins pick the group up) AND the
 * test guest really boots under it (an openable /dev/kvm is not enough: nested under some
 * hypervisors SeaBIOS runs but a Linux kernel hangs); TCG otherwise or when VMOPS_ACCEL=tcg.
 * The boot probe's result is cached per machine, guest build and kernel. Logged once per process.
 */
export function testAccel(): Promise<'kvm' | 'tcg'> {
  accelP ??= (async () => {
    const forced = process.env.VMOPS_ACCEL;
    if (forced !== undefined && forced !== 'kvm' && forced !== 'tcg') throw new Error(`VMOPS_ACCEL must be kvm or tcg, not ${JSON.stringify(forced)}`);
    let accel: 'kvm' | 'tcg' = 'tcg';
    let why = 'VMOPS_ACCEL=tcg';
    if (forced !== 'tcg') {
      const user = await ensureHostUser();
      try {
        await stat('/dev/kvm');
        if (!(await execFileP('getent', ['group', 'kvm']).then(() => true, () => false))) await underAccountLock(() => execFileP('groupadd', ['--system', '-f', 'kvm']));
        await execFileP('chgrp', ['kvm', '/dev/kvm']);
        await chmod('/dev/kvm', 0o660);
        const groups = (await execFileP('id', ['-nG', user.name])).stdout.trim().split(/\s+/);
        if (!groups.includes('kvm')) await underAccountLock(() => execFileP('usermod', ['-a', '-G', 'kvm', user.name]));
        // can the host user open it read-write (as QEMU will)?
        await execFileP('runuser', ['-u', user.name, '--', 'sh', '-c', 'exec 3<>/dev/kvm']);
        await kvmBootProbe(user.name);
        accel = 'kvm';
        why = '/dev/kvm usable by the host user and the test guest boots under it';
      } catch (err) {
        if (forced === 'kvm') throw new Error(`VMOPS_ACCEL=kvm but KVM is not usable: ${(err as Error).message}`);
        why = `KVM not usable: ${(err as Error).message.split('\n')[0]}`;
      }
    }
    process.stderr.write(`[test world] QEMU accelerator: ${accel} (${why})\n`);
    return accel;
  })();
  return accelP;
}

/** Boots the test guest under KVM as `user` and waits for guestd's first line; throws if it does not come. */
async function kvmBootProbe(user: string): Promise<void> {
  const { guestImageDir } = await import('./guestImage.js');
  const dir = await guestImageDir();
  const kernel = (await execFileP('uname', ['-r'])).stdout.trim();
  // per machine boot, not per test run: scripts/test.sh gives each tier its own TMPDIR
  const cache = path.join('/tmp', `vmops-kvm-probe-${path.basename(dir)}-${kernel.replace(/[^A-Za-z0-9._-]/g, '_')}`);
  const cached = await readFile(cache, 'utf8').catch(() => '');
  if (cached === 'ok') return;
  if (cached.startsWith('fail')) throw new Error(cached.slice(5));
  const timeoutMs = 20_000;
  // the cache lives in root's home: give the host user its own copy
  const probeDir = await mkdtemp(path.join(tmpdir(), 'vmops-kvmprobe-run-'));
  await chmod(probeDir, 0o755);
  for (const f of ['vmlinuz', 'initrd.img']) await copyFile(path.join(dir, f), path.join(probeDir, f));
  const ok = await new Promise<boolean>((resolve) => {
    // own process group (killed as a whole below); `timeout` bounds QEMU even if that kill missed it
    const child = spawn('runuser', ['-u', user, '--', 'timeout', '-s', 'KILL', String(timeoutMs / 1000 + 5), 'qemu-system-x86_64', '-machine', 'pc,accel=kvm', '-m', '96', '-nodefaults', '-display', 'none', '-no-reboot',
      '-serial', 'stdio', '-kernel', path.join(probeDir, 'vmlinuz'), '-initrd', path.join(probeDir, 'initrd.img'), '-append', 'console=ttyS0 quiet vmops.rate=0'], { stdio: ['ignore', 'pipe', 'ignore'], detached: true });
    let out = '';
    const done = (v: boolean): void => {
      clearTimeout(timer);
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
      resolve(v);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString('latin1');
      if (out.includes('GUESTD start')) done(true);
    });
    child.once('exit', () => done(out.includes('GUESTD start')));
  });
  await rm(probeDir, { recursive: true, force: true });
  const verdict = ok ? 'ok' : `fail the test guest did not boot under KVM within ${timeoutMs / 1000} s (nested virtualization without working KVM?)`;
  await writeFile(cache, verdict);
  if (!ok) throw new Error(verdict.slice(5));
}

/** QEMU settings of every test host (HostSpec.qemu). */
export async function testHostQemu(): Promise<HostQemu> {
  return { binary: 'qemu-system-x86_64', machine: 'pc', accel: await testAccel() };
}

/** sshd reads authorized_keys as the user, and the user must reach its vmDir: every ancestor needs o+x. */
async function makeTraversable(dir: string): Promise<void> {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    const st = await stat(d);
    if ((st.mode & 0o001) === 0) await chmod(d, (st.mode & 0o7777) | 0o011);
    if (d === path.dirname(d)) return;
  }
}

/**
 * Files the test process (root) creates inside a host's vmDir must belong to the host user, as if
 * the host had created them: chowns `file` and its root-owned ancestor directories up to the first
 * directory owned by the host user. Outside a vmDir (no such ancestor) nothing changes.
 */
export async function adoptHostFile(file: string): Promise<void> {
  const user = await ensureHostUser();
  const chain: string[] = [path.resolve(file)];
  for (let d = path.dirname(chain[0] as string); d !== path.dirname(d); d = path.dirname(d)) {
    const st = await stat(d);
    if (st.uid === user.uid) {
      for (const p of chain) await chown(p, user.uid, user.gid);
      return;
    }
    if (st.uid !== 0) return;
    chain.push(d);
  }
}

export interface OperatorIdentity {
  privateKey: string;
  publicKey: string;
  privateKeyPath: string;
}

export interface TestHosts {
  hosts: HostSpec[];
  identity: OperatorIdentity;
  /** per host: directory holding its sshd config, keys and log (for debugging failed tests) */
  hostDirs: Record<string, string>;
  stop(): Promise<void>;
}

async function keygen(file: string, comment: string): Promise<void> {
  await rm(file, { force: true });
  await rm(`${file}.pub`, { force: true });
  await execFileP('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', file]);
}

/** The kernel picks a free port; a tiny race until sshd binds it is acceptable in tests. */
async function freePort(address: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, address, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Waits for the SSH banner, not just an open port, so the first real connect does not race sshd start-up. */
async function waitForSsh(address: string, port: number, child: ChildProcess, logFile: string, timeoutMs = liveness(10_000)): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      const log = await readFile(logFile, 'utf8').catch(() => '');
      throw new Error(`sshd on ${address}:${port} exited with ${child.exitCode}: ${log}`);
    }
    const ok = await new Promise<boolean>((resolve) => {
      const sock = net.connect({ host: address, port });
      const done = (v: boolean): void => {
        sock.destroy();
        resolve(v);
      };
      sock.once('data', (d) => done(d.toString('latin1').startsWith('SSH-')));
      sock.once('error', () => done(false));
      sock.setTimeout(1000, () => done(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`sshd on ${address}:${port} did not come up within ${timeoutMs} ms`);
}

export async function startHosts(opts: { count: number; baseDir: string; firstAddress?: number }): Promise<TestHosts> {
  const first = opts.firstAddress ?? 2;
  if (first + opts.count > 255) throw new Error('too many hosts for 127.0.0.0/24');
  const baseDir = path.resolve(opts.baseDir);
  await mkdir(baseDir, { recursive: true });
  const user = await ensureHostUser();
  const qemu = await testHostQemu();
  await makeTraversable(baseDir);
  // sshd refuses to start without its privilege-separation directory.
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });

  const privateKeyPath = path.join(baseDir, 'operator_ed25519');
  await keygen(privateKeyPath, 'vm-migration-operator-test');
  const identity: OperatorIdentity = {
    privateKey: await readFile(privateKeyPath, 'utf8'),
    publicKey: (await readFile(`${privateKeyPath}.pub`, 'utf8')).trim(),
    privateKeyPath,
  };

  const children: ChildProcess[] = [];
  const hosts: HostSpec[] = [];
  const hostDirs: Record<string, string> = {};

  const stop = async (): Promise<void> => {
    await Promise.all(
      children.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            c.once('exit', () => resolve());
            c.kill('SIGTERM');
            setTimeout(() => {
              c.kill('SIGKILL');
            }, 3000).unref();
          }),
      ),
    );
  };

  try {
    for (let i = 0; i < opts.count; i++) {
      const name = `host${String(i + 1).padStart(2, '0')}`;
      const address = `127.0.0.${first + i}`;
      const dir = path.join(baseDir, name);
      const sshDir = path.join(dir, 'sshd');
      const vmDir = path.join(dir, 'vms');
      await mkdir(sshDir, { recursive: true });
      await mkdir(vmDir, { recursive: true });
      await chown(vmDir, user.uid, user.gid);
      await chmod(dir, 0o755);
      await chmod(sshDir, 0o755);
      hostDirs[name] = sshDir;

      const hostKeyPath = path.join(sshDir, 'ssh_host_ed25519_key');
      await keygen(hostKeyPath, `${name}-hostkey`);
      const [keyType, keyBlob] = (await readFile(`${hostKeyPath}.pub`, 'utf8')).trim().split(/\s+/);
      // in a directory of the host user's own, as ~/.ssh is: transfer mode Direct rewrites the file (rename into place)
      const keysDir = path.join(dir, 'user-ssh');
      await mkdir(keysDir, { mode: 0o700 });
      await chown(keysDir, user.uid, user.gid);
      const authorizedKeys = path.join(keysDir, 'authorized_keys');
      await writeFile(authorizedKeys, `${identity.publicKey}\n`, { mode: 0o600 });
      await chown(authorizedKeys, user.uid, user.gid);

      const port = await freePort(address);
      const cfg = path.join(sshDir, 'sshd_config');
      const logFile = path.join(sshDir, 'sshd.log');
      await writeFile(
        cfg,
        [
          `ListenAddress ${address}:${port}`,
          `HostKey ${hostKeyPath}`,
          `AuthorizedKeysFile ${authorizedKeys}`,
          `PidFile ${path.join(sshDir, 'sshd.pid')}`,
          'UsePAM no',
          `AllowUsers ${user.name}`,
          'PermitRootLogin no',
          'PasswordAuthentication no',
          'KbdInteractiveAuthentication no',
          'StrictModes no',
          'AllowStreamLocalForwarding yes',
          // as on a stock Debian host (scp uses SFTP since OpenSSH 9.0; the benchmark's manual runbook needs it)
          'Subsystem sftp internal-sftp',
          // The operator multiplexes many exec channels over one connection (polls, relays, QMP).
          'MaxSessions 64',
          'MaxStartups 64:30:128',
          'LogLevel ERROR',
          '',
        ].join('\n'),
      );

      const child = spawn('/usr/sbin/sshd', ['-D', '-f', cfg, '-E', logFile], { stdio: 'ignore' });
      children.push(child);
      await waitForSsh(address, port, child, logFile);

      hosts.push({
        name,
        address,
        port,
        user: user.name,
        hostKey: `${keyType} ${keyBlob}`,
        vmDir,
        qemu,
        authorizedKeysFile: authorizedKeys,
      });
    }
  } catch (err) {
    await stop();
    throw err;
  }

  return { hosts, identity, hostDirs, stop };
}

/** Two started test hosts with one open connection and Hypervisor each: the common integration-test setup. */
export interface TwoHosts {
  world: TestHosts;
  baseDir: string;
  h1: HostSpec;
  h2: HostSpec;
  c1: HostConnection;
  c2: HostConnection;
  hv1: Hypervisor;
  hv2: Hypervisor;
  stop(): Promise<void>;
}

export async function startTwoHosts(opts: { tmpPrefix: string; firstAddress: number }): Promise<TwoHosts> {
  const baseDir = await mkdtemp(path.join(tmpdir(), opts.tmpPrefix));
  const world = await startHosts({ count: 2, baseDir, firstAddress: opts.firstAddress });
  const [h1, h2] = world.hosts as [HostSpec, HostSpec];
  const [c1, c2] = await Promise.all([HostConnection.connect(h1, world.identity), HostConnection.connect(h2, world.identity)]);
  return {
    world, baseDir, h1, h2, c1, c2, hv1: new Hypervisor(h1, c1), hv2: new Hypervisor(h2, c2),
    stop: async () => {
      c1.close();
      c2.close();
      await world.stop();
      await rm(baseDir, { recursive: true, force: true });
    },
  };
}

/**
 * What a host must allow for QEMU (run as the host user) to put a VM's NIC on a bridge, as a cloud's
 * hosts would: the bridge (up; with `hostAddress` ADDR/PREFIX the host itself is on that network),
 * the bridge helper's ACL (/etc/qemu/bridge.conf), /dev/net/tun usable, the setuid helper. The two
 * test hosts share this machine's network namespace, so one bridge is "the bridge on each host".
 */
export function allowVmBridge(bridge: string, hostAddress?: string): void {
  const sh = (cmd: string) => execFileSync('sh', ['-c', cmd]);
  sh(`ip link show ${bridge} >/dev/null 2>&1 || ip link add ${bridge} type bridge; ip link set ${bridge} up`);
  if (hostAddress) sh(`ip addr replace ${hostAddress} dev ${bridge}`);
  mkdirSync('/etc/qemu', { recursive: true });
  let acl = '';
  try {
    acl = readFileSync('/etc/qemu/bridge.conf', 'utf8');
  } catch {
    // no ACL yet
  }
  if (!acl.split('\n').includes(`allow ${bridge}`)) writeFileSync('/etc/qemu/bridge.conf', `${acl}${acl && !acl.endsWith('\n') ? '\n' : ''}allow ${bridge}\n`);
  execFileSync('chmod', ['0666', '/dev/net/tun']);
  execFileSync('chmod', ['u+s', '/usr/lib/qemu/qemu-bridge-helper']);
}
