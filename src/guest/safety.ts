/**
 * Builds the guest-safety parts of one environment from its inventory description: an EtcdGuard when the
 * environment describes its control plane (`controlPlane` + controller `address`es), an NginxLoadBalancer when
 * it describes a load balancer. Credentials are fetched lazily from Secrets by the guard; nothing here logs them.
 */
import type { Duplex } from 'node:stream';
import type { EnvironmentSpec, LoadBalancerSpec } from '../api/inventory.js';
import type { ControlPlaneGuard, LoadBalancerControl } from '../migrate/guestSafety.js';
import { EtcdGuard } from './etcdGuard.js';
import { loadGuestKubeconfig, type SecretRef } from './kubeconfig.js';
import { NginxLoadBalancer, type RemoteShell } from './nginxLoadBalancer.js';

export interface GuestSafetyDeps {
  /** data of a Secret in the operator's cluster, decoded */
  readSecret(namespace: string, name: string): Promise<Record<string, string>>;
  /** a stream to address:port opened by the hypervisor that hosts `vm` of `environment` now */
  dial(environment: string, vm: string, address: string, port: number): Promise<Duplex>;
  /** an SSH connection to the load balancer's machine (host key pinned from the spec) */
  connectLoadBalancer(environment: string, spec: LoadBalancerSpec): Promise<RemoteShell>;
  onLoadBalancerChange?(environment: string, what: string): void;
}

/**
 * The CA the guest kubeconfig trusts for its API server(s), from the kubeconfig as loadGuestKubeconfig
 * validated it (inline data only, never a file path or exec plugin). Never parsed again with another
 * parser: client-node's quotes the lines around an error — the token — into its message, which would
 * become the quorum verdict, the condition, the Event and the log.
 */
export function kubeconfigCa(yaml: string, ref: SecretRef): string {
  const data = loadGuestKubeconfig(yaml, ref).getCurrentCluster()?.caData;
  if (!data) throw new Error(`guest kubeconfig in Secret ${ref.namespace}/${ref.name} has no certificate-authority-data for its current cluster`);
  return Buffer.from(data, 'base64').toString('utf8');
}

export function guestSafetyParts(env: EnvironmentSpec, deps: GuestSafetyDeps): { guard?: ControlPlaneGuard; loadBalancer?: LoadBalancerControl } {
  const parts: { guard?: ControlPlaneGuard; loadBalancer?: LoadBalancerControl } = {};
  const controllers = env.vms.filter((v) => v.role === 'controller' && v.address).map((v) => ({ vm: v.name, nodeName: v.nodeName, address: v.address! }));
  const cp = env.controlPlane;
  if (cp && controllers.length) {
    parts.guard = new EtcdGuard({
      controllers,
      etcdPort: cp.etcdPort,
      apiServerPort: cp.apiServerPort,
      dial: (vm, address, port) => deps.dial(env.name, vm, address, port),
      credentials: async () => {
        const etcd = await deps.readSecret(cp.etcdClientSecret.namespace, cp.etcdClientSecret.name);
        const missing = ['ca.crt', 'tls.crt', 'tls.key'].filter((k) => !etcd[k]);
        if (missing.length) throw new Error(`Secret ${cp.etcdClientSecret.namespace}/${cp.etcdClientSecret.name} lacks ${missing.join(', ')} (etcd client TLS of environment ${env.name})`);
        const ks = env.kubeconfigSecret;
        const kubeconfig = (await deps.readSecret(ks.namespace, ks.name))[ks.key];
        if (!kubeconfig) throw new Error(`Secret ${ks.namespace}/${ks.name} has no key ${ks.key}`);
        return { etcdTls: { ca: etcd['ca.crt']!, cert: etcd['tls.crt']!, key: etcd['tls.key']! }, apiServerCa: kubeconfigCa(kubeconfig, ks) };
      },
    });
  }
  const lb = env.loadBalancer;
  if (lb) {
    const port = cp?.apiServerPort ?? 6443;
    parts.loadBalancer = new NginxLoadBalancer({
      connect: () => deps.connectLoadBalancer(env.name, lb),
      configPath: lb.configPath,
      upstream: lb.upstream,
      nginxBinary: lb.nginxBinary,
      mainConfig: lb.mainConfig,
      prefix: lb.prefix,
      sourceAddress: lb.sourceAddress,
      drainTimeoutMs: lb.drainTimeoutSeconds * 1000,
      backendOf: (vm) => {
        const address = env.vms.find((v) => v.name === vm.name)?.address;
        if (!address) throw new Error(`VM ${vm.name} of ${env.name} has no address in the inventory: it cannot be a load-balancer backend`);
        return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
      },
      onChange: (what) => deps.onLoadBalancerChange?.(env.name, what),
    });
  }
  return parts;
}
