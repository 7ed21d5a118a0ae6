/**
 * Inventory rules that keep one VM from being two (or zero): hosts that are the same machine and
 * directory, names that collide with each other or with the operator's own files, paths that are
 * system directories, host keys whose label lies about their blob, and hostile strings.
 */
import { generateKeyPairSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { parseInventory } from '../../src/api/inventoryFile.js';

/** A real OpenSSH ed25519 public key line, built from a generated key (blob = string "ssh-ed25519" + string key). */
function ed25519Line(): string {
  const { publicKey } = generateKeyPairSync('ed25519');
  const raw = publicKey.export({ format: 'der', type: 'spki' }).subarray(-32);
  const str = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, b.length]), b]);
  return `ssh-ed25519 ${Buffer.concat([str(Buffer.from('ssh-ed25519')), str(raw)]).toString('base64')}`;
}
const KEY1 = ed25519Line();
const KEY2 = ed25519Line();

type Doc = {
  hosts: Array<Record<string, unknown>>;
  environments: Array<{ name: string; kubeconfigSecret: Record<string, unknown>; vms: Array<Record<string, unknown> & { files: Array<Record<string, unknown>> }> }>;
};

function good(): Doc {
  return {
    hosts: [
      { name: 'host01', address: '127.0.0.2', port: 2222, hostKey: KEY1, vmDir: '/srv/vms' },
      { name: 'host02', address: '127.0.0.3', port: 2222, hostKey: KEY2, vmDir: '/srv/vms' },
    ],
    environments: [
      {
        name: 'student-1',
        kubeconfigSecret: { namespace: 'ns', name: 'kc' },
        vms: [
          { name: 'node-1', role: 'worker', host: 'host01', nodeName: 'student-1-node-1', files: [{ name: 'disk0.qcow2', format: 'qcow2' }, { name: 'seed.img', kind: 'file' }] },
          { name: 'node-2', role: 'worker', host: 'host01', nodeName: 'student-1-node-2', files: [{ name: 'disk0.qcow2', format: 'qcow2' }] },
        ],
      },
    ],
  };
}

function rejects(mutate: (d: Doc) => void, message: RegExp): void {
  const d = good();
  mutate(d);
  expect(() => parseInventory(d)).toThrow(message);
}

describe('inventory: the good document parses', () => {
  it('accepts two distinct hosts and a well-formed environment', () => {
    expect(parseInventory(good()).hosts).toHaveLength(2);
  });
  it('accepts the same address with a different port when the VM directories do not overlap', () => {
    const d = good();
    d.hosts[1]!.address = '127.0.0.2';
    d.hosts[1]!.port = 2223;
    d.hosts[1]!.vmDir = '/srv/vms2';
    expect(parseInventory(d).hosts).toHaveLength(2);
  });
});

describe('inventory: two hosts that are one machine', () => {
  it('refuses the same address and port', () => {
    rejects((d) => {
      d.hosts[1]!.address = '127.0.0.2';
      d.hosts[1]!.vmDir = '/data/vms';
    }, /hosts\[1\] \(host02\) and hosts\[0\] \(host01\) are the same SSH endpoint 127\.0\.0\.2:2222/);
  });
  it('refuses the same address (any port) with the same or a nested VM directory', () => {
    rejects((d) => {
      d.hosts[1]!.address = '127.0.0.2';
      d.hosts[1]!.port = 22;
    }, /host02.*host01.*VM directories overlap/);
    rejects((d) => {
      d.hosts[1]!.address = '127.0.0.2';
      d.hosts[1]!.port = 22;
      d.hosts[1]!.vmDir = '/srv/vms/inner';
    }, /VM directories overlap/);
  });
  it('treats address case and a trailing slash on vmDir as the same', () => {
    rejects((d) => {
      d.hosts[0]!.address = 'HV1.example.com';
      d.hosts[1]!.address = 'hv1.example.com';
      d.hosts[1]!.port = 22;
      d.hosts[1]!.vmDir = '/srv/vms/';
    }, /VM directories overlap/);
  });
});

describe('inventory: vmDir', () => {
  for (const dir of ['/', '/.', '/etc', '/etc/vms', '/usr', '/proc/1', '/sys', '/dev/shm', '/boot', '/var', '/tmp', '/home', '/root', '/srv/./vms', '/srv/../etc', '/srv//vms']) {
    it(`refuses ${JSON.stringify(dir)}`, () => {
      rejects((d) => {
        d.hosts[0]!.vmDir = dir;
      }, /hosts\[0\]\.vmDir/);
    });
  }
  it('accepts a directory below /var/lib or /tmp', () => {
    const d = good();
    d.hosts[0]!.vmDir = '/var/lib/vms';
    d.hosts[1]!.vmDir = '/tmp/vmop-test/host02/vms';
    expect(parseInventory(d).hosts[0]!.vmDir).toBe('/var/lib/vms');
  });
});

describe('inventory: authorizedKeysFile (transfer mode Direct)', () => {
  it('is optional, and taken as written when it is a safe absolute path', () => {
    const d = good();
    expect(parseInventory(d).hosts[0]?.authorizedKeysFile).toBeUndefined();
    d.hosts[1]!.authorizedKeysFile = '/root/.ssh/authorized_keys';
    expect(parseInventory(d).hosts[1]?.authorizedKeysFile).toBe('/root/.ssh/authorized_keys');
  });
  it('refuses a relative path, a path with "..", and shell syntax', () => {
    for (const bad of ['.ssh/authorized_keys', '/root/../etc/passwd', '/root/.ssh/$(id)']) {
      const d = good();
      d.hosts[0]!.authorizedKeysFile = bad;
      expect(() => parseInventory(d)).toThrow(/hosts\[0\]\.authorizedKeysFile .* is not a valid absolute path/);
    }
  });
});

describe('inventory: host keys', () => {
  it('refuses a label that does not match the blob', () => {
    rejects((d) => {
      d.hosts[0]!.hostKey = KEY1.replace('ssh-ed25519', 'ssh-rsa');
    }, /hosts\[0\]\.hostKey says "ssh-rsa" but its key blob is a "ssh-ed25519" key/);
  });
  it('refuses a blob that is not a key', () => {
    rejects((d) => {
      d.hosts[0]!.hostKey = 'ssh-ed25519 AAAAC3Nza';
    }, /hosts\[0\]\.hostKey.*not a valid/);
    rejects((d) => {
      d.hosts[0]!.hostKey = 'ssh-ed25519 bm90IGEga2V5IGF0IGFsbA==';
    }, /hosts\[0\]\.hostKey.*not a valid/);
  });
  it('refuses garbage', () => {
    rejects((d) => {
      d.hosts[0]!.hostKey = '$(curl evil)';
    }, /hosts\[0\]\.hostKey/);
  });
});

describe('inventory: names', () => {
  it('refuses duplicate nodeNames in one environment', () => {
    rejects((d) => {
      d.environments[0]!.vms[1]!.nodeName = 'student-1-node-1';
    }, /environments\[0\]\.vms\[1\]\.nodeName "student-1-node-1" is already used by vms\[0\] \(node-1\)/);
  });
  for (const nodeName of ['Node_1', 'node 1', 'a;b', '-node', 'x'.repeat(254), 'node\n1']) {
    it(`refuses nodeName ${JSON.stringify(nodeName.slice(0, 20))}`, () => {
      rejects((d) => {
        d.environments[0]!.vms[0]!.nodeName = nodeName;
      }, /vms\[0\]\.nodeName .* is not a valid Kubernetes node name/);
    });
  }
  it('refuses duplicate file names in one VM', () => {
    rejects((d) => {
      d.environments[0]!.vms[0]!.files[1]!.name = 'disk0.qcow2';
    }, /vms\[0\]\.files\[1\]\.name "disk0.qcow2" appears twice/);
  });
  for (const name of ['qemu.pid', 'qmp.sock', 'serial.log', 'nbd.sock', 'migrate.sock', 'disk0.qcow2.partial', 'disk0.qcow2.nbd.sock', 'disk0.qcow2.nbd.pid', 'mig-1234.sock', 'source.lock']) {
    it(`refuses file name ${name}, which the operator itself creates in a VM directory`, () => {
      rejects((d) => {
        d.environments[0]!.vms[0]!.files[1]!.name = name;
      }, /vms\[0\]\.files\[1\]\.name .* is reserved for the operator's own files/);
    });
  }
  it('refuses two VMs whose QEMU -name collide', () => {
    rejects((d) => {
      d.environments[0]!.name = 'a.b';
      d.environments[0]!.vms[0]!.name = 'c';
      d.environments.push({ name: 'a', kubeconfigSecret: { namespace: 'ns', name: 'kc2' }, vms: [{ name: 'b.c', role: 'worker', host: 'host01', files: [{ name: 'disk0.qcow2', format: 'qcow2' }] }] });
    }, /environments\[1\]\.vms\[0\] \(a\/b\.c\) and environments\[0\]\.vms\[0\] \(a\.b\/c\) would both run as QEMU "a\.b\.c"/);
  });
  const hostile = ['a;reboot', '$(reboot)', '`reboot`', '../x', 'a b', 'a\nb', 'x'.repeat(300), '..', 'a..b'];
  for (const h of hostile) {
    it(`refuses the hostile name ${JSON.stringify(h.slice(0, 24))} everywhere a name goes`, () => {
      rejects((d) => {
        d.environments[0]!.name = h;
      }, /environments\[0\]\.name/);
      rejects((d) => {
        d.environments[0]!.vms[0]!.name = h;
      }, /vms\[0\]\.name/);
      rejects((d) => {
        d.environments[0]!.vms[0]!.files[0]!.name = h;
      }, /files\[0\]\.name/);
      rejects((d) => {
        d.hosts[0]!.name = h;
      }, /hosts\[0\]\.name/);
      rejects((d) => {
        d.hosts[0]!.user = h;
      }, /hosts\[0\]\.user/);
      rejects((d) => {
        d.hosts[0]!.address = h;
      }, /hosts\[0\]\.address/);
      rejects((d) => {
        d.environments[0]!.kubeconfigSecret.name = h;
      }, /kubeconfigSecret\.name/);
      rejects((d) => {
        d.environments[0]!.kubeconfigSecret.namespace = h;
      }, /kubeconfigSecret\.namespace/);
    });
  }
  it('refuses an address that looks like an ssh option', () => {
    rejects((d) => {
      d.hosts[0]!.address = '-oProxyCommand=id';
    }, /hosts\[0\]\.address/);
  });
  it('does not echo a 300-character value in full', () => {
    const d = good();
    d.environments[0]!.name = 'x'.repeat(300);
    let msg = '';
    try {
      parseInventory(d);
    } catch (err) {
      msg = (err as Error).message;
    }
    expect(msg).toMatch(/environments\[0\]\.name/);
    expect(msg.length).toBeLessThan(250);
  });
});
