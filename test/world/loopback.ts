/**
 * Where each test file's machines listen: the last octet N of 127.0.0.N of its first hypervisor host
 * (the others follow), and for the HA guest worlds of its load balancer (controllers follow).
 * scripts/test.sh runs two lanes of VM files side by side, so no range may overlap another: an sshd,
 * etcd member or blackhole rule of one file must never land on another file's address
 * (test/unit/loopback.test.ts). Files running side by side also need distinct environment names:
 * the test world finds a VM's QEMU by its `-name` (liveness bridge, split-brain census).
 */
export const LOOPBACK = {
  hosts: { first: 2, count: 2 },
  migration: { first: 4, count: 2 },
  faults: { first: 6, count: 2 },
  haHosts: { first: 8, count: 2 },
  transfer: { first: 12, count: 2 },
  strategies: { first: 22, count: 2 },
  transferEngine: { first: 24, count: 2 },
  haGuest: { first: 30, count: 4 },
  fencing: { first: 42, count: 2 },
  fleetCapacity: { first: 46, count: 2 },
  tunnel: { first: 52, count: 2 },
  direct: { first: 62, count: 2 },
  failover: { first: 70, count: 2 },
  finalizer: { first: 74, count: 2 },
  drainOperator: { first: 78, count: 2 },
  hardening: { first: 82, count: 2 },
  realGuest: { first: 90, count: 2 },
  fleet: { first: 94, count: 3 },
  guestHaHost: { first: 100, count: 1 },
  guestHa: { first: 102, count: 4 },
  rollforward: { first: 120, count: 2 },
  gitops: { first: 126, count: 2 },
  vmDefinition: { first: 130, count: 2 },
  handover: { first: 134, count: 2 },
  outage: { first: 138, count: 2 },
  vmNetwork: { first: 142, count: 2 },
} as const satisfies Record<string, { first: number; count: number }>;

/** Names of the ranges that share an address, each pair once (empty when the table is sound). */
export function overlappingRanges(table: Record<string, { first: number; count: number }> = LOOPBACK): string[] {
  const owner = new Map<number, string>();
  const clashes = new Set<string>();
  for (const [name, { first, count }] of Object.entries(table)) {
    for (let n = first; n < first + count; n++) {
      if (n < 2 || n > 254) clashes.add(`${name}: 127.0.0.${n} is not a usable test address`);
      const other = owner.get(n);
      if (other) clashes.add(`${other} and ${name} share 127.0.0.${n}`);
      else owner.set(n, name);
    }
  }
  return [...clashes];
}
