/**
 * `vm-migration-operator history <migration-uid-or-name> --db F`: each VM's steps, as journaled,
 * with start time, duration and outcome — the audit trail a resume is decided from.
 */
import type { Store } from '../store/store.js';
import { boundedText } from '../util/text.js';

interface Row { step: string; event: string; at: string; detail_json: string | null }

export interface StepLine {
  step: string;
  startedAt: string;
  durationMs?: number;
  outcome: 'done' | 'failed' | 'running';
  message?: string;
}

/** Pairs each `begin` with the `end`/`fail` that follows it for the same step. */
export function stepLines(rows: Row[]): StepLine[] {
  const lines: StepLine[] = [];
  const open = new Map<string, StepLine>();
  for (const r of rows) {
    const detail = r.detail_json ? (JSON.parse(r.detail_json) as { durationMs?: number; message?: string }) : {};
    if (r.event === 'begin') {
      const line: StepLine = { step: r.step, startedAt: r.at, outcome: 'running' };
      open.set(r.step, line);
      lines.push(line);
      continue;
    }
    const line = open.get(r.step);
    if (!line) continue;
    open.delete(r.step);
    line.outcome = r.event === 'end' ? 'done' : 'failed';
    line.durationMs = detail.durationMs ?? Date.parse(r.at) - Date.parse(line.startedAt);
    line.message = detail.message;
  }
  return lines;
}

export async function history(store: Store, ref: string, out: (line: string) => void = console.log): Promise<boolean> {
  const named = await store.migrationUidsNamed(ref);
  const uids = named.length > 0 ? named : [ref];
  let found = false;
  for (const uid of uids) {
    const rows = await store.journalEntries(uid);
    if (rows.length === 0) continue;
    found = true;
    out(`migration ${uid}`);
    const vms = [...new Set(rows.map((r) => `${r.environment}/${r.vm}`))];
    for (const vm of vms) {
      const move = await store.move(uid, vm.split('/')[0]!, vm.split('/')[1]!);
      out(`  ${vm}  ${move ? `${move.phase} ${move.fromHost} → ${move.toHost}, attempts ${move.attempts}` : ''}`);
      for (const l of stepLines(rows.filter((r) => `${r.environment}/${r.vm}` === vm))) {
        const dur = l.durationMs === undefined ? '' : `${(l.durationMs / 1000).toFixed(2)} s`;
        out(`    ${l.startedAt}  ${l.step.padEnd(14)} ${l.outcome.padEnd(8)} ${dur.padStart(9)}${l.message ? `  ${boundedText(l.message, 2048)}` : ''}`);
      }
    }
  }
  return found;
}
