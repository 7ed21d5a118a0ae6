/**
 * `vm-migration-operator status NAME [--watch]`: a VMMigration's progress per environment and per
 * VM (bars, rate, ETA, the student's outage), read from the resource's status only — no database, no SSH.
 */
import { CustomObjectsApi, KubeConfig, Watch } from '@kubernetes/client-node';
import { GROUP, PLURAL, VERSION, type VMMigration, type VMStatus } from '../api/types.js';
import { mib } from '../util/units.js';
import { boundedText } from '../util/text.js';

const BAR = 20;
const TERMINAL = new Set(['Succeeded', 'Failed']);

function bar(fraction: number): string {
  const f = Math.max(0, Math.min(1, Number.isFinite(fraction) ? fraction : 0));
  const full = Math.round(f * BAR);
  return `${'█'.repeat(full)}${'░'.repeat(BAR - full)} ${String(Math.round(f * 100)).padStart(3)}%`;
}


export function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '-';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

function vmFraction(v: VMStatus): number {
  if (v.phase === 'Succeeded') return 1;
  if (v.bytesTotal && v.bytesTotal > 0) return (v.bytesTransferred ?? 0) / v.bytesTotal;
  return 0;
}

function seconds(from?: string, to?: string | Date): number {
  if (!from) return Number.NaN;
  const end = to instanceof Date ? to.getTime() : to ? Date.parse(to) : Number.NaN;
  return (end - Date.parse(from)) / 1000;
}

/** Time left: the VM in flight's own ETA plus the mean duration of finished VMs for each one still pending. */
function etaSeconds(vms: VMStatus[], now: Date): number | undefined {
  const done = vms.filter((v) => v.phase === 'Succeeded' && v.startedAt && v.finishedAt);
  const pending = vms.filter((v) => v.phase === 'Pending').length;
  const running = vms.find((v) => v.phase === 'Running');
  if (done.length === 0) return running?.etaSeconds !== undefined && pending === 0 ? running.etaSeconds : undefined;
  const mean = done.reduce((a, v) => a + seconds(v.startedAt, v.finishedAt), 0) / done.length;
  let left = pending * mean;
  if (running) left += running.etaSeconds ?? Math.max(0, mean - seconds(running.startedAt, now));
  return left;
}

/** The text of one status screen. Pure, for tests and for --watch redraws. */
export function renderStatus(o: VMMigration, now = new Date()): string {
  const s = o.status ?? {};
  const vms = s.vms ?? [];
  const lines: string[] = [];
  const done = vms.filter((v) => v.phase === 'Succeeded').length;
  const elapsed = s.startedAt ? duration(seconds(s.startedAt, s.finishedAt ?? now)) : '-';
  const eta = TERMINAL.has(s.phase ?? '') ? undefined : etaSeconds(vms, now);
  lines.push(`VMMigration ${o.metadata.namespace}/${o.metadata.name}   ${s.phase ?? 'Pending (not picked up yet)'}   ${done}/${vms.length || '?'} VMs   target ${o.spec.targetHost}   elapsed ${elapsed}${eta !== undefined ? `   ETA ${duration(eta)}` : ''}`);
  const generation = o.metadata.generation;
  if (generation !== undefined && s.observedGeneration !== undefined && s.observedGeneration < generation) {
    lines.push(`  (status is for generation ${s.observedGeneration}; the spec is at ${generation})`);
  }
  for (const c of s.conditions ?? []) lines.push(`  ${c.type.padEnd(12)} ${c.status.padEnd(6)} ${c.reason}: ${boundedText(c.message)}`);
  const plan = s.plan ?? [];
  const envs = [...new Set([...plan.map((p) => p.environment), ...vms.map((v) => v.environment)])];
  for (const env of envs) {
    const ev = vms.filter((v) => v.environment === env);
    const route = [...new Set(plan.filter((p) => p.environment === env).map((p) => `${p.from} → ${p.to}`))].join(', ');
    const fraction = ev.length ? ev.reduce((a, v) => a + vmFraction(v), 0) / ev.length : 0;
    lines.push('');
    lines.push(`ENVIRONMENT ${env}   ${bar(fraction)}   ${ev.filter((v) => v.phase === 'Succeeded').length}/${ev.length} VMs   ${route}`);
    lines.push(`  ${'VM'.padEnd(14)} ${'PHASE'.padEnd(10)} ${'STEP'.padEnd(10)} ${'PROGRESS'.padEnd(25)} ${'COPIED'.padEnd(22)} ${'RATE'.padEnd(12)} ${'ETA'.padEnd(7)} OUTAGE (STUDENT'S)`);
    for (const v of ev) {
      const copied = v.bytesTotal ? `${mib(v.bytesTransferred ?? 0)} of ${mib(v.bytesTotal)}` : v.bytesTransferred ? mib(v.bytesTransferred) : '';
      const rate = v.phase === 'Running' && v.bytesPerSecond ? `${mib(v.bytesPerSecond)}/s` : '';
      const vEta = v.phase === 'Running' && v.etaSeconds !== undefined ? duration(v.etaSeconds) : '';
      const down = outageCell(v);
      lines.push(`  ${v.name.padEnd(14)} ${v.phase.padEnd(10)} ${(v.phase === 'Running' ? v.step ?? '' : '').padEnd(10)} ${bar(vmFraction(v)).padEnd(25)} ${copied.padEnd(22)} ${rate.padEnd(12)} ${vEta.padEnd(7)} ${down}`.trimEnd());
      if (v.message && v.phase !== 'Succeeded') lines.push(`      ${boundedText(v.message)}`);
    }
  }
  if (s.message && !(s.conditions ?? []).some((c) => c.message === s.message)) lines.push('', boundedText(s.message));
  return lines.join('\n');
}

/** The student's outage first; the operator's stop→start beside it, so the two are never mistaken for one another. */
function outageCell(v: VMStatus): string {
  if (v.outageSeconds === undefined) return '';
  if (v.outage?.until === 'GuestResumed') return `${v.outageSeconds.toFixed(2)} s (live pause)`;
  const share = v.outage ? `, stop→start ${v.outage.stopToStartSeconds.toFixed(1)} s` : '';
  return `${v.outageSeconds.toFixed(1)} s (to node Ready${share})`;
}

export interface StatusCommandOptions {
  kc: KubeConfig;
  name: string;
  namespace: string;
  watch: boolean;
  out?: (text: string) => void;
  /** redraw in place (ANSI) instead of printing each screen below the last; default: stdout is a TTY */
  redraw?: boolean;
}

/** Exit code: 0 when shown (or, with --watch, when it Succeeded), 1 when it ended Failed, 2 when not found. */
export async function statusCommand(opts: StatusCommandOptions): Promise<number> {
  const out = opts.out ?? ((t: string) => process.stdout.write(`${t}\n`));
  const redraw = opts.redraw ?? process.stdout.isTTY === true;
  const api = opts.kc.makeApiClient(CustomObjectsApi);
  let obj: VMMigration;
  try {
    obj = (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: opts.namespace, plural: PLURAL, name: opts.name })) as VMMigration;
  } catch (err) {
    const code = (err as { code?: number }).code;
    if (code === 404) {
      process.stderr.write(`error: VMMigration ${opts.namespace}/${opts.name} not found (NAME; the namespace is set with --namespace)\n`);
      return 2;
    }
    throw err;
  }
  const exitFor = (o: VMMigration) => (o.status?.phase === 'Failed' ? 1 : 0);
  out(renderStatus(obj));
  if (!opts.watch || TERMINAL.has(obj.status?.phase ?? '')) return exitFor(obj);

  return new Promise<number>((resolve, reject) => {
    let last = '';
    let req: AbortController | undefined;
    const show = (o: VMMigration) => {
      const text = renderStatus(o);
      if (text === last) return;
      last = text;
      out(redraw ? `\x1b[H\x1b[2J${text}` : `\n${text}`);
      if (TERMINAL.has(o.status?.phase ?? '')) {
        req?.abort();
        clearInterval(tick);
        resolve(exitFor(o));
      }
    };
    // elapsed/ETA move on between events too
    let latest = obj;
    const tick = setInterval(() => show(latest), 5000);
    const start = () => new Watch(opts.kc)
      .watch(`/apis/${GROUP}/${VERSION}/namespaces/${opts.namespace}/${PLURAL}`, { fieldSelector: `metadata.name=${opts.name}` }, (type: string, o: VMMigration) => {
        if (type === 'DELETED') {
          clearInterval(tick);
          out(`VMMigration ${opts.namespace}/${opts.name} was deleted`);
          resolve(1);
          return;
        }
        latest = o;
        show(o);
      }, (err) => {
        if (err && !(err instanceof Error && err.name === 'AbortError')) {
          clearInterval(tick);
          reject(err instanceof Error ? err : new Error(String(err)));
        } else if (!TERMINAL.has(latest.status?.phase ?? '')) {
          start(); // the API server ends watches after a while; keep watching
        }
      })
      .then((c) => (req = c), (err: unknown) => {
        clearInterval(tick);
        reject(err instanceof Error ? err : new Error(String(err)));
      });
    start();
  });
}
