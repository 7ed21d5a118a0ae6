/**
 * QmpClient.nap: the poll loops inside a guest's downtime (live handover, mirror cancel) sleep with
 * it; an event QEMU announces must end the sleep at once, and the listeners must not pile up.
 * "At once" is asserted as a mechanism, not a latency: with the nap's timer frozen (fake timers), only
 * the event (or the connection's end) can settle it.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { fakeQemu } from './fakeQmp.js';

/** lets the sockets deliver what was written (I/O callbacks run; the faked timers do not) */
const ioTurns = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

afterEach(() => {
  vi.useRealTimers();
});

describe('QmpClient.nap', () => {
  it('wakes on a named event, not on its timer; ignores other events; leaves no listener behind', async () => {
    const { qmp, emit } = await fakeQemu();
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    let settled = false;
    const napping = qmp.nap(5000, ['MIGRATION', 'STOP']).then(() => (settled = true));
    emit('RESUME'); // not one of them
    await ioTurns();
    expect(settled, 'an event it does not wait for ended the nap').toBe(false);
    emit('MIGRATION');
    await napping; // the 5 s timer is frozen: only the event can settle it
    expect(settled).toBe(true);
    expect(qmp.listenerCount('MIGRATION') + qmp.listenerCount('STOP')).toBe(0);
    vi.useRealTimers();
    qmp.close();
  });

  it('ends at its time without an event, and when the connection closes, not on its timer', async () => {
    const { qmp, end } = await fakeQemu();
    const t0 = performance.now();
    await qmp.nap(30, ['MIGRATION']);
    // a lower bound only: it slept (at least) its time
    expect(performance.now() - t0).toBeGreaterThanOrEqual(25);
    expect(qmp.listenerCount('MIGRATION')).toBe(0);
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const napping = qmp.nap(5000, ['MIGRATION']);
    end();
    await napping; // frozen timer: only the close can settle it
    expect(qmp.isClosed).toBe(true);
  });
});
