import { afterEach, describe, expect, it } from 'vitest';
import {
  moveInFlight,
  recordLiveFigures,
  recordMigrationFinished,
  recordMigrationStarted,
  recordTransferBytes,
  recordVmMove,
  registry,
  startStepTimer,
  stepLabel,
  strategyLabel,
  workQueueMetricsHooks,
  informerRestartHook,
} from '../../src/metrics/metrics.js';
import { startMetricsServer, type MetricsServer } from '../../src/metrics/server.js';
import { WorkQueue } from '../../src/controller/runtime/workQueue.js';

let server: MetricsServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function get(path: string): Promise<{ status: number; body: string; type: string | null }> {
  const res = await fetch(`http://127.0.0.1:${server!.port}${path}`);
  return { status: res.status, body: await res.text(), type: res.headers.get('content-type') };
}

describe('metrics', () => {
  it('GET /metrics exposes the operator counters, histograms and default process metrics', async () => {
    recordMigrationStarted('live');
    recordMigrationFinished('live', true);
    recordMigrationStarted('cold');
    recordMigrationFinished('cold', false);
    recordVmMove('success', { seconds: 0.3, until: 'GuestResumed', stopToStartSeconds: 0.3 });
    recordVmMove('success', { seconds: 14, until: 'NodeReady', stopToStartSeconds: 3.2 });
    recordTransferBytes(1024);
    startStepTimer('mirror')();
    const q = new WorkQueue({ metrics: workQueueMetricsHooks(), baseDelayMs: 10_000 });
    q.add('a');
    q.add('b');
    q.addRateLimited('c');
    informerRestartHook()('test');
    await q.shutdown();

    server = await startMetricsServer({ port: 0, host: '127.0.0.1', readiness: () => ({ ready: true }) });
    const { status, body, type } = await get('/metrics');
    expect(status).toBe(200);
    expect(type).toContain('text/plain');
    expect(body).toMatch(/^vmops_migrations_started_total\{strategy="live"\} 1$/m);
    expect(body).toMatch(/^vmops_migrations_succeeded_total\{strategy="live"\} 1$/m);
    expect(body).toMatch(/^vmops_migrations_failed_total\{strategy="cold"\} 1$/m);
    expect(body).toMatch(/^vmops_migrations_active 0$/m);
    expect(body).toMatch(/^vmops_vm_moves_total\{result="success"\} 2$/m);
    // the student's outage, by how its end was seen; the operator's stop→start beside it
    expect(body).toMatch(/^vmops_vm_outage_seconds_bucket\{le="0.5",until="GuestResumed"\} 1$/m);
    expect(body).toMatch(/^vmops_vm_outage_seconds_bucket\{le="10",until="NodeReady"\} 0$/m);
    expect(body).toMatch(/^vmops_vm_outage_seconds_bucket\{le="30",until="NodeReady"\} 1$/m);
    expect(body).toMatch(/^vmops_vm_stop_to_start_seconds_bucket\{le="0.5"\} 1$/m);
    expect(body).toMatch(/^vmops_vm_stop_to_start_seconds_bucket\{le="5"\} 2$/m);
    expect(body).toMatch(/^vmops_transfer_bytes_total 1024$/m);
    expect(body).toMatch(/^vmops_step_duration_seconds_count\{step="mirror"\} 1$/m);
    expect(body).toMatch(/^vmops_workqueue_depth 0$/m); // shutdown dropped the queued keys
    expect(body).toMatch(/^vmops_workqueue_retries_total 1$/m);
    expect(body).toMatch(/^vmops_informer_restarts_total 1$/m);
    expect(body).toMatch(/^process_cpu_seconds_total /m);
    expect(body).toMatch(/^nodejs_heap_size_used_bytes /m);
  });

  it("exposes QEMU's live-migration figures while one runs, 0 once it ended", async () => {
    const move = moveInFlight();
    recordLiveFigures({ remainingBytes: 5 * 1048576, expectedDowntimeMs: 120, dirtyPagesPerSecond: 340 });
    let body = await registry.metrics();
    expect(body).toMatch(/^vmops_live_migration_remaining_bytes 5242880$/m);
    expect(body).toMatch(/^vmops_live_migration_expected_downtime_seconds 0.12$/m);
    expect(body).toMatch(/^vmops_live_migration_dirty_pages_per_second 340$/m);
    move.ended();
    body = await registry.metrics();
    expect(body).toMatch(/^vmops_live_migration_remaining_bytes 0$/m);
    expect(body).toMatch(/^vmops_live_migration_expected_downtime_seconds 0$/m);
  });

  it('the stuck-move timestamp is the least recent progress among moves in flight, planned waits (window, turn) left out', async () => {
    const value = async () => Number(/^vmops_vm_move_last_progress_timestamp_seconds (\S+)$/m.exec(await registry.metrics())?.[1]);
    const a = moveInFlight();
    const t0 = await value();
    expect(t0).toBeGreaterThan(0);
    await new Promise((r) => setTimeout(r, 20));
    const b = moveInFlight();
    // a (older) holds the minimum while it makes no progress
    expect(await value()).toBe(t0);
    // a waits for its window for hours: not stuck, b is the one to watch
    a.plannedWait(true);
    expect(await value()).toBeGreaterThan(t0);
    b.ended();
    expect(await value()).toBe(0);
    a.plannedWait(false);
    expect(await value()).toBeGreaterThan(t0);
    a.ended();
    a.ended();
    expect(await value()).toBe(0);
  });

  it('clamps free-form label values to bounded enums', () => {
    expect(strategyLabel('live')).toBe('live');
    expect(strategyLabel('student-env-42/secret')).toBe('other');
    expect(stepLabel('mirror')).toBe('mirror');
    expect(stepLabel('vm-controller-1')).toBe('other');
    recordMigrationStarted('some-user-string');
    recordMigrationFinished('some-user-string', true);
  });

  it('metric names and labels never contain anything outside the allowed label sets', async () => {
    const metrics = await registry.getMetricsAsJSON();
    const allowed = new Set(['strategy', 'result', 'step', 'le', 'quantile', 'until']);
    for (const m of metrics.filter((x) => x.name.startsWith('vmops_') && !x.name.includes('process') && !x.name.includes('nodejs'))) {
      for (const v of m.values) {
        for (const label of Object.keys(v.labels)) expect(allowed.has(label), `${m.name}:${label}`).toBe(true);
      }
    }
  });

  it('/healthz is 200, /readyz follows the readiness callback, unknown paths are 404', async () => {
    let ready: { ready: boolean; reason?: string } = { ready: false, reason: 'informer not synced' };
    server = await startMetricsServer({ port: 0, host: '127.0.0.1', readiness: () => ready });
    expect((await get('/healthz')).status).toBe(200);
    const notReady = await get('/readyz');
    expect(notReady.status).toBe(503);
    expect(notReady.body).toContain('informer not synced');
    ready = { ready: true };
    const ok = await get('/readyz');
    expect(ok.status).toBe(200);
    expect(ok.body).toBe('ok\n');
    expect((await get('/nope')).status).toBe(404);
    const post = await fetch(`http://127.0.0.1:${server.port}/metrics`, { method: 'POST' });
    expect(post.status).toBe(405);
  });

  it('a throwing readiness callback yields 500, not a crash', async () => {
    server = await startMetricsServer({
      port: 0,
      host: '127.0.0.1',
      readiness: () => {
        throw new Error('boom');
      },
    });
    expect((await get('/readyz')).status).toBe(500);
    expect((await get('/healthz')).status).toBe(200);
  });
});
