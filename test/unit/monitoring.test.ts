/**
 * The shipped Prometheus rules, checked and unit-tested by the real promtool (Debian's
 * `prometheus` package), the PrometheusRule generated from them, and the operator's /metrics
 * checked by `promtool check metrics`.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import {
  initLabelledCounters, recordMigrationFinished, recordMigrationStarted, recordTransferBytes, recordVmMove,
  registry, reportInformerSynced, startStepTimer,
} from '../../src/metrics/metrics.js';
import { startMetricsServer, type MetricsServer } from '../../src/metrics/server.js';
import { prometheusRuleYaml } from '../../scripts/gen-manifests.mjs';

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, '../..');
const RULES = join(ROOT, 'manifests/monitoring/rules.yaml');
const TESTS = join(ROOT, 'test/monitoring/rules.test.yaml');
const WORK = join(ROOT, '.sandbox/monitoring-unit');

interface Rule { alert?: string; record?: string; expr: string; labels?: Record<string, string>; annotations?: Record<string, string> }
interface RulesFile { groups: Array<{ name: string; rules: Rule[] }> }
interface ExpAlert { exp_labels: Record<string, string>; exp_annotations?: Record<string, string> }
interface PromtoolTest { name: string; alert_rule_test?: Array<{ alertname: string; exp_alerts: ExpAlert[] }>; promql_expr_test?: Array<{ expr: string }> }

const rules = parse(readFileSync(RULES, 'utf8')) as RulesFile;
const allRules = rules.groups.flatMap((g) => g.rules);

/** Renders the only template construct the rules use, {{ $labels.NAME }}, as Prometheus would. */
function render(text: string, labels: Record<string, string>): string {
  return text.replace(/\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}/g, (_m, name: string) => labels[name] ?? '');
}

async function promtool(args: string[], stdin?: string): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('promtool', args, { cwd: ROOT });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('close', (code) => resolve({ code: code ?? 1, out }));
    if (stdin !== undefined) p.stdin.end(stdin);
    else p.stdin.end();
  });
}

describe('Prometheus rules (manifests/monitoring/rules.yaml)', () => {
  it('pass `promtool check rules`', async () => {
    const r = await promtool(['check', 'rules', RULES]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain(`SUCCESS: ${allRules.length} rules found`);
  });

  it('cover what the issue asks for, each alert with severity, summary, description and runbook', () => {
    const alerts = allRules.filter((r) => r.alert).map((r) => r.alert);
    expect(alerts).toEqual(expect.arrayContaining([
      'VMOpsMigrationFailed', 'VMOpsVMMoveStuck', 'VMOpsVMOutageAboveSLO', 'VMOpsVMMoveRolledBack',
      'VMOpsVMMoveNeedsHuman', 'VMOpsNoLeader', 'VMOpsInformerNotSynced', 'VMOpsWorkQueueRetriesClimbing',
    ]));
    for (const r of allRules.filter((x) => x.alert)) {
      expect(['warning', 'critical'], r.alert).toContain(r.labels?.severity);
      for (const k of ['summary', 'description', 'runbook']) expect(r.annotations?.[k]?.length ?? 0, `${r.alert}.${k}`).toBeGreaterThan(20);
    }
  });

  it('pass `promtool test rules`, and every alert and recording rule has a test', async () => {
    const spec = parse(readFileSync(TESTS, 'utf8')) as { tests: PromtoolTest[] };
    const byAlert = new Map(allRules.filter((r) => r.alert).map((r) => [r.alert!, r]));
    const alertsTested = new Set<string>();
    const firingTested = new Set<string>();
    const exprs: string[] = [];
    for (const t of spec.tests) {
      for (const a of t.alert_rule_test ?? []) {
        const rule = byAlert.get(a.alertname);
        expect(rule, `test "${t.name}" names unknown alert ${a.alertname}`).toBeDefined();
        alertsTested.add(a.alertname);
        for (const e of a.exp_alerts) {
          firingTested.add(a.alertname);
          expect(e.exp_annotations, 'annotations are filled in from the rules file').toBeUndefined();
          e.exp_annotations = Object.fromEntries(Object.entries(rule!.annotations ?? {}).map(([k, v]) => [k, render(v, e.exp_labels)]));
        }
      }
      for (const p of t.promql_expr_test ?? []) exprs.push(p.expr);
    }
    expect([...alertsTested].sort()).toEqual([...byAlert.keys()].sort());
    expect([...firingTested].sort(), 'every alert is shown firing at least once').toEqual([...byAlert.keys()].sort());
    for (const r of allRules.filter((x) => x.record)) {
      expect(exprs.some((e) => e.includes(r.record!)) || allRules.some((a) => a.alert && a.expr.includes(r.record!)), `${r.record} is tested`).toBe(true);
    }
    mkdirSync(WORK, { recursive: true });
    const filled = join(WORK, 'rules.test.yaml');
    writeFileSync(filled, JSON.stringify({ ...spec, rule_files: [RULES] }));
    const r = await promtool(['test', 'rules', filled]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain('SUCCESS');
  });

  it('are byte-for-byte the rules of the generated PrometheusRule', () => {
    const text = readFileSync(join(ROOT, 'manifests/monitoring/prometheusrule.yaml'), 'utf8');
    expect(text, 'run node scripts/gen-manifests.mjs').toBe(prometheusRuleYaml());
    const pr = parse(text) as { kind: string; spec: RulesFile };
    expect(pr.kind).toBe('PrometheusRule');
    expect(pr.spec.groups).toEqual(rules.groups);
  });
});

describe('the operator\'s /metrics', () => {
  let server: MetricsServer;
  let body: string;
  beforeAll(async () => {
    initLabelledCounters();
    reportInformerSynced(() => true);
    recordMigrationStarted('cold');
    startStepTimer('transfer')();
    recordTransferBytes(4096);
    recordVmMove('success', { seconds: 9.5, until: 'NodeReady', stopToStartSeconds: 1.5 });
    recordMigrationFinished('cold', true);
    server = await startMetricsServer({ port: 0, host: '127.0.0.1', readiness: () => ({ ready: true }) });
    body = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
  });
  afterAll(() => server?.close());

  it('pass `promtool check metrics` (names, units, help, types)', async () => {
    const r = await promtool(['check', 'metrics'], body);
    expect(r.out).toBe('');
    expect(r.code).toBe(0);
  });

  it('export every label value of the labelled counters from the start (so increase() sees the first failure)', () => {
    for (const s of ['cold', 'precopy', 'live', 'other']) expect(body).toMatch(new RegExp(`^vmops_migrations_failed_total\\{strategy="${s}"\\} \\d+$`, 'm'));
    for (const r of ['success', 'failure', 'rolled_back', 'stuck']) expect(body).toMatch(new RegExp(`^vmops_vm_moves_total\\{result="${r}"\\} \\d+$`, 'm'));
    // the outage histogram by how its end was seen: a live move's series exists before the first live move
    expect(body).toMatch(/^vmops_vm_outage_seconds_count\{until="GuestResumed"\} 0$/m);
    expect(body).toMatch(/^vmops_vm_outage_seconds_count\{until="NodeReady"\} 1$/m);
    expect(body).toMatch(/^vmops_informer_synced 1$/m);
    // the move ended: no move in flight, so no progress timestamp that could look stuck
    expect(body).toMatch(/^vmops_vm_move_last_progress_timestamp_seconds 0$/m);
  });

  it('name every metric the rules use', async () => {
    const exported = new Set((await registry.getMetricsAsJSON()).map((m) => m.name));
    const used = new Set(allRules.flatMap((r) => r.expr.match(/\bvmops_[a-z_]+/g) ?? []).map((n) => n.replace(/_(bucket|count|sum)$/, '')));
    expect(used.size).toBeGreaterThan(5);
    for (const n of used) expect(exported.has(n), `${n} is used by a rule but not exported`).toBe(true);
  });
});

// promtool is an external dependency of the suite; say so plainly if it is missing.
beforeAll(async () => {
  await execFileP('promtool', ['--version']).catch(() => {
    throw new Error('promtool not found: install Debian\'s "prometheus" package (scripts/setup.sh does)');
  });
});

describe('the Grafana dashboard (manifests/monitoring/grafana-dashboard.json)', () => {
  interface Panel { title: string; targets?: Array<{ expr: string }> }
  const dashboard = JSON.parse(readFileSync(join(ROOT, 'manifests/monitoring/grafana-dashboard.json'), 'utf8')) as { panels: Panel[]; templating: { list: Array<{ query: unknown }> } };
  const queries = [
    ...dashboard.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ where: p.title, expr: t.expr }))),
    ...dashboard.templating.list.flatMap((v) => (typeof v.query === 'object' && v.query && 'query' in v.query ? [{ where: 'variable', expr: String((v.query as { query: string }).query) }] : [])),
  ];

  it('shows what the issue asks for', () => {
    const titles = dashboard.panels.map((p) => p.title).join(' | ');
    for (const t of ['in flight', 'student outage distribution', 'throughput', 'Step duration', 'Failures']) expect(titles).toContain(t);
  });

  it('names only exported metrics, recording rules of rules.yaml, or Prometheus\'s own ALERTS', async () => {
    const exported = new Set((await registry.getMetricsAsJSON()).map((m) => m.name));
    const recorded = new Set(allRules.filter((r) => r.record).map((r) => r.record!));
    const FUNCTIONS = new Set(['sum', 'by', 'without', 'rate', 'increase', 'histogram_quantile', 'max', 'min', 'time', 'label_values', 'and', 'or', 'unless']);
    let names = 0;
    for (const q of queries) {
      // drop label matchers, strings and range selectors; what remains are metric names, functions and keywords
      const bare = q.expr.replace(/\{[^}]*\}/g, '').replace(/"[^"]*"/g, '').replace(/\[[^\]]*\]/g, '').replace(/\(\s*[a-z_, ]+\)\s*\(/g, '(');
      const idents = (bare.match(/[a-zA-Z_:][a-zA-Z0-9_:]*/g) ?? []).filter((i) => !FUNCTIONS.has(i) && !/^(job|le|step|result|strategy|instance)$/.test(i));
      expect(idents.length, `${q.where}: ${q.expr}`).toBeGreaterThan(0);
      for (const id of idents) {
        names++;
        const base = id.replace(/_(bucket|count|sum)$/, '');
        expect(exported.has(base) || recorded.has(id) || id === 'ALERTS', `${q.where}: ${id} in ${q.expr}`).toBe(true);
      }
    }
    expect(names).toBeGreaterThan(20);
  });
});

