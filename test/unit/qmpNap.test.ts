/**
 * QmpClient.nap: the poll loops inside a guest's downtime (live handover, mirror cancel) sleep with
 * it; an event QEMU announces must end the sleep at once, and the listeners must not pile up.
 */
import { describe, expect, it } from 'vitest';
import { fakeQemu } from './fakeQmp.js';

describe('QmpClient.nap', () => {
  it('wakes on a named event long before its time, ignores other events, and leaves no listener behind', async () => {
    const { qmp, emit } = await fakeQemu();
    const t0 = performance.now();
    const napping = qmp.nap(5000, ['MIGRATION', 'STOP']);
    emit('RESUME'); // not one of them
    setTimeout(() => emit('MIGRATION'), 20);
    await napping;
    const waited = performance.now() - t0;
    expect(waited).toBeLessThan(5000);
    expect(waited).toBeGreaterThanOrEqual(15);
    expect(qmp.listenerCount('MIGRATION') + qmp.listenerCount('STOP')).toBe(0);
    qmp.close();
  });

  it('ends at its time without an event, and at once when the connection closes', async () => {
    const { qmp, end } = await fakeQemu();
    const t0 = performance.now();
    await qmp.nap(30, ['MIGRATION']);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(25);
    expect(qmp.listenerCount('MIGRATION')).toBe(0);
    const t1 = performance.now();
    const napping = qmp.nap(5000, ['MIGRATION']);
    end();
    await napping;
    expect(performance.now() - t1).toBeLessThan(5000);
    expect(qmp.isClosed).toBe(true);
  });
});
