/**
 * The per-VM flow's decisions (resume point, rollback, fencing, quorum gate) with in-memory hosts,
 * guest and byte movers. The same code runs against real sshd/QEMU/Kubernetes in test/e2e.
 */
import { describe, expect, it } from 'vitest';
import { settingsFrom } from '../../src/api/types.js';
import { TurnWithdrawn } from '../../src/migrate/fleet.js';
import { Handover, moveVm, MoveError, type MoveHost } from '../../src/migrate/vmMove.js';
import type { Store } from '../../src/store/store.js';
import { context } from './moveDoubles.js';

describe('moveVm', () => {
  it('runs every step in order and journals begin/end for each', async () => {
    const { ctx, calls, source, target, store } = await context('running', 'absent');
    const r = await moveVm(ctx);
    expect(calls).toEqual(['cordon:e-controller-1', 'drain:e-controller-1', 'host01:stop', 'transfer', 'host02:start', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r).toMatchObject({ bytes: 100, resumedFrom: 'cordon', mode: 'cold' });
    expect(source.state).toBe('absent');
    expect(target.state).toBe('running');
    const journal = (await store.journalEntries('uid')).map((j) => `${j.step}:${j.event}`);
    // precheck, quorum, cordon, drain, quorum, leaderMove, stop, fence, transfer, start, nodeReady, memberHealthy, uncordon, commit, cleanup
    expect(journal.filter((j) => j.endsWith(':begin'))).toHaveLength(15);
    expect(journal.every((j, i) => !j.endsWith(':end') || journal[i - 1] === j.replace(':end', ':begin'))).toBe(true);
    expect((await store.environment('e'))).toBeUndefined(); // placement lives in the inventory rows, not created here
  });

  it('rolls back to the source when the copy fails: VM restarted there, node uncordoned, target cleared', async () => {
    const { ctx, calls, source, target, engines } = await context('running', 'absent');
    engines.copyAll = async () => { throw new Error('checksum mismatch for disk0.qcow2'); };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MoveError);
    expect(err).toMatchObject({ step: 'transfer', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(target.state).toBe('absent');
    expect(calls.slice(-2)).toEqual(['host01:start', 'uncordon:e-controller-1']);
  });

  it('resumes after a crash that happened once the VM already ran on the target', async () => {
    const { ctx, calls, source } = await context('stopped', 'running');
    const resumed: string[] = [];
    ctx.observer.resumed = (i) => resumed.push(`${i.from}: ${i.why}`);
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('nodeReady');
    expect(calls).toEqual(['ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(source.state).toBe('absent');
    expect(resumed).toEqual([expect.stringMatching(/^nodeReady: the VM already runs on the target/)]);
  });

  it('resumes a copy interrupted by a crash without stopping anything again', async () => {
    const { ctx, calls } = await context('stopped', 'stopped');
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('transfer');
    expect(calls[0]).toBe('transfer');
    expect(calls).not.toContain('host01:stop');
  });

  it('refuses to touch a VM that is live on both hosts', async () => {
    const { ctx, calls } = await context('running', 'running');
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'precheck', outcome: 'untouched' });
    expect(calls).toEqual([]);
  });

  it('does not stop a controller when the control plane would lose quorum: it waits, touching nothing', async () => {
    const { ctx, calls, guest } = await context('running', 'absent', {});
    guest.quorumOk = false;
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'quorum', outcome: 'waiting', verdict: { safe: false, reason: 'WaitingForQuorum' } });
    expect((err as Error).message).toMatch(/lose quorum.*controller-3 is NotReady/);
    expect(calls).toEqual([]);
  });

  it('a quorum lost after the drain holds the move (Waiting condition) until it is back, then proceeds', async () => {
    const { ctx, calls, guest, target } = await context('running', 'absent');
    const waits: string[] = [];
    let checks = 0;
    guest.drain = async (n: string) => { calls.push(`drain:${n}`); guest.quorumOk = false; return { evicted: 0, pdbRetries: 0 }; };
    ctx.observer.waiting = (v) => {
      waits.push(v ? v.reason : 'released');
      if (v && ++checks === 2) guest.quorumOk = true;
    };
    await moveVm(ctx);
    expect(waits).toEqual(['WaitingForQuorum', 'WaitingForQuorum', 'released']);
    expect(calls.indexOf('host01:stop')).toBeGreaterThan(calls.indexOf('drain:e-controller-1'));
    expect(target.state).toBe('running');
  }, 15_000);

  it('the gate after the drain fails (and rolls back) once safetyWaitTimeout has passed', async () => {
    const { ctx, guest, source } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], safetyWaitTimeout: '0s' });
    guest.drain = async () => { guest.quorumOk = false; return { evicted: 0, pdbRetries: 0 }; };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'quorum', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
  });
});

describe('moveVm strategies', () => {
  it('live: hands the VM over without cordon, drain or a cold stop; the outage is the guest\'s pause, from QEMU\'s stop', async () => {
    const { ctx, calls } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    const r = await moveVm(ctx);
    expect(calls).toEqual(['live', 'quit-source', 'verify', 'resume-target', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r.outage).toMatchObject({ until: 'GuestResumed' });
    expect(r.outage!.seconds).toBeGreaterThanOrEqual(0.18);
    expect(r.outage!.seconds).toBe(r.outage!.stopToStartSeconds);
    expect(r.bytes).toBe(30);
    expect(r.mode).toBe('live');
  });

  it('live that does not converge falls back to pre-copy with a drain', async () => {
    const { ctx, calls, engines } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    engines.liveFails = 'fallback';
    const r = await moveVm(ctx);
    expect(calls.slice(0, 5)).toEqual(['live', 'mirror', 'cordon:e-controller-1', 'drain:e-controller-1', 'halt']);
    expect(calls).not.toContain('host01:stop');
    expect(r.mode).toBe('precopy');
  });

  it('live with fallback None fails and leaves the VM running on the source, node untouched', async () => {
    const { ctx, calls, source, engines } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate', live: { fallback: 'None' } });
    engines.liveFails = 'hard';
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'live', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(calls).not.toContain('cordon:e-controller-1');
  });

  it('pre-copy: mirror overlaps the drain; the cutover runs as stop, converge, fence, transfer, verify, start', async () => {
    const { ctx, calls, store } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    const r = await moveVm(ctx);
    expect(calls).toEqual(['mirror', 'cordon:e-controller-1', 'drain:e-controller-1', 'halt', 'converge', 'quit-source', 'copy-files', 'verify', 'host02:start', 'ready:e-controller-1', 'uncordon:e-controller-1', 'host01:remove']);
    expect(r.bytes).toBe(65);
    const steps = (await store.journalEntries('uid')).filter((j) => j.event === 'end').map((j) => j.step);
    expect(steps).toEqual(expect.arrayContaining(['stop', 'fence', 'start']));
  });

  it('pre-copy: a failed drain aborts the mirror before rolling back', async () => {
    const { ctx, calls, source, guest } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    guest.drain = async () => { throw new Error('drain timed out: PDB'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'drain', outcome: 'rolled-back' });
    expect(calls).toContain('mirror-abort');
    expect(calls.indexOf('mirror-abort')).toBeLessThan(calls.indexOf('uncordon:e-controller-1'));
    expect(source.state).toBe('running');
  });

  it('after a crash mid pre-copy cutover (source stopped, mirror converged per journal) the cutover resumes, not a cold copy', async () => {
    const { ctx, calls, store, target } = await context('stopped', 'stopped');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    for (const [step, ev] of [['mirror', 'begin'], ['mirror', 'end'], ['stop', 'begin'], ['stop', 'end'], ['converge', 'begin'], ['converge', 'end'], ['fence', 'begin']] as const) await store.journal('uid', 'e', 'controller-1', step, ev);
    const resumed: string[] = [];
    ctx.observer.resumed = (i) => resumed.push(i.why);
    const r = await moveVm(ctx);
    expect(calls.slice(0, 3)).toEqual(['copy-files', 'verify', 'host02:start']);
    expect(calls).not.toContain('transfer');
    expect(r.mode).toBe('precopy');
    expect(resumed[0]).toMatch(/resuming the pre-copy cutover/);
    expect(target.state).toBe('running');
  });

  it('after a crash mid live migration, a target still in inmigrate is discarded and the move starts over', async () => {
    const { ctx, calls, target } = await context('running', 'running');
    target.qmpStatus = 'inmigrate';
    const r = await moveVm(ctx);
    expect(calls.slice(0, 2)).toEqual(['host02:stop', 'host02:remove']);
    expect(r.resumedFrom).toBe('cordon');
  });

  it('after a crash between a completed live migration and the handover, the source is fenced and the paused target resumed', async () => {
    const { ctx, calls, source, target } = await context('running', 'paused');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    source.qmpStatus = 'postmigrate';
    const r = await moveVm(ctx);
    expect(calls.slice(0, 3)).toEqual(['host01:stop', 'verify', 'resume-target']);
    expect(r.resumedFrom).toBe('fence');
    expect(target.state).toBe('running');
    expect(source.state).toBe('absent');
  });

  it('after a crash right after a live handover, the postmigrate source is quit and the move completes', async () => {
    const { ctx, calls, source } = await context('running', 'running');
    source.qmpStatus = 'postmigrate';
    const r = await moveVm(ctx);
    expect(calls[0]).toBe('host01:stop');
    expect(r.resumedFrom).toBe('nodeReady');
  });
});

describe('moveVm interruption', () => {
  it('stops without rolling back when the run is handed over (leadership lost); the next run resumes', async () => {
    const { ctx, calls, source, guest } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    guest.drain = async () => {
      calls.push('drain');
      ac.abort(new Handover('lost leadership'));
      throw new Error('drain aborted');
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'drain', outcome: 'interrupted' });
    expect(calls).toEqual(['cordon:e-controller-1', 'drain']);
    expect(source.state).toBe('running');

    // the next leader picks it up: same VM state, a fresh signal
    ctx.signal = new AbortController().signal;
    guest.drain = async () => ({ evicted: 0, pdbRetries: 0 });
    const r = await moveVm(ctx);
    expect(r.resumedFrom).toBe('cordon');
    expect(source.state).toBe('absent');
  });

  it('a user cancel (plain abort) still rolls back', async () => {
    const { ctx, calls, guest } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    guest.drain = async () => {
      ac.abort(new Error('VMMigration deleted'));
      throw new Error('drain aborted');
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'rolled-back' });
    expect(calls).toContain('uncordon:e-controller-1');
  });
});

/** Journal lines as an interrupted earlier run left them. */
async function journalled(store: Store, entries: [string, 'begin' | 'end'][]): Promise<void> {
  for (const [step, ev] of entries) await store.journal('uid', 'e', 'controller-1', step, ev);
}

describe('moveVm: roll forward once the target has run (rule 2)', () => {
  const quick = (o: Record<string, unknown> = {}) => settingsFrom({ targetHost: 'host02', environments: ['e'], nodeReadyTimeout: '2s', ...o });

  it('a node that never comes Ready on the target: the VM stays there, Degraded; the source is never started and keeps its files', async () => {
    const { ctx, calls, source, target, guest } = await context('running', 'absent');
    ctx.settings = quick();
    guest.waitNodeReady = async () => { calls.push('ready?'); throw new Error('node not Ready within 2 s'); };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'nodeReady', outcome: 'stuck-on-target' });
    expect((err as Error).message).toMatch(/node not Ready/);
    expect(calls.filter((c) => c === 'host01:start')).toEqual([]);
    expect(calls).not.toContain('host02:stop');
    expect(calls).not.toContain('host02:remove');
    expect(calls.filter((c) => c === 'ready?').length).toBeGreaterThan(1);
    expect(target.state).toBe('running');
    expect(source.state).toBe('stopped');
  }, 15_000);

  it('a node-Ready failure that clears: the retry finishes the move on the target', async () => {
    const { ctx, calls, source, target, guest } = await context('running', 'absent');
    ctx.settings = quick({ nodeReadyTimeout: '10s' });
    let n = 0;
    guest.waitNodeReady = async () => { if (n++ === 0) throw new Error('node not Ready yet'); };
    const r = await moveVm(ctx);
    expect(r.mode).toBe('cold');
    expect(calls).not.toContain('host01:start');
    expect(target.state).toBe('running');
    expect(source.state).toBe('absent');
  }, 15_000);

  it('a cleanup that fails half-way after commit is retried, never rolled back', async () => {
    const { ctx, calls, source, target, store } = await context('running', 'absent');
    ctx.settings = quick({ nodeReadyTimeout: '10s' });
    let n = 0;
    source.removeVmDir = async () => {
      calls.push('host01:remove');
      // rm -rf removed some files, then failed: the directory is still there
      if (n++ === 0) throw new Error('rm: cannot remove disk0.qcow2: Input/output error');
      source.state = 'absent';
    };
    await moveVm(ctx);
    expect(calls.filter((c) => c === 'host01:remove')).toHaveLength(2);
    expect(calls).not.toContain('host01:start');
    expect(target.state).toBe('running');
    expect((await store.journalEntries('uid')).some((j) => j.step === 'rollback')).toBe(false);
  }, 15_000);

  it('a cleanup that keeps failing leaves the VM on the target, Degraded, with the source image kept', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    ctx.settings = quick();
    source.removeVmDir = async () => { calls.push('host01:remove'); throw new Error('rm: Read-only file system'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'cleanup', outcome: 'stuck-on-target' });
    expect(calls).not.toContain('host01:start');
    expect(target.state).toBe('running');
    expect(source.state).toBe('stopped');
  }, 15_000);

  it('a crash after the VM ran on the target (its QEMU gone since): starts it on the target again, never copies the stale source over it', async () => {
    const { ctx, calls, store, target } = await context('stopped', 'stopped');
    ctx.settings = quick();
    await journalled(store, [['cordon', 'begin'], ['cordon', 'end'], ['drain', 'begin'], ['drain', 'end'], ['stop', 'begin'], ['stop', 'end'],
      ['fence', 'begin'], ['fence', 'end'], ['transfer', 'begin'], ['transfer', 'end'], ['start', 'begin'], ['start', 'end'], ['nodeReady', 'begin']]);
    await moveVm(ctx);
    expect(calls).not.toContain('transfer');
    expect(calls).not.toContain('host01:start');
    expect(calls[0]).toBe('host02:start');
    expect(target.state).toBe('running');
  });

  it('live: a lost reply to the final cont while the target runs: no rollback, the move finishes on the target', async () => {
    const { ctx, calls, source, target, engines } = await context('running', 'absent');
    ctx.settings = quick({ strategy: 'LiveMigrate' });
    const real = engines.live.bind(engines);
    engines.live = async (o) => {
      const s = await real(o);
      return { ...s, resumeTarget: async () => { calls.push('resume-target'); target.state = 'running'; throw new Error('QMP connection closed before the reply to cont'); } };
    };
    await moveVm(ctx);
    expect(calls).not.toContain('host02:stop');
    expect(calls).not.toContain('host02:remove');
    expect(calls).not.toContain('live-abort');
    expect(target.state).toBe('running');
    expect(source.state).toBe('absent');
  }, 15_000);

  it('live: a crash after the source was fenced but before cont (target paused) resumes the target, it is not taken for running', async () => {
    const { ctx, calls, store, target } = await context('stopped', 'paused');
    ctx.settings = quick({ strategy: 'LiveMigrate' });
    await journalled(store, [['live', 'begin'], ['live', 'end'], ['stop', 'begin'], ['stop', 'end'], ['fence', 'begin'], ['fence', 'end']]);
    const r = await moveVm(ctx);
    expect(calls).toContain('resume-target');
    expect(calls.indexOf('resume-target')).toBeLessThan(calls.indexOf('ready:e-controller-1'));
    expect(target.state).toBe('running');
    expect(r.mode).toBe('live');
  });

  it('a cancel (deletion) after the target ran never rolls back', async () => {
    const { ctx, calls, guest, target } = await context('running', 'absent');
    ctx.settings = quick();
    const ac = new AbortController();
    ctx.signal = ac.signal;
    guest.waitNodeReady = async () => { ac.abort(new Error('VMMigration deleted')); throw new Error('aborted'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'stuck-on-target' });
    expect(calls).not.toContain('host01:start');
    expect(target.state).toBe('running');
  });
});

describe('moveVm: every strategy verifies before the source goes', () => {
  it('live: the guest data is compared while both QEMUs are stopped, before the target resumes', async () => {
    const { ctx, calls } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    await moveVm(ctx);
    expect(calls.indexOf('verify')).toBeGreaterThan(calls.indexOf('quit-source'));
    expect(calls.indexOf('verify')).toBeLessThan(calls.indexOf('resume-target'));
    expect(calls.indexOf('verify')).toBeLessThan(calls.indexOf('host01:remove'));
  });

  it('live: a mismatch before the target ran rolls back and never removes the source', async () => {
    const { ctx, calls, engines, target } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    engines.verify = async () => { throw new Error('guest data differs between source and target: disk0.qcow2'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'verify', outcome: 'rolled-back' });
    expect(calls).not.toContain('host01:remove');
    expect(calls).not.toContain('resume-target');
    expect(target.state).not.toBe('running');
    // the session lets go of the paused target before the rollback stops it (QEMU serves one QMP client)
    expect(calls).toContain('live-release');
    expect(calls.indexOf('live-release')).toBeLessThan(calls.indexOf('host02:stop'));
  });
});

describe('moveVm: rollback brings back a halted source, and says so only when it runs', () => {
  it('a source left in shutdown by an interrupted ACPI cutover is reset and resumed', async () => {
    const { ctx, calls, source, store } = await context('paused', 'absent');
    source.qmpStatus = 'shutdown';
    (source as MoveHost).resumeVm = async () => { calls.push('host01:resume'); source.state = 'running'; source.qmpStatus = undefined; };
    await journalled(store, [['stop', 'begin'], ['stop', 'end']]);
    source.stopVm = async () => { throw new Error('QMP unreachable'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'stop', outcome: 'rolled-back' });
    expect(calls).toContain('host01:resume');
    expect(source.state).toBe('running');
  });

  it('a source that does not come back is reported stuck, not rolled back', async () => {
    const { ctx, source, store } = await context('paused', 'absent');
    source.qmpStatus = 'shutdown';
    (source as MoveHost).resumeVm = async () => { throw new Error('cont: guest is panicked'); };
    await journalled(store, [['stop', 'begin'], ['stop', 'end']]);
    source.stopVm = async () => { throw new Error('QMP unreachable'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'stuck' });
  });
});

describe('moveVm: leadership loss inside a step stops before the next irreversible action', () => {
  it('lost during the fence check of `start`: the target is not started', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    const status = source.vmStatus;
    let transferred = false;
    ctx.engines.copyAll = async () => { calls.push('transfer'); transferred = true; return 1; };
    source.vmStatus = async (e, v) => {
      if (transferred) ac.abort(new Handover('lost leadership'));
      return status(e, v);
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'interrupted' });
    expect(calls).not.toContain('host02:start');
  });

  it('lost while cleanup looks at the source: nothing is removed', async () => {
    const { ctx, calls, source, guest } = await context('running', 'absent');
    const ac = new AbortController();
    ctx.signal = ac.signal;
    const status = source.vmStatus;
    let committed = false;
    guest.uncordon = async () => { committed = true; };
    source.vmStatus = async (e, v) => {
      if (committed) ac.abort(new Handover('lost leadership'));
      return status(e, v);
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'interrupted' });
    expect(calls).not.toContain('host01:remove');
  });
});

describe('moveVm: an unreachable host and stale copies', () => {
  it('cold: the target unreachable right before start rolls back — the source runs again, the never-started target copy is left for later', async () => {
    const { ctx, calls, source, target } = await context('running', 'absent');
    const status = target.vmStatus;
    let down = false;
    ctx.engines.copyAll = async () => { calls.push('transfer'); target.state = 'stopped'; down = true; return 1; };
    target.vmStatus = async (e, v) => { if (down) throw new Error('connect ECONNREFUSED 127.0.0.3:22'); return status(e, v); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ step: 'start', outcome: 'rolled-back' });
    expect(source.state).toBe('running');
    expect(calls).not.toContain('host02:start');
    expect(calls).not.toContain('host02:remove');
  });

  it('live: the target unreachable after the migration fails closed (its paused QEMU holds the guest): stuck, nothing restarted', async () => {
    const { ctx, calls, target, engines } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    const real = engines.live.bind(engines);
    let down = false;
    engines.live = async (o) => {
      const s = await real(o);
      down = true;
      return { ...s, abort: async () => { throw new Error('target unreachable'); }, verify: async () => { throw new Error('connect ECONNREFUSED'); } };
    };
    const status = target.vmStatus;
    target.vmStatus = async (e, v) => { if (down) throw new Error('connect ECONNREFUSED 127.0.0.3:22'); return status(e, v); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'stuck' });
    expect(calls).not.toContain('host01:start');
  });

  it('a fence failure in a run after an earlier run had begun start does not roll back (rule 2 across runs)', async () => {
    const { ctx, calls, store, source } = await context('stopped', 'stopped');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], nodeReadyTimeout: '2s' });
    await journalled(store, [['stop', 'begin'], ['stop', 'end'], ['fence', 'begin'], ['fence', 'end'], ['transfer', 'begin'], ['transfer', 'end'], ['start', 'begin']]);
    const status = source.vmStatus;
    let n = 0;
    source.vmStatus = async (e, v) => { if (n++ === 2) throw new Error('source probe failed'); return status(e, v); };
    await moveVm(ctx).catch(() => undefined);
    expect(calls).not.toContain('host01:start');
    expect(calls).not.toContain('host02:remove');
  }, 15_000);

  it('files on the target that never ran, beside a running source, are stale: removed and the move starts over', async () => {
    const { ctx, calls, target } = await context('running', 'stopped');
    const r = await moveVm(ctx);
    expect(calls[0]).toBe('host02:remove');
    expect(r.resumedFrom).toBe('cordon');
    expect(target.state).toBe('running');
  });
});

describe('moveVm: the source lock', () => {
  it('is taken before the first side effect and released by a rollback once the source runs again', async () => {
    const { ctx, source, engines } = await context('running', 'absent');
    let heldDuringCopy: string | undefined;
    engines.copyAll = async () => { heldDuringCopy = source.lock; throw new Error('checksum mismatch'); };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'rolled-back' });
    expect(heldDuringCopy).toBe('uid');
    expect(source.state).toBe('running');
    expect(source.lock).toBeUndefined();
  });

  it('stays when the move ends stuck on the target or stuck: nothing but this migration may start the stale copy', async () => {
    const a = await context('running', 'absent');
    a.ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], nodeReadyTimeout: '1s' });
    a.guest.waitNodeReady = async () => { throw new Error('node not Ready'); };
    await expect(moveVm(a.ctx)).rejects.toMatchObject({ outcome: 'stuck-on-target' });
    expect(a.source.lock).toBe('uid');
    await expect(a.source.startVm('e', a.ctx.vm)).rejects.toThrow(/locked by migration uid/);

    const b = await context('paused', 'absent');
    b.source.qmpStatus = 'shutdown';
    (b.source as MoveHost).resumeVm = async () => { throw new Error('cont: guest is panicked'); };
    await journalled(b.store, [['stop', 'begin'], ['stop', 'end']]);
    b.source.stopVm = async () => { throw new Error('QMP unreachable'); };
    await expect(moveVm(b.ctx)).rejects.toMatchObject({ outcome: 'stuck' });
    expect(b.source.lock).toBe('uid');
  }, 15_000);

  it('held by another migration: this one ends untouched before any side effect', async () => {
    const { ctx, calls, source } = await context('stopped', 'absent');
    source.lock = 'uid-of-an-earlier-move';
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ outcome: 'untouched', step: 'transfer' });
    expect((err as Error).message).toMatch(/locked by migration uid-of-an-earlier-move/);
    expect(calls).toEqual([]);
    expect(source.lock).toBe('uid-of-an-earlier-move');
  });

  it('held by this migration (a resumed run): the move goes on and cleanup takes the lock with the source directory', async () => {
    const { ctx, source, target } = await context('stopped', 'stopped');
    source.lock = 'uid';
    await moveVm(ctx);
    expect(target.state).toBe('running');
    expect(source.state).toBe('absent');
    expect(source.lock).toBeUndefined();
  });
});

describe('moveVm: warm migration (pre-copy before the window)', () => {
  it('the mirror runs while the cut-over waits for the window (WaitingForWindow); once it opens the move goes on', async () => {
    const { ctx, calls } = await context('running', 'absent');
    const opens = Date.now() + 400;
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true }, window: { notBefore: new Date(opens).toISOString() } });
    const waits: (string | undefined)[] = [];
    ctx.observer.waiting = (v) => waits.push(v?.reason);
    const stopAt: number[] = [];
    const halt = ctx.engines.startMirror;
    ctx.engines.startMirror = async (o) => {
      const m = await halt(o);
      return { ...m, haltSource: async (t) => { stopAt.push(Date.now()); return m.haltSource(t); } };
    };
    await moveVm(ctx);
    expect(calls.slice(0, 2)).toEqual(['mirror', 'cordon:e-controller-1']);
    expect(waits[0]).toBe('WaitingForWindow');
    expect(waits.at(-1)).toBeUndefined();
    expect(stopAt[0]).toBeGreaterThanOrEqual(opens - 1000); // window times have second precision
  });

  it('a window that closed before the cut-over: the mirror is dropped, the VM never stopped (rolled back)', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true }, window: { notBefore: '2026-11-27T05:00:00Z', notAfter: '2026-11-27T06:00:00Z' } });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'window', outcome: 'rolled-back' });
    expect((err as Error).message).toMatch(/not cutting over: the window closed at 2026-11-27T06:00:00.000Z/);
    expect(calls.slice(0, 2)).toEqual(['mirror', 'mirror-abort']);
    expect(calls.filter((c) => c.startsWith('cordon') || c === 'halt' || c.endsWith(':stop'))).toEqual([]);
    expect(source.state).toBe('running');
  });
});

describe('moveVm: mirrored ahead (pipelined pre-copy)', () => {
  const precopy = () => settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });

  it('mirrors first, then waits for its turn; nothing is cordoned, stopped or asked of the quorum gate before it', async () => {
    const { ctx, calls } = await context('running', 'absent');
    ctx.settings = precopy();
    let grant!: () => void;
    const granted = new Promise<void>((r) => { grant = r; });
    ctx.turn = async () => { calls.push('turn-wait'); await granted; calls.push('turn-granted'); };
    const moving = moveVm(ctx);
    for (let i = 0; i < 50 && !calls.includes('turn-wait'); i++) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 20));
    expect(calls).toEqual(['mirror', 'turn-wait']);
    grant();
    await moving;
    // a controller mirrored ahead asks the quorum gate after its turn, before the cordon
    expect(calls.slice(0, 4)).toEqual(['mirror', 'turn-wait', 'turn-granted', 'cordon:e-controller-1']);
  });

  it('a withdrawn turn drops the mirror and leaves the VM running on the source, never stopped; the error carries the withdrawal', async () => {
    const { ctx, calls, source } = await context('running', 'absent');
    ctx.settings = precopy();
    ctx.turn = async () => { throw new TurnWithdrawn('not cut over: e/node-1 failed'); };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'turn', outcome: 'rolled-back' });
    expect((err as Error).cause).toBeInstanceOf(TurnWithdrawn);
    expect(calls.slice(0, 2)).toEqual(['mirror', 'mirror-abort']);
    expect(calls.filter((c) => c.startsWith('cordon') || c === 'halt' || c.endsWith(':stop'))).toEqual([]);
    expect(source.state).toBe('running');
  });
});

describe('moveVm: mirrored ahead, VM stopped by someone', () => {
  it('waits for its turn before touching anything; a withdrawn turn leaves it untouched — stopped, not started by a rollback', async () => {
    const { ctx, calls, source } = await context('stopped', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    ctx.turn = async () => { throw new TurnWithdrawn('not cut over: the environment waits'); };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toMatchObject({ step: 'turn', outcome: 'untouched' });
    expect((err as Error).cause).toBeInstanceOf(TurnWithdrawn);
    expect(calls).toEqual([]);
    expect(source.state).toBe('stopped');
    expect(source.lock).toBeUndefined();
  });
});
