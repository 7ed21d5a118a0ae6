/**
 * A VM's run state through its QMP monitor, with no host behind it: halting a source for a pre-copy
 * cut-over, giving it back, and running a migrated guest on the target. (Kept apart from
 * qemuIncoming.ts, which drives hosts: the hypervisor needs these, and they need nothing of it.)
 */
import { sleep } from '../util/sleep.js';
import type { QmpClient } from './qmp.js';

/**
 * Halts the guest for a pre-copy cutover without letting QEMU exit (an exiting QEMU would kill the
 * mirror before it converged): shutdown action "pause", ACPI power-down, wait for status shutdown; a
 * guest that does not react within powerdownTimeoutMs is paused with QMP stop (disk state as after a crash).
 */
export async function pauseSourceForCutover(qmp: QmpClient, opts: { powerdownTimeoutMs: number }): Promise<'powerdown' | 'stop'> {
  if (opts.powerdownTimeoutMs > 0) {
    // the guest's SHUTDOWN event wakes the wait at once: a poll interval would sit inside the downtime
    let wake = (): void => undefined;
    let seen = false;
    const onShutdown = (): void => {
      seen = true;
      wake();
    };
    qmp.on('SHUTDOWN', onShutdown);
    try {
      await qmp.execute('set-action', { shutdown: 'pause' });
      await qmp.execute('system_powerdown');
      const deadline = Date.now() + opts.powerdownTimeoutMs;
      while (Date.now() < deadline) {
        const s = await qmp.execute<{ status: string }>('query-status');
        if (s.status === 'shutdown') return 'powerdown';
        // once the event came, the status follows within a round trip or two: ask again at once
        if (!seen) {
          await new Promise<void>((r) => {
            const t = setTimeout(r, Math.min(100, Math.max(deadline - Date.now(), 0)));
            wake = () => { clearTimeout(t); r(); };
          });
        } else await sleep(10);
      }
    } finally {
      qmp.removeListener('SHUTDOWN', onShutdown);
    }
  }
  await qmp.execute('stop');
  return 'stop';
}

/**
 * Undoes pauseSourceForCutover: shutdown action back to QEMU's default (poweroff) and the guest
 * running again — after a guest power-down that means a reset (a reboot of the guest).
 */
export async function resumeSource(qmp: QmpClient): Promise<void> {
  await qmp.execute('set-action', { shutdown: 'poweroff' });
  const s = (await qmp.execute<{ status: string }>('query-status')).status;
  if (s === 'running') return;
  if (s === 'shutdown' || s === 'guest-panicked') await qmp.execute('system_reset');
  await qmp.execute('cont');
}

/**
 * Runs a migrated guest on the target: its QEMU holds the whole state, paused (`-S`). The NBD server
 * that received the disks is stopped first (a no-op if it already was). Resolves once QMP reports
 * running; returns the wall-clock time it did.
 */
export async function resumeIncoming(qmp: QmpClient, opts: { nbdServerStopped?: boolean } = {}): Promise<number> {
  // a live handover stopped it already (a round trip less with the guest down); a resumed move may not have
  if (!opts.nbdServerStopped) await qmp.execute('nbd-server-stop').catch(() => undefined);
  const resumed = qmp.waitForEvent('RESUME', 10_000).catch(() => undefined);
  await qmp.execute('cont');
  const runningAt = Date.now();
  await resumed;
  const s = (await qmp.execute<{ status: string }>('query-status')).status;
  if (s !== 'running') throw new Error(`target QEMU is ${s} after cont, expected running`);
  return runningAt;
}
