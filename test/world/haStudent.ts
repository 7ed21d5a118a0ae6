/**
 * The student: the real `kubectl` against the beachhead's load balancer, in a loop of gets, lists and a
 * create/delete, each invocation's outcome and wall time (what the student waits for) recorded.
 */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { liveness } from './budget.js';

export interface StudentSample {
  /** Date.now() at the start */
  at: number;
  op: string;
  ok: boolean;
  ms: number;
  error?: string;
}

export interface StudentSummary {
  sent: number;
  failed: number;
  p99Ms: number;
  worstMs: number;
  /** requests slower than the limit given to summary() */
  slow: number;
  errors: string[];
}

export function summarize(samples: StudentSample[], slowMs = 2000): StudentSummary {
  const ms = samples.map((s) => s.ms).sort((a, b) => a - b);
  const p99 = ms.length ? ms[Math.min(ms.length - 1, Math.ceil(ms.length * 0.99) - 1)]! : 0;
  return {
    sent: samples.length,
    failed: samples.filter((s) => !s.ok).length,
    p99Ms: p99,
    worstMs: ms.at(-1) ?? 0,
    slow: samples.filter((s) => s.ms > slowMs).length,
    errors: samples.filter((s) => !s.ok).map((s) => `${new Date(s.at).toISOString()} ${s.op} after ${s.ms} ms: ${s.error ?? ''}`),
  };
}

export class KubectlStudent {
  readonly samples: StudentSample[] = [];
  private running = false;
  private loops: Promise<void>[] = [];
  private seq = 0;

  constructor(
    private readonly kubeconfigPath: string,
    private readonly opts: {
      cacheDir: string;
      namespace?: string;
      parallel?: number;
      pauseMs?: number;
      /** the loops end by themselves after this long (a liveness budget; default 30 min) if stop() never comes */
      maxRunMs?: number;
    },
  ) {}

  private kubectl(args: string[]): Promise<{ ok: boolean; error?: string }> {
    return new Promise((res) => {
      execFile('kubectl', ['--kubeconfig', this.kubeconfigPath, '--cache-dir', this.opts.cacheDir, '--request-timeout=30s', ...args], { timeout: 60_000 }, (err, _out, stderr) =>
        res(err ? { ok: false, error: (stderr || err.message).trim().split('\n').slice(-2).join(' | ') } : { ok: true }),
      );
    });
  }

  private async one(op: string, args: string[]): Promise<void> {
    const at = Date.now();
    const t = performance.now();
    const r = await this.kubectl(args);
    const sample: StudentSample = { at, op, ok: r.ok, ms: Math.round(performance.now() - t) };
    if (r.error) sample.error = r.error;
    this.samples.push(sample);
  }

  async start(): Promise<void> {
    await mkdir(this.opts.cacheDir, { recursive: true });
    this.running = true;
    const ns = this.opts.namespace ?? 'default';
    // a test that failed before stop() must not leave kubectl loops running into the next test or file
    const deadline = Date.now() + (this.opts.maxRunMs ?? liveness(1_800_000));
    const loop = async (worker: number) => {
      while (this.running && Date.now() < deadline) {
        const n = `student-${worker}-${this.seq++}`;
        await this.one('get', ['get', 'namespace', ns, '-o', 'name']);
        if (!this.running) break;
        await this.one('list', ['get', 'pods', '-A', '-o', 'name']);
        if (!this.running) break;
        await this.one('create', ['create', 'configmap', n, '-n', ns, '--from-literal=k=v']);
        await this.one('delete', ['delete', 'configmap', n, '-n', ns, '--wait=false', '--ignore-not-found']);
        if (this.opts.pauseMs) await new Promise((r) => setTimeout(r, this.opts.pauseMs));
      }
    };
    this.loops = Array.from({ length: this.opts.parallel ?? 2 }, (_, i) => loop(i));
  }

  /** Ends the loops after their current call; returns every sample (idempotent). */
  async stop(): Promise<StudentSample[]> {
    this.running = false;
    await Promise.all(this.loops);
    return this.samples;
  }

  between(from: number, to: number): StudentSample[] {
    return this.samples.filter((s) => s.at >= from && s.at <= to);
  }
}
