/**
 * The crash matrix on the state machine: for each strategy and every step of one move, the operator
 * "dies" right after the journal records that step's begin — and, separately, its end: the signal
 * is handed over and nothing more happens in that run (no fail line, no rollback). A fresh run then
 * resumes from the journal and from what it finds on the (in-memory) hosts. Whatever the kill
 * point: the guest never runs on both hosts while no operator runs, the move finishes on the
 * target, nothing is rolled back, and a source that was stopped for the cutover never runs again.
 * test/e2e/faults.test.ts does the same with real parts and a real SIGKILL.
 */
import { describe, expect, it } from 'vitest';
import { settingsFrom, type VMMigrationSpec } from '../../src/api/types.js';
import { flowSteps, type StepName } from '../../src/migrate/steps.js';
import { Handover, moveVm, MoveError } from '../../src/migrate/vmMove.js';
import { context } from './moveDoubles.js';

const STRATEGIES: Record<string, Partial<VMMigrationSpec>> = {
  cold: {},
  precopy: { transfer: { precopy: true } },
  live: { strategy: 'LiveMigrate' },
};

/** the guest executes there: a postmigrate source or a paused/incoming target holds it without running it */
const runs = (h: { state: string; qmpStatus?: string }) => h.state === 'running' && (h.qmpStatus ?? 'running') === 'running';

for (const [strategy, spec] of Object.entries(STRATEGIES)) {
  const settings = settingsFrom({ targetHost: 'host02', environments: ['e'], ...spec });
  const steps = [...new Set<StepName>(['precheck', ...flowSteps({ location: 'source-running', journal: { converged: false }, settings, role: 'controller', capabilities: { loadBalancer: false } }).steps.map((s) => s.name)])];
  describe(`${strategy}: killed once at each step boundary, then resumed`, () => {
    for (const step of steps) {
      for (const event of ['begin', 'end'] as const) {
        it(`${step}:${event}`, async () => {
          const { ctx, calls, source, target, store } = await context('running', 'absent');
          ctx.settings = settings;
          const ac = new AbortController();
          let dead = false;
          const journal = store.journal.bind(store);
          // a SIGKILL: the journal line is written, then nothing more happens in this process
          store.journal = async (...args) => {
            if (dead) throw new Error('dead');
            await journal(...args);
            if (args[3] === step && args[4] === event) {
              dead = true;
              ac.abort(new Handover('SIGKILL'));
              throw new Error('killed');
            }
          };
          const first = await moveVm({ ...ctx, signal: ac.signal }).catch((e: unknown) => e);
          expect(first).toBeInstanceOf(MoveError);
          expect((first as MoveError).outcome).toBe('interrupted');
          expect(runs(source) && runs(target), 'running on both hosts while no operator runs').toBe(false);
          const stoppedBefore = calls.some((x) => x === 'host01:stop' || x === 'halt' || x === 'live');

          store.journal = journal;
          await moveVm({ ...ctx, signal: new AbortController().signal });
          expect(target.state).toBe('running');
          expect(source.state).toBe('absent');
          // the restarted operator never rolled back, and never ran the source again once it had been stopped
          expect((await store.journalEntries('uid')).some((j) => j.step === 'rollback')).toBe(false);
          if (stoppedBefore) expect(calls.filter((x) => x === 'host01:start' || x === 'mirror-abort' || x === 'live-abort')).toEqual([]);
          expect(calls.lastIndexOf('uncordon:e-controller-1')).toBeGreaterThan(calls.lastIndexOf('cordon:e-controller-1'));
        });
      }
    }
  });
}
