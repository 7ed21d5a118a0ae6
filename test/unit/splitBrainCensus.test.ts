/**
 * The split-brain census of the e2e tests counts one environment's VMs only. The two VM lanes of
 * scripts/test.sh run side by side on one machine: a live migration in one lane legitimately has two
 * QEMUs (the source and the paused incoming one), and a machine-wide census in the other lane
 * reported that as its own VM "live on two hosts" (a fresh-clone CI run: the finalizer e2e failed on
 * `student-f.node-1`, the fault matrix's VM, while it moved `student-fin`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { qemuCensus } from '../world/vmm.js';

const children: ChildProcess[] = [];

/** A process whose argv looks like a QEMU of `name` started with a pidfile under `hostDir` (a perl that sleeps; argv[0] set by bash's exec -a). */
async function fakeQemu(name: string, hostDir: string): Promise<void> {
  const argv = ['-name', `${name},process=${name}`, '-pidfile', `${hostDir}/qemu.pid`];
  const child = spawn('bash', ['-c', 'exec -a qemu-system-x86_64 perl -e "sleep 60" -- "$@"', 'bash', ...argv], { stdio: 'ignore' });
  children.push(child);
  // The census reads /proc: wait until the exec happened.
  for (let i = 0; i < 100; i++) {
    if ((await qemuCensus(name.split('.')[0]!)).has(name)) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`fake QEMU ${name} never showed up in /proc`);
}

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

describe('qemuCensus', () => {
  it('counts the hosts a VM runs on, by pidfile directory', async () => {
    await fakeQemu('census-a.node-1', '/tmp/census-host01/census-a/node-1');
    await fakeQemu('census-a.node-1', '/tmp/census-host02/census-a/node-1');
    expect((await qemuCensus('census-a')).get('census-a.node-1')).toBe(2);
  });

  it("does not count another environment's VMs, even one whose name starts with this one's", async () => {
    await fakeQemu('census-b.node-1', '/tmp/census-host01/census-b/node-1');
    await fakeQemu('census-b.node-1', '/tmp/census-host02/census-b/node-1');
    await fakeQemu('census-bb.node-1', '/tmp/census-host01/census-bb/node-1');
    const mine = await qemuCensus('census-bb');
    expect(mine.get('census-b.node-1'), 'the other environment (mid live migration) is not this one').toBeUndefined();
    expect(mine.get('census-bb.node-1')).toBe(1);
  });
});
