/**
 * Loads a guest cluster's kubeconfig from the content of its Secret. Pure: YAML text + which Secret
 * it came from → a KubeConfig, or a KubeconfigError.
 *
 * The operator holds the SSH key to every hypervisor, so a kubeconfig is treated as data, never code:
 * exec credential plugins and auth providers would run programs inside the operator, and file
 * references (tokenFile, client-key, certificate-authority) would read the operator's own disk —
 * e.g. send its service-account token to a student's API server. Only inline static credentials
 * are accepted: a bearer token or a client certificate and key, with the cluster's CA.
 *
 * Errors name the Secret and the kind of problem, never content: a YAML parser's message quotes the
 * lines around the error, which hold the token or the client key.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { parseDocument } from 'yaml';

export interface SecretRef {
  namespace: string;
  name: string;
  key: string;
}

export type KubeconfigProblem =
  | 'NotYaml'
  | 'Malformed'
  | 'ExecPluginRefused'
  | 'AuthProviderRefused'
  | 'CredentialFileRefused'
  | 'UnsupportedCredential'
  | 'UnsupportedField';

export class KubeconfigError extends Error {
  constructor(
    readonly reason: KubeconfigProblem,
    readonly secret: string,
    problem: string,
  ) {
    super(`kubeconfig in Secret ${secret}: ${problem}`);
    this.name = 'KubeconfigError';
  }
}

const CLUSTER_FIELDS = new Set(['server', 'certificate-authority-data', 'tls-server-name']);
const USER_FIELDS = new Set(['token', 'client-certificate-data', 'client-key-data']);
const FILE_FIELDS = new Set(['tokenFile', 'client-certificate', 'client-key', 'certificate-authority']);
/** Fields the operator does not use; their values are ignored, never interpreted. */
const IGNORED_CLUSTER_FIELDS = new Set(['extensions']);
const IGNORED_USER_FIELDS = new Set(['extensions']);

export function loadGuestKubeconfig(yaml: string, ref: SecretRef): KubeConfig {
  const secret = `${ref.namespace}/${ref.name} (key "${ref.key}")`;
  const fail = (reason: KubeconfigProblem, problem: string): never => {
    throw new KubeconfigError(reason, secret, problem);
  };

  // parseDocument collects errors instead of throwing; only their position is reported.
  const parsed = parseDocument(yaml, { prettyErrors: false, uniqueKeys: true });
  if (parsed.errors.length > 0) {
    const line = parsed.errors[0]?.linePos?.[0]?.line;
    fail('NotYaml', `not valid YAML${line ? ` (first error at line ${line})` : ''}`);
  }
  let doc: unknown;
  try {
    doc = parsed.toJS({ maxAliasCount: 100 });
  } catch {
    fail('NotYaml', 'not a plain YAML document (too many aliases)');
  }
  const root = mapping(doc) ?? fail('Malformed', 'the document is not a mapping');

  const current = root['current-context'];
  if (typeof current !== 'string' || current === '') fail('Malformed', 'current-context is missing');
  const context = named(root.contexts, 'context', current as string) ?? fail('Malformed', 'current-context does not name an entry of contexts');
  const clusterName = context.cluster;
  const userName = context.user;
  if (typeof clusterName !== 'string' || typeof userName !== 'string') fail('Malformed', 'the current context must name a cluster and a user');
  const cluster = named(root.clusters, 'cluster', clusterName as string) ?? fail('Malformed', "the current context's cluster is not in clusters");
  const user = named(root.users, 'user', userName as string) ?? fail('Malformed', "the current context's user is not in users");

  if ('exec' in user) fail('ExecPluginRefused', 'exec credential plugins are refused (the operator never runs programs from a kubeconfig); use a token or a client certificate');
  if ('auth-provider' in user) fail('AuthProviderRefused', 'auth-provider is refused (it runs code in the operator); use a token or a client certificate');
  for (const [fields, what] of [[user, 'user'], [cluster, 'cluster']] as const) {
    const file = Object.keys(fields).find((k) => FILE_FIELDS.has(k));
    if (file) fail('CredentialFileRefused', `${what} field ${file} reads a file of the operator's disk; put the data inline (*-data fields, token)`);
  }
  if ('username' in user || 'password' in user) fail('UnsupportedCredential', 'basic authentication is not supported; use a token or a client certificate');
  const unknownUser = Object.keys(user).find((k) => !USER_FIELDS.has(k) && !IGNORED_USER_FIELDS.has(k));
  if (unknownUser !== undefined) fail('UnsupportedField', `user field ${safeKey(unknownUser)} is not supported (allowed: ${[...USER_FIELDS].join(', ')})`);
  const unknownCluster = Object.keys(cluster).find((k) => !CLUSTER_FIELDS.has(k) && !IGNORED_CLUSTER_FIELDS.has(k));
  if (unknownCluster !== undefined) fail('UnsupportedField', `cluster field ${safeKey(unknownCluster)} is not supported (allowed: ${[...CLUSTER_FIELDS].join(', ')})`);

  const server = cluster.server;
  if (typeof server !== 'string' || !isHttpsUrl(server)) fail('Malformed', 'cluster.server must be an https:// URL');
  const caData = optionalString(cluster['certificate-authority-data']) ?? fail('Malformed', 'cluster.certificate-authority-data is required (the guest API server is verified against it)');
  const tlsServerName = optionalString(cluster['tls-server-name']);
  const token = optionalString(user.token);
  const certData = optionalString(user['client-certificate-data']);
  const keyData = optionalString(user['client-key-data']);
  if (!token && !(certData && keyData)) fail('UnsupportedCredential', 'the user has no static credential (token, or client-certificate-data with client-key-data)');
  if ((certData === undefined) !== (keyData === undefined)) fail('UnsupportedCredential', 'client-certificate-data and client-key-data go together');

  const kc = new KubeConfig();
  kc.loadFromClusterAndUser(
    { name: clusterName as string, server: server as string, caData, tlsServerName, skipTLSVerify: false },
    { name: userName as string, token, certData, keyData },
  );
  return kc;
}

function mapping(v: unknown): Record<string, unknown> | undefined {
  return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
}

/** The `field` mapping of the list entry called `name` (kubeconfig's named-list shape). */
function named(list: unknown, field: string, name: string): Record<string, unknown> | undefined {
  if (!Array.isArray(list)) return undefined;
  const entry = list.map(mapping).find((e) => e?.name === name);
  return mapping(entry?.[field]);
}

function optionalString(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

function isHttpsUrl(s: string): boolean {
  try {
    return new URL(s).protocol === 'https:';
  } catch {
    return false;
  }
}

/** Fields of kubeconfig's cluster and user that are named in a refusal; any other key could be a pasted secret and is not echoed. */
const KNOWN_FIELDS = new Set([
  'impersonate', 'impersonate-uid', 'impersonate-groups', 'impersonate-user-extra', 'as', 'as-uid', 'as-groups', 'as-user-extra',
  'proxy-url', 'insecure-skip-tls-verify', 'disable-compression',
]);

function safeKey(k: string): string {
  return KNOWN_FIELDS.has(k) ? `"${k}"` : '(a field that is not part of a kubeconfig)';
}
