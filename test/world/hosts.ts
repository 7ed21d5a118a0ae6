/**
 * Test world: N "hypervisor hosts", each a real OpenSSH sshd listening on its own loopback
 * address (127.0.0.N), with its own host key and VM directory under baseDir.
 * Everything runs as the current (root) user on this machine; the hosts differ only by address,
 * port, host key and vmDir, which is exactly what the operator sees of a host.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, writeFile, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import type { HostSpec } from '../../src/api/inventory.js';

const execFileP = promisify(execFile);

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
async function waitForSsh(address: string, port: number, child: ChildProcess, logFile: string, timeoutMs = 10_000): Promise<void> {
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
      hostDirs[name] = sshDir;

      const hostKeyPath = path.join(sshDir, 'ssh_host_ed25519_key');
      await keygen(hostKeyPath, `${name}-hostkey`);
      const [keyType, keyBlob] = (await readFile(`${hostKeyPath}.pub`, 'utf8')).trim().split(/\s+/);
      const authorizedKeys = path.join(sshDir, 'authorized_keys');
      await writeFile(authorizedKeys, `${identity.publicKey}\n`, { mode: 0o600 });

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
          'PermitRootLogin prohibit-password',
          'PasswordAuthentication no',
          'KbdInteractiveAuthentication no',
          'StrictModes no',
          'AllowStreamLocalForwarding yes',
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
        user: 'root',
        hostKey: `${keyType} ${keyBlob}`,
        vmDir,
      });
    }
  } catch (err) {
    await stop();
    throw err;
  }

  return { hosts, identity, hostDirs, stop };
}
