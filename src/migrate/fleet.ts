/**
 * Scheduling rule for fleet moves (pure): given the plan, the moves in flight and the limits,
 * which environments may start their next VM now — and, for the others, why they wait.
 *
 * Invariants it keeps (the runner only executes its answer):
 * - one VM per environment at a time (an environment with a move in flight never starts another);
 * - at most maxParallelEnvironments environments *started and not finished*: an environment, once
 *   begun, is finished before a new one begins, so few environments are ever split across hosts;
 * - at most maxDisruptedEnvironments VMs in flight (every in-flight move counts as a disruption:
 *   the VM is down or about to be, the conservative reading);
 * - per-host outbound/inbound limits on concurrent moves;
 * - cutovers only inside the window, and only when the move is expected to finish before it closes.
 */
import type { PlanEntry } from '../api/types.js';

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
}

export interface ScheduleInput {
  /** in plan order */
  queues: EnvironmentQueue[];
  inFlight: PlanEntry[];
  limits: FleetLimits;
  cancelled: ReadonlySet<string>;
  /** environments another migration holds, with the holder's name */
  heldBy: ReadonlyMap<string, string>;
  window: Window;
  nowMs: number;
  /** how long one VM move is expected to take (e.g. the longest so far); 0 = unknown */
  estimatedMoveMs: number;
}

export interface Waiting {
  environment: string;
  reason: string;
}

export interface ScheduleDecision {
  start: PlanEntry[];
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
  let inFlight = input.inFlight.length;
  const live = input.queues.filter((q) => q.pending.length > 0 && !input.cancelled.has(q.environment));
  let active = live.filter((q) => q.started || moving.has(q.environment)).length;
  // started environments first, so they finish before new ones begin
  const order = [...live.filter((q) => q.started), ...live.filter((q) => !q.started)];

  const decision: ScheduleDecision = { start: [], waiting: [] };
  const win = windowState(input.window, input.nowMs, input.estimatedMoveMs);
  for (const q of order) {
    if (moving.has(q.environment)) continue;
    const next = q.pending[0]!;
    const wait = (reason: string) => decision.waiting.push({ environment: q.environment, reason });
    const holder = input.heldBy.get(q.environment);
    if (holder !== undefined) {
      wait(`VMMigration ${holder} is moving this environment`);
      continue;
    }
    if (!win.open) {
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
  if (!win.open && decision.start.length === 0) {
    decision.windowMessage = win.reason;
    decision.windowReopensAtMs = win.opensAtMs;
  }
  return decision;
}
