import { execFileSync } from 'node:child_process';
import { statfsSync } from 'node:fs';
import { mkdir, open, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnvironmentSpec } from '../../src/api/inventory.js';
import { settingsFrom } from '../../src/api/types.js';
import { readCapacity, vmAllocatedBytes } from '../../src/hosts/capacity.js';
import { planMigration } from '../../src/planner/plan.js';
import { vmFits } from '../../src/planner/placement.js';
import { adoptHostFile, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { LOOPBACK } from '../world/loopback.js';

const MiB = 1048576;

/** a file with `dense` MiB of random data at its start and a hole up to `size` MiB */
async function sparseFile(file: string, dense: number, size: number): Promise<void> {
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `count=${dense}`, 'status=none']);
  const fh = await open(file, 'r+');
  await fh.truncate(size * MiB);
  await fh.close();
  await adoptHostFile(file);
}

const env = (name: string, host: string): EnvironmentSpec => ({
  name,
  kubeconfigSecret: { namespace: 'ns', name: 'kc', key: 'kubeconfig' },
  vms: ['vm1', 'vm2'].map((n) => ({ name: n, role: 'worker' as const, nodeName: `${name}-${n}`, host, memoryMiB: 32, cpus: 1, files: [] })),
});

describe('host capacity read over real sshd', () => {
  let two: TwoHosts;

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-capacity-', firstAddress: LOOPBACK.fleetCapacity.first });
    for (const vm of ['vm1', 'vm2']) {
      const dir = path.join(two.h1.vmDir, 'env-a', vm);
      await mkdir(dir, { recursive: true });
      await adoptHostFile(dir);
      // 8 MiB allocated of a 1 GiB raw disk: only the allocated part counts
      await sparseFile(path.join(dir, 'disk0.img'), 8, 1024);
    }
    // not an environment name: ignored
    await mkdir(path.join(two.h1.vmDir, 'Not An Env'), { recursive: true });
  });

  afterAll(async () => {
    await two?.stop();
  });

  it('reads memory, CPUs, free disk of the VM directory and allocated bytes per environment', async () => {
    const c = await readCapacity(two.c1, two.h1);
    // The test hosts are this machine: compare with what the kernel tells this process.
    const meminfo = await readFile('/proc/meminfo', 'utf8');
    const total = Number(/^MemTotal:\s+(\d+)/m.exec(meminfo)![1]) * 1024;
    expect(c.memTotalBytes).toBe(total);
    expect(c.memAvailableBytes).toBeGreaterThan(0);
    expect(c.memAvailableBytes).toBeLessThanOrEqual(total);
    expect(c.cpus).toBe(Number(execFileSync('nproc').toString()));
    const fs = statfsSync(two.h1.vmDir);
    expect(Math.abs(c.diskFreeBytes - fs.bavail * fs.bsize)).toBeLessThan(256 * MiB);
    expect(Object.keys(c.environmentBytes)).toEqual(['env-a']);
    // 2 × 8 MiB of data plus a few directory/indirect blocks, never the 2 GiB apparent size
    expect(c.environmentBytes['env-a']).toBeGreaterThanOrEqual(16 * MiB);
    expect(c.environmentBytes['env-a']).toBeLessThan(17 * MiB);
    const vm1 = await vmAllocatedBytes(two.c1, two.h1, 'env-a', 'vm1');
    expect(vm1).toBeGreaterThanOrEqual(8 * MiB);
    expect(vm1).toBeLessThan(8.5 * MiB);
  });

  it('measures the filesystem a VM directory will be created on when it does not exist yet', async () => {
    const fresh = { ...two.h2, vmDir: `${two.h2.vmDir}/not/yet` };
    const c = await readCapacity(two.c2, fresh);
    expect(c.diskFreeBytes).toBeGreaterThan(0);
    expect(c.environmentBytes).toEqual({});
  });

  it('refuses a target without enough free disk, with the measured numbers, and plans nothing', async () => {
    const capacity = new Map([[two.h1.name, await readCapacity(two.c1, two.h1)], [two.h2.name, await readCapacity(two.c2, two.h2)]]);
    const free = capacity.get('host02')!.diskFreeBytes;
    // a reserve leaving 10 to 11 MiB usable on host02 (whole MiB of reserve; 10.96 MiB prints as 11.0):
    // env-a's 16 MiB of allocated data do not fit
    const reserveMiB = Math.floor(free / MiB) - 10;
    const r = planMigration([two.h1, two.h2], [env('env-a', 'host01')], settingsFrom({ sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 100, diskReserveMiB: reserveMiB, memoryReserveMiB: 0 } }), capacity);
    expect(r.entries).toEqual([]);
    expect(r.problems).toHaveLength(1);
    expect(r.problems[0]).toMatch(/^no host can take environment env-a \(needs 64\.0 MiB memory, 2 vCPUs, 16\.\d MiB disk\): host02: disk: (10\.\d|11\.0) MiB free in the VM directory \(after a \d+\.\d GiB reserve\), 16\.\d MiB needed$/);
    // with room, the same measured inventory is planned, the reason carrying the numbers
    const ok = planMigration([two.h1, two.h2], [env('env-a', 'host01')], settingsFrom({ sourceHost: 'host01', placement: { maxEnvironmentsPercentPerHost: 100, memoryReserveMiB: 0 } }), capacity);
    expect(ok.problems).toEqual([]);
    expect(ok.environments[0]!.reason).toMatch(/memory free after; .* GiB disk free after; 2\/\d+ vCPUs$/);
    // the per-VM check uses the same reading; 5 MiB more reserve leaves 5 to 6 MiB (5.96 prints as 6.0)
    const vm1 = await vmAllocatedBytes(two.c1, two.h1, 'env-a', 'vm1');
    const check = vmFits({ vm: 'env-a/vm1', target: 'host02', allocatedBytes: vm1, memoryBytes: 32 * MiB, capacity: capacity.get('host02')!, placement: { ...settingsFrom({ sourceHost: 'host01' }).placement, diskReserveBytes: (reserveMiB + 5) * MiB } });
    expect(check.ok).toBe(false);
    expect(!check.ok && check.message).toMatch(/^host02 has no room for env-a\/vm1: disk: (5\.\d|6\.0) MiB free in the VM directory \(after a [\d.]+ GiB reserve\), 8\.\d MiB needed$/);
  });
});
