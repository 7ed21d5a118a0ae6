/**
 * A moved VM is the same VM: its CPU model and its NICs (host bridge, MAC, model) are part of its
 * inventory definition, replayed as validated argv tokens wherever it runs; a target that cannot run
 * it as defined is refused before anything is touched.
 */
import { describe, expect, it } from 'vitest';
import { parseInventory } from '../../src/api/inventoryFile.js';
import { settingsFrom } from '../../src/api/types.js';
import { buildQemuArgv } from '../../src/hosts/qemuArgv.js';
import type { HostReadiness } from '../../src/hosts/hypervisor.js';
import { moveVm, MoveError, qemuVersionOlder } from '../../src/migrate/vmMove.js';
import { Store } from '../../src/store/store.js';
import { context } from './moveDoubles.js';

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro';
const inv = (vm: Record<string, unknown>, more: Record<string, unknown>[] = []) => ({
  hosts: [{ name: 'h1', address: '10.0.0.1', hostKey: KEY, vmDir: '/var/lib/vms' }],
  environments: [{ name: 'env', kubeconfigSecret: { namespace: 'ns', name: 's' }, vms: [{ name: 'vm1', role: 'worker', host: 'h1', files: [{ name: 'disk0.qcow2', format: 'qcow2' }], ...vm }, ...more] }],
});
const defined = { cpu: { model: 'Skylake-Client,-hle,+pcid' }, nics: [{ bridge: 'br-students', mac: '52:54:00:12:34:56', model: 'virtio-net-pci' }, { bridge: 'br-storage', mac: '52:54:00:12:34:57' }] };

describe('the VM definition in the inventory', () => {
  it('parses the CPU model and the NICs (model virtio-net-pci by default) and keeps them through the store', async () => {
    const i = parseInventory(inv(defined));
    const vm = i.environments[0]!.vms[0]!;
    expect(vm.cpu).toEqual({ model: 'Skylake-Client,-hle,+pcid' });
    expect(vm.nics).toEqual([{ bridge: 'br-students', mac: '52:54:00:12:34:56', model: 'virtio-net-pci' }, { bridge: 'br-storage', mac: '52:54:00:12:34:57', model: 'virtio-net-pci' }]);
    const store = await Store.open(':memory:');
    await store.loadInventory(i);
    expect((await store.environment('env'))!.vms[0]).toMatchObject({ cpu: vm.cpu, nics: vm.nics });
    await store.close();
  });

  it('refuses what would reach QEMU unvalidated, naming the field', () => {
    expect(() => parseInventory(inv({ nics: [{ bridge: 'br0;reboot', mac: '52:54:00:12:34:56' }] }))).toThrow(/nics\[0\]\.bridge "br0;reboot" is not a network interface name/);
    expect(() => parseInventory(inv({ nics: [{ bridge: 'br0', mac: '53:54:00:12:34:56' }] }))).toThrow(/nics\[0\]\.mac "53:54:00:12:34:56" is not a unicast MAC/);
    expect(() => parseInventory(inv({ nics: [{ bridge: 'br0', mac: '52:54:00:12:34:56', model: 'vhost-user' }] }))).toThrow(/nics\[0\]\.model must be one of/);
    expect(() => parseInventory(inv({ cpu: { model: 'host,+vmx;reboot' } }))).toThrow(/cpu\.model "host,\+vmx;reboot" is not a QEMU CPU model/);
    expect(() => parseInventory(inv({ cpu: { model: 'host -device e1000' } }))).toThrow(/is not a QEMU CPU model/);
    // one MAC is one identity on the hosts' shared network
    expect(() => parseInventory(inv({ nics: [{ bridge: 'br0', mac: '52:54:00:00:00:01' }] }, [{ name: 'vm2', role: 'worker', host: 'h1', files: [], nics: [{ bridge: 'br0', mac: '52:54:00:00:00:01' }] }]))).toThrow(/both have a NIC with MAC 52:54:00:00:00:01/);
  });

  it('is replayed as argv tokens: -cpu, one bridge netdev and one device with its MAC per NIC, nothing else added', () => {
    const vm = parseInventory(inv(defined)).environments[0]!.vms[0]!;
    const argv = buildQemuArgv('/var/lib/vms/env/vm1', 'env', vm, { qemu: { accel: 'tcg' } });
    expect(argv.slice(argv.indexOf('-cpu'), argv.indexOf('-cpu') + 2)).toEqual(['-cpu', 'Skylake-Client,-hle,+pcid']);
    expect(argv.filter((a, i) => argv[i - 1] === '-netdev' || argv[i - 1] === '-device')).toEqual([
      'bridge,id=nic0,br=br-students', 'virtio-net-pci,netdev=nic0,mac=52:54:00:12:34:56',
      'bridge,id=nic1,br=br-storage', 'virtio-net-pci,netdev=nic1,mac=52:54:00:12:34:57',
    ]);
    expect(argv).toContain('-nodefaults');
  });
});

describe('a target that cannot run the VM as defined is refused before anything is touched', () => {
  const ready = (over: Partial<HostReadiness> = {}): HostReadiness => ({ version: 'QEMU emulator version 7.2.22 (Debian)', machine: 'pc', accel: 'kvm', missing: [], ...over });

  it('a missing bridge: the move ends untouched, the condition names the host and the bridge; the VM still runs on the source', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    target.readiness = async () => ready({ missing: ['no bridge br-students'] });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect((err as MoveError).outcome).toBe('untouched');
    expect((err as Error).message).toMatch(/^host02 cannot run VM controller-1 as it is defined: no bridge br-students\. Nothing was touched; the VM stays on host01/);
    expect(calls).toEqual([]);
    expect(source.state).toBe('running');
  });

  it('live: another machine type or an older QEMU on the target is refused; the same passes', async () => {
    for (const [t, why] of [[ready({ machine: 'q35' }), /machine type q35, the source runs pc/], [ready({ version: 'QEMU emulator version 6.2.0' }), /QEMU 6\.2\.0 is older than the source's 7\.2\.22/]] as const) {
      const { ctx, calls, source, target } = await context('running', 'absent');
      ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
      source.readiness = async () => ready();
      target.readiness = async () => t;
      const err = await moveVm(ctx).catch((e: unknown) => e);
      expect((err as MoveError).outcome).toBe('untouched');
      expect((err as Error).message).toMatch(why);
      expect(calls).toEqual([]);
    }
    const { ctx, source, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    source.readiness = async () => ready();
    target.readiness = async () => ready({ version: 'QEMU emulator version 8.0.0' });
    await moveVm(ctx);
    expect(target.state).toBe('running');
  });

  it('compares QEMU versions numerically', () => {
    expect(qemuVersionOlder('QEMU emulator version 7.2.22', 'QEMU emulator version 7.2.3')).toBeUndefined();
    expect(qemuVersionOlder('QEMU emulator version 7.10.0', 'QEMU emulator version 7.9.9')).toBeUndefined();
    expect(qemuVersionOlder('QEMU emulator version 7.2.3', 'QEMU emulator version 7.2.22')).toEqual({ target: '7.2.3', source: '7.2.22' });
    expect(qemuVersionOlder(undefined, 'QEMU emulator version 7.2.22')).toBeUndefined();
  });
});
