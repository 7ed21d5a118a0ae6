/**
 * Today's ControlPlaneGuard: judges etcd quorum by the guest cluster's node readiness and the API
 * server's /readyz (GuestCluster.controlPlaneQuorum). It is the fallback until etcd itself is asked
 * (src/guest's etcd-backed guard plugs in through RunnerDeps.guestSafety): it cannot see an etcd
 * member's own health or who leads, so moveLeadershipAway moves nothing and waitMemberHealthy
 * waits for the node to be Ready and /readyz to answer, standing in for "member caught up".
 */
import type { VMSpec } from '../api/inventory.js';
import type { NodeState, QuorumResult } from '../guest/guestCluster.js';
import { sleep } from '../util/sleep.js';
import type { ControlPlaneGuard, SafetyVerdict } from './guestSafety.js';

/** What this guard needs from the guest cluster (GuestCluster implements it). */
export interface ReadinessSource {
  controlPlaneQuorum(excludingNode: string): Promise<QuorumResult>;
  nodeState(node: string): Promise<NodeState>;
  apiHealthy(): Promise<boolean>;
}

export function readinessGuard(guest: ReadinessSource): ControlPlaneGuard {
  return {
    async checkSafeToStop(vm: VMSpec): Promise<SafetyVerdict> {
      const q = await guest.controlPlaneQuorum(vm.nodeName);
      if (q.ok) return { safe: true, reason: 'QuorumKept', message: q.reason };
      const reason = /readyz/.test(q.reason) ? 'WaitingForAPIServer' : 'WaitingForQuorum';
      return { safe: false, reason, message: `control plane would lose quorum without ${vm.nodeName}: ${q.reason}` };
    },
    async moveLeadershipAway(): Promise<{ movedTo?: string }> {
      return {};
    },
    async waitMemberHealthy(vm: VMSpec, opts: { timeoutMs: number; signal: AbortSignal }): Promise<void> {
      const deadline = Date.now() + opts.timeoutMs;
      for (;;) {
        const node = await guest.nodeState(vm.nodeName);
        if (node.ready && (await guest.apiHealthy())) return;
        if (Date.now() >= deadline) throw new Error(`controller ${vm.nodeName} not healthy within ${opts.timeoutMs} ms (node ready=${node.ready})`);
        await sleep(500, opts.signal);
      }
    },
  };
}
