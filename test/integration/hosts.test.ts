import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import net, { type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { HostSpec, VMSpec } from '../../src/api/inventory.js';
import { vmDirectory } from '../../src/api/inventory.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { QmpClient, type QmpEvent } from '../../src/hosts/qmp.js';
import { HostConnection, HostKeyMismatchError } from '../../src/hosts/ssh.js';
import { HOST_USER, startHosts, type TestHosts } from '../world/hosts.js';
import { createDiskImage } from '../world/images.js';
import { LOOPBACK } from '../world/loopback.js';

const ENV = 'env-hosts';

function vmSpec(name: string, host: string): VMSpec {
  return {
    name,
    role: 'worker',
    nodeName: name,
    host,
    memoryMiB: 64,
    cpus: 1,
    files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }],
  };
}

describe('hosts over real sshd + QEMU', () => {
  let world: TestHosts;
  let baseDir: string;
  let h1: HostSpec;
  let h2: HostSpec;
  let conn: HostConnection;
  let hv: Hypervisor;

  beforeAll(async () => {
    baseDir = await mkdtemp(path.join(tmpdir(), 'vmop-hosts-'));
    world = await startHosts({ count: 2, baseDir, firstAddress: LOOPBACK.hosts.first });
    [h1, h2] = world.hosts as [HostSpec, HostSpec];
    conn = await HostConnection.connect(h1, world.identity);
    hv = new Hypervisor(h1, conn);
  });

  afterAll(async () => {
    // Never leave a QEMU behind, even when a test failed half-way.
    for (const name of ['vm1']) {
      await hv?.stopVm(ENV, vmSpec(name, 'host01'), { powerdownTimeoutMs: 0 }).catch(() => undefined);
    }
    conn?.close();
    await world?.stop();
    await rm(baseDir, { recursive: true, force: true });
  });

  it('connects with the pinned host key and runs commands', async () => {
    expect(conn.isAlive).toBe(true);
    const r = await conn.exec(['id', '-un']);
    expect(r.code).toBe(0);
    // an unprivileged host user whose login shell reads no rc files
    expect(r.stdout.toString().trim()).toBe(HOST_USER);
    expect((await conn.execOk(['id', '-u'])).toString().trim()).not.toBe('0');
    const n = 10;
    const t0 = Date.now();
    for (let i = 0; i < n; i++) await conn.execOk(['true']);
    const perExec = (Date.now() - t0) / n;
    console.log(`exec latency: ${perExec.toFixed(1)} ms per exec`);
    // root's ~/.bashrc (pyenv init) used to cost ~400 ms per exec. The cause is asserted, not the time
    // (the machine's): the host user's login shell is /bin/sh, which runs a command without rc files.
    const passwd = (await conn.execOk(['getent', 'passwd', HOST_USER])).toString().trim().split(':');
    expect(passwd[6]).toBe('/bin/sh');
    const c2 = await HostConnection.connect(h2, world.identity);
    expect((await c2.execOk(['hostname'])).length).toBeGreaterThan(0);
    c2.close();
  });

  it('refuses a host that presents another host key, without retrying', async () => {
    // the connection attempts are counted on their way to host01's sshd (a forwarder on another port)
    let attempts = 0;
    const forwarder = net.createServer((c) => {
      attempts++;
      const up = net.connect(h1.port, h1.address);
      c.on('error', () => up.destroy());
      up.on('error', () => c.destroy());
      c.pipe(up).pipe(c);
    });
    await new Promise<void>((r) => forwarder.listen(0, h1.address, r));
    try {
      const wrong: HostSpec = { ...h1, port: (forwarder.address() as AddressInfo).port, hostKey: h2.hostKey };
      const err = await HostConnection.connect(wrong, world.identity, { retries: 5 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(HostKeyMismatchError);
      expect((err as Error).message).toContain('host01');
      // five retries were allowed; a host key mismatch is not worth one: a single attempt reached sshd
      expect(attempts).toBe(1);
    } finally {
      forwarder.close();
    }
  });

  it('refuses an unknown operator key', async () => {
    const { execFileSync } = await import('node:child_process');
    const other = path.join(baseDir, 'other_key');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', other]);
    const { readFileSync } = await import('node:fs');
    await expect(HostConnection.connect(h1, { privateKey: readFileSync(other, 'utf8') }, { retries: 3 })).rejects.toThrow(/authentication/i);
  });

  it('passes arguments literally: no shell interpretation', async () => {
    const marker = path.join(baseDir, 'pwned');
    const nasty = [
      `a b  c`,
      `it's "quoted"`,
      `$(touch ${marker})`,
      `\`touch ${marker}\``,
      `; touch ${marker} #`,
      `| & > < * ? ~ \\ $HOME \${PATH}`,
      `line1\nline2`,
      `''`,
      ``,
    ];
    const r = await conn.exec(['printf', '%s\\0', ...nasty]);
    expect(r.code).toBe(0);
    const got = r.stdout.toString('utf8').split('\0').slice(0, -1);
    expect(got).toEqual(nasty);
    expect(existsSync(marker)).toBe(false);
    await expect(conn.exec(['echo', 'a\0b'])).rejects.toThrow(/NUL/);
  });

  it('feeds stdin, reports exit codes and stderr, and times out', async () => {
    const r = await conn.exec(['sha256sum'], { stdin: 'hello\n' });
    expect(r.stdout.toString()).toMatch(/^5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03/);
    const f = await conn.exec(['sh', '-c', 'echo boom >&2; exit 7']);
    expect(f.code).toBe(7);
    expect(f.stderr).toBe('boom\n');
    await expect(conn.execOk(['false'])).rejects.toThrow(/exited with 1/);
    await expect(conn.exec(['sleep', '30'], { timeoutMs: 300 })).rejects.toThrow(/timed out/);
    expect(conn.isAlive).toBe(true);
  });

  it('streams with spawn and backpressure', async () => {
    const p = await conn.spawn(['wc', '-c']);
    const chunks: Buffer[] = [];
    p.stdout.on('data', (d: Buffer) => chunks.push(d));
    const block = Buffer.alloc(1024 * 1024, 7);
    for (let i = 0; i < 16; i++) {
      if (!p.stdin.write(block)) await new Promise((r) => p.stdin.once('drain', r));
    }
    p.stdin.end();
    expect(await p.exit).toBe(0);
    expect(Buffer.concat(chunks).toString().trim()).toBe(String(16 * 1024 * 1024));
  });

  it('reports a missing unix socket as an error', async () => {
    await expect(conn.openUnixSocket(path.join(h1.vmDir, 'nope.sock'))).rejects.toThrow(/nope\.sock/);
  });

  it('runs the VM lifecycle: absent, stopped, running (QMP over SSH), paused, stop with fencing', async () => {
    const vm = vmSpec('vm1', 'host01');
    expect((await hv.vmStatus(ENV, vm)).state).toBe('absent');

    const dir = vmDirectory(h1, ENV, vm.name);
    await mkdir(dir, { recursive: true });
    await createDiskImage(path.join(dir, 'disk0.qcow2'), { sizeMiB: 32, format: 'qcow2', seed: 1 });
    expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');

    let t0 = Date.now();
    const started = await hv.startVm(ENV, vm);
    const startMs = Date.now() - t0;
    expect(started.state).toBe('running');
    expect(started.pid).toBeGreaterThan(0);
    const pid = started.pid as number;
    expect(existsSync(`/proc/${pid}`)).toBe(true);

    const st = await hv.vmStatus(ENV, vm);
    expect(st).toEqual({ state: 'running', qmpStatus: 'running', pid });

    await expect(hv.startVm(ENV, vm)).rejects.toThrow(/already has a live QEMU/);
    await expect(hv.removeVmDir(ENV, vm)).rejects.toThrow(/alive/);

    // QMP events and pause through a direct client over the SSH-forwarded socket.
    const qmp = await QmpClient.open(await conn.openUnixSocket(path.join(dir, 'qmp.sock')));
    const stopEv = qmp.waitForEvent('STOP', 5000);
    await qmp.execute('stop');
    expect((await stopEv).event).toBe('STOP');
    await expect(qmp.execute('no-such-command')).rejects.toThrow(/CommandNotFound/);
    const events: QmpEvent[] = [];
    qmp.on('event', (e: QmpEvent) => events.push(e));
    qmp.close();
    expect(await hv.vmStatus(ENV, vm)).toEqual({ state: 'paused', qmpStatus: 'paused', pid });

    const files = await hv.listVmFiles(ENV, vm);
    expect(files.map((f) => f.name)).toEqual(expect.arrayContaining(['disk0.qcow2', 'qemu.pid', 'serial.log']));

    t0 = Date.now();
    // No guest OS answers ACPI, so this must escalate to quit.
    const how = await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 1000 });
    const stopMs = Date.now() - t0;
    expect(['quit', 'powerdown']).toContain(how);
    expect(how).toBe('quit');
    const gone = !existsSync(`/proc/${pid}`) || /\) [ZX] /.test((await import('node:fs')).readFileSync(`/proc/${pid}/stat`, 'utf8'));
    expect(gone).toBe(true);
    expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');
    expect(await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 1000 })).toBe('already-stopped');

    console.log(`timings: VM start ${startMs} ms, stop (powerdown 1s then quit) ${stopMs} ms`);

    // Restart works after a stop (stale qmp.sock and pidfile do not confuse anything).
    const again = await hv.startVm(ENV, vm);
    expect(again.state).toBe('running');
    expect(await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 0 })).toBe('quit');

    await hv.removeVmDir(ENV, vm);
    expect((await hv.vmStatus(ENV, vm)).state).toBe('absent');
  });

  it('does not mistake an unrelated process with a recycled pid for the VM', async () => {
    const vm = vmSpec('vm2', 'host01');
    const dir = vmDirectory(h1, ENV, vm.name);
    await hv.ensureDir(dir);
    // pid 1 is alive but is not our QEMU
    await conn.execOk(['sh', '-c', 'echo 1 > "$1"', 'sh', `${dir}/qemu.pid`]);
    expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');
    expect(await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 0 })).toBe('already-stopped');
    await hv.removeVmDir(ENV, vm);
  });

  it('file helpers validate paths and work', async () => {
    const d = `${h1.vmDir}/scratch/x`;
    await hv.ensureDir(d);
    expect(await hv.exists(d)).toBe(true);
    await conn.execOk(['sh', '-c', 'printf abc > "$1"', 'sh', `${d}/a`]);
    expect(await hv.exists(`${d}/a`)).toBe(true);
    await hv.removeFile(`${d}/a`);
    expect(await hv.exists(`${d}/a`)).toBe(false);
    await expect(hv.exists('relative/path')).rejects.toThrow(/not a valid absolute path/);
    await expect(hv.removeFile('/tmp/x; rm -rf /')).rejects.toThrow(/not a valid absolute path/);
    await expect(hv.ensureDir(`${d}/../../etc`)).rejects.toThrow(/not a valid absolute path/);
    await expect(hv.vmStatus('Bad Env', vmSpec('x', 'host01'))).rejects.toThrow(/not a valid name/);
  });

  it('a start that QEMU refuses after creating its monitor (kernel missing) has settled when startVm throws: the next probe sees the VM stopped, never a QMP socket without a process', async () => {
    const vm: VMSpec = { ...vmSpec('nokernel', 'host01'), boot: { kernel: 'vmlinuz' }, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }, { name: 'vmlinuz', kind: 'file' }] };
    const dir = vmDirectory(h1, ENV, vm.name);
    await hv.ensureDir(dir);
    await conn.execOk(['qemu-img', 'create', '-q', '-f', 'qcow2', `${dir}/disk0.qcow2`, '16M']);
    // QEMU opens the kernel at machine init, after its QMP socket listens, and its exit can outlast
    // its -daemonize parent's: a local loop (no SSH in between) found the socket still answering after
    // the parent returned in 5 of 40 tries; through SSH the window is rarely hit (0 of 80 here), but it
    // was once, in realGuest's corrupted-copy test ("QMP socket answers but no QEMU process")
    for (let i = 0; i < 8; i++) {
      await expect(hv.startVm(ENV, vm)).rejects.toThrow(/could not open kernel file/);
      expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');
    }
  });
});
