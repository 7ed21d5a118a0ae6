/**
 * Guest kubeconfigs come from Secrets that students' environments are provisioned with: they are data,
 * never code (no exec plugins, no auth providers, no files of the operator's disk), and a broken one
 * is reported by Secret and kind of problem only, never by quoting its content.
 */
import { describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { KubeconfigError, loadGuestKubeconfig } from '../../src/guest/kubeconfig.js';

const REF = { namespace: 'vm-migration-system', name: 'student-42-kubeconfig', key: 'kubeconfig' };
const TOKEN = 'sekr3t-t0ken-abcdefghijklmnopqrstuvwxyz';
const KEYDATA = Buffer.from('-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIPRIVATEKEYMATERIAL\n-----END EC PRIVATE KEY-----\n').toString('base64');
const CA = Buffer.from('-----BEGIN CERTIFICATE-----\nMIIBCA\n-----END CERTIFICATE-----\n').toString('base64');

function doc(user: Record<string, unknown>, cluster: Record<string, unknown> = { server: 'https://10.0.0.5:6443', 'certificate-authority-data': CA }): Record<string, unknown> {
  return {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name: 'c', cluster }],
    users: [{ name: 'u', user }],
    contexts: [{ name: 'ctx', context: { cluster: 'c', user: 'u' } }],
    'current-context': 'ctx',
  };
}

function problem(yaml: string): KubeconfigError {
  try {
    loadGuestKubeconfig(yaml, REF);
  } catch (err) {
    expect(err).toBeInstanceOf(KubeconfigError);
    return err as KubeconfigError;
  }
  throw new Error('expected the kubeconfig to be refused');
}

describe('guest kubeconfig: static credentials only', () => {
  it('accepts a bearer token with a CA', async () => {
    const kc = loadGuestKubeconfig(stringify(doc({ token: TOKEN })), REF);
    expect(kc.getCurrentCluster()?.server).toBe('https://10.0.0.5:6443');
    expect(kc.getCurrentUser()?.token).toBe(TOKEN);
    const opts: { headers?: Record<string, string> } = {};
    await kc.applyToHTTPSOptions(opts);
    expect(opts.headers?.Authorization).toBe(`Bearer ${TOKEN}`);
  });
  it('accepts a client certificate and key', () => {
    const kc = loadGuestKubeconfig(stringify(doc({ 'client-certificate-data': CA, 'client-key-data': KEYDATA })), REF);
    expect(kc.getCurrentUser()?.keyData).toBe(KEYDATA);
  });
  it('refuses an exec credential plugin, naming the Secret and not running it', () => {
    const e = problem(stringify(doc({ exec: { apiVersion: 'client.authentication.k8s.io/v1', command: 'sh', args: ['-c', 'touch /tmp/pwned'] } })));
    expect(e.reason).toBe('ExecPluginRefused');
    expect(e.message).toContain('vm-migration-system/student-42-kubeconfig');
    expect(e.message).toMatch(/exec credential plugin/);
    expect(e.message).not.toContain('touch');
  });
  it('refuses an auth-provider', () => {
    const e = problem(stringify(doc({ 'auth-provider': { name: 'gcp', config: { 'cmd-path': '/bin/sh' } } })));
    expect(e.reason).toBe('AuthProviderRefused');
    expect(e.message).toContain('student-42-kubeconfig');
  });
  it('refuses credentials and CAs read from files of the operator (its own service-account token would be sent)', () => {
    expect(problem(stringify(doc({ tokenFile: '/var/run/secrets/kubernetes.io/serviceaccount/token' }))).reason).toBe('CredentialFileRefused');
    expect(problem(stringify(doc({ 'client-certificate': '/etc/a.crt', 'client-key': '/etc/ssh-key' }))).reason).toBe('CredentialFileRefused');
    expect(problem(stringify(doc({ token: TOKEN }, { server: 'https://x:6443', 'certificate-authority': '/etc/ca.crt' }))).reason).toBe('CredentialFileRefused');
  });
  it('refuses basic auth, a proxy and an unknown user field', () => {
    expect(problem(stringify(doc({ username: 'a', password: 'b' }))).reason).toBe('UnsupportedCredential');
    expect(problem(stringify(doc({ token: TOKEN }, { server: 'https://x:6443', 'certificate-authority-data': CA, 'proxy-url': 'http://evil:3128' }))).reason).toBe('UnsupportedField');
    expect(problem(stringify(doc({ token: TOKEN, impersonate: 'system:admin' }))).reason).toBe('UnsupportedField');
  });
  it('refuses plain http and a disabled TLS check, and a kubeconfig without credentials', () => {
    expect(problem(stringify(doc({ token: TOKEN }, { server: 'http://10.0.0.5:8080' }))).reason).toBe('Malformed');
    expect(problem(stringify(doc({ token: TOKEN }, { server: 'https://10.0.0.5:6443', 'insecure-skip-tls-verify': true }))).reason).toBe('UnsupportedField');
    expect(problem(stringify(doc({}))).reason).toBe('UnsupportedCredential');
  });
  it('refuses a current-context that names nothing', () => {
    const d = doc({ token: TOKEN });
    d['current-context'] = 'other';
    expect(problem(stringify(d)).message).toMatch(/current-context/);
  });
});

describe('guest kubeconfig: errors never quote the Secret', () => {
  const broken = [
    // a YAML parse error whose message would quote the line with the token
    `apiVersion: v1\nusers:\n- name: u\n  user:\n    token: ${TOKEN}\n   client-key-data: ${KEYDATA}\n  bad: [\n`,
    `users: {token: ${TOKEN}`,
    `"${TOKEN}`,
    `- ${TOKEN}`,
    `${TOKEN}: ${KEYDATA}`,
    stringify({ ...doc({ token: TOKEN }), clusters: TOKEN }),
    stringify({ ...doc({ token: TOKEN }), 'current-context': TOKEN }),
    stringify(doc({ token: TOKEN, [TOKEN]: 1 })),
  ];
  broken.forEach((yaml, i) => {
    it(`case ${i}: names the Secret and the kind of problem, nothing of its content`, () => {
      const e = problem(yaml);
      expect(e.message).toContain('Secret vm-migration-system/student-42-kubeconfig');
      for (const secret of [TOKEN, TOKEN.slice(0, 12), KEYDATA.slice(0, 16), 'PRIVATE']) {
        expect(e.message).not.toContain(secret);
        expect(String(e.stack)).not.toContain(secret);
        expect(JSON.stringify(e)).not.toContain(secret);
      }
      expect(e.cause).toBeUndefined();
    });
  });
});
