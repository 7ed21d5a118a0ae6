/**
 * A replica that lost the Lease lets go of the QEMUs (issue 20, item 9), on real sshd hosts and QEMU:
 * QEMU serves one client per monitor, so a pre-copy session the old leader kept open made the VM look
 * "other" (QMP unreachable) to the new leader, which then refused to act on it (fencing fails closed).
 * After detach() the new leader's probe answers "running", and nothing was undone: the mirror's target
 * copy is still there for the next leader to find and decide on.
 */
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmDirectory, type VMSpec } from '../../src/api/inventory.js';
import { Hypervisor } from '../../src/hosts/hypervisor.js';
import { HostConnection } from '../../src/hosts/ssh.js';
import { startPrecopy } from '../../src/transfer/mirror.js';
import { liveness } from '../world/budget.js';
import { adoptHostFile, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { createDiskImage } from '../world/images.js';
import { LOOPBACK } from '../world/loopback.js';

const ENV = 'env-handover';
const vm: VMSpec = { name: 'vm1', role: 'worker', nodeName: 'vm1', host: 'host01', memoryMiB: 32, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };

describe('a hand-over lets go of the VM: the next leader can ask QEMU', () => {
  let two: TwoHosts;
  let nextLeader: Hypervisor;
  let conn: HostConnection;

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-handover-', firstAddress: LOOPBACK.handover.first });
    const dir = vmDirectory(two.h1, ENV, vm.name);
    mkdirSync(dir, { recursive: true });
    await createDiskImage(path.join(dir, 'disk0.qcow2'), { sizeMiB: 16, format: 'qcow2', seed: 7, regions: 4 });
    await adoptHostFile(path.join(dir, 'disk0.qcow2'));
    await two.hv1.startVm(ENV, vm);
    // the next leader: its own SSH connection, as another replica has
    conn = await HostConnection.connect(two.h1, two.world.identity);
    nextLeader = new Hypervisor(two.h1, conn);
  }, liveness(120_000));

  afterAll(async () => {
    conn?.close();
    for (const hv of [two?.hv1, two?.hv2]) await hv?.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
    await two?.stop();
  });

  it('while the old leader\'s mirror holds the monitor the VM looks "other"; once it detached, "running", and the target copy is left as it was', async () => {
    const handle = await startPrecopy({ source: two.hv1, target: two.hv2, environment: ENV, vm, prepass: false, readyTimeoutMs: liveness(60_000) });
    await handle.ready;
    // the symptom: the monitor is taken, the probe cannot learn the run state
    expect((await nextLeader.vmStatus(ENV, vm)).state).toBe('other');
    await handle.detach();
    expect(await nextLeader.vmStatus(ENV, vm)).toMatchObject({ state: 'running', qmpStatus: 'running' });
    // nothing undone: the mirror's partial copy on the target stays for the next leader to find
    const left = (await two.c2.execOk(['ls', '-A', vmDirectory(two.h2, ENV, vm.name)])).toString();
    expect(left).toMatch(/disk0\.qcow2/);
  }, liveness(180_000));
});
