/**
 * Setup file for every test file (vitest.config.ts): what the machine was doing around a failed test —
 * the load average at its start, its end and its worst, and the test process's own event-loop delay —
 * appended to .sandbox/test-failure-context.jsonl, which the closing summary of scripts/test.sh prints
 * beside the failure. A test that fails only under load then says so itself.
 */
import { appendFileSync, mkdirSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { spawnSync } from 'node:child_process';
import { afterAll, afterEach, beforeEach } from 'vitest';

const out = process.env.VMOPS_FAILURE_CONTEXT ?? join(process.cwd(), '.sandbox', 'test-failure-context.jsonl');
const delay = monitorEventLoopDelay({ resolution: 20 });
delay.enable();
let startLoad = 0;
let maxLoad = 0;
let startedAt = 0;
let currentFile = '';
const sampler = setInterval(() => (maxLoad = Math.max(maxLoad, loadavg()[0] ?? 0)), 2000);
sampler.unref();

beforeEach((ctx) => {
  delay.reset();
  startLoad = maxLoad = loadavg()[0] ?? 0;
  startedAt = performance.now();
  currentFile = relative(process.cwd(), ctx.task.file.filepath);
  ctx.onTestFailed(() => {
    const ms = (ns: number) => Math.round(ns / 1e6);
    const context = {
      file: relative(process.cwd(), ctx.task.file.filepath),
      test: ctx.task.fullName ?? ctx.task.name,
      seconds: Math.round((performance.now() - startedAt) / 1000),
      load1: { start: startLoad, end: loadavg()[0] ?? 0, max: Math.max(maxLoad, loadavg()[0] ?? 0) },
      eventLoopDelayMs: { p50: ms(delay.percentile(50)), p99: ms(delay.percentile(99)), max: ms(delay.max) },
    };
    console.error(`[failure context] ${context.test}: load average ${context.load1.start.toFixed(1)} → ${context.load1.end.toFixed(1)} (max ${context.load1.max.toFixed(1)}) over ${context.seconds} s; event-loop delay p50 ${context.eventLoopDelayMs.p50} ms, p99 ${context.eventLoopDelayMs.p99} ms, max ${context.eventLoopDelayMs.max} ms`);
    try {
      mkdirSync(dirname(out), { recursive: true });
      appendFileSync(out, `${JSON.stringify(context)}\n`);
    } catch {
      // the console line above already carries it
    }
  });
});

afterEach(() => {
  maxLoad = Math.max(maxLoad, loadavg()[0] ?? 0);
});

// Per-file teardown (scripts/test.sh and scripts/torture.sh set VMOPS_REAP=1 for files that run one at
// a time, with this run's VMOPS_RUN_ID and TMPDIR): whatever this file's own afterAll left running —
// its world's QEMUs, sshds, control plane, operators — ends here, after every hook of the file (hooks
// run in stack order: this setup file's afterAll last).
afterAll(() => {
  if (process.env.VMOPS_REAP !== '1' || !process.env.VMOPS_RUN_ID) return;
  const r = spawnSync('bash', [join(process.cwd(), 'scripts', 'reap.sh'), process.env.VMOPS_RUN_ID, tmpdir()], { encoding: 'utf8', timeout: 60_000 });
  const ended = (r.stdout ?? '').trim();
  if (ended) console.error(`[reap] after ${currentFile || 'a file'}: the file left these behind:\n${ended}`);
});
