/**
 * `BENCH_PARTS=fleet npm run bench`: the fleet moved for real — 4 student environments × 7 no-OS
 * QEMU VMs evacuated from host01 by the real operator (targets it chooses on host02/host03) at
 * maxParallelEnvironments 1 (the baseline, measured in the same run), 2 and 4 (per-host limits set to
 * the same number, so that they do not cap it); between runs the
 * fleet goes back to host01. Prints wall time and its ratio to the baseline, the most environments
 * disrupted at once, the most nodes of one environment down at once, and status writes per second.
 * Asserts nothing beyond each migration Succeeding with the data intact.
 */
import { startFleetWorld } from '../test/world/fleetWorld.js';

const ENVIRONMENTS = ['fleet-a', 'fleet-b', 'fleet-c', 'fleet-d'];
const POLICY = { maxEnvironmentsPercentPerHost: 50, cpuOvercommitRatio: 16 };

export async function runFleet(): Promise<string> {
  const w = await startFleetWorld({ environments: ENVIRONMENTS, firstAddress: 150, log: (l) => console.error(`[fleet] ${l}`) });
  try {
    const rows: Array<{ p: number; seconds: number; envsAtOnce: number; perEnv: number; writesPerS: number }> = [];
    for (const p of [1, 2, 4]) {
      const watch = await w.watchDisruption();
      // every VM leaves host01: the per-host limits (default 2) would cap the parallelism, so they follow it
      const r = await w.migrate(`evacuate-p${p}`, { sourceHost: 'host01', maxParallelEnvironments: p, hostLimits: { maxOutboundPerHost: p, maxInboundPerHost: p }, placement: POLICY });
      watch.stop();
      const changed = await w.changedFiles();
      if (changed.length > 0) throw new Error(`data changed by the move: ${changed.join(', ')}`);
      rows.push({ p, seconds: r.seconds, envsAtOnce: watch.maxEnvsDisrupted(), perEnv: watch.maxDownPerEnv(), writesPerS: watch.writes(`evacuate-p${p}`) / r.seconds });
      console.error(`[fleet] parallelism ${p}: ${r.seconds.toFixed(1)} s`);
      if (p !== 4) await w.migrate(`back-p${p}`, { environments: ENVIRONMENTS, targetHost: 'host01', maxParallelEnvironments: 4, placement: { cpuOvercommitRatio: 16 } });
    }
    const base = rows[0]!.seconds;
    const lines = [
      `### Fleet evacuation, real moves (${ENVIRONMENTS.length} environments × 7 VMs, 16 MiB qcow2 + 1 MiB raw per VM, cold moves, 2 target hosts)`,
      '',
      '| maxParallelEnvironments | wall time | vs parallelism 1 | environments disrupted at once | nodes down per environment | status writes/s |',
      '|---|---|---|---|---|---|',
      ...rows.map((r) => `| ${r.p} | ${r.seconds.toFixed(1)} s | ${(base / r.seconds).toFixed(2)}× | ${r.envsAtOnce} | ${r.perEnv} | ${r.writesPerS.toFixed(2)} |`),
    ];
    return lines.join('\n');
  } finally {
    await w.stop();
  }
}
