/**
 * A VM the cloud started with its own tooling is judged by its own command line before anything is
 * touched: moved when it is the VM its inventory entry describes, refused (naming what differs) when
 * its QEMU gives the guest something the entry does not, and waited for while its monitor does not
 * answer (src/hosts/qemuArgv.ts definitionDrift, src/migrate/vmMove.ts sourceAsDefined).
 */
import { describe, expect, it } from 'vitest';
import type { VMSpec } from '../../src/api/inventory.js';
import { buildQemuArgv, definitionDrift } from '../../src/hosts/qemuArgv.js';
import { moveVm } from '../../src/migrate/vmMove.js';
import { context } from './moveDoubles.js';

const DIR = '/var/lib/vms/env/vm1';
const vm: VMSpec = {
  name: 'vm1', role: 'worker', nodeName: 'vm1', host: 'h1', memoryMiB: 64, cpus: 2,
  files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }],
  cpu: { model: 'qemu64' },
  nics: [{ bridge: 'br0', mac: '52:54:00:00:00:01', model: 'virtio-net-pci' }],
};
const defined = buildQemuArgv(DIR, 'env', vm, { qemu: { accel: 'tcg' } });

describe('definitionDrift: what the guest of a running QEMU sees, against the inventory definition', () => {
  it("the operator's own command line, and one written by hand for the same VM (other order, units, monitor, no pidfile), are the same VM", () => {
    expect(definitionDrift(defined, defined)).toEqual({ extra: [], missing: [] });
    const byHand = [
      '/usr/bin/qemu-system-x86_64', '-nodefaults', '-name', 'guest=env.vm1', '-M', 'pc', '-enable-kvm', '-smp', 'cpus=2,sockets=1', '-m', 'size=64M',
      '-cpu', 'qemu64', '-drive', `file=${DIR}/disk0.qcow2,format=qcow2,if=virtio`, '-netdev', 'bridge,id=n0,br=br0',
      '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01', '-qmp', `unix:${DIR}/qmp.sock,server,nowait`, '-vnc', ':3', '-daemonize',
    ];
    expect(definitionDrift(byHand, defined)).toEqual({ extra: [], missing: [] });
  });

  it('names what the running QEMU gives its guest beyond the definition, and what it lacks', () => {
    const running = [...defined.filter((a) => a !== '-nodefaults' && a !== 'qemu64' && a !== '-cpu'), '-device', 'virtio-rng-pci', '-cdrom', '/srv/seed.iso'];
    expect(definitionDrift(running, defined)).toEqual({
      extra: ["QEMU's default devices (no -nodefaults: a NIC, a VGA card, a CD-ROM, a floppy)", 'device virtio-rng-pci', '-cdrom /srv/seed.iso'],
      missing: ['CPU model qemu64'],
    });
  });

  it('a NIC with another MAC or on another bridge is another identity', () => {
    const running = defined.map((a) => a.replace('mac=52:54:00:00:00:01', 'mac=52:54:00:00:00:99').replace('br=br0', 'br=br1'));
    expect(definitionDrift(running, defined)).toEqual({
      extra: ['network backend bridge on bridge br1', 'device virtio-net-pci with MAC 52:54:00:00:00:99'],
      missing: ['network backend bridge on bridge br0', 'device virtio-net-pci with MAC 52:54:00:00:00:01'],
    });
  });
});

describe('a move judges the running source before anything is touched', () => {
  it('a source QEMU with devices the inventory does not describe: refused, untouched, the devices named', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    source.definitionDrift = async () => ({ extra: ['device virtio-rng-pci'], missing: [] });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'precheck', outcome: 'untouched', message: expect.stringContaining('it runs with device virtio-rng-pci, which the inventory does not describe') });
    expect(calls).toEqual([]);
    expect(source.state).toBe('running');
  });

  it('a source QEMU whose monitor does not answer: waiting (a condition names it), untouched', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    const status = source.vmStatus;
    source.vmStatus = async (e, v) => ({ ...(await status(e, v)), state: 'other', qmpStatus: undefined, pid: 4242 });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'precheck', outcome: 'waiting', verdict: { reason: 'WaitingForVMMonitor', message: expect.stringContaining('(pid 4242) runs but does not answer on its monitor') } });
    expect(calls).toEqual([]);
  });

  it('a source that is the VM its entry describes moves', async () => {
    const { ctx, source } = await context('running', 'absent');
    source.definitionDrift = async () => ({ extra: [], missing: [] });
    await expect(moveVm(ctx)).resolves.toMatchObject({ mode: 'cold' });
  });
});
