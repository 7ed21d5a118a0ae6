import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { VMSpec } from '../../src/api/inventory.js';
import { parseInventory } from '../../src/api/inventoryFile.js';
import { buildQemuArgv, diskFormat, liveMigrationMismatch, QEMU_DEFAULTS } from '../../src/hosts/qemuArgv.js';

const DIR = '/var/lib/vms/env/vm1';
const guest = (over: Partial<VMSpec> = {}): VMSpec => ({
  name: 'vm1', role: 'worker', nodeName: 'vm1', host: 'h1', memoryMiB: 96, cpus: 1,
  files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }, { name: 'vmlinuz', kind: 'file' }, { name: 'initrd.img', kind: 'file' }],
  boot: { kernel: 'vmlinuz', initrd: 'initrd.img', append: 'console=ttyS0 quiet vmops.rate=50' },
  ...over,
});

const host = (qemu?: unknown): unknown => ({ name: 'h1', address: '10.0.0.1', hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro', vmDir: '/var/lib/vms', ...(qemu === undefined ? {} : { qemu }) });
const inv = (h: unknown, vm: unknown): unknown => ({ hosts: [h], environments: [{ name: 'env', kubeconfigSecret: { namespace: 'ns', name: 's' }, vms: [vm] }] });

describe('QEMU argv from the inventory', () => {
  it('defaults to KVM, machine pc, qemu-system-x86_64 (a real host)', () => {
    const argv = buildQemuArgv(DIR, 'env', guest());
    expect(QEMU_DEFAULTS).toEqual({ binary: 'qemu-system-x86_64', machine: 'pc', accel: 'kvm' });
    expect(argv[0]).toBe('qemu-system-x86_64');
    expect(argv.slice(argv.indexOf('-machine'), argv.indexOf('-machine') + 2)).toEqual(['-machine', 'pc,accel=kvm']);
  });

  it("takes binary, machine and accelerator from the host's qemu settings", () => {
    const argv = buildQemuArgv(DIR, 'env', guest(), { qemu: { binary: '/opt/qemu/bin/qemu-system-x86_64', machine: 'pc-i440fx-7.2', accel: 'tcg' } });
    expect(argv[0]).toBe('/opt/qemu/bin/qemu-system-x86_64');
    expect(argv).toContain('pc-i440fx-7.2,accel=tcg');
  });

  it('boots the kernel and initrd from the VM directory with the command line as one argument, and adds the heartbeat port', () => {
    const argv = buildQemuArgv(DIR, 'env', guest());
    expect(argv).toEqual(expect.arrayContaining(['-kernel', `${DIR}/vmlinuz`, '-initrd', `${DIR}/initrd.img`, '-append', 'console=ttyS0 quiet vmops.rate=50']));
    expect(argv).toEqual(expect.arrayContaining(['-serial', `file:${DIR}/serial.log`, '-serial', `unix:${DIR}/heartbeat.sock,server=on,wait=off`]));
    // no boot section: no kernel arguments
    expect(buildQemuArgv(DIR, 'env', guest({ boot: undefined }))).not.toContain('-kernel');
  });

  it('refuses a kernel that is not a VM file, and command lines outside the safe character set', () => {
    expect(() => buildQemuArgv(DIR, 'env', guest({ boot: { kernel: 'kernel.img' } }))).toThrow(/must be one of the VM's files/);
    for (const append of ["console=ttyS0 'x'", 'a;reboot', 'a  b', 'x=$(id)']) {
      expect(() => buildQemuArgv(DIR, 'env', guest({ boot: { kernel: 'vmlinuz', append } })), append).toThrow(/append/);
    }
    expect(() => buildQemuArgv(DIR, 'env', guest(), { qemu: { binary: 'sh -c x' } })).toThrow(/binary/);
    expect(() => buildQemuArgv(DIR, 'env', guest(), { qemu: { machine: 'pc,accel=kvm' } })).toThrow(/machine/);
    expect(() => buildQemuArgv(DIR, 'env', guest(), { qemu: { accel: 'hvf' as 'kvm' } })).toThrow(/accel/);
  });

  it('live migration needs the same machine type and accelerator on both ends', () => {
    expect(liveMigrationMismatch({ accel: 'kvm' }, undefined)).toBeUndefined();
    expect(liveMigrationMismatch({ accel: 'tcg' }, { accel: 'kvm' })).toMatch(/accelerator differs \(tcg vs kvm\)/);
    expect(liveMigrationMismatch({ machine: 'q35' }, {})).toMatch(/machine type differs/);
  });
});

describe('inventory file: hosts[].qemu and vms[].boot', () => {
  const vm = { name: 'vm1', role: 'worker', host: 'h1', files: [{ name: 'disk0.qcow2', format: 'qcow2' }, { name: 'vmlinuz', kind: 'file' }], boot: { kernel: 'vmlinuz', append: 'console=ttyS0' } };

  it('parses and keeps them', () => {
    const i = parseInventory(inv(host({ machine: 'q35', accel: 'tcg' }), vm));
    expect(i.hosts[0]?.qemu).toEqual({ machine: 'q35', accel: 'tcg' });
    expect(i.environments[0]?.vms[0]?.boot).toEqual({ kernel: 'vmlinuz', append: 'console=ttyS0' });
    expect(parseInventory(inv(host(), { ...vm, boot: undefined })).hosts[0]?.qemu).toBeUndefined();
  });

  it('rejects bad values with the entry and field named', () => {
    expect(() => parseInventory(inv(host({ accel: 'xen' }), vm))).toThrow(/hosts\[0\]\.qemu\.accel must be kvm or tcg/);
    expect(() => parseInventory(inv(host({ binary: '../qemu-system-x86_64' }), vm))).toThrow(/hosts\[0\]\.qemu\.binary/);
    expect(() => parseInventory(inv(host(), { ...vm, boot: { kernel: 'disk0.qcow2' } }))).toThrow(/vms\[0\]\.boot\.kernel "disk0.qcow2" must be one of the VM's files \(kind file\)/);
    expect(() => parseInventory(inv(host(), { ...vm, boot: { kernel: 'vmlinuz', append: 'init=/bin/sh;x' } }))).toThrow(/vms\[0\]\.boot\.append/);
  });
});

describe('a disk format is stated, never probed (a guest writes its disk\'s first bytes)', () => {
  it('the inventory refuses a disk without a format, and a format on a non-disk file', () => {
    const vm = { name: 'vm1', role: 'worker', host: 'h1', files: [{ name: 'disk0.img' }] };
    expect(() => parseInventory(inv(host(), vm))).toThrow(/vms\[0\]\.files\[0\]\.format is required for a disk \(qcow2 or raw\)/);
    expect(() => parseInventory(inv(host(), { ...vm, files: [{ name: 'seed.iso', kind: 'file', format: 'raw' }] }))).toThrow(/files\[0\]\.format is for disks only/);
  });

  it('QEMU is never started on a disk whose format nobody stated', () => {
    expect(() => buildQemuArgv(DIR, 'env', guest({ files: [{ name: 'disk0.img', kind: 'disk' }], boot: undefined }))).toThrow(/disk0.img has no format/);
    expect(buildQemuArgv(DIR, 'env', guest({ files: [{ name: 'disk0.img', kind: 'disk', format: 'raw' }], boot: undefined }))).toContain(`file=${DIR}/disk0.img,format=raw,if=virtio`);
  });

  it('real qemu-img: a raw disk whose guest wrote a qcow2 header naming a host file is opened as that qcow2 when probed, and as plain bytes when stated raw', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmops-format-'));
    try {
      const other = join(dir, 'another-tenant.img');
      writeFileSync(other, 'not yours');
      // what a guest can write into the first sector of its raw disk: a qcow2 header whose backing file is a host path
      const disk = join(dir, 'disk0.img');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', other, '-F', 'raw', disk, '1M']);
      const probed = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', disk]).toString()) as { format: string; 'backing-filename'?: string };
      expect(probed).toMatchObject({ format: 'qcow2', 'backing-filename': other });
      const stated = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-f', diskFormat({ name: 'disk0.img', kind: 'disk', format: 'raw' }), disk]).toString()) as { format: string; 'backing-filename'?: string };
      expect(stated.format).toBe('raw');
      expect(stated['backing-filename']).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
