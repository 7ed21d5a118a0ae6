/**
 * A real Prometheus (Debian's `prometheus` package) for the tests: own config and data dir, on a
 * free loopback port, scraping the given targets every second and evaluating the shipped rules
 * every second, so an alert with `for: 0m` fires within a few seconds of its condition.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { stringify } from 'yaml';
import { liveness, noteWait } from './budget.js';
import { freePort } from './sandbox.js';

export const RULES_FILE = resolve(import.meta.dirname, '../../manifests/monitoring/rules.yaml');

export interface PrometheusAlert { labels: Record<string, string>; annotations: Record<string, string>; state: 'pending' | 'firing'; activeAt: string; value: string }
export interface PrometheusSample { metric: Record<string, string>; value: [number, string] }

export interface TestPrometheus {
  url: string;
  /** instant query; throws on a query error */
  query(expr: string): Promise<PrometheusSample[]>;
  alerts(): Promise<PrometheusAlert[]>;
  /** polls until `check` returns a value (not undefined); `timeoutMs` is a liveness budget, scaled by VMOPS_TIME_SCALE */
  waitFor<T>(what: string, check: () => Promise<T | undefined>, timeoutMs?: number): Promise<T>;
  /** scrape targets as Prometheus sees them (health, lastError) */
  targets(): Promise<Array<{ scrapeUrl: string; health: string; lastError: string; labels: Record<string, string> }>>;
  stop(): Promise<void>;
}

export interface PrometheusOptions {
  dir: string;
  /** host:port of each operator /metrics endpoint */
  targets: string[];
  job?: string;
  ruleFiles?: string[];
}

export async function startPrometheus(opts: PrometheusOptions): Promise<TestPrometheus> {
  const dir = resolve(opts.dir);
  mkdirSync(join(dir, 'data'), { recursive: true });
  const port = await freePort();
  const configPath = join(dir, 'prometheus.yml');
  writeFileSync(configPath, stringify({
    // A scrape that times out marks the operator's series stale, and the next instant query finds
    // nothing: 2 s gives an operator whose event loop a loaded machine holds up room to answer.
    global: { scrape_interval: '2s', scrape_timeout: '2s', evaluation_interval: '1s' },
    rule_files: opts.ruleFiles ?? [RULES_FILE],
    scrape_configs: [{ job_name: opts.job ?? 'vm-migration-operator', static_configs: [{ targets: opts.targets }] }],
  }));
  const logPath = join(dir, 'prometheus.log');
  const fd = openSync(logPath, 'a');
  const child: ChildProcess = spawn('prometheus', [
    `--config.file=${configPath}`,
    `--storage.tsdb.path=${join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${port}`,
    '--storage.tsdb.retention.time=1h',
    '--log.level=warn',
  ], { stdio: ['ignore', fd, fd] });
  closeSync(fd);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const url = `http://127.0.0.1:${port}`;
  const running = () => child.exitCode === null && child.signalCode === null;

  const api = async <T>(path: string): Promise<T> => {
    const res = await fetch(`${url}${path}`);
    const body = (await res.json()) as { status: string; data: T; error?: string };
    if (body.status !== 'success') throw new Error(`prometheus ${path}: ${body.error ?? res.status}`);
    return body.data;
  };
  const waitFor = async <T>(what: string, check: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> => {
    const budget = liveness(timeoutMs);
    const t0 = performance.now();
    const deadline = Date.now() + budget;
    for (;;) {
      if (!running()) throw new Error(`prometheus exited; log ${logPath}:\n${readFileSync(logPath, 'utf8').slice(-2000)}`);
      const v = await check().catch(() => undefined);
      if (v !== undefined) {
        noteWait(`prometheus: ${what}`, budget, performance.now() - t0);
        return v;
      }
      if (Date.now() > deadline) throw new Error(`timed out after ${budget} ms waiting for ${what} (prometheus log ${logPath})`);
      await new Promise((r) => setTimeout(r, 250));
    }
  };

  const prom: TestPrometheus = {
    url,
    query: async (expr) => (await api<{ result: PrometheusSample[] }>(`/api/v1/query?query=${encodeURIComponent(expr)}`)).result,
    alerts: async () => (await api<{ alerts: PrometheusAlert[] }>('/api/v1/alerts')).alerts,
    targets: async () => (await api<{ activeTargets: Array<{ scrapeUrl: string; health: string; lastError: string; labels: Record<string, string> }> }>('/api/v1/targets')).activeTargets,
    waitFor,
    stop: async () => {
      if (running()) child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (running()) child.kill('SIGKILL');
    },
  };
  try {
    await waitFor('prometheus /-/ready', async () => ((await fetch(`${url}/-/ready`)).ok ? true : undefined), 60_000);
  } catch (err) {
    await prom.stop();
    throw err;
  }
  return prom;
}
