/**
 * Runs the operator the way its Deployment does: credentials only from a ServiceAccount token that
 * the real API server issued (TokenRequest, via `kubectl create token`) for the ServiceAccount of
 * manifests/rbac.yaml, mounted where every in-cluster client looks for it
 * (/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}) and found through
 * KUBERNETES_SERVICE_HOST/PORT. The mount happens in a private mount namespace of the operator
 * process (unshare), so the operator code is unchanged and the host's /run is untouched.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { KubeConfig } from '@kubernetes/client-node';
import { parse } from 'yaml';

const execFileP = promisify(execFile);

/** The fixed in-cluster location (client-go, @kubernetes/client-node, kubectl all read it). */
export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

export interface InClusterIdentity {
  /** the token issued by the API server for the ServiceAccount */
  token: string;
  /** `<root>/var/run/secrets/kubernetes.io/serviceaccount` holds token, ca.crt, namespace */
  root: string;
  /** KUBERNETES_SERVICE_HOST/PORT of the test API server */
  serviceEnv: { KUBERNETES_SERVICE_HOST: string; KUBERNETES_SERVICE_PORT: string };
  /** a client configured exactly as in a pod (loadFromCluster), for checks from the test */
  kubeConfig(): KubeConfig;
  /** the environment for the operator: the service env, and no kubeconfig of any kind */
  env(base: NodeJS.ProcessEnv): NodeJS.ProcessEnv;
  /** argv that runs `argv` with the token mounted at SERVICE_ACCOUNT_DIR in a private mount namespace */
  wrap(argv: string[]): string[];
}

export interface InClusterOptions {
  kubeconfigPath: string;
  /** where the service-account files are written */
  dir: string;
  namespace: string;
  serviceAccount: string;
  /** TokenRequest expirationSeconds; long enough for the test run */
  durationSeconds?: number;
}

/**
 * Issues a token for the ServiceAccount (which must exist: apply manifests/rbac.yaml first) and
 * lays out the service-account directory. Nothing else of the admin credentials is passed on.
 */
export async function inClusterIdentity(opts: InClusterOptions): Promise<InClusterIdentity> {
  const kubectl = (args: string[]) => execFileP('kubectl', ['--kubeconfig', opts.kubeconfigPath, ...args]);
  const { stdout: tokenOut } = await kubectl(['create', 'token', opts.serviceAccount, '-n', opts.namespace, `--duration=${opts.durationSeconds ?? 7200}s`]);
  const token = tokenOut.trim();
  const admin = parse((await kubectl(['config', 'view', '--raw', '-o', 'yaml'])).stdout) as {
    clusters: Array<{ cluster: { server: string; 'certificate-authority-data': string } }>;
  };
  const cluster = admin.clusters[0]!.cluster;
  const server = new URL(cluster.server);
  if (['80', '8080', '8001'].includes(server.port)) throw new Error(`API server port ${server.port}: client-node would use plain http for it in cluster`);
  const root = join(opts.dir, 'root');
  const saDir = join(root, SERVICE_ACCOUNT_DIR);
  mkdirSync(saDir, { recursive: true });
  writeFileSync(join(saDir, 'token'), token, { mode: 0o600 });
  writeFileSync(join(saDir, 'ca.crt'), Buffer.from(cluster['certificate-authority-data'], 'base64'));
  writeFileSync(join(saDir, 'namespace'), opts.namespace);
  const serviceEnv = { KUBERNETES_SERVICE_HOST: server.hostname, KUBERNETES_SERVICE_PORT: server.port };

  return {
    token, root, serviceEnv,
    kubeConfig() {
      const saved = { h: process.env.KUBERNETES_SERVICE_HOST, p: process.env.KUBERNETES_SERVICE_PORT };
      Object.assign(process.env, serviceEnv);
      try {
        const kc = new KubeConfig();
        kc.loadFromCluster(root);
        return kc;
      } finally {
        for (const [k, v] of [['KUBERNETES_SERVICE_HOST', saved.h], ['KUBERNETES_SERVICE_PORT', saved.p]] as const) {
          if (v === undefined) delete process.env[k];
          else process.env[k] = v;
        }
      }
    },
    env(base) {
      const env: NodeJS.ProcessEnv = { ...base, ...serviceEnv };
      for (const k of ['KUBECONFIG', 'VMOPS_KUBECONFIG']) delete env[k];
      return env;
    },
    wrap(argv) {
      // tmpfs over /run hides the host's /run (and anything under /var/run) from the operator;
      // the service-account dir is bind-mounted read-only, as the kubelet mounts it.
      const script = [
        'set -e',
        'mount -t tmpfs -o mode=0755,size=1m tmpfs /run',
        `mkdir -p ${SERVICE_ACCOUNT_DIR}`,
        `mount --bind "$0" ${SERVICE_ACCOUNT_DIR}`,
        `mount -o remount,bind,ro ${SERVICE_ACCOUNT_DIR}`,
        'exec "$@"',
      ].join('\n');
      const userns = process.getuid?.() === 0 ? [] : ['--user', '--map-root-user'];
      return ['unshare', ...userns, '--mount', '--propagation', 'private', '--', 'sh', '-c', script, saDir, ...argv];
    },
  };
}
