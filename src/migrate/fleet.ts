/**
 * Scheduling rule for fleet moves (pure): given the plan, the moves in flight and the limits,
 * which environments may start their next VM now — and, for the others, why they wait.
 *
 * Invariants it keeps (the runner only executes its answer):
 * - one VM per environment at a time: an environment with a move in flight starts no other, except
 *   that with pre-copy up to `mirrorAhead` of its next VMs may start *mirroring ahead* — their moves
 *   wait in a `turn` step, the VM running undisturbed, until the moves before them finished, so still
 *   only one VM of the environment is ever down (the runner grants the turns);
 * - at most maxParallelEnvironments environments *started and not finished*: an environment, once
 *   begun, is finished before a new one begins, so few environments are ever split across hosts;
 * - at most maxDisruptedEnvironments environments with a move in flight (every such environment
 *   counts as disrupted: a VM is down or about to be, the conservative reading);
 * - per-host outbound/inbound limits on concurrent moves (a mirror ahead is a transfer: it counts;
 *   the environments' next VMs are chosen first, mirrors ahead fill what is left);
 * - cutovers only inside the window, and only when the move is expected to finish before it closes
 *   (pre-copy moves may start before it: their mirror runs, the flow's `window` step holds the cut-over).
 * (Two migrations never share an environment: the runner claims all of its environments first.)
 */
import type { MigrationSettings, PlanEntry } from '../api/types.js';
import type { SafetyVerdict } from './guestSafety.js';
import { abortReason } from '../util/sleep.js';
import { moveMode } from './steps.js';

export interface FleetLimits {
  maxParallelEnvironments: number;
  maxDisruptedEnvironments: number;
  maxOutboundPerHost: number;
  maxInboundPerHost: number;
}

export interface EnvironmentQueue {
  environment: string;
  /** VMs of this environment not yet moved, in plan order */
  pending: PlanEntry[];
  /** at least one of its VMs moved or is moving */
  started: boolean;
}

export interface Window {
  notBeforeMs: number | undefined;
  notAfterMs: number | undefined;
  /** every day (UTC) from startS to endS seconds after midnight; endS < startS crosses midnight */
  daily?: { startS: number; endS: number };
}

const DAY_MS = 86_400_000;

/** The daily interval [start, end) that contains `t`, or else the next one. */
function dailyInterval(d: { startS: number; endS: number }, t: number): { start: number; end: number } {
  const midnight = Math.floor(t / DAY_MS) * DAY_MS;
  const len = ((((d.endS - d.startS) % 86_400) + 86_400) % 86_400) * 1000;
  // yesterday's interval may still run (it crosses midnight), else today's, else tomorrow's
  for (const day of [-1, 0]) {
    const start = midnight + day * DAY_MS + d.startS * 1000;
    if (t < start + len) return { start, end: start + len };
  }
  const start = midnight + DAY_MS + d.startS * 1000;
  return { start, end: start + len };
}

export interface ScheduleInput {
  /** in plan order */
  queues: EnvironmentQueue[];
  inFlight: PlanEntry[];
  limits: FleetLimits;
  /** cancelled, or waiting for a condition this run cannot change: start nothing of them */
  cancelled: ReadonlySet<string>;
  window: Window;
  nowMs: number;
  /** how long one VM move is expected to take (e.g. the longest so far); 0 = unknown */
  estimatedMoveMs: number;
  /** pre-copy: a move may start before the window opens; its own gate holds the cut-over (warm migration) */
  warmBeforeWindow?: boolean;
  /** pre-copy: how many VMs after the one moving an environment may mirror ahead (0 = none) */
  mirrorAhead?: number;
  /**
   * environments whose moving VM is past its checks (changed something): only behind such a VM do
   * the next ones mirror ahead — a VM waiting at its quorum gate may end its run as a wait, and
   * mirrors started behind it would only be dropped again (undefined: every moving VM counts)
   */
  underway?: ReadonlySet<string>;
}

export interface Waiting {
  environment: string;
  reason: string;
}

export interface ScheduleDecision {
  start: PlanEntry[];
  /** moves that mirror ahead: their cut-over waits for the turn the runner grants */
  ahead: PlanEntry[];
  waiting: Waiting[];
  /** set when nothing may start because of the window: when to look again (undefined = never by itself) */
  windowReopensAtMs?: number;
  windowMessage?: string;
}

export type WindowState = { open: true } | { open: false; reason: string; opensAtMs: number | undefined };

/** Is a cutover that takes about `estimatedMs` allowed to start at `nowMs`? */
export function windowState(w: Window, nowMs: number, estimatedMs = 0): WindowState {
  if (w.notBeforeMs !== undefined && nowMs < w.notBeforeMs) {
    return { open: false, reason: `the window opens at ${new Date(w.notBeforeMs).toISOString()}`, opensAtMs: w.notBeforeMs };
  }
  if (w.notAfterMs !== undefined && nowMs + estimatedMs > w.notAfterMs) {
    const why = nowMs >= w.notAfterMs ? `the window closed at ${new Date(w.notAfterMs).toISOString()}` : `a move takes about ${Math.ceil(estimatedMs / 1000)} s and the window closes at ${new Date(w.notAfterMs).toISOString()}`;
    return { open: false, reason: `${why}; extend spec.window.notAfter to continue`, opensAtMs: undefined };
  }
  if (w.daily) {
    const iv = dailyInterval(w.daily, nowMs);
    // a move that would not end inside today's window waits for the next one
    const next = nowMs < iv.start ? iv.start : nowMs + estimatedMs > iv.end ? iv.start + DAY_MS : undefined;
    if (next !== undefined) {
      const why = nowMs < iv.start ? `the daily window opens at ${new Date(next).toISOString()}` : `a move takes about ${Math.ceil(estimatedMs / 1000)} s and the daily window closes at ${new Date(iv.end).toISOString()}; the next opens at ${new Date(next).toISOString()}`;
      if (w.notAfterMs !== undefined && next >= w.notAfterMs) return { open: false, reason: `${why}, after spec.window.notAfter ${new Date(w.notAfterMs).toISOString()}; extend it to continue`, opensAtMs: undefined };
      return { open: false, reason: why, opensAtMs: next };
    }
  }
  return { open: true };
}

function bump(m: Map<string, number>, k: string): void {
  m.set(k, (m.get(k) ?? 0) + 1);
}

export function nextMoves(input: ScheduleInput): ScheduleDecision {
  const { limits } = input;
  const moving = new Set(input.inFlight.map((e) => e.environment));
  const outbound = new Map<string, number>();
  const inbound = new Map<string, number>();
  for (const e of input.inFlight) {
    bump(outbound, e.from);
    bump(inbound, e.to);
  }
  // an environment counts once, however many of its VMs mirror ahead
  let inFlight = moving.size;
  const live = input.queues.filter((q) => q.pending.length > 0 && !input.cancelled.has(q.environment));
  // an environment finishing its last VM still counts as moving
  let active = input.queues.filter((q) => moving.has(q.environment) || (q.started && q.pending.length > 0 && !input.cancelled.has(q.environment))).length;
  // started environments first, so they finish before new ones begin
  const order = [...live.filter((q) => q.started), ...live.filter((q) => !q.started)];

  const decision: ScheduleDecision = { start: [], ahead: [], waiting: [] };
  const win = windowState(input.window, input.nowMs, input.estimatedMoveMs);
  // before the window (not after it): a warm start mirrors now and cuts over once it opens
  const mayStart = win.open || (input.warmBeforeWindow === true && win.opensAtMs !== undefined);
  for (const q of order) {
    if (moving.has(q.environment)) continue;
    const next = q.pending[0]!;
    const wait = (reason: string) => decision.waiting.push({ environment: q.environment, reason });
    if (!mayStart) {
      wait(win.reason);
      continue;
    }
    if (!q.started && active >= limits.maxParallelEnvironments) {
      wait(`${active} environment(s) are moving, spec.maxParallelEnvironments is ${limits.maxParallelEnvironments}`);
      continue;
    }
    if (inFlight >= limits.maxDisruptedEnvironments) {
      wait(`${inFlight} environment(s) have a VM down, spec.maxDisruptedEnvironments is ${limits.maxDisruptedEnvironments}`);
      continue;
    }
    if ((outbound.get(next.from) ?? 0) >= limits.maxOutboundPerHost) {
      wait(`${next.from} already sends ${outbound.get(next.from)} VM(s), spec.hostLimits.maxOutboundPerHost is ${limits.maxOutboundPerHost}`);
      continue;
    }
    if ((inbound.get(next.to) ?? 0) >= limits.maxInboundPerHost) {
      wait(`${next.to} already receives ${inbound.get(next.to)} VM(s), spec.hostLimits.maxInboundPerHost is ${limits.maxInboundPerHost}`);
      continue;
    }
    decision.start.push(next);
    moving.add(q.environment);
    bump(outbound, next.from);
    bump(inbound, next.to);
    inFlight++;
    if (!q.started) active++;
  }
  if (input.mirrorAhead && mayStart) {
    const flying = new Map<string, number>();
    for (const e of [...input.inFlight, ...decision.start]) bump(flying, e.environment);
    for (const q of live) {
      // only behind a VM of the same environment that moves: the mirrors overlap its drain and cut-over
      let n = flying.get(q.environment) ?? 0;
      if (input.underway && !input.underway.has(q.environment)) continue;
      for (const next of q.pending) {
        if (n === 0 || n - 1 >= input.mirrorAhead) break;
        if (decision.start.includes(next)) continue;
        if ((outbound.get(next.from) ?? 0) >= limits.maxOutboundPerHost || (inbound.get(next.to) ?? 0) >= limits.maxInboundPerHost) break;
        decision.ahead.push(next);
        bump(outbound, next.from);
        bump(inbound, next.to);
        n++;
      }
    }
  }
  if (!win.open && decision.start.length === 0) {
    decision.windowMessage = win.reason;
    decision.windowReopensAtMs = win.opensAtMs;
  }
  return decision;
}

/**
 * How one VM move ended, as the runner reports it. withdrawn: a move mirroring ahead whose turn was
 * refused (the migration failed or stopped, its environment waits or was cancelled): its mirror, if
 * one started, was dropped and the VM left as it was; it is not moved and not a failure.
 */
export type FleetOutcome = { kind: 'moved' } | { kind: 'wait'; verdict: Pick<SafetyVerdict, 'reason' | 'message'> } | { kind: 'failed'; message: string } | { kind: 'withdrawn' };

/** A mirror-ahead move's turn was refused: its cut-over never begins. */
export class TurnWithdrawn extends Error {}

/** Waits for a mirror-ahead move's turn: resolves when the runner grants it, rejects when it is withdrawn or the move aborts. */
export type Turn = (signal: AbortSignal) => Promise<void>;

export type FleetStop = { cancelled: string[] } & (
  | { kind: 'done' }
  | { kind: 'failed'; message: string }
  | { kind: 'wait'; verdict: Pick<SafetyVerdict, 'reason' | 'message'> }
  | { kind: 'window'; message: string; retryAfterMs: number }
  | { kind: 'aborted'; error: unknown }
);

export interface RunFleetInput {
  entries: PlanEntry[];
  /** moved already (from the store); runFleet adds to it */
  finished: Set<PlanEntry>;
  settings: Pick<MigrationSettings, 'maxParallelEnvironments' | 'maxDisruptedEnvironments' | 'maxOutboundPerHost' | 'maxInboundPerHost' | 'window' | 'strategy' | 'precopy' | 'live' | 'mirrorAhead'>;
  signal: AbortSignal;
  /**
   * `turn` is set for a move that mirrors ahead: its cut-over waits for it. `underway` is to be
   * called once the move is past its checks (its first step that changes something began).
   */
  moveOne: (entry: PlanEntry, turn: Turn | undefined, underway: () => void) => Promise<FleetOutcome>;
  /** awaited before each scheduling round (spec.paused: moves in flight go on, nothing new starts) */
  beforeRound: () => Promise<void>;
  /** re-read every round: spec.cancel may change while the migration runs */
  cancelled: () => ReadonlySet<string>;
  onWaiting: (waiting: Waiting[]) => void;
}

/**
 * Executes nextMoves' answers until everything moved or nothing more may start. A failure stops
 * new starts (moves in flight finish: never cut one short) and ends the run Failed; a VM that must
 * wait (quorum, capacity, host) parks its environment for this run while the others go on.
 */
export async function runFleet(input: RunFleetInput): Promise<FleetStop> {
  const { entries, finished, settings } = input;
  const inFlight = new Map<PlanEntry, Promise<{ entry: PlanEntry; outcome?: FleetOutcome; error?: unknown }>>();
  const envs = [...new Set(entries.map((e) => e.environment))];
  const parked = new Map<string, Pick<SafetyVerdict, 'reason' | 'message'>>();
  let failed: string | undefined;
  let aborted: { error: unknown } | undefined;
  let longestMs = 0;
  let cancel: ReadonlySet<string> = new Set();
  const vmKey = (e: PlanEntry) => `${e.environment}/${e.vm}`;
  // mirror-ahead moves whose turn is not granted yet
  const turns = new Map<PlanEntry, { grant: () => void; withdraw: (why: string) => void }>();
  const newTurn = (entry: PlanEntry): Turn => {
    const decided = new Promise<void>((grant, reject) => turns.set(entry, { grant, withdraw: (why) => reject(new TurnWithdrawn(why)) }));
    decided.catch(() => undefined);
    return (signal) => new Promise<void>((resolve, reject) => {
      const onAbort = () => reject(abortReason(signal));
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      decided.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
    });
  };
  const withdraw = (which: (e: PlanEntry) => string | undefined) => {
    for (const [entry, t] of turns) {
      const why = which(entry);
      if (why === undefined) continue;
      turns.delete(entry);
      t.withdraw(why);
    }
  };
  const startedAt = new Map<PlanEntry, number>();
  // moves past their checks; a move getting there wakes the loop (its next VMs may mirror ahead now)
  const underway = new Set<PlanEntry>();
  let wake: () => void = () => undefined;
  const woken = (): Promise<undefined> => new Promise((r) => { wake = () => r(undefined); });
  // cancelled environments with a VM not moved, then single cancelled VMs (of environments not cancelled whole) not moved
  const cancelledLeft = () => [
    ...envs.filter((e) => cancel.has(e) && entries.some((x) => x.environment === e && !finished.has(x))),
    ...entries.filter((x) => cancel.has(vmKey(x)) && !cancel.has(x.environment) && !finished.has(x)).map(vmKey),
  ];
  for (;;) {
    const stopping = failed !== undefined || aborted !== undefined || input.signal.aborted;
    if (stopping) withdraw(() => `not cut over: ${failed ?? 'the migration stopped'}`);
    if (!stopping) {
      await input.beforeRound();
      cancel = input.cancelled();
      withdraw((e) => cancel.has(e.environment) || cancel.has(vmKey(e)) ? 'cancelled (spec.cancel) before its turn'
        : parked.has(e.environment) ? `its environment waits: ${parked.get(e.environment)!.message}` : undefined);
      // (granted only here, after beforeRound: while spec.paused no next VM goes down)
      for (const [entry, t] of turns) {
        const before = [...inFlight.keys()].some((e) => e.environment === entry.environment && entries.indexOf(e) < entries.indexOf(entry));
        if (before) continue;
        turns.delete(entry);
        startedAt.set(entry, Date.now());
        t.grant();
      }
      const flying = [...inFlight.keys()];
      const queues = envs.map((environment) => {
        const mine = entries.filter((e) => e.environment === environment);
        return { environment, pending: mine.filter((e) => !finished.has(e) && !inFlight.has(e) && !cancel.has(vmKey(e))), started: mine.some((e) => finished.has(e) || inFlight.has(e)) };
      });
      const d = nextMoves({
        queues, inFlight: flying, cancelled: new Set([...cancel, ...parked.keys()]), window: settings.window, nowMs: Date.now(), estimatedMoveMs: longestMs,
        warmBeforeWindow: moveMode(settings) === 'precopy', mirrorAhead: moveMode(settings) === 'precopy' ? settings.mirrorAhead : 0,
        underway: new Set([...underway].filter((e) => inFlight.has(e)).map((e) => e.environment)),
        limits: { maxParallelEnvironments: settings.maxParallelEnvironments, maxDisruptedEnvironments: settings.maxDisruptedEnvironments, maxOutboundPerHost: settings.maxOutboundPerHost, maxInboundPerHost: settings.maxInboundPerHost },
      });
      input.onWaiting(d.waiting);
      for (const entry of [...d.start, ...d.ahead]) {
        // a mirror-ahead move's duration counts from its turn (the window estimate is about cut-overs)
        if (d.start.includes(entry)) startedAt.set(entry, Date.now());
        const onUnderway = () => {
          if (underway.has(entry)) return;
          underway.add(entry);
          wake();
        };
        inFlight.set(entry, input.moveOne(entry, d.start.includes(entry) ? undefined : newTurn(entry), onUnderway).then(
          (outcome) => {
            if (outcome.kind === 'moved') longestMs = Math.max(longestMs, Date.now() - (startedAt.get(entry) ?? Date.now()));
            return { entry, outcome };
          },
          (error: unknown) => ({ entry, error }),
        ));
      }
      if (inFlight.size === 0) {
        if (parked.size > 0) return { kind: 'wait', verdict: [...parked.values()][0]!, cancelled: cancelledLeft() };
        if (d.windowMessage !== undefined) {
          const until = d.windowReopensAtMs === undefined ? 60_000 : d.windowReopensAtMs - Date.now();
          return { kind: 'window', message: d.windowMessage, retryAfterMs: Math.min(60_000, Math.max(500, until)), cancelled: cancelledLeft() };
        }
        return { kind: 'done', cancelled: cancelledLeft() };
      }
    } else if (inFlight.size === 0) {
      if (aborted) return { kind: 'aborted', error: aborted.error, cancelled: cancelledLeft() };
      if (failed !== undefined) return { kind: 'failed', message: failed, cancelled: cancelledLeft() };
      return { kind: 'aborted', error: input.signal.reason, cancelled: cancelledLeft() };
    }
    const r = await Promise.race([...inFlight.values(), woken()]);
    if (r === undefined) continue;
    inFlight.delete(r.entry);
    if (r.error !== undefined) aborted ??= { error: r.error };
    else if (r.outcome!.kind === 'moved') finished.add(r.entry);
    else if (r.outcome!.kind === 'wait') parked.set(r.entry.environment, r.outcome!.verdict);
    else if (r.outcome!.kind === 'failed') failed ??= r.outcome!.message;
    // withdrawn: not moved, and not a failure of its own; a later run (or nobody, if cancelled) moves it
  }
}
