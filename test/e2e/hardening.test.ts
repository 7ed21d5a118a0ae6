/**
 * Hostile or broken inputs that only the operator can see, end to end on real parts (control
 * plane, sshd hosts, QEMU VMs, the operator as its own process): a kubeconfig Secret that is not
 * YAML (and holds a token), one with an exec credential plugin, and a host whose SSH key does not
 * match the inventory. Each ends Failed with a condition naming the culprit, touches nothing, and
 * no secret material appears in status, Events or the operator's output.
 */
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import { join } from 'node:path';
import { CoreV1Api, CustomObjectsApi } from '@kubernetes/client-node';
import { expectSandboxUntouched } from '../world/vmm.js';
import { guestContentSha256 } from '../../src/hosts/qemuIncoming.js';
import { sha256File } from '../world/images.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../../src/api/types.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox, type OperatorProcess, type Sandbox } from '../world/sandbox.js';
import { LOOPBACK } from '../world/loopback.js';
import { liveness } from '../world/budget.js';
import { until } from '../world/until.js';

const DIR = join(REPO_ROOT, '.sandbox', 'hardening');
const TOKEN = 'tok-9f8e7d6c5b4a39281706f5e4d3c2b1a0-secret';
const KEY_MARK = 'MHcCAQEEIHARDENINGPRIVATEKEYMATERIALxyz';
const PWNED = join(DIR, 'exec-plugin-ran');

let sb: Sandbox;
let operator: OperatorProcess;
const operatorLog = join(DIR, 'operator-hardening.log');

beforeAll(async () => {
  // refusals before anything is touched: one VM shows it as well as seven
  // the PDB allows every eviction: the Direct move at the end drains the only node
  sb = await startSandbox({ dir: DIR, environment: 'student-h', vms: ['node-1'], firstAddress: LOOPBACK.hardening.first, diskMiB: 16, workloadReplicas: 2, workloadMinAvailable: 0, log: (l) => console.log(`[sandbox] ${l}`) });
  operator = await sb.startOperator({ logFile: operatorLog });
}, 900_000);

afterAll(async () => {
  await operator?.stop();
  await sb?.stop();
});

async function getVmm(name: string): Promise<VMMigration> {
  const api = sb.kc.makeApiClient(CustomObjectsApi);
  return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
}

/** Liveness budgets of this file's waits (nominal ms, scaled by liveness()): a test's timeout is their sum. */
const W = {
  /** a VMMigration to Failed or Succeeded */
  finished: 120_000,
  /** the bounded steps around it: kubectl, an operator (re)start, hashing the VM's files */
  steps: 60_000,
};

async function waitFinished(name: string): Promise<VMMigration> {
  let last: VMMigration | undefined;
  try {
    return await until(`${name} Failed or Succeeded`, W.finished, async () => {
      last = await getVmm(name).catch(() => last);
      return last?.status?.phase === 'Failed' || last?.status?.phase === 'Succeeded' ? last : undefined;
    }, 300);
  } catch (err) {
    throw new Error(`${(err as Error).message} (status: ${JSON.stringify(last?.status)})`);
  }
}

async function migrate(name: string, extra: Record<string, unknown> = {}): Promise<VMMigration> {
  const doc = { apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE }, spec: { environments: [sb.environment.name], targetHost: 'host02', shutdown: { powerdownTimeout: '1s' }, ...extra } };
  const path = join(DIR, `${name}.json`);
  writeFileSync(path, JSON.stringify(doc));
  await sb.kubectl(['apply', '-f', path]);
  return waitFinished(name);
}

async function setKubeconfigSecret(content: string): Promise<void> {
  const core = sb.kc.makeApiClient(CoreV1Api);
  const { name } = sb.environment.kubeconfigSecret;
  await core.replaceNamespacedSecret({ name, namespace: SECRET_NAMESPACE, body: { metadata: { name }, type: 'Opaque', stringData: { kubeconfig: content } } });
}

const expectUntouched = () => expectSandboxUntouched(sb);

/** Everything a user or a log collector could see: the resource, every Event in the namespace, the operator's output. */
async function everythingVisible(name: string): Promise<string> {
  const events = (await sb.kubectl(['get', 'events', '-n', SECRET_NAMESPACE, '-o', 'json'])).stdout;
  return [JSON.stringify(await getVmm(name)), events, readFileSync(operatorLog, 'utf8')].join('\n');
}

function readyMessage(o: VMMigration): string {
  return o.status?.conditions?.find((c) => c.type === 'Ready')?.message ?? '';
}

describe('kubeconfig Secrets are data, never code, and never echoed', () => {
  const good = () => sb.controlPlane.kubeconfigYaml;
  afterAll(async () => {
    await setKubeconfigSecret(good());
  });

  it('a Secret that is not YAML fails the migration naming the Secret, and its token and key appear nowhere', async () => {
    // a realistic paste error: wrong indentation around the credentials
    const broken = `apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n    token: ${TOKEN}\n   client-key-data: ${KEY_MARK}\n  oops: [\n`;
    await setKubeconfigSecret(broken);
    const o = await migrate('leaky-secret');
    expect(o.status?.phase).toBe('Failed');
    const msg = readyMessage(o);
    expect(msg).toContain(`Secret ${SECRET_NAMESPACE}/${sb.environment.kubeconfigSecret.name}`);
    expect(msg).toContain('not valid YAML');
    await expectUntouched();
    const visible = await everythingVisible('leaky-secret');
    expect(visible).toContain('leaky-secret');
    for (const secret of [TOKEN, TOKEN.slice(0, 16), KEY_MARK, KEY_MARK.slice(0, 16)]) expect(visible).not.toContain(secret);
  }, liveness(W.finished + W.steps));

  it('an exec credential plugin is refused, naming the Secret, and never runs', async () => {
    rmSync(PWNED, { force: true });
    const kc = parse(good()) as { users: Array<{ name: string; user: Record<string, unknown> }> };
    kc.users[0]!.user = { exec: { apiVersion: 'client.authentication.k8s.io/v1', command: 'sh', args: ['-c', `touch ${PWNED}; echo '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"x"}}'`] } };
    await setKubeconfigSecret(stringify(kc));
    const o = await migrate('exec-secret');
    expect(o.status?.phase).toBe('Failed');
    const msg = readyMessage(o);
    expect(msg).toContain(`Secret ${SECRET_NAMESPACE}/${sb.environment.kubeconfigSecret.name}`);
    expect(msg).toMatch(/exec credential plugins are refused/);
    expect(existsSync(PWNED)).toBe(false);
    await expectUntouched();
  }, liveness(W.finished + W.steps));
});

describe('an SSH host whose key does not match the inventory', () => {
  let original: string;
  beforeAll(() => {
    original = readFileSync(sb.inventoryPath, 'utf8');
  });
  afterAll(async () => {
    writeFileSync(sb.inventoryPath, original);
    await operator.stop();
    operator = await sb.startOperator({ logFile: operatorLog });
  });

  it('is refused: the migration fails with a condition naming the host, nothing touched', async () => {
    const inv = parse(original) as { hosts: Array<{ name: string; hostKey: string }> };
    const { publicKey } = generateKeyPairSync('ed25519');
    const raw = publicKey.export({ format: 'der', type: 'spki' }).subarray(-32);
    const str = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, b.length]), b]);
    inv.hosts.find((h) => h.name === 'host02')!.hostKey = `ssh-ed25519 ${Buffer.concat([str(Buffer.from('ssh-ed25519')), str(raw)]).toString('base64')}`;
    writeFileSync(sb.inventoryPath, stringify(inv));
    await operator.stop();
    operator = await sb.startOperator({ logFile: operatorLog });
    const o = await migrate('wrong-host-key');
    expect(o.status?.phase).toBe('Failed');
    expect(readyMessage(o)).toMatch(/SSH host key of host host02 does not match the inventory/);
    expect(o.status?.conditions?.find((c) => c.type === 'Degraded')?.status).toBe('True');
    await expectUntouched();
  }, liveness(W.steps + W.finished + W.steps));
});

describe('transfer mode Direct through the operator', () => {
  it('moves the VM host to host with a per-copy key: data identical, and afterwards no key on the source and no authorization on the target', async () => {
    const vm = sb.environment.vms[0]!;
    const h01 = await sb.hypervisor('host01');
    const h02 = await sb.hypervisor('host02');
    /** guest-visible content of every disk, bytes of every other file (as the fault matrix compares them) */
    const fingerprint = async (hv: typeof h01) => {
      const dir = hv.vmDir(sb.environment.name, vm);
      return Promise.all(vm.files.map((f) => (f.kind === 'disk' ? guestContentSha256(hv, `${dir}/${f.name}`, f.format ?? 'qcow2') : sha256File(`${dir}/${f.name}`))));
    };
    const before = await fingerprint(h01);
    const keysFile = sb.hosts.hosts.find((h) => h.name === 'host02')!.authorizedKeysFile!;
    const keysBefore = readFileSync(keysFile, 'utf8');
    const o = await migrate('direct-move', { transfer: { mode: 'Direct' } });
    expect(o.status?.phase, JSON.stringify(o.status?.conditions)).toBe('Succeeded');
    expect((await h02.vmStatus(sb.environment.name, vm)).state).toBe('running');
    expect((await h01.vmStatus(sb.environment.name, vm)).state).toBe('absent');
    expect(await fingerprint(h02)).toEqual(before);
    expect(readFileSync(keysFile, 'utf8')).toBe(keysBefore);
    const left = await h01.conn.execOk(['sh', '-c', 'ls -d /tmp/vmops-direct+* 2>/dev/null; true']);
    expect(left.toString()).toBe('');
    // the private key never reached the operator
    expect(readFileSync(operatorLog, 'utf8')).not.toMatch(/PRIVATE KEY|vmops-direct\+/);
  }, liveness(W.steps + W.finished + W.steps));
});
