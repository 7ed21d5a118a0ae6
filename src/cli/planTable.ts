/**
 * The `plan` command's table: order, VM, route, and per VM an estimate of copy time and the student's outage.
 * The inventory has no disk sizes, so the estimates come from what the store measured: the bytes
 * and outage of the VM's last completed move, and the throughput of recent moves. Where nothing
 * was measured yet the columns say so instead of guessing.
 */
import type { PlanEntry } from '../api/types.js';
import type { Store } from '../store/store.js';
import { duration } from './status.js';
import { mib } from '../util/units.js';

export interface MoveHistory {
  /** `${environment}/${vm}` → last completed move */
  lastMove: Map<string, { bytes: number; outageSeconds: number | undefined }>;
  /** bytes per second over the recent completed moves (whole move: drain to uncordon), if any */
  throughput: number | undefined;
  /** how many moves the throughput is based on */
  samples: number;
}

/** Reads the completed moves (newest first) from the store's vm_moves table. */
export async function moveHistory(store: Store, recent = 20): Promise<MoveHistory> {
  const rows = await store.db.selectFrom('vm_moves')
    .select(['environment', 'vm', 'bytes', 'outage_ms', 'started_at', 'finished_at'])
    .where('phase', '=', 'Succeeded')
    .orderBy('finished_at', 'desc')
    .execute();
  const lastMove: MoveHistory['lastMove'] = new Map();
  for (const r of rows) {
    const key = `${r.environment}/${r.vm}`;
    if (!lastMove.has(key)) lastMove.set(key, { bytes: Number(r.bytes), outageSeconds: r.outage_ms === null ? undefined : Number(r.outage_ms) / 1000 });
  }
  let bytes = 0;
  let secs = 0;
  let samples = 0;
  for (const r of rows.slice(0, recent)) {
    const d = r.started_at && r.finished_at ? (Date.parse(r.finished_at) - Date.parse(r.started_at)) / 1000 : Number.NaN;
    if (Number(r.bytes) > 0 && d > 0) {
      bytes += Number(r.bytes);
      secs += d;
      samples++;
    }
  }
  return { lastMove, throughput: secs > 0 ? bytes / secs : undefined, samples };
}

export function planTable(entries: PlanEntry[], history: MoveHistory): string[] {
  const head = ['ORDER', 'ENVIRONMENT', 'VM', 'ROLE', 'FROM', 'TO', 'DATA', 'EST. COPY', 'EST. OUTAGE'];
  const rows = entries.map((e) => {
    const last = history.lastMove.get(`${e.environment}/${e.vm}`);
    const copy = last && history.throughput ? duration(last.bytes / history.throughput) : '?';
    const down = last?.outageSeconds !== undefined ? `${last.outageSeconds.toFixed(1)} s (last move)` : '?';
    return [String(e.order), e.environment, e.vm, e.role, e.from, e.to, last ? mib(last.bytes) : '?', copy, down];
  });
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(width[i]!)).join('  ').trimEnd();
  const out = [line(head), ...rows.map(line)];
  const known = rows.filter((r) => r[7] !== '?').length;
  out.push('');
  out.push(history.throughput
    ? `estimates: data and outage of each VM's last move, copy time at ${mib(history.throughput)}/s (measured over the last ${history.samples} move(s)); ${known}/${rows.length} VM(s) have history`
    : 'estimates: no completed move in the store yet (--db), so no measured size or throughput: "?"');
  return out;
}
