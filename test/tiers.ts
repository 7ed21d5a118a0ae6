/**
 * The suite's tiers and the one order its files run in (scripts/test.sh, vitest.config.ts's sequencer).
 *
 * Tiers run one at a time, files within a tier one at a time (unit files two at a time): on two cores
 * the lanes that once ran side by side starved each other's control planes and guests, and a local
 * re-run (vitest: failed first, then longest first) never ran the files in the order a fresh clone
 * did (no cache: largest first). One committed order makes a fresh clone, CI and a re-run agree.
 * test/unit/tiers.test.ts checks that every test file is in exactly one tier.
 */
export interface Tier {
  name: string;
  /** what the tier's files need from the machine */
  needs: string;
  /** files in the order they run; a directory means every file in it, by name */
  files: string[];
  /** files that may run side by side (pure logic only) */
  parallel?: boolean;
}

export const TIERS: Tier[] = [
  { name: 'unit', needs: 'nothing shared: pure logic, doubles, local tools (promtool, lua, sh)', files: ['test/unit'], parallel: true },
  {
    name: 'control-plane',
    needs: 'a control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK), PostgreSQL or Prometheus; no VM',
    files: [
      'test/integration/runtime.test.ts',
      'test/integration/controlplane.test.ts',
      'test/integration/drain.test.ts',
      'test/integration/guest.test.ts',
      'test/integration/fleet.crd.test.ts',
      'test/integration/store.test.ts',
      'test/integration/startupFaults.test.ts',
      'test/integration/inCluster.test.ts',
      'test/e2e/validation.test.ts',
    ],
  },
  {
    name: 'hosts',
    needs: 'sshd hosts and QEMU without a guest OS (SeaBIOS only)',
    files: [
      'test/integration/hosts.test.ts',
      'test/integration/fencing-probe.test.ts',
      'test/integration/fencing.test.ts',
      'test/integration/tunnel.test.ts',
      'test/integration/transfer.test.ts',
      'test/integration/transfer-engine.test.ts',
      'test/integration/direct.test.ts',
      'test/integration/rollforward.test.ts',
      'test/integration/fleet.capacity.test.ts',
      'test/integration/vmDefinition.test.ts',
      'test/integration/handover.test.ts',
    ],
  },
  {
    name: 'real-guest',
    needs: 'QEMU booting the Linux test guest (TCG here)',
    files: ['test/integration/realGuest.test.ts', 'test/integration/strategies.test.ts', 'test/integration/vmNetwork.test.ts'],
  },
  {
    name: 'operator-e2e',
    needs: 'the operator process against a control plane, sshd hosts and QEMU; the HA guest last',
    files: [
      'test/integration/drain-operator.test.ts',
      'test/e2e/migration.test.ts',
      'test/e2e/faults.test.ts',
      'test/e2e/hardening.test.ts',
      'test/e2e/finalizer.test.ts',
      'test/e2e/failover.test.ts',
      'test/e2e/fleet.test.ts',
      'test/e2e/gitops.test.ts',
      'test/e2e/outage.test.ts',
      'test/integration/guestHa.test.ts',
      'test/e2e/ha.test.ts',
    ],
  },
];

/** Position of a repository-relative test file in the committed order (unknown files after all known ones). */
export function orderOf(file: string): number {
  let i = 0;
  for (const tier of TIERS) {
    for (const f of tier.files) {
      if (file === f || (!f.endsWith('.ts') && file.startsWith(`${f}/`))) return i;
      i++;
    }
  }
  return Number.MAX_SAFE_INTEGER;
}
