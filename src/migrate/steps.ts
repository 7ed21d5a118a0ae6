/**
 * The per-VM flow as data: where the VM is (and what the journal says happened) plus the strategy
 * → the ordered list of named steps still to run. Pure; test/unit/flowSteps.test.ts covers every
 * (location, strategy) pair. `moveVm` runs the list through one journaled step runner.
 *
 * Every strategy uses the same names for the same effects, so journal, Events, metrics and status
 * speak one vocabulary:
 *
 *   stop      the guest stops executing on the source (cold: ACPI then QMP quit; pre-copy: paused for
 *             the cutover; live: QEMU's stop-and-copy, confirmed as postmigrate)
 *   fence     the source QEMU is quit (if still alive) and proven gone — the one fencing step
 *   start     the guest runs on the target (cold/pre-copy: boot; live: resume the migrated state);
 *             it re-checks the fence first
 *
 * Controller VMs get the guest-safety steps (src/migrate/guestSafety.ts): quorum (gate) → cordon →
 * drain → quorum (again, right before the stop) → leaderMove → lbOut → … → start → nodeReady →
 * memberHealthy → lbIn → uncordon. Without a LoadBalancerControl lbOut/lbIn are left out.
 *
 * `afterNoReturn` marks the steps that begin once the VM may have run on the target (`start` and
 * everything after): from there the target holds the only current copy of the guest's writes.
 */
import type { VMRole } from '../api/inventory.js';
import type { MigrationSettings } from '../api/types.js';

export type StepName =
  | 'precheck' | 'quorum' | 'mirror' | 'turn' | 'window' | 'cordon' | 'drain' | 'mirrorSync' | 'leaderMove' | 'lbOut'
  | 'live' | 'stop' | 'converge' | 'fence' | 'transfer' | 'verify' | 'start'
  | 'nodeReady' | 'memberHealthy' | 'lbIn' | 'uncordon' | 'commit' | 'cleanup' | 'rollback';

/**
 * What a step is. check: looks, changes nothing; gate: waits until it is safe or its time has come,
 * changing nothing; effect: changes something (taken under the source lock; a journal with one is a
 * move that touched the VM).
 */
export type StepKind = 'check' | 'gate' | 'effect';

export interface StepInfo {
  kind: StepKind;
  /** a wait the user planned (the window, the environment's turn): however long, it is not stuck */
  planned?: true;
  /** a guest-safety step around the stop (leadership, load balancer): not where a move's own work begins */
  guestSafety?: true;
  /** the Event reason when it ends (none: the checks and the waits end silently) */
  eventReason?: string;
}

/** One record per step, in flow order: every list of steps (names, checks, Event reasons) is derived from it. */
export const STEP_TABLE: Readonly<Record<StepName, StepInfo>> = {
  precheck: { kind: 'check' },
  quorum: { kind: 'gate' },
  mirror: { kind: 'effect', eventReason: 'MirrorStarted' },
  turn: { kind: 'gate', planned: true },
  window: { kind: 'gate', planned: true },
  cordon: { kind: 'effect', eventReason: 'Cordoned' },
  drain: { kind: 'effect', eventReason: 'Drained' },
  mirrorSync: { kind: 'effect' },
  leaderMove: { kind: 'effect', guestSafety: true, eventReason: 'LeaderMoved' },
  lbOut: { kind: 'effect', guestSafety: true, eventReason: 'RemovedFromLoadBalancer' },
  live: { kind: 'effect', eventReason: 'LiveMigrated' },
  stop: { kind: 'effect', eventReason: 'VMStopped' },
  converge: { kind: 'effect' },
  fence: { kind: 'effect', eventReason: 'SourceFenced' },
  transfer: { kind: 'effect', eventReason: 'FilesCopied' },
  verify: { kind: 'effect', eventReason: 'CopyVerified' },
  start: { kind: 'effect', eventReason: 'VMStarted' },
  nodeReady: { kind: 'effect', eventReason: 'NodeReady' },
  memberHealthy: { kind: 'effect', guestSafety: true },
  lbIn: { kind: 'effect', guestSafety: true, eventReason: 'AddedToLoadBalancer' },
  uncordon: { kind: 'effect', eventReason: 'Uncordoned' },
  commit: { kind: 'effect' },
  cleanup: { kind: 'effect', eventReason: 'SourceCleaned' },
  rollback: { kind: 'effect', eventReason: 'RolledBack' },
};

/** Every step name, in flow order (metrics use it as the bounded label set). */
export const STEP_NAMES = Object.keys(STEP_TABLE) as readonly StepName[];

/** Does this step change something? (A step name read back from the journal may be any string.) */
export function changesSomething(step: string): boolean {
  return (STEP_TABLE as Record<string, StepInfo | undefined>)[step]?.kind === 'effect';
}

/** The steps that change nothing (checks and gates): before the first of the others nothing was touched. */
export const NOTHING_CHANGED_STEPS: ReadonlySet<StepName> = new Set(STEP_NAMES.filter((n) => !changesSomething(n)));

/**
 * Where the VM is, as `locate` found it:
 * - source-running: a QEMU runs the guest on the source (nothing irreversible happened yet)
 * - source-halted: the source QEMU is alive but its guest is halted for a cutover (pre-copy stop)
 * - source-stopped: no QEMU on the source, its files still there
 * - handover-pending: a live migration completed (source postmigrate) but the target was not resumed yet
 * - target-stopped: the source files are gone (only after a verified copy), the target not started
 * - target-running: the guest runs on the target
 */
export type Location = 'source-running' | 'source-halted' | 'source-stopped' | 'handover-pending' | 'target-stopped' | 'target-running';

/** How the disks move: cold relay copy, pre-copy mirror, live migration. */
export type MoveMode = 'cold' | 'precopy' | 'live';

export interface FlowStep {
  name: StepName;
  /** the VM may have run on the target once this step began (rule 2: never restart the source after it) */
  afterNoReturn: boolean;
}

export interface FlowInput {
  location: Location;
  /** facts read from this migration's journal for this VM */
  journal: { converged: boolean; targetRan?: boolean };
  settings: Pick<MigrationSettings, 'strategy' | 'precopy' | 'live'> & { window?: MigrationSettings['window'] };
  role: VMRole;
  capabilities: { loadBalancer: boolean };
  /** a live migration aborted cleanly: plan the fallback strategy from the still-running source */
  liveFellBack?: boolean;
  /**
   * mirrored ahead: the environment's previous VM is still moving, so after its mirror started this
   * move waits in a `turn` step until that move finished (one VM of an environment down at a time)
   */
  ahead?: boolean;
}

export interface FlowPlan {
  mode: MoveMode;
  steps: FlowStep[];
  /** set when the list does not start at the beginning: what is resumed and why */
  resume?: { from: StepName; why: string };
}

export function moveMode(settings: FlowInput['settings'], liveFellBack = false): MoveMode {
  if (settings.strategy === 'LiveMigrate' && !liveFellBack) return 'live';
  const mode = settings.strategy === 'LiveMigrate' ? settings.live.fallback : settings.precopy ? 'PreCopy' : 'Cold';
  return mode === 'PreCopy' ? 'precopy' : 'cold';
}

/** The steps after `precheck` (which located the VM), in order. */
export function flowSteps(input: FlowInput): FlowPlan {
  const controller = input.role === 'controller';
  const lb = controller && input.capabilities.loadBalancer;
  const mode = moveMode(input.settings, input.liveFellBack);
  const names: StepName[] = [];
  const add = (...s: (StepName | false)[]) => { for (const n of s) if (n) names.push(n); };
  const beforeStop = () => add(controller && 'quorum', controller && 'leaderMove', lb && 'lbOut');
  const afterStart = () => add('nodeReady', controller && 'memberHealthy', lb && 'lbIn', 'uncordon', 'commit', 'cleanup');
  let plan: Omit<FlowPlan, 'steps'>;

  switch (input.location) {
    case 'source-running':
      plan = { mode };
      if (mode === 'live') {
        // No cordon, no drain: the node stays Ready. Quorum is re-checked right before the switchover.
        beforeStop();
        // verify while both QEMUs are stopped (source quit, target paused): every strategy compares before the source goes
        add('live', 'stop', 'fence', 'verify', 'start');
      } else {
        // warm migration: with a window, the mirror starts before it opens and the cut-over (cordon on)
        // waits for it, the disks kept in sync meanwhile
        const w = input.settings.window;
        const windowed = w?.notBeforeMs !== undefined || w?.notAfterMs !== undefined || w?.daily !== undefined;
        // mirrored ahead (pipelined pre-copy): its quorum gate waits for the turn, when the previous
        // controller is back — asked before, it would only report the move still in flight
        const ahead = mode === 'precopy' && input.ahead === true;
        add(controller && !ahead && 'quorum', mode === 'precopy' && 'mirror', ahead && 'turn', mode === 'precopy' && windowed && 'window', controller && ahead && 'quorum', 'cordon', 'drain', mode === 'precopy' && 'mirrorSync');
        beforeStop();
        add('stop', mode === 'precopy' && 'converge', 'fence', 'transfer', mode === 'precopy' && 'verify', 'start');
      }
      break;
    case 'source-halted':
      if (input.journal.converged) {
        plan = { mode: 'precopy', resume: { from: 'fence', why: 'the pre-copy cutover was interrupted after the mirror converged (journal: converge ended); the halted source is quit, the remaining files copied and the guest data verified before the start' } };
        add('fence', 'transfer', 'verify', 'start');
      } else {
        plan = { mode: 'cold', resume: { from: 'stop', why: 'the cutover was interrupted with the source halted and no converged mirror in the journal; the source is stopped and its files copied cold' } };
        add('stop', 'fence', 'transfer', 'start');
      }
      break;
    case 'source-stopped':
      if (input.journal.converged) {
        plan = { mode: 'precopy', resume: { from: 'fence', why: 'the source is stopped and the journal shows the pre-copy mirror converged onto the target; resuming the pre-copy cutover (remaining files, guest-data verification, start), not a cold copy' } };
        add('fence', 'transfer', 'verify', 'start');
      } else {
        plan = { mode: 'cold', resume: { from: 'transfer', why: 'the source is stopped and no converged mirror is journaled; copying its files (resumes with the segments not yet verified)' } };
        add('transfer', 'fence', 'start');
      }
      break;
    case 'handover-pending':
      plan = { mode: 'live', resume: { from: 'fence', why: 'a live migration completed before the interruption: the paused target holds the guest state and the source is postmigrate or quit; quitting the source, verifying the guest data, resuming on the target' } };
      add('fence', 'verify', 'start');
      break;
    case 'target-stopped':
      plan = input.journal.targetRan
        ? { mode, resume: { from: 'start', why: 'the VM ran on the target before the interruption (journal: start began) and is not running now; starting it there again — its disk holds the newest guest writes, the source copy is stale (rule 2)' } }
        : { mode, resume: { from: 'start', why: 'the source files are gone after a verified copy; starting the VM on the target' } };
      add('fence', 'start');
      break;
    case 'target-running':
      plan = { mode, resume: { from: 'nodeReady', why: 'the VM already runs on the target; finishing the move there' } };
      break;
  }
  afterStart();
  // mirrored ahead but not a fresh pre-copy (stopped, halted, handed over, already moved: a resume or a
  // VM someone stopped): nothing may happen before the turn; the wait changes nothing, like a check
  if (input.ahead && !names.includes('turn')) names.unshift('turn');
  const noReturn = names.indexOf('start') >= 0 ? names.indexOf('start') : 0;
  return { ...plan, steps: names.map((name, i) => ({ name, afterNoReturn: input.location === 'target-running' || i >= noReturn })) };
}
