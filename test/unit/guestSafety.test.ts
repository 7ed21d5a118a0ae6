import { describe, expect, it } from 'vitest';
import { parseInventory } from '../../src/api/inventoryFile.js';
import { quorumAfterStop } from '../../src/guest/etcdGuard.js';
import { isBackendDown, MAX_CONFIG_BYTES, nginxPidFile, nginxWorkers, setBackendDown } from '../../src/guest/nginxLoadBalancer.js';
import { guestSafetyParts, kubeconfigCa } from '../../src/guest/safety.js';

describe('quorumAfterStop (Cluster API rule: voting − unhealthy − 1 ≥ ⌊voting/2⌋ + 1)', () => {
  const m = (label: string, problems: string[] = [], isLearner = false) => ({ label, problems, isLearner });
  it('3 healthy voters: stopping one keeps quorum', () => {
    expect(quorumAfterStop({ voting: 3, others: [m('c2'), m('c3')] })).toMatchObject({ ok: true, remaining: 2, quorum: 2 });
  });
  it('one other member unhealthy: not safe, and the verdict names it', () => {
    const q = quorumAfterStop({ voting: 3, others: [m('c2', ['unreachable']), m('c3')] });
    expect(q).toMatchObject({ ok: false, remaining: 1, quorum: 2 });
    expect(q.unhealthy).toEqual(['c2: unreachable']);
  });
  it('a learner or a member with an alarm counts as unhealthy', () => {
    expect(quorumAfterStop({ voting: 3, others: [m('c2'), m('c3'), m('c4', ['is a learner'], true)] }).ok).toBe(false);
    expect(quorumAfterStop({ voting: 3, others: [m('c2', ['alarm NOSPACE']), m('c3')] }).ok).toBe(false);
  });
  it('5 voters tolerate one unhealthy other member, not two', () => {
    expect(quorumAfterStop({ voting: 5, others: [m('a', ['x']), m('b'), m('c'), m('d')] }).ok).toBe(true);
    expect(quorumAfterStop({ voting: 5, others: [m('a', ['x']), m('b', ['y']), m('c'), m('d')] }).ok).toBe(false);
  });
  it('a single-member cluster can never lose its member', () => {
    expect(quorumAfterStop({ voting: 1, others: [] }).ok).toBe(false);
  });
});

describe('setBackendDown (NGINX upstream edit)', () => {
  const conf = `# managed by hand
upstream other { server 10.0.0.11:6443; }
upstream kube_apiservers {
    server 10.0.0.11:6443 max_fails=1 fail_timeout=10s;
    server 10.0.0.12:6443 max_fails=1 fail_timeout=10s;
    server 10.0.0.13:6443;
}
`;
  it('marks exactly one server of the named upstream down, keeping its parameters', () => {
    const out = setBackendDown(conf, 'kube_apiservers', '10.0.0.11:6443', true);
    expect(out).toContain('upstream other { server 10.0.0.11:6443; }');
    expect(out).toContain('    server 10.0.0.11:6443 max_fails=1 fail_timeout=10s down;');
    expect(out).toContain('    server 10.0.0.12:6443 max_fails=1 fail_timeout=10s;');
    expect(isBackendDown(out, 'kube_apiservers', '10.0.0.11:6443')).toBe(true);
    expect(isBackendDown(out, 'kube_apiservers', '10.0.0.12:6443')).toBe(false);
  });
  it('is idempotent and reversible to the byte', () => {
    const down = setBackendDown(conf, 'kube_apiservers', '10.0.0.13:6443', true);
    expect(setBackendDown(down, 'kube_apiservers', '10.0.0.13:6443', true)).toBe(down);
    expect(setBackendDown(down, 'kube_apiservers', '10.0.0.13:6443', false)).toBe(conf);
    expect(setBackendDown(conf, 'kube_apiservers', '10.0.0.13:6443', false)).toBe(conf);
  });
  it('does not confuse 10.0.0.1:6443 with 10.0.0.11:6443', () => {
    expect(() => setBackendDown(conf, 'kube_apiservers', '10.0.0.1:6443', true)).toThrow(/has no server 10.0.0.1:6443/);
  });
  it('names a missing upstream', () => {
    expect(() => setBackendDown(conf, 'nope', '10.0.0.11:6443', true)).toThrow(/no upstream nope/);
  });
  it('reads statements as NGINX does: comments, quoted words and a `server` inside another word are not statements', () => {
    const tricky = `upstream kube_apiservers {\n  # server 10.0.0.11:6443;\n  server "10.0.0.11:6443" weight=2; # trailing\n  xserver 10.0.0.11:6443;\n}\n`;
    expect(setBackendDown(tricky, 'kube_apiservers', '10.0.0.11:6443', true)).toBe(`upstream kube_apiservers {\n  # server 10.0.0.11:6443;\n  server "10.0.0.11:6443" weight=2 down; # trailing\n  xserver 10.0.0.11:6443;\n}\n`);
  });
  it("a student's 1 MiB of unterminated server lines is answered, not backtracked over (the regular expression it replaces was quadratic: 0.2 s at 26 KB, minutes at 1 MiB, blocking the event loop)", () => {
    const hostile = `upstream kube_apiservers {\n${'server 10.0.0.12:6443 '.repeat(Math.floor((MAX_CONFIG_BYTES - 64) / 22))}\n}\n`;
    expect(hostile.length).toBeLessThanOrEqual(MAX_CONFIG_BYTES);
    expect(() => setBackendDown(hostile, 'kube_apiservers', '10.0.0.12:6443', true)).toThrow(/has no server 10.0.0.12:6443/);
  });
  it('a configuration over 1 MiB is refused, never parsed', () => {
    expect(() => setBackendDown(`${conf}#${'x'.repeat(MAX_CONFIG_BYTES)}`, 'kube_apiservers', '10.0.0.11:6443', true)).toThrow(/more than the 1048576 the operator reads/);
  });
});

describe('inventory: controlPlane and loadBalancer', () => {
  const base = (env: Record<string, unknown>, ctrl: Record<string, unknown> = { address: '10.0.0.11' }) => ({
    hosts: [{ name: 'h1', address: '127.0.0.2', hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro', vmDir: '/srv/vms' }],
    environments: [{ name: 'e', kubeconfigSecret: { namespace: 'ns', name: 's' }, vms: [{ name: 'controller-1', role: 'controller', host: 'h1', files: [], ...ctrl }], ...env }],
  });
  const lb = { kind: 'nginx', address: '10.0.0.10', user: 'lb', hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro', configPath: '/etc/nginx/conf.d/k.conf', upstream: 'kube_apiservers' };
  it('parses both with defaults', () => {
    const inv = parseInventory(base({ controlPlane: { etcdClientSecret: { namespace: 'ns', name: 'etcd-client' } }, loadBalancer: lb }));
    const e = inv.environments[0]!;
    expect(e.controlPlane).toEqual({ etcdPort: 2379, apiServerPort: 6443, etcdClientSecret: { namespace: 'ns', name: 'etcd-client' } });
    expect(e.loadBalancer).toMatchObject({ kind: 'nginx', port: 22, nginxBinary: '/usr/sbin/nginx', drainTimeoutSeconds: 60, upstream: 'kube_apiservers' });
    expect(e.vms[0]!.address).toBe('10.0.0.11');
  });
  it('rejects what would end up in a remote command or cannot work, naming the field', () => {
    expect(() => parseInventory(base({ loadBalancer: { ...lb, kind: 'haproxy' } }))).toThrow(/loadBalancer.kind must be nginx/);
    expect(() => parseInventory(base({ loadBalancer: { ...lb, configPath: '/etc/nginx/$(reboot)' } }))).toThrow(/loadBalancer.configPath/);
    expect(() => parseInventory(base({ loadBalancer: { ...lb, upstream: 'a b' } }))).toThrow(/loadBalancer.upstream/);
    expect(() => parseInventory(base({ loadBalancer: { ...lb, hostKey: 'nope' } }))).toThrow(/hostKey/);
    expect(() => parseInventory(base({ loadBalancer: lb }, {}))).toThrow(/vms\[0\].address is required/);
    expect(() => parseInventory(base({}, { address: '10.0.0.11; rm -rf /' }))).toThrow(/address/);
  });
});

describe('guestSafetyParts', () => {
  const env = (extra: Record<string, unknown> = {}) =>
    parseInventory({
      hosts: [{ name: 'h1', address: '127.0.0.2', hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBpIex7HY9vWbTLfeE5oyMyctlLWHf5PDLlZBVKDaro', vmDir: '/srv/vms' }],
      environments: [{ name: 'e', kubeconfigSecret: { namespace: 'ns', name: 'kc' }, vms: [{ name: 'controller-1', role: 'controller', host: 'h1', files: [], address: '10.0.0.11' }], ...extra }],
    }).environments[0]!;
  const deps = (secrets: Record<string, Record<string, string>>) => ({
    readSecret: async (ns: string, name: string) => {
      const s = secrets[`${ns}/${name}`];
      if (!s) throw new Error(`Secret ${ns}/${name} not found`);
      return s;
    },
    dial: () => Promise.reject(new Error('no network in unit tests')),
    connectLoadBalancer: () => Promise.reject(new Error('no network in unit tests')),
  });
  it('nothing described: no guard, no load balancer (the runner falls back to the readiness guard)', () => {
    expect(guestSafetyParts(env(), deps({}))).toEqual({});
  });
  it('a Secret without the TLS keys is named, its content never shown', async () => {
    const parts = guestSafetyParts(env({ controlPlane: { etcdClientSecret: { namespace: 'ns', name: 'etcd' } } }), deps({ 'ns/etcd': { 'ca.crt': 'SECRET-CA-CONTENT' } }));
    expect(parts.guard).toBeDefined();
    // not safe yet (a wait with a reason), not a crash: someone can still fix the Secret
    const v = await parts.guard!.checkSafeToStop({ name: 'controller-1', role: 'controller', nodeName: 'n', host: 'h1', memoryMiB: 32, cpus: 1, files: [] });
    expect(v).toMatchObject({ safe: false, reason: 'WaitingForQuorum' });
    expect(v.message).toMatch(/Secret ns\/etcd lacks tls\.crt, tls\.key/);
    expect(v.message).not.toMatch(/SECRET-CA-CONTENT/);
  });
  it('a kubeconfig Secret with one control byte never puts its token into the verdict (condition, Event, journal, log)', async () => {
    const token = 'sEcReT-ToKeN-0123456789abcdef';
    // DEL (0x7f) inside a quoted token: the yaml parser takes it; client-node's parser refuses it and quotes four lines
    const kubeconfig = `apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: "https://10.0.0.11:6443", certificate-authority-data: ${Buffer.from('PEM').toString('base64')}}}]\nusers:\n- name: u\n  user:\n    token: ${token}\x7f\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n`;
    const parts = guestSafetyParts(env({ controlPlane: { etcdClientSecret: { namespace: 'ns', name: 'etcd' } } }), deps({ 'ns/etcd': { 'ca.crt': 'CA', 'tls.crt': 'CRT', 'tls.key': 'KEY' }, 'ns/kc': { kubeconfig } }));
    const v = await parts.guard!.checkSafeToStop({ name: 'controller-1', role: 'controller', nodeName: 'n', host: 'h1', memoryMiB: 32, cpus: 1, files: [] });
    expect(v.safe).toBe(false);
    expect(v.message).not.toContain(token.slice(0, 12));
    expect(v.message).not.toMatch(/token/i);
  });
  it('kubeconfigCa takes inline CA data only', () => {
    const yaml = (cluster: Record<string, unknown>) => `apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: ${JSON.stringify({ server: 'https://x', ...cluster })}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n`;
    const ref = { namespace: 'ns', name: 'kc', key: 'kubeconfig' };
    expect(kubeconfigCa(yaml({ 'certificate-authority-data': Buffer.from('PEM').toString('base64') }), ref)).toBe('PEM');
    expect(() => kubeconfigCa(yaml({ 'certificate-authority': '/etc/ca.crt' }), ref)).toThrow(/certificate-authority reads a file of the operator's disk/);
  });
});

describe('following an NGINX reload', () => {
  it('finds the pid file as nginx -s does: the pid directive, else the compiled-in path; relative below the prefix', () => {
    const v = 'nginx version: nginx/1.22.1\nconfigure arguments: --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf --pid-path=/run/nginx.pid';
    expect(nginxPidFile('# configuration file /etc/nginx/nginx.conf:\nuser www-data;\npid /run/lb.pid;\n', v)).toBe('/run/lb.pid');
    expect(nginxPidFile('worker_processes 1;\n  pid   "logs/n.pid" ;\n', v, '/srv/lb/')).toBe('/srv/lb/logs/n.pid');
    expect(nginxPidFile('worker_processes 1;\n', v)).toBe('/run/nginx.pid');
    expect(nginxPidFile('worker_processes 1;\n', 'configure arguments: --prefix=/opt/ng --pid-path=ng.pid')).toBe('/opt/ng/ng.pid');
    expect(() => nginxPidFile('worker_processes 1;\n', 'configure arguments: --prefix=/opt/ng')).toThrow(/no pid file/);
  });

  it('tells workers that still accept from those shutting down', () => {
    expect(nginxWorkers(' 22278 nginx: worker process\n 22282 nginx: worker process is shutting down\n\n')).toEqual([
      { pid: 22278, accepting: true },
      { pid: 22282, accepting: false },
    ]);
    expect(nginxWorkers('')).toEqual([]);
  });
});
