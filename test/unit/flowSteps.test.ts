/** The per-VM flow as data: the step list for every (location, strategy) pair, and its invariants. */
import { describe, expect, it } from 'vitest';
import { settingsFrom, type VMMigrationSpec } from '../../src/api/types.js';
import { flowSteps, type FlowInput, type Location } from '../../src/migrate/steps.js';

const STRATEGIES: Record<string, Partial<VMMigrationSpec>> = {
  cold: {},
  precopy: { transfer: { precopy: true } },
  live: { strategy: 'LiveMigrate' },
};

function names(location: Location, strategy: keyof typeof STRATEGIES, o: Partial<FlowInput> = {}): string[] {
  return flowSteps({
    location, journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false },
    settings: settingsFrom({ targetHost: 'h2', environments: ['e'], ...STRATEGIES[strategy] }), ...o,
  }).steps.map((s) => s.name);
}

const POST = ['nodeReady', 'uncordon', 'commit', 'cleanup'];

describe('flowSteps: a worker, every (location, strategy) pair', () => {
  const table: Record<Location, Record<keyof typeof STRATEGIES, string[]>> = {
    'source-running': {
      cold: ['cordon', 'drain', 'stop', 'fence', 'transfer', 'start', ...POST],
      precopy: ['mirror', 'cordon', 'drain', 'mirrorSync', 'stop', 'converge', 'fence', 'transfer', 'verify', 'start', ...POST],
      live: ['live', 'stop', 'fence', 'verify', 'start', ...POST],
    },
    'source-halted': {
      cold: ['stop', 'fence', 'transfer', 'start', ...POST],
      precopy: ['stop', 'fence', 'transfer', 'start', ...POST],
      live: ['stop', 'fence', 'transfer', 'start', ...POST],
    },
    'source-stopped': {
      cold: ['transfer', 'fence', 'start', ...POST],
      precopy: ['transfer', 'fence', 'start', ...POST],
      live: ['transfer', 'fence', 'start', ...POST],
    },
    'handover-pending': {
      cold: ['fence', 'verify', 'start', ...POST],
      precopy: ['fence', 'verify', 'start', ...POST],
      live: ['fence', 'verify', 'start', ...POST],
    },
    'target-stopped': {
      cold: ['fence', 'start', ...POST],
      precopy: ['fence', 'start', ...POST],
      live: ['fence', 'start', ...POST],
    },
    'target-running': { cold: POST, precopy: POST, live: POST },
  };
  for (const [location, byStrategy] of Object.entries(table) as [Location, Record<string, string[]>][]) {
    for (const [strategy, expected] of Object.entries(byStrategy)) {
      it(`${location} × ${strategy}`, () => expect(names(location, strategy)).toEqual(expected));
    }
  }

  it('every strategy uses the same stop, fence and start steps, fence right before the bytes or the start', () => {
    for (const s of Object.keys(STRATEGIES)) {
      const list = names('source-running', s);
      expect(list.filter((n) => n === 'stop' || n === 'fence' || n === 'start')).toEqual(['stop', 'fence', 'start']);
    }
  });
});

describe('flowSteps: resume decisions read from the journal', () => {
  it('an interrupted pre-copy cutover (source stopped, converged mirror journaled) resumes the cutover, not a cold copy', () => {
    const p = flowSteps({ location: 'source-stopped', journal: { converged: true }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2', transfer: { precopy: true } }) });
    expect(p.mode).toBe('precopy');
    expect(p.steps.map((s) => s.name)).toEqual(['fence', 'transfer', 'verify', 'start', ...POST]);
    expect(p.resume?.why).toMatch(/resuming the pre-copy cutover/);
  });

  it('a halted source with a converged mirror is fenced and the cutover finished; without one it is finished cold', () => {
    expect(names('source-halted', 'precopy', { journal: { converged: true } })).toEqual(['fence', 'transfer', 'verify', 'start', ...POST]);
    const cold = flowSteps({ location: 'source-halted', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2', transfer: { precopy: true } }) });
    expect(cold.mode).toBe('cold');
    expect(cold.resume?.why).toMatch(/copied cold/);
  });

  it('an interrupted live migration whose handover was pending resumes the target, it does not migrate again', () => {
    const p = flowSteps({ location: 'handover-pending', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2', strategy: 'LiveMigrate' }) });
    expect(p.mode).toBe('live');
    expect(p.steps.map((s) => s.name)).not.toContain('live');
    expect(p.resume?.from).toBe('fence');
  });

  it('a stopped target whose VM already ran (journal: start began) is started again, with that reason', () => {
    const p = flowSteps({ location: 'target-stopped', journal: { converged: false, targetRan: true }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2' }) });
    expect(p.steps.map((s) => s.name)).toEqual(['fence', 'start', ...POST]);
    expect(p.resume?.why).toMatch(/ran on the target.*rule 2/);
  });

  it('a fresh move says nothing about resuming', () => {
    expect(flowSteps({ location: 'source-running', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2' }) }).resume).toBeUndefined();
  });
});

describe('flowSteps: controllers and the guest-safety steps', () => {
  it('cold/pre-copy: quorum gate, cordon, drain, quorum again, leader move, LB out … start, node Ready, member healthy, LB in', () => {
    expect(names('source-running', 'cold', { role: 'controller', capabilities: { loadBalancer: true } })).toEqual([
      'quorum', 'cordon', 'drain', 'quorum', 'leaderMove', 'lbOut', 'stop', 'fence', 'transfer', 'start', 'nodeReady', 'memberHealthy', 'lbIn', 'uncordon', 'commit', 'cleanup',
    ]);
    expect(names('source-running', 'precopy', { role: 'controller', capabilities: { loadBalancer: true } }).slice(0, 8)).toEqual(['quorum', 'mirror', 'cordon', 'drain', 'mirrorSync', 'quorum', 'leaderMove', 'lbOut']);
  });

  it('live: quorum is checked right before the switchover', () => {
    expect(names('source-running', 'live', { role: 'controller', capabilities: { loadBalancer: true } }).slice(0, 4)).toEqual(['quorum', 'leaderMove', 'lbOut', 'live']);
  });

  it('without a LoadBalancerControl lbOut/lbIn are left out', () => {
    const list = names('source-running', 'cold', { role: 'controller' });
    expect(list).not.toContain('lbOut');
    expect(list).not.toContain('lbIn');
    expect(list).toContain('memberHealthy');
  });

  it('a live migration that fell back plans the fallback strategy from the running source', () => {
    const p = flowSteps({ location: 'source-running', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2', strategy: 'LiveMigrate', live: { fallback: 'Cold' } }), liveFellBack: true });
    expect(p.mode).toBe('cold');
    expect(p.steps.map((s) => s.name)).toContain('drain');
  });
});

describe('flowSteps: the point of no return', () => {
  it('is the start: nothing before it, everything from it on', () => {
    for (const s of Object.keys(STRATEGIES)) {
      const p = flowSteps({ location: 'source-running', journal: { converged: false }, role: 'controller', capabilities: { loadBalancer: true }, settings: settingsFrom({ targetHost: 'h2', ...STRATEGIES[s] }) });
      const i = p.steps.findIndex((x) => x.name === 'start');
      expect(p.steps.slice(0, i).every((x) => !x.afterNoReturn)).toBe(true);
      expect(p.steps.slice(i).every((x) => x.afterNoReturn)).toBe(true);
    }
    expect(flowSteps({ location: 'target-running', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2' }) }).steps.every((x) => x.afterNoReturn)).toBe(true);
  });
});

describe('flowSteps: mirrored ahead (pipelined pre-copy)', () => {
  const input = (o: Partial<FlowInput>): FlowInput => ({ location: 'source-running', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settingsFrom({ targetHost: 'h2', environments: ['e'], transfer: { precopy: true } }), ahead: true, ...o });

  it('a move mirrored ahead waits for its turn right after the mirror started, before the window and anything disruptive', () => {
    expect(flowSteps(input({})).steps.map((s) => s.name).slice(0, 4)).toEqual(['mirror', 'turn', 'cordon', 'drain']);
    const windowed = settingsFrom({ targetHost: 'h2', environments: ['e'], transfer: { precopy: true }, window: { notBefore: '2026-11-27T06:00:00Z' } });
    expect(flowSteps(input({ settings: windowed })).steps.map((s) => s.name).slice(0, 4)).toEqual(['mirror', 'turn', 'window', 'cordon']);
  });

  it('a controller mirrored ahead asks the quorum gate after its turn (before, the previous controller is still moving), and again before the stop', () => {
    const names = flowSteps(input({ role: 'controller' })).steps.map((s) => s.name);
    expect(names.slice(0, 5)).toEqual(['mirror', 'turn', 'quorum', 'cordon', 'drain']);
    expect(names.filter((n) => n === 'quorum')).toHaveLength(2);
    expect(flowSteps(input({ role: 'controller', ahead: false })).steps.map((s) => s.name).slice(0, 2)).toEqual(['quorum', 'mirror']);
  });

  it('a turn is honoured whatever the strategy: cold and live (never scheduled ahead: runFleet) would wait for it first', () => {
    for (const spec of [{}, { strategy: 'LiveMigrate' as const }]) {
      expect(flowSteps(input({ settings: settingsFrom({ targetHost: 'h2', environments: ['e'], ...spec }) })).steps[0]?.name).toBe('turn');
      expect(flowSteps(input({ settings: settingsFrom({ targetHost: 'h2', environments: ['e'], ...spec }), ahead: false })).steps.map((s) => s.name)).not.toContain('turn');
    }
  });
});

describe('flowSteps: warm migration', () => {
  const settings = (window: Partial<VMMigrationSpec>) => settingsFrom({ targetHost: 'h2', environments: ['e'], transfer: { precopy: true }, ...window });
  const input = (o: Partial<FlowInput>): FlowInput => ({ location: 'source-running', journal: { converged: false }, role: 'worker', capabilities: { loadBalancer: false }, settings: settings({}), ...o });

  it('with a window, pre-copy holds the cut-over in a `window` step right after the mirror started; without one there is no such step', () => {
    const windowed = flowSteps(input({ settings: settings({ window: { notBefore: '2026-11-27T06:00:00Z' } }) })).steps.map((s) => s.name);
    expect(windowed.slice(0, 4)).toEqual(['mirror', 'window', 'cordon', 'drain']);
    expect(flowSteps(input({})).steps.map((s) => s.name)).not.toContain('window');
    expect(flowSteps(input({ settings: settings({ window: { daily: { start: '22:00', end: '04:00' } } }) })).steps.map((s) => s.name)).toContain('window');
    // cold and live are held by the scheduler (nothing starts before the window), not by a step
    for (const spec of [{}, { strategy: 'LiveMigrate' as const }]) {
      expect(flowSteps(input({ settings: settingsFrom({ targetHost: 'h2', environments: ['e'], window: { notBefore: '2026-11-27T06:00:00Z' }, ...spec }) })).steps.map((s) => s.name)).not.toContain('window');
    }
  });
});

describe('flowSteps: mirrored ahead, not a fresh pre-copy', () => {
  it('a VM mirrored ahead that is stopped, halted, handed over or already moved waits for its turn before anything else', () => {
    const settings = settingsFrom({ targetHost: 'h2', environments: ['e'], transfer: { precopy: true } });
    for (const location of ['source-stopped', 'source-halted', 'handover-pending', 'target-stopped', 'target-running'] as const) {
      const p = flowSteps({ location, journal: { converged: false }, role: 'controller', capabilities: { loadBalancer: false }, settings, ahead: true });
      expect(p.steps[0]?.name, location).toBe('turn');
      expect(p.steps.filter((s) => s.name === 'turn'), location).toHaveLength(1);
    }
  });
});
