/**
 * `BENCH_PARTS=environment npm run bench`: one 7-VM environment (no-OS QEMU VMs, BENCH_ENV_DISK_MIB
 * of dense data each, default 256) moved by the real operator between host01 and host02, once per
 * way of moving it, in one run:
 *  - cold: the baseline the relay's throughput is measured from (bytes ÷ the sum of its copy steps);
 *  - pre-copy, mirrorAhead 0: serial, each VM mirrors only once the one before it has moved;
 *  - pre-copy, mirrorAhead 1: the next VM mirrors while the current one drains and cuts over;
 *  - pre-copy, mirrorAhead 6: the whole environment mirrors at once, the cut-overs follow one by one.
 * Prints wall time, its ratio to the serial pre-copy, the sum of the seven cut-overs (`stop` began →
 * the move's last journal entry: stop, converge, fence, files, verify, start, node Ready, uncordon,
 * cleanup), and issue 9's goal: wall ≤ 1.2 × allocated ÷ relay throughput + Σ cut-overs. Every run also asserts one node of the environment down at a time.
 */
import { join } from 'node:path';
import { Store } from '../src/store/store.js';
import { startFleetWorld } from '../test/world/fleetWorld.js';

const ENV = 'env-bench';
const MiB = 1048576;

interface Row { name: string; seconds: number; cutoverS: number; copyS: number; bytes: number; perEnv: number }

export async function runEnvironment(): Promise<string> {
  const denseMiB = Number(process.env.BENCH_ENV_DISK_MIB ?? '256');
  const w = await startFleetWorld({ environments: [ENV], firstAddress: 170, diskMiB: Math.max(1024, denseMiB * 2), denseMiB, log: (l) => console.error(`[environment] ${l}`) });
  const runs: Array<{ name: string; spec: Record<string, unknown> }> = [
    { name: 'cold', spec: {} },
    { name: 'pre-copy, mirrorAhead 0 (serial)', spec: { transfer: { precopy: true, mirrorAhead: 0 } } },
    { name: 'pre-copy, mirrorAhead 1', spec: { transfer: { precopy: true, mirrorAhead: 1 } } },
    { name: 'pre-copy, mirrorAhead 6 (whole environment)', spec: { transfer: { precopy: true, mirrorAhead: 6 } } },
  ];
  const rows: Row[] = [];
  try {
    let at = 'host01';
    for (const [i, r] of runs.entries()) {
      const to = at === 'host01' ? 'host02' : 'host01';
      const watch = await w.watchDisruption();
      const name = `env-${i}`;
      const m = await w.migrate(name, { environments: [ENV], targetHost: to, hostLimits: { maxOutboundPerHost: 7, maxInboundPerHost: 7 }, placement: { cpuOvercommitRatio: 16 }, ...r.spec });
      watch.stop();
      if (watch.maxDownPerEnv() > 1) throw new Error(`${r.name}: ${watch.maxDownPerEnv()} nodes of the environment down at once`);
      const store = await Store.open(join(w.dir, 'operator.db'));
      try {
        const rowsOf = await store.journalEntries(m.o.metadata.uid);
        const t = (x: { at: string }) => Date.parse(x.at);
        let cutoverMs = 0;
        let copyMs = 0;
        for (const vm of w.envs[0]!.vms) {
          const mine = rowsOf.filter((x) => x.vm === vm.name);
          const stop = mine.find((x) => x.step === 'stop' && x.event === 'begin');
          if (stop) cutoverMs += t(mine.at(-1)!) - t(stop);
          for (const x of mine) if (x.step === 'transfer' && x.event === 'end') copyMs += (JSON.parse(x.detail_json ?? '{}') as { durationMs?: number }).durationMs ?? 0;
        }
        const bytes = (m.o.status?.vms ?? []).reduce((n, v) => n + (v.bytesTransferred ?? 0), 0);
        rows.push({ name: r.name, seconds: m.seconds, cutoverS: cutoverMs / 1000, copyS: copyMs / 1000, bytes, perEnv: watch.maxDownPerEnv() });
      } finally {
        await store.close();
      }
      console.error(`[environment] ${r.name}: ${m.seconds.toFixed(1)} s`);
      at = to;
    }
  } finally {
    await w.stop();
  }
  const cold = rows[0]!;
  const relayBps = cold.bytes / cold.copyS;
  const serial = rows[1]!;
  return [
    `### Whole environment, pipelined pre-copy (7 no-OS VMs × ${denseMiB} MiB dense data, real operator, host01 ⇄ host02)`,
    '',
    `Relay throughput from the cold run: ${(relayBps / MiB).toFixed(0)} MiB/s (${(cold.bytes / MiB).toFixed(0)} MiB in ${cold.copyS.toFixed(1)} s of copy steps).`,
    '',
    '| how | wall time | vs serial pre-copy | Σ cut-overs (stop → end of the move) | goal: 1.2 × bytes ÷ relay + Σ cut-overs | met | nodes down at once |',
    '|---|---:|---:|---:|---:|---|---:|',
    ...rows.map((r) => {
      const goal = r === cold ? undefined : 1.2 * (cold.bytes / relayBps) + r.cutoverS;
      return `| ${r.name} | ${r.seconds.toFixed(1)} s | ${r === cold ? '–' : `${(serial.seconds / r.seconds).toFixed(2)}×`} | ${r.cutoverS.toFixed(1)} s | ${goal === undefined ? '–' : `${goal.toFixed(1)} s`} | ${goal === undefined ? '–' : r.seconds <= goal ? 'yes' : 'no'} | ${r.perEnv} |`;
    }),
  ].join('\n');
}
