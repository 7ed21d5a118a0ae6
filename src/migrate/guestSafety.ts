/**
 * What a VM move needs from the guest cluster's control plane and its load balancer, owned by the
 * consumer (the per-VM flow). `src/guest/` implements it: etcd asked through its own API, the
 * beachhead's NGINX driven over SSH. The flow runs these as named steps for controller VMs:
 *
 *   quorum (gate) → cordon → drain → quorum (again, right before the stop) → leaderMove → lbOut
 *     → stop … start → nodeReady → memberHealthy → lbIn → uncordon
 *
 * An environment without a described load balancer has no LoadBalancerControl (the flow omits lbOut/lbIn
 * and says so in a warning Event); the control-plane guard always exists.
 */
import type { VMSpec } from '../api/inventory.js';

/** Not safe yet means wait and re-check with this reason in a condition — not fail. */
export interface SafetyVerdict {
  safe: boolean;
  /** condition reason, e.g. WaitingForQuorum, WaitingForAPIServer */
  reason: string;
  /** human-readable: which members / API servers are unhealthy and why (never credentials) */
  message: string;
}

export interface ControlPlaneGuard {
  /** Before a controller VM goes down: etcd keeps quorum without its member, every other member is healthy, the other API servers are ready. */
  checkSafeToStop(vm: VMSpec): Promise<SafetyVerdict>;
  /** If vm's etcd member is the leader, move leadership to a healthy, caught-up member and verify it moved; otherwise nothing. */
  moveLeadershipAway(vm: VMSpec, signal: AbortSignal): Promise<{ movedTo?: string }>;
  /** After the VM runs again: its member is healthy and caught up with the leader, its API server ready. */
  waitMemberHealthy(vm: VMSpec, opts: { timeoutMs: number; signal: AbortSignal }): Promise<void>;
}

export interface LoadBalancerControl {
  /** Take vm's API server out of the load balancer (atomic change, validated, graceful reload, rolled back on error) and wait until its connections drained. Idempotent. */
  removeBackend(vm: VMSpec, signal: AbortSignal): Promise<void>;
  /** Put vm's API server back. Idempotent. */
  addBackend(vm: VMSpec, signal: AbortSignal): Promise<void>;
}
