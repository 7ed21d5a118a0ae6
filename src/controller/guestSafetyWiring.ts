/**
 * Connects the guest-safety parts (src/guest/safety.ts) to the operator's plumbing: Secrets from the
 * management cluster, streams into a VM's network through the SSH connection of the hypervisor that hosts it
 * now (placement from the store), and an SSH connection to the load balancer's machine (from the pool, host key
 * pinned). Environments without a `controlPlane` description fall back to the readiness guard.
 */
import { CoreV1Api, type KubeConfig } from '@kubernetes/client-node';
import type { EnvironmentSpec, HostSpec, Inventory, LoadBalancerSpec } from '../api/inventory.js';
import type { HostPool } from '../hosts/pool.js';
import { guestSafetyParts } from '../guest/safety.js';
import type { GuestCluster } from '../guest/guestCluster.js';
import type { ControlPlaneGuard, LoadBalancerControl } from '../migrate/guestSafety.js';
import { readinessGuard } from '../migrate/readinessGuard.js';
import type { Store } from '../store/store.js';

export type GuestSafetyHook = (env: EnvironmentSpec, guest: GuestCluster) => { guard: ControlPlaneGuard; loadBalancer?: LoadBalancerControl };

/** the load balancer's SSH endpoint as a pool entry (it is not a hypervisor; vmDir is never used) */
function lbHost(environment: string, lb: LoadBalancerSpec): HostSpec {
  return { name: `lb.${environment}`, address: lb.address, port: lb.port, user: lb.user, hostKey: lb.hostKey, vmDir: '/nonexistent' };
}

export function guestSafetyHook(deps: { inventory: Inventory | undefined; kc: KubeConfig; store: Pick<Store, 'environment' | 'host'>; pool: Pick<HostPool, 'hypervisor'> }): GuestSafetyHook {
  const core = deps.kc.makeApiClient(CoreV1Api);
  return (env, guest) => {
    // controlPlane / loadBalancer / VM addresses come from the inventory file; placement from the store
    const described = deps.inventory?.environments.find((e) => e.name === env.name);
    const parts = described
      ? guestSafetyParts(described, {
          readSecret: async (namespace, name) => {
            const s = await core.readNamespacedSecret({ namespace, name }).catch((err: { code?: number }) => {
              throw new Error(err.code === 404 ? `Secret ${namespace}/${name} not found` : `cannot read Secret ${namespace}/${name} (HTTP ${err.code ?? '?'})`);
            });
            return Object.fromEntries(Object.entries(s.data ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64').toString('utf8')]));
          },
          dial: async (environment, vm, address, port) => {
            const placed = (await deps.store.environment(environment))?.vms.find((v) => v.name === vm);
            const host = placed ? await deps.store.host(placed.host) : undefined;
            if (!host) throw new Error(`no host known for ${environment}/${vm}`);
            return (await deps.pool.hypervisor(host)).conn.openTcp(address, port);
          },
          connectLoadBalancer: async (environment, lb) => (await deps.pool.hypervisor(lbHost(environment, lb))).conn,
        })
      : {};
    return { guard: parts.guard ?? readinessGuard(guest), ...(parts.loadBalancer ? { loadBalancer: parts.loadBalancer } : {}) };
  };
}
