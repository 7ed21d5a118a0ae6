/**
 * Nothing a fault or a lost database does may delete the only copy of a VM or write a stale copy over
 * a newer one (issue "Nothing a student, a fault or a lost database does…", items 1 and 2), with the
 * project's in-memory hosts. The same rules are exercised on real QEMU by the fault matrix.
 */
import { describe, expect, it } from 'vitest';
import { settingsFrom } from '../../src/api/types.js';
import { releaseSource } from '../../src/migrate/releaseSource.js';
import { Handover, moveVm, MoveError } from '../../src/migrate/vmMove.js';
import { liveFallback } from '../../src/migrate/engines.js';
import { handedOver, LiveMigrationAbortedError } from '../../src/transfer/live.js';
import { context, env, vm } from './moveDoubles.js';

describe('a target QEMU that never ran the guest is not "running"', () => {
  for (const qmpStatus of ['inmigrate', 'prelaunch']) {
    it(`source stopped, target ${qmpStatus}: the target is stopped and removed, the source copied again; the source image goes only after the VM ran on the target`, async () => {
      const { ctx, calls, source, target } = await context('stopped', 'running');
      target.qmpStatus = qmpStatus;
      const r = await moveVm(ctx);
      // before: nodeReady → uncordon → commit → cleanup removed host01's image with no start and no copy
      expect(calls.indexOf('host02:stop')).toBeGreaterThanOrEqual(0);
      expect(calls.indexOf('host02:remove')).toBeGreaterThan(calls.indexOf('host02:stop'));
      expect(calls.indexOf('transfer')).toBeGreaterThan(calls.indexOf('host02:remove'));
      expect(calls.indexOf('host02:start')).toBeGreaterThan(calls.indexOf('transfer'));
      expect(calls.indexOf('host01:remove')).toBeGreaterThan(calls.indexOf('host02:start'));
      expect(r.resumedFrom).toBe('transfer');
      expect(target.state).toBe('running');
      expect(source.state).toBe('absent');
    });
  }

  it('a target in a run state the operator cannot account for (internal-error) beside a stopped source is refused: nothing stopped, removed or copied', async () => {
    const { ctx, calls, target } = await context('stopped', 'running');
    target.qmpStatus = 'internal-error';
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MoveError);
    expect((err as MoveError).outcome).toBe('untouched');
    expect((err as Error).message).toMatch(/internal-error/);
    expect(calls.filter((c) => /remove|stop|start|transfer/.test(c))).toEqual([]);
  });
});

describe('release-source deletes the source image only for a target that runs after a journaled start', () => {
  const released = async (qmpStatus: string, journalStart: boolean) => {
    const { ctx, calls, source, target, store } = await context('stopped', 'running');
    target.qmpStatus = qmpStatus;
    await store.ensureMove({ migrationUid: 'uid', environment: 'e', vm: vm.name, fromHost: 'host01', toHost: 'host02' });
    await store.updateMove('uid', 'e', vm.name, { phase: 'Degraded' });
    if (journalStart) {
      await store.journal('uid', 'e', vm.name, 'start', 'begin');
      await store.journal('uid', 'e', vm.name, 'start', 'end');
    }
    const r = await releaseSource({ store, migrationUid: 'uid', environment: env.name, vm, source: ctx.source, target: ctx.target }).then((m) => m, (e: Error) => e);
    return { r, calls, source };
  };

  it('an inmigrate target (a partial live migration) is refused and the source image stays', async () => {
    const { r, calls, source } = await released('inmigrate', true);
    expect(r).toBeInstanceOf(Error);
    expect((r as Error).message).toMatch(/inmigrate/);
    expect(calls).not.toContain('host01:remove');
    expect(source.state).toBe('stopped');
  });

  it('a running target without a journaled start (the operator never started it) is refused', async () => {
    const { r, calls } = await released('running', false);
    expect((r as Error).message).toMatch(/journal/);
    expect(calls).not.toContain('host01:remove');
  });

  it('a running target after a journaled start: the source image is released', async () => {
    const { r, calls } = await released('running', true);
    expect(r).toMatch(/released/);
    expect(calls).toContain('host01:remove');
  });
});

describe('a live migration falls back only when its abort proved the target gone', () => {
  it('an abort whose target cleanup failed is not a fallback: the move fails and its rollback looks at the target first', () => {
    const clean = new LiveMigrationAbortedError('aborted in migrate: did not converge', 'migrate', { targetGone: true });
    const dirty = new LiveMigrationAbortedError('aborted in migrate: did not converge (cleanup problems: target cleanup: connection lost)', 'migrate', { targetGone: false });
    expect(liveFallback(clean, 'PreCopy')).toBe(true);
    expect(liveFallback(clean, 'None')).toBe(false);
    expect(liveFallback(dirty, 'PreCopy')).toBe(false);
    expect(liveFallback(new Error('other'), 'PreCopy')).toBe(false);
  });

  it('with the target unreachable after such an abort, the rollback fails closed: stuck, the source lock kept', async () => {
    const { ctx, calls, source, target, engines } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], strategy: 'LiveMigrate' });
    engines.live = async () => {
      calls.push('live');
      // the incoming QEMU stays behind, and the target host stops answering
      target.state = 'running';
      target.qmpStatus = 'inmigrate';
      target.vmStatus = async () => { throw new Error('host02: connection lost'); };
      throw new LiveMigrationAbortedError('aborted in migrate (cleanup problems: target cleanup: connection lost)', 'migrate', { targetGone: false });
    };
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect((err as MoveError).outcome).toBe('stuck');
    expect(source.lock).toBe('uid');
    expect(calls).not.toContain('host01:remove');
  });
});

describe('the target may have run: recorded on the host, not only in the journal', () => {
  it('the VM ran on the target, the database was restored from an older backup (empty journal), both QEMUs down: it starts on the target, nothing is copied over it', async () => {
    const { ctx, calls, target } = await context('stopped', 'stopped');
    target.marker = 'uid-of-an-earlier-run';
    await moveVm(ctx);
    expect(calls).not.toContain('transfer');
    expect(calls).not.toContain('host01:start');
    expect(calls.find((c) => /^host0[12]:start$/.test(c))).toBe('host02:start');
  });

  it('the start step records it before the target runs', async () => {
    const { ctx, calls, target } = await context('running', 'absent');
    target.startVm = async () => {
      calls.push(`host02:start (marked ${target.marker ?? 'no'})`);
      target.state = 'running';
    };
    await moveVm(ctx);
    expect(calls).toContain('host02:start (marked uid)');
  });

  it('a copy onto a VM directory that carries it is refused, even beside a running source', async () => {
    const { ctx, calls, target } = await context('running', 'stopped');
    target.marker = 'uid-of-an-earlier-run';
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect((err as MoveError).outcome).toBe('untouched');
    expect((err as Error).message).toMatch(/may have run on host02/);
    expect(calls.filter((c) => /remove|transfer|stop|start/.test(c))).toEqual([]);
  });
});

describe('a node is tied to its VM by address before anything is drained for it', () => {
  it('a node whose InternalIP is not the VM\'s inventory address: refused, untouched (nothing cordoned, drained or stopped)', async () => {
    const { ctx, calls, guest } = await context('running', 'absent');
    ctx.vm = { ...ctx.vm, address: '10.0.0.11' };
    guest.nodeState = async () => ({ exists: true, ready: true, unschedulable: false, internalIPs: ['10.9.9.9'] });
    const err = await moveVm(ctx).catch((e: unknown) => e);
    expect((err as MoveError).outcome).toBe('untouched');
    expect((err as Error).message).toMatch(/reports InternalIP 10\.9\.9\.9, but VM controller-1 has address 10\.0\.0\.11/);
    expect(calls).toEqual([]);
  });

  it('the same address, or nothing to compare (no address on one side), goes ahead', async () => {
    for (const internalIPs of [['10.0.0.11'], []]) {
      const { ctx, guest, target } = await context('running', 'absent');
      ctx.vm = { ...ctx.vm, address: '10.0.0.11' };
      guest.nodeState = async () => ({ exists: true, ready: true, unschedulable: false, internalIPs });
      await moveVm(ctx);
      expect(target.state).toBe('running');
    }
  });
});

describe('a replica that lost the Lease lets go of the QEMUs and undoes nothing', () => {
  it('pre-copy: handed over mid-drain, the mirror session is detached (its monitor and tunnels closed), not aborted, and nothing is rolled back', async () => {
    const { ctx, calls, source, guest } = await context('running', 'absent');
    ctx.settings = settingsFrom({ targetHost: 'host02', environments: ['e'], transfer: { precopy: true } });
    const ac = new AbortController();
    ctx.signal = ac.signal;
    guest.drain = async () => {
      calls.push('drain');
      ac.abort(new Handover('lost leadership'));
      throw new Error('drain aborted');
    };
    await expect(moveVm(ctx)).rejects.toMatchObject({ outcome: 'interrupted' });
    expect(calls).toContain('mirror-detach');
    expect(calls).not.toContain('mirror-abort');
    expect(calls.filter((c) => /host0[12]:(stop|start|remove)|uncordon/.test(c))).toEqual([]);
    expect(source.state).toBe('running');
  });

  it('the live engine hands over the same way: handedOver() is true only for a resumable abort reason', () => {
    const ac = new AbortController();
    expect(handedOver(ac.signal)).toBe(false);
    ac.abort(new Handover('lost leadership'));
    expect(handedOver(ac.signal)).toBe(true);
    const cancel = new AbortController();
    cancel.abort(new Error('deleted'));
    expect(handedOver(cancel.signal)).toBe(false);
  });
});
