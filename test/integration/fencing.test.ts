/**
 * Fencing fails closed, on a real sshd host with real QEMU: a VM counts as stopped only when no
 * QEMU process for it exists in /proc (by -name or by a path in its VM directory) AND its QMP socket
 * does not answer. The pidfile is a hint at most: deleted or corrupted, the VM is still found.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { qemuName, vmDirectory, type HostSpec, type VMSpec } from '../../src/api/inventory.js';
import type { Hypervisor } from '../../src/hosts/hypervisor.js';
import { buildQemuArgv } from '../../src/hosts/qemuArgv.js';
import { liveness } from '../world/budget.js';
import { adoptHostFile, HOST_USER, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { createDiskImage } from '../world/images.js';
import { LOOPBACK } from '../world/loopback.js';

const ENV = 'env-fence';
const execFileP = promisify(execFile);

function vmSpec(name: string): VMSpec {
  return { name, role: 'worker', nodeName: name, host: 'host01', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
}

/** query-status over a local QMP socket; '' when nothing answers (yet). */
function qmpStatus(sock: string): Promise<string> {
  return new Promise((resolve) => {
    let buf = '';
    let sent = 0;
    const c = net.connect(sock);
    const done = (v: string) => {
      c.destroy();
      resolve(v);
    };
    c.setTimeout(2000, () => done(''));
    c.on('error', () => done(''));
    c.on('data', (d) => {
      buf += d.toString('utf8');
      if (sent === 0 && buf.includes('"QMP"')) {
        sent = 1;
        c.write('{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n');
      }
      if (buf.includes('"status"')) done(buf);
    });
  });
}

describe('fencing on a real host', () => {
  let two: TwoHosts;
  let h1: HostSpec;
  let hv: Hypervisor;
  const used: VMSpec[] = [];
  const extra: ChildProcess[] = [];
  const servers: net.Server[] = [];

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-fence-', firstAddress: LOOPBACK.fencing.first });
    ({ h1, hv1: hv } = two);
  });

  afterEach(async () => {
    for (const s of servers.splice(0)) s.close();
    for (const c of extra.splice(0)) c.kill('SIGKILL');
    for (const vm of used.splice(0)) {
      // the pidfile may be gone: kill by the identity the probe uses
      await execFileP('pkill', ['-KILL', '-f', `^qemu-system[^ ]* .*-name ${qemuName(ENV, vm.name)},`]).catch(() => undefined);
    }
  });

  afterAll(async () => {
    await two?.stop();
  });

  async function runningVm(name: string): Promise<{ vm: VMSpec; dir: string; pid: number }> {
    const vm = vmSpec(name);
    used.push(vm);
    const dir = vmDirectory(h1, ENV, vm.name);
    await mkdir(dir, { recursive: true });
    await createDiskImage(path.join(dir, 'disk0.qcow2'), { sizeMiB: 16, format: 'qcow2', seed: 7, regions: 2 });
    await adoptHostFile(path.join(dir, 'disk0.qcow2'));
    const st = await hv.startVm(ENV, vm);
    expect(st.state).toBe('running');
    return { vm, dir, pid: st.pid! };
  }

  it('finds a running VM whose pidfile was deleted, and refuses to start it twice or delete its disks', async () => {
    const { vm, dir, pid } = await runningVm('no-pidfile');
    await rm(path.join(dir, 'qemu.pid'));
    const st = await hv.vmStatus(ENV, vm);
    expect(st).toMatchObject({ state: 'running', pid });
    await expect(hv.startVm(ENV, vm)).rejects.toThrow(/already has a live QEMU/);
    await expect(hv.removeVmDir(ENV, vm)).rejects.toThrow(/is alive/);
    // and it can still be stopped (by QMP), after which it is proven gone
    expect(await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 0 })).toBe('quit');
    expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');
  });

  it('finds a running VM whose pidfile holds garbage or another process', async () => {
    const { vm, dir, pid } = await runningVm('bad-pidfile');
    for (const content of ['garbage\n', '1\n', `${process.pid}\n`, '']) {
      await writeFile(path.join(dir, 'qemu.pid'), content);
      expect(await hv.vmStatus(ENV, vm)).toMatchObject({ state: 'running', pid });
    }
    await expect(hv.startVm(ENV, vm)).rejects.toThrow(/already has a live QEMU/);
  });

  it('finds a running VM whose QMP socket was removed: alive, never "stopped"', async () => {
    const { vm, dir, pid } = await runningVm('no-qmp');
    await rm(path.join(dir, 'qmp.sock'));
    await rm(path.join(dir, 'qemu.pid'));
    const st = await hv.vmStatus(ENV, vm);
    expect(st.state).toBe('other');
    expect(st.pid).toBe(pid);
    await expect(hv.removeVmDir(ENV, vm)).rejects.toThrow(/is alive/);
  });

  it('fails closed when the QMP socket answers but no QEMU process is visible', async () => {
    const vm = vmSpec('ghost');
    const dir = vmDirectory(h1, ENV, vm.name);
    await mkdir(dir, { recursive: true });
    await adoptHostFile(dir);
    // something (a QEMU in another PID namespace, say) listens on the VM's QMP socket
    // the host's probe may hang up before the greeting is written: that EPIPE is the probe's business,
    // not an uncaught error of the test process (it failed stop 16's CI with every test passing)
    const srv = net.createServer((s) => s.on('error', () => undefined).end('{"QMP": {}}\n'));
    servers.push(srv);
    await new Promise<void>((r) => srv.listen(path.join(dir, 'qmp.sock'), r));
    await adoptHostFile(path.join(dir, 'qmp.sock'));
    await expect(hv.vmStatus(ENV, vm)).rejects.toThrow(/cannot prove .* stopped.*QMP socket answers/);
    await expect(hv.startVm(ENV, vm)).rejects.toThrow(/cannot prove/);
    await expect(hv.removeVmDir(ENV, vm)).rejects.toThrow(/cannot prove/);
    srv.close();
    servers.length = 0;
    // a stale socket file nobody listens on is not a live VM
    await writeFile(path.join(dir, 'qmp.sock'), '');
    expect((await hv.vmStatus(ENV, vm)).state).toBe('stopped');
  });

  it('fails closed when two QEMU processes claim the VM', async () => {
    const { vm, dir } = await runningVm('twice');
    // a second QEMU with the same -name, started by hand from another directory (the runbook's mistake)
    const otherDir = path.join(path.dirname(dir), 'twice-copy');
    await mkdir(otherDir, { recursive: true });
    await adoptHostFile(otherDir);
    // with the host's accelerator: the default (KVM) fails on a machine without it, but only after QEMU
    // created its QMP socket, so the probe raced the second QEMU's exit (a fresh-clone CI run lost)
    const argv = buildQemuArgv(otherDir, ENV, vm, { qemu: h1.qemu }).filter((a) => a !== '-daemonize');
    const drive = argv.findIndex((a) => a === '-drive');
    argv.splice(drive, 2);
    const child = spawn('runuser', ['-u', HOST_USER, '--', ...argv], { stdio: 'ignore' });
    extra.push(child);
    await expect.poll(() => existsSync(path.join(otherDir, 'qmp.sock')), { timeout: liveness(10_000) }).toBe(true);
    // QEMU creates its sockets before it initializes the accelerator: only an answer proves it is up
    await expect.poll(() => qmpStatus(path.join(otherDir, 'qmp.sock')), { timeout: liveness(10_000) }).toMatch(/"status": ?"(running|prelaunch)"/);
    await expect(hv.vmStatus(ENV, vm)).rejects.toThrow(/cannot prove .*2 QEMU processes/);
    await expect(hv.startVm(ENV, vm)).rejects.toThrow(/cannot prove/);
  });

  it('reports absent only when neither the directory nor a process exists', async () => {
    const { vm, dir, pid } = await runningVm('dir-gone');
    // the directory vanished under a running QEMU (an rm -rf by hand): the VM is alive, not absent
    await rm(dir, { recursive: true, force: true });
    expect(await hv.vmStatus(ENV, vm)).toMatchObject({ pid });
    expect((await hv.vmStatus(ENV, vm)).state).not.toMatch(/absent|stopped/);
  });
});
