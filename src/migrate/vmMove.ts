/**
 * One VM move: `precheck` locates the VM (QEMU status on both hosts) and reads the journal, the pure
 * `flowSteps` (src/migrate/steps.ts) turns that into the ordered steps still to run, and this loop
 * runs them through one journaled step runner. Every step writes `begin` to the journal before its
 * side effect and `end`/`fail` after it, and every step is idempotent, so a re-run after a crash
 * neither loses nor doubles a VM; a resumed move says what it resumes and why.
 *
 * A failure before the VM may have run on the target rolls back to the source. From the first instant
 * it may have run there (`start` began) the target's disk is the truth (DESIGN rule 2): a failure is
 * retried forward — re-locate, re-plan, run the remaining steps — until nodeReadyTimeout has passed,
 * and then the move stops there as `stuck-on-target` (Degraded); the source is never started again
 * and its image stays until an administrator releases it. Right before its first side effect a move
 * takes the source lock (nobody but this migration may start the source copy again); a rollback
 * releases it once the source runs again, cleanup removes it with the source directory, and a move
 * that ended stuck keeps it for an administrator. The source image is only removed once the
 * VM runs on the target, its copy was verified and its node is Ready. A not-yet-safe
 * verdict before any side effect ends the attempt as `waiting` (the runner re-queues it); a later
 * safety gate waits in place until the verdict turns safe or safetyWaitTimeout passes.
 */
import type { EnvironmentSpec, VMSpec } from '../api/inventory.js';
import type { LiveFigures, MigrationSettings, VMStatus } from '../api/types.js';
import type { DrainOptions, DrainResult, NodeState } from '../guest/guestCluster.js';
import type { HostReadiness, VmStatus } from '../hosts/hypervisor.js';
import type { JournalEvent } from '../store/store.js';
import type { Logger } from '../util/log.js';
import { abortReason, backoffMs, sleep } from '../util/sleep.js';
import type { ControlPlaneGuard, LoadBalancerControl, SafetyVerdict } from './guestSafety.js';
import { windowState, type Turn } from './fleet.js';
import { changesSomething, flowSteps, moveMode, STEP_TABLE, type FlowPlan, type Location, type MoveMode, type StepName } from './steps.js';
import { mib } from '../util/units.js';
import { journalFacts, type JournalFacts } from './journal.js';
import { outageOf, type Outage } from './outage.js';

export type MoveStep = StepName;

/** The hypervisor lifecycle a move uses (src/hosts/hypervisor.ts implements it). */
export interface MoveHost {
  readonly host: { name: string };
  vmStatus(environment: string, vm: VMSpec): Promise<VmStatus>;
  /** refused while a migration other than `lockHolder` holds the VM's source lock */
  startVm(environment: string, vm: VMSpec, opts?: { lockHolder?: string }): Promise<unknown>;
  /** `signal` ends the wait for the guest's own shutdown early (no quit after it fired) */
  stopVm(environment: string, vm: VMSpec, opts: { powerdownTimeoutMs: number; signal?: AbortSignal }): Promise<unknown>;
  /** `staleCopy`: a target copy that never ran — refused when the host recorded that the guest may have run from it */
  removeVmDir(environment: string, vm: VMSpec, opts?: { staleCopy?: boolean }): Promise<void>;
  /** who recorded on the host that the guest may have run from this VM directory (src/hosts/hypervisor.ts RAN_MARKER_FILE) */
  ranHere?(environment: string, vm: VMSpec): Promise<string | undefined>;
  /** records it, right before the target runs the guest; idempotent */
  markRanHere?(environment: string, vm: VMSpec, migrationUid: string): Promise<void>;
  /** a live but halted QEMU (paused, or shut down by ACPI with action pause) runs its guest again */
  resumeVm?(environment: string, vm: VMSpec, opts?: { lockHolder?: string }): Promise<void>;
  /**
   * The source lock (src/hosts/hypervisor.ts SOURCE_LOCK_FILE): taken before a move's first side
   * effect, idempotent for its holder, refused when another migration holds it; "absent" when the
   * VM directory is gone.
   */
  lockSource(environment: string, vm: VMSpec, holder: { uid: string; migration?: string; target: string }): Promise<'locked' | 'held' | 'absent'>;
  /** removes the lock if `uid` holds it */
  unlockSource(environment: string, vm: VMSpec, uid: string): Promise<void>;
  /** stop qemu-nbd exports / remove migration sockets an interrupted earlier run left in the VM directory */
  clearStaleExports?(environment: string, vm: VMSpec): Promise<void>;
  /** remove the temporary copies an interrupted guest-data verification left beside the VM's disks */
  sweepScratch?(environment: string, vm: VMSpec): Promise<void>;
  /** what this host offers to run the VM as the inventory defines it (src/hosts/hypervisor.ts) */
  readiness?(vm: VMSpec): Promise<HostReadiness>;
  /** how the VM's live QEMU here differs from its inventory definition, in what the guest sees (undefined: none runs) */
  definitionDrift?(environment: string, vm: VMSpec): Promise<{ extra: string[]; missing: string[] } | undefined>;
}

/** The guest cluster operations a move uses (src/guest/guestCluster.ts implements them). */
export interface MoveGuest {
  apiHealthy(): Promise<boolean>;
  nodeState(node: string): Promise<NodeState>;
  cordon(node: string): Promise<void>;
  uncordon(node: string): Promise<void>;
  drain(node: string, opts: DrainOptions): Promise<DrainResult>;
  /** `notBoot`: the boot the node reported before its guest was stopped; Ready counts only from another boot */
  waitNodeReady(node: string, opts: { timeoutMs: number; signal?: AbortSignal; notBoot?: string }): Promise<void>;
}

/** The store operations a move uses (src/store/store.ts implements them). */
export interface MoveStore {
  journal(migrationUid: string, environment: string, vm: string, step: string, event: JournalEvent, detail?: unknown): Promise<void>;
  journalEntries(migrationUid: string, environment?: string, vm?: string): Promise<{ step: string; event: string; at: string }[]>;
  updateMove(migrationUid: string, environment: string, vm: string, patch: { step?: string }): Promise<void>;
  setPlacement(environment: string, vm: string, host: string): Promise<void>;
}

export interface CopyProgress {
  bytesTransferred: number;
  bytesTotal: number;
}

/** A running pre-copy mirror of the VM's disks, with the source QEMU it holds. */
export interface MirrorSession {
  readonly ready: Promise<unknown>;
  /** stop: halt the guest, keeping QEMU alive so the mirror can converge */
  haltSource(powerdownTimeoutMs: number): Promise<string>;
  /** converge: the mirrors catch up, exports flushed, target disks renamed into place; tunnel bytes */
  converge(): Promise<number>;
  /** fence: quit the source QEMU through the mirror's QMP client, proven gone */
  quitSource(): Promise<void>;
  /** transfer (after the fence): the non-disk files not already copied while the guest ran; bytes */
  copyFiles(signal: AbortSignal): Promise<number>;
  /** verify (after converge and fence): guest data equal on both hosts; says how it was compared */
  verify(): Promise<string>;
  /** rollback before the fence: drop the mirror and run the guest on the source again */
  abortAndResume(): Promise<void>;
  /** handed over: let go of the source QEMU's monitor and the tunnels, undoing nothing (the next leader resumes) */
  detach(): Promise<void>;
}

/** A live migration that reached its handover: source postmigrate, target paused with the state. */
export interface LiveSession {
  bytes: number;
  /** when QEMU stopped the guest on the source */
  stoppedAt: number;
  /** the source QEMU's run state, asked over the session's own QMP client (QEMU serves one client at a time) */
  sourceRunState(): Promise<string>;
  quitSource(): Promise<void>;
  /** verify: guest data compared on both hosts while both QEMUs are stopped (target caches flushed first); says how */
  verify(): Promise<string>;
  /** start: the target runs the migrated guest; returns when it did */
  resumeTarget(): Promise<number>;
  /** rollback before the target ran: target QEMU gone, source resumed */
  abort(reason: Error): Promise<void>;
  /**
   * rollback after the source was fenced, before the target ran (a failed verification): lets go of
   * the paused target QEMU's only QMP connection and closes the tunnels, so the rollback can stop it
   */
  release(): Promise<void>;
  /** handed over: let go of both QEMUs' monitors and the tunnels, undoing nothing (the next leader resumes) */
  detach(): Promise<void>;
}

export class LiveFellBack extends Error {}

/** Byte moving for one VM between its two hosts (src/migrate/engines.ts wires src/transfer). */
export interface MoveEngines {
  copyAll(opts: { signal: AbortSignal; onProgress: (p: CopyProgress & { bytesPerSecond?: number; etaSeconds?: number }) => void }): Promise<number>;
  copyNonDisk(signal: AbortSignal): Promise<number>;
  startMirror(opts: { signal: AbortSignal; onProgress: (p: CopyProgress) => void }): Promise<MirrorSession>;
  /** rejects with LiveFellBack when the migration aborted cleanly and the VM still runs on the source */
  live(opts: { signal: AbortSignal; onProgress: (message: string, bytes: number, figures?: LiveFigures) => void }): Promise<LiveSession>;
  /** guest data on both hosts equal; a paused target QEMU's caches are flushed first */
  verify(): Promise<void>;
  /** start after an interrupted live handover: resume the paused target QEMU */
  resumeTarget(): Promise<number>;
}

export interface MoveObserver {
  /** a step began, ended or failed: for events, logs and step-duration metrics */
  step(step: MoveStep, event: 'begin' | 'end' | 'fail', info: { durationMs?: number; message?: string }): void;
  /** progress for the VM's status entry (merged into what was reported before) */
  progress(update: Partial<VMStatus>): void;
  /** a safety gate holds the move (verdict) or released it (undefined) */
  waiting?(verdict: SafetyVerdict | undefined): void;
  /** the move resumes an interrupted one: what and why */
  resumed?(info: { from: MoveStep; why: string }): void;
  /** the controller VM moves without load-balancer steps (no LoadBalancerControl) */
  noLoadBalancer?(): void;
}

export interface MoveContext {
  migrationUid: string;
  /** namespace/name, journaled with the first step so `history` finds the move by name */
  migrationName?: string;
  environment: EnvironmentSpec;
  vm: VMSpec;
  source: MoveHost;
  target: MoveHost;
  guest: MoveGuest;
  safety: { guard: ControlPlaneGuard; loadBalancer?: LoadBalancerControl };
  store: MoveStore;
  engines: MoveEngines;
  settings: MigrationSettings;
  /** the migration's settings as they are now (an edited window is honoured by a move that waits for it) */
  currentSettings?: () => MigrationSettings;
  observer: MoveObserver;
  log: Logger;
  signal: AbortSignal;
  /**
   * Set when this pre-copy move mirrors ahead of its environment's previous VM: the `turn` step
   * waits for it before anything is disrupted (rejects when the turn is withdrawn: roll back).
   */
  turn?: Turn;
}

export interface MoveResult {
  /** the student's outage and its parts; undefined when no stop of this move was seen (the VM was already down) */
  outage: Outage | undefined;
  nodeReadyMs: number;
  bytes: number;
  /** the first step that changes something (a fresh move: cordon, or mirror/live) */
  resumedFrom: MoveStep;
  mode: MoveMode;
}

/**
 * untouched: failed before any side effect; waiting: not safe yet, nothing touched, try again later;
 * rolled-back: back on the source; stuck: rollback failed, needs a human; stuck-on-target: the VM ran
 * on the target and a later step kept failing — it stays there (Degraded), the source image is kept
 * and never started; interrupted: stopped on purpose mid-way (leadership lost, shutdown) and left for
 * the next run to resume from the journal — rolling back then would race the new leader.
 */
export type MoveOutcome = 'untouched' | 'waiting' | 'rolled-back' | 'stuck' | 'stuck-on-target' | 'interrupted';

/** Abort reason that means "stop, someone will resume" rather than "cancel and roll back". */
export class Handover extends Error {
  readonly resumable = true;
}

export class MoveError extends Error {
  constructor(readonly step: MoveStep, message: string, readonly outcome: MoveOutcome, readonly verdict?: SafetyVerdict) {
    super(message);
    this.name = 'MoveError';
  }
}


/** What the steps of one move share while it runs. */
interface MoveState {
  mode: MoveMode;
  touched: boolean;
  /** the outage's edges as this run saw them (the operator's clock); an earlier run's are in the journal */
  stoppedAt?: number;
  haltedAt?: number;
  startingAt?: number;
  runningAt?: number;
  readyAt?: number;
  /** the boot the node reported right before this run stopped its guest */
  bootBefore?: string;
  nodeReadyMs: number;
  bytes: number;
  mirror?: MirrorSession;
  live?: LiveSession;
  sourceFenced: boolean;
  targetStarted: boolean;
  lbOut: boolean;
  /** this run holds the source lock (taken right before the first side effect) */
  sourceHeld: boolean;
}

export async function moveVm(ctx: MoveContext): Promise<MoveResult> {
  const run = stepRunner(ctx);
  const location = await run('precheck', () => precheck(ctx)).catch((err: Error) => {
    if (interruptedBy(ctx)) throw new MoveError('precheck', `interrupted: ${interruptedBy(ctx)}`, 'interrupted');
    throw err instanceof MoveError ? err : new MoveError('precheck', err.message, 'untouched');
  });
  const { converged, targetRan } = await journalOf(ctx);
  // the journal, or the target host's own record when the journal lost it (a restored database)
  const ranBefore = targetRan || (location === 'target-stopped' && (await ctx.target.ranHere?.(ctx.environment.name, ctx.vm)) !== undefined);
  const planFor = (loc: Location, liveFellBack = false, targetRan = ranBefore): FlowPlan => flowSteps({
    location: loc, journal: { converged, targetRan }, settings: ctx.settings, role: ctx.vm.role,
    capabilities: { loadBalancer: ctx.safety.loadBalancer !== undefined }, liveFellBack, ahead: ctx.turn !== undefined,
  });
  let plan = planFor(location);
  if (plan.resume) {
    ctx.log.info({ resumeFrom: plan.resume.from, why: plan.resume.why }, 'resuming an interrupted move');
    ctx.observer.resumed?.(plan.resume);
  }
  if (ctx.vm.role === 'controller' && !ctx.safety.loadBalancer) ctx.observer.noLoadBalancer?.();
  const resumedFrom = plan.steps.find((s) => changesSomething(s.name) && !STEP_TABLE[s.name].guestSafety)?.name ?? 'nodeReady';

  // an earlier run's `start` counts too: once the target may have run, this run never rolls back
  const st: MoveState = { mode: plan.mode, touched: false, nodeReadyMs: 0, bytes: 0, sourceFenced: false, targetStarted: location === 'target-running' || ranBefore, lbOut: false, sourceHeld: false };
  const runSteps = async (steps: FlowPlan['steps']): Promise<MoveResult> => {
    const queue = [...steps];
    while (queue.length > 0) {
      const step = queue.shift()!;
      if (changesSomething(step.name) && !st.sourceHeld) {
        // before the first side effect: held by another migration means untouched, not rolled back
        await holdSource(ctx).catch((err: Error) => { throw Object.assign(err, { step: step.name }); });
        st.sourceHeld = true;
      }
      if (changesSomething(step.name)) st.touched = true;
      try {
        await run(step.name, () => ACTIONS[step.name](ctx, st));
      } catch (err) {
        if (!(err instanceof LiveFellBack)) throw err;
        // The live migration aborted cleanly (the VM never left the source): continue with the fallback.
        ctx.observer.progress({ message: `live migration aborted (${err.message}); falling back to ${ctx.settings.live.fallback}` });
        plan = planFor('source-running', true);
        st.mode = plan.mode;
        queue.splice(0, queue.length, ...plan.steps);
      }
    }
    return { outage: await outageSeen(ctx, st), nodeReadyMs: st.nodeReadyMs, bytes: st.bytes, resumedFrom, mode: st.mode };
  };
  try {
    return await runSteps(plan.steps);
  } catch (err) {
    const failedStep = (err as { step?: MoveStep }).step ?? 'precheck';
    if (err instanceof MoveError && err.outcome === 'waiting') throw err;
    if (interruptedBy(ctx)) {
      // QEMU serves one client per monitor: a session kept open would make the next leader see the VM as "other"
      await Promise.allSettled([st.mirror?.detach(), st.live?.detach()]);
      throw new MoveError(failedStep, `interrupted: ${interruptedBy(ctx)}`, 'interrupted');
    }
    const reason = (err as Error).message;
    if (!st.touched) throw Object.assign(new MoveError(failedStep, reason, 'untouched'), { cause: err });
    // A lost reply (e.g. to the live handover's `cont`) can hide a target that runs: look before deciding.
    if (!st.targetStarted && (await targetRuns(ctx))) st.targetStarted = true;
    if (st.targetStarted) return rollForward(ctx, st, { step: failedStep, reason }, async () => runSteps(planFor(await locate(ctx), false, true).steps));
    const outcome = await rollback(ctx, st).then((): MoveOutcome => 'rolled-back', (rbErr: Error): MoveOutcome => {
      ctx.log.error({ err: rbErr.message }, 'rollback failed');
      ctx.observer.progress({ message: `rollback failed: ${rbErr.message}` });
      return 'stuck';
    });
    // the cause tells a withdrawn turn (a mirror ahead dropped, nothing disrupted) from a failed step
    throw Object.assign(new MoveError(failedStep, reason, outcome), { cause: err });
  }
}

/** Takes the source lock: from now on no stray start (another migration, a second replica) brings up the source copy. */
async function holdSource(ctx: MoveContext): Promise<void> {
  const holder = { uid: ctx.migrationUid, ...(ctx.migrationName ? { migration: ctx.migrationName } : {}), target: ctx.target.host.name };
  const r = await ctx.source.lockSource(ctx.environment.name, ctx.vm, holder);
  if (r === 'locked') ctx.log.info({ host: ctx.source.host.name }, 'source lock taken');
}

/** The abort reason when the run was handed over (leadership lost, shutdown): the next run resumes, nobody rolls back. */
function interruptedBy(ctx: MoveContext): string | undefined {
  return ctx.signal.aborted && ctx.signal.reason instanceof Handover ? ctx.signal.reason.message : undefined;
}

/** True only when the target's QEMU answers `running`; unreachable or unsure counts as not known to run. */
async function targetRuns(ctx: MoveContext): Promise<boolean> {
  const s = await ctx.target.vmStatus(ctx.environment.name, ctx.vm).catch(() => undefined);
  return s?.qmpStatus === 'running';
}

/**
 * Rule 2: the VM may have run on the target, so its disk holds the newest guest writes. Retry the
 * rest of the move there — re-locate (the failure may have changed where things are), re-plan,
 * run — with backoff until nodeReadyTimeout has passed since the first failure. Then stop there:
 * `stuck-on-target`. Never start the source, never stop or delete the target.
 */
async function rollForward(ctx: MoveContext, st: MoveState, first: { step: MoveStep; reason: string }, attempt: () => Promise<MoveResult>): Promise<MoveResult> {
  const deadline = Date.now() + ctx.settings.nodeReadyTimeoutMs;
  let last = first;
  // sessions of the first attempt are spent (their QMP clients closed); retries open fresh ones
  st.live = undefined;
  st.mirror = undefined;
  for (let n = 0; ; n++) {
    const stuck = (why: string) => new MoveError(last.step, `${last.reason}${why} — the VM ran on ${ctx.target.host.name} and stays there (its disk holds the guest's newest writes); the source image on ${ctx.source.host.name} is kept and was never started again`, 'stuck-on-target');
    if (interruptedBy(ctx)) throw new MoveError(last.step, `interrupted: ${interruptedBy(ctx)}`, 'interrupted');
    if (ctx.signal.aborted) throw stuck(' (cancelled)');
    const left = deadline - Date.now();
    if (left <= 0) throw stuck(` (still failing after ${n} retr${n === 1 ? 'y' : 'ies'} for ${Math.round(ctx.settings.nodeReadyTimeoutMs / 1000)} s)`);
    ctx.log.warn({ step: last.step, err: last.reason, retry: n + 1 }, 'step failed after the VM ran on the target: rolling forward');
    ctx.observer.progress({ message: `rolling forward on ${ctx.target.host.name} (never back: the VM ran there): ${last.step} failed: ${last.reason}; retry ${n + 1}` });
    try {
      await sleep(Math.min(left, backoffMs(n, 500, 15_000)), ctx.signal);
      return await attempt();
    } catch (err) {
      if (err instanceof MoveError && err.outcome === 'stuck-on-target') throw err;
      last = { step: (err as { step?: MoveStep }).step ?? last.step, reason: (err as Error).message };
    }
  }
}

async function precheck(ctx: MoveContext): Promise<Location> {
  const { vm, guest, environment } = ctx;
  if (!(await guest.apiHealthy())) {
    const verdict = { safe: false, reason: 'WaitingForAPIServer', message: `the API server of ${environment.name}'s guest cluster is not healthy (/readyz)` };
    throw new MoveError('precheck', verdict.message, 'waiting', verdict);
  }
  const node = await guest.nodeState(vm.nodeName);
  if (!node.exists) throw new Error(`node ${vm.nodeName} of VM ${vm.name} does not exist in the guest cluster of ${environment.name}`);
  await targetReady(ctx);
  // The guest cluster is the student's: a node named like the VM is not proof that it runs on that VM.
  // Where both say where they are, they must agree before anything is drained or stopped for it.
  const ips = node.internalIPs ?? [];
  if (vm.address && ips.length > 0 && !ips.includes(vm.address)) {
    throw new Error(`node ${vm.nodeName} reports InternalIP ${ips.slice(0, 4).join(', ')}, but VM ${vm.name} has address ${vm.address} in the inventory: the node is not known to run on this VM; refusing to drain it or move the VM`);
  }
  const location = await locate(ctx);
  if (location === 'source-running') await sourceAsDefined(ctx);
  return location;
}

/**
 * The running source is the VM its inventory entry describes (the operator starts it on the target
 * from that entry, and a live migration's target must match it): a VM the cloud started with devices
 * the entry lacks would lose them, and a monitor that does not answer leaves no clean way to stop or
 * migrate it. Checked before anything is touched.
 */
async function sourceAsDefined(ctx: MoveContext): Promise<void> {
  const { source, environment, vm } = ctx;
  const st = await source.vmStatus(environment.name, vm);
  if (st.state === 'other') {
    const message = `the QEMU of VM ${vm.name} on ${source.host.name}${st.pid ? ` (pid ${st.pid})` : ''} runs but does not answer on its monitor (its VM directory's qmp.sock): busy with another client, wedged, or not started as the operator's contract asks (docs/manual.md, "VMs the operator did not start"); it could be neither shut down cleanly nor migrated. Nothing was touched`;
    throw new MoveError('precheck', message, 'waiting', { safe: false, reason: 'WaitingForVMMonitor', message });
  }
  const drift = await source.definitionDrift?.(environment.name, vm);
  if (!drift || (drift.extra.length === 0 && drift.missing.length === 0)) return;
  const parts = [
    drift.extra.length > 0 ? `it runs with ${drift.extra.slice(0, 8).join('; ')}, which the inventory does not describe (lost on the target)` : '',
    drift.missing.length > 0 ? `the inventory defines ${drift.missing.slice(0, 8).join('; ')}, which it does not run with (the guest would see it change)` : '',
  ].filter(Boolean);
  throw new Error(`VM ${vm.name} on ${source.host.name} is not the VM its inventory entry describes: ${parts.join('; and ')}. Describe the VM fully in the inventory (docs/manual.md, "VMs the operator did not start"); nothing was touched`);
}

/**
 * The target can run the VM as it is defined — its bridges (with the bridge helper's consent), its
 * CPU model, the host's machine type and accelerator — and, for a live migration, load the source's
 * stream: the same machine type and accelerator, and a QEMU at least as new. Asked before anything is
 * touched; what is missing ends the move untouched, named.
 */
async function targetReady(ctx: MoveContext): Promise<void> {
  const { source, target, vm } = ctx;
  if (!target.readiness) return;
  const live = moveMode(ctx.settings) === 'live';
  const [t, s] = await Promise.all([target.readiness(vm), live ? source.readiness?.(vm) : undefined]);
  const missing = [...t.missing];
  if (live && s) {
    if (s.machine !== t.machine) missing.push(`machine type ${t.machine}, the source runs ${s.machine} (a live migration needs the same)`);
    if (s.accel !== t.accel) missing.push(`accelerator ${t.accel}, the source runs ${s.accel} (a live migration needs the same)`);
    const older = qemuVersionOlder(t.version, s.version);
    if (older) missing.push(`QEMU ${older.target} is older than the source's ${older.source}: it cannot load a live migration's stream from it`);
  }
  if (missing.length > 0) throw new Error(`${target.host.name} cannot run VM ${vm.name} as it is defined: ${missing.join('; ')}. Nothing was touched; the VM stays on ${source.host.name}`);
}

/** "QEMU emulator version 7.2.22 (…)" lines → which is older, when the target's is (undefined when unknown or not older). */
export function qemuVersionOlder(target?: string, source?: string): { target: string; source: string } | undefined {
  const v = (line?: string) => /version (\d+)\.(\d+)\.(\d+)/.exec(line ?? '')?.slice(1).map(Number);
  const [a, b] = [v(target), v(source)];
  if (!a || !b) return undefined;
  for (let i = 0; i < 3; i++) {
    if ((a[i] as number) !== (b[i] as number)) return (a[i] as number) < (b[i] as number) ? { target: a.join('.'), source: b.join('.') } : undefined;
  }
  return undefined;
}

/** True when this VM's journal shows a converged pre-copy mirror since its last mirror start and rollback. */
/** The outage from what this run saw, and from the journal for what an earlier run did (a resumed move). */
async function outageSeen(ctx: MoveContext, st: MoveState): Promise<Outage | undefined> {
  const seen = { stoppedAt: st.stoppedAt, haltedAt: st.haltedAt, startingAt: st.startingAt, runningAt: st.runningAt };
  const journaled = Object.values(seen).some((v) => v === undefined) ? (await journalOf(ctx)).outage : {};
  const stoppedAt = seen.stoppedAt ?? journaled.stoppedAt;
  const runningAt = seen.runningAt ?? journaled.runningAt;
  // no stop of this move anywhere: the VM was down before it began, and its outage is not the move's
  if (stoppedAt === undefined || runningAt === undefined) return undefined;
  return outageOf({ mode: st.mode, stoppedAt, haltedAt: seen.haltedAt ?? journaled.haltedAt, startingAt: seen.startingAt ?? journaled.startingAt, runningAt, readyAt: st.readyAt });
}

/** What this VM's journal (of this migration) says happened. */
async function journalOf(ctx: MoveContext): Promise<JournalFacts> {
  return journalFacts(await ctx.store.journalEntries(ctx.migrationUid, ctx.environment.name, ctx.vm.name));
}

const live = (s: string) => s === 'running' || s === 'paused' || s === 'other';
/**
 * A live QEMU that has not run the guest (yet): an incoming target waiting for or loading a live
 * migration's stream, or one started with -S. Its disks hold a partial copy, never the newest writes.
 */
const neverRan = (s: VmStatus) => s.qmpStatus === 'inmigrate' || s.qmpStatus === 'prelaunch';

/**
 * Finds the VM. Exactly one host may hold a QEMU that ran the guest; two is the split-brain the
 * fencing exists to prevent, and we stop rather than guess. A target counts as running the guest only
 * when QMP says `running`; whether it may have run before is known from the journal and, should the
 * journal be lost or restored from an older backup, from the target host's own record
 * (RAN_MARKER_FILE). A target QEMU in a state nobody can account for is refused.
 */
async function locate(ctx: MoveContext): Promise<Location> {
  const { source, target, vm, environment } = ctx;
  const env = environment.name;
  // nothing of this run exists yet: any qemu-nbd export in the target's VM directory is an interrupted
  // run's, and so is any verification scratch copy beside the source's disks
  await Promise.all([target.clearStaleExports?.(env, vm), source.sweepScratch?.(env, vm)]);
  const [src, dstSeen, journal, marker] = await Promise.all([source.vmStatus(env, vm), target.vmStatus(env, vm), journalOf(ctx), target.ranHere?.(env, vm)]);
  const journalRan = journal.targetRan;
  let dst = dstSeen;
  const ran = journalRan || marker !== undefined;
  const evidence = journalRan ? 'journal: start began' : `recorded on ${target.host.name} by migration ${marker ?? '?'}`;
  /** the target's QEMU never ran the guest: stop it and remove its partial copy (refused if the guest may have run from that directory) */
  const discardTarget = async (): Promise<void> => {
    if (marker !== undefined) throw new Error(`VM ${vm.name} has a ${dst.qmpStatus} QEMU on ${target.host.name} in a directory the guest may have run from (${evidence}); refusing to touch it`);
    await target.stopVm(env, vm, { powerdownTimeoutMs: 0 });
    await assertStopped(target, env, vm);
    await target.removeVmDir(env, vm, { staleCopy: true });
  };
  if (live(src.state) && live(dst.state)) {
    // An interrupted live migration leaves two QEMUs, but only one of them ever ran the guest:
    // a target still waiting for the incoming stream never ran it, a source that finished handing over never will again.
    if (src.qmpStatus === 'running' && neverRan(dst)) {
      await discardTarget();
      return 'source-running';
    }
    if (src.qmpStatus === 'postmigrate' && dst.qmpStatus === 'running') {
      await source.stopVm(env, vm, { powerdownTimeoutMs: 0 });
      await assertStopped(source, env, vm);
      return 'target-running';
    }
    if (src.qmpStatus === 'postmigrate' && dst.qmpStatus === 'paused') return 'handover-pending';
    throw new Error(`VM ${vm.name} has a live QEMU on both ${source.host.name} (${src.qmpStatus ?? src.state}) and ${target.host.name} (${dst.qmpStatus ?? dst.state}); refusing to touch it`);
  }
  if (live(dst.state)) {
    if (dst.qmpStatus === 'running') return 'target-running';
    // a paused target beside a stopped source holds a migrated guest that was never resumed (or whose
    // resume was interrupted): it has to be resumed, not waited for — and once it may have run, it is
    // the truth: resumed as it is, never verified against (or replaced by) the older source copy
    if (dst.qmpStatus === 'paused') return ran ? 'target-stopped' : 'handover-pending';
    if (!neverRan(dst)) throw new Error(`VM ${vm.name} has a QEMU in state ${dst.qmpStatus ?? dst.state} on ${target.host.name} beside a stopped source on ${source.host.name}; the operator cannot tell whether it ran the guest: refusing to touch either copy`);
    // a partial live migration's incoming QEMU (the source was stopped since): it never ran the guest
    await discardTarget();
    dst = { state: 'absent' };
  }
  // Rule 2: once `start` began the target may have run; its disk is the truth, even when the source
  // files are still there and the target QEMU is gone (crashed, host rebooted). Never copy over it.
  if (ran) {
    if (live(src.state)) throw new Error(`VM ${vm.name} may have run on ${target.host.name} (${evidence}) but a QEMU of it runs on ${source.host.name} again; refusing to touch either copy — an administrator decides which one is the VM`);
    if (dst.state === 'absent') throw new Error(`VM ${vm.name} may have run on ${target.host.name} (${evidence}) but its files are gone there; refusing to fall back to the stale copy on ${source.host.name}`);
    return 'target-stopped';
  }
  if (live(src.state)) {
    if (src.qmpStatus !== 'running' && src.qmpStatus !== undefined && journal.haltedForCutover) return 'source-halted';
    // files on the target that never ran (a rolled-back or interrupted copy): stale, the move starts over
    if (dst.state === 'stopped') await target.removeVmDir(env, vm, { staleCopy: true });
    return 'source-running';
  }
  if (src.state === 'absent' && dst.state === 'stopped') {
    // Source already cleaned: only possible after a verified copy.
    return 'target-stopped';
  }
  if (src.state === 'absent') throw new Error(`VM ${vm.name} has no files on ${source.host.name} nor a complete copy on ${target.host.name}`);
  return 'source-stopped';
}

/**
 * Leadership (or a cancel) is checked right before every irreversible sub-action, not only at step
 * boundaries: a step whose probe outlasted the lease must not go on to stop, start or delete.
 */
function checkpoint(ctx: MoveContext, what: string): void {
  if (ctx.signal.aborted) throw new Error(`not ${what}: ${abortReason(ctx.signal).message}`);
}

async function assertStopped(h: MoveHost, env: string, vm: VMSpec): Promise<void> {
  const s = await h.vmStatus(env, vm);
  if (s.state !== 'stopped' && s.state !== 'absent') throw new Error(`VM ${vm.name} is still ${s.qmpStatus ?? s.state} on ${h.host.name}`);
}

type Action = (ctx: MoveContext, st: MoveState) => Promise<unknown>;


/** A safety gate: waits (status condition, backoff) while not safe; before any side effect it hands the wait to the runner. */
async function gate(ctx: MoveContext, st: MoveState): Promise<void> {
  let deadline: number | undefined;
  for (let attempt = 0; ; attempt++) {
    const verdict = await ctx.safety.guard.checkSafeToStop(ctx.vm);
    if (verdict.safe) {
      if (attempt > 0) ctx.observer.waiting?.(undefined);
      return;
    }
    if (!st.touched) throw new MoveError('quorum', verdict.message, 'waiting', verdict);
    deadline ??= Date.now() + ctx.settings.safetyWaitTimeoutMs;
    if (Date.now() >= deadline) throw new Error(`still not safe after waiting ${Math.round(ctx.settings.safetyWaitTimeoutMs / 1000)} s: ${verdict.message}`);
    ctx.observer.waiting?.(verdict);
    await sleep(backoffMs(attempt, 1000, 15_000), ctx.signal);
  }
}

/**
 * Warm migration: the pre-copy mirror runs (the VM too, undisturbed) while the cut-over waits for
 * spec.window to open. A window that closed meanwhile ends the move before anything is disrupted:
 * the rollback drops the mirror and the VM never stopped.
 */
async function windowGate(ctx: MoveContext): Promise<void> {
  for (let waited = false; ; waited = true) {
    // read anew each time: the window may be edited (opened, closed, moved) while the move waits
    const w = windowState((ctx.currentSettings?.() ?? ctx.settings).window, Date.now());
    if (w.open) {
      if (waited) ctx.observer.waiting?.(undefined);
      return;
    }
    if (w.opensAtMs === undefined) throw new Error(`not cutting over: ${w.reason}`);
    const message = `pre-copy mirror running, the VM undisturbed; the cut-over waits: ${w.reason}`;
    ctx.observer.waiting?.({ safe: false, reason: 'WaitingForWindow', message });
    ctx.observer.progress({ message });
    await sleep(Math.min(Math.max(w.opensAtMs - Date.now(), 0), 10_000), ctx.signal);
  }
}

const ACTIONS: Record<MoveStep, Action> = {
  precheck: async () => undefined,
  quorum: gate,
  mirror: async (ctx, st) => {
    st.mirror = await ctx.engines.startMirror({ signal: ctx.signal, onProgress: (p) => ctx.observer.progress(p) });
  },
  turn: async (ctx) => {
    ctx.observer.progress({ message: 'mirroring ahead, the VM undisturbed; its cut-over waits until the environment\'s previous VM has moved (one VM of an environment down at a time)' });
    await need(ctx.turn, 'turn')(ctx.signal);
  },
  window: windowGate,
  cordon: (ctx) => ctx.guest.cordon(ctx.vm.nodeName),
  drain: (ctx) => ctx.guest.drain(ctx.vm.nodeName, {
    timeoutMs: ctx.settings.drainTimeoutMs, gracePeriodSeconds: ctx.settings.drainGracePeriodSeconds,
    deleteEmptyDirData: ctx.settings.deleteEmptyDirData, force: ctx.settings.drainForce, ignoreDaemonSets: ctx.settings.drainIgnoreDaemonSets,
    skipWaitForDeleteTimeoutSeconds: ctx.settings.drainSkipWaitForDeleteTimeoutSeconds, signal: ctx.signal,
    onProgress: (remaining: number) => ctx.observer.progress({ message: `draining: ${remaining} pod(s) left` }),
  }),
  mirrorSync: async (_ctx, st) => {
    await need(st.mirror, 'mirror').ready;
  },
  leaderMove: async (ctx) => {
    const r = await ctx.safety.guard.moveLeadershipAway(ctx.vm, ctx.signal);
    if (r.movedTo) ctx.observer.progress({ message: `etcd leadership moved to ${r.movedTo}` });
  },
  lbOut: async (ctx, st) => {
    st.lbOut = true;
    await ctx.safety.loadBalancer?.removeBackend(ctx.vm, ctx.signal);
  },
  live: async (ctx, st) => {
    st.live = await ctx.engines.live({
      signal: ctx.signal,
      onProgress: (message, bytes, figures) => ctx.observer.progress({
        bytesTransferred: bytes, ...(figures ? { live: figures } : {}),
        message: `live: ${message}${figures ? `, RAM ${mib(figures.remainingBytes)} of ${mib(figures.totalBytes)} left${figures.expectedDowntimeMs !== undefined ? `, QEMU expects ${figures.expectedDowntimeMs} ms downtime` : ''}${figures.cpuThrottlePercent ? `, guest vCPUs throttled ${figures.cpuThrottlePercent}% (auto-converge)` : ''}` : ''}`,
      }),
    });
    st.bytes = st.live.bytes;
  },
  stop: async (ctx, st) => {
    const { source, environment, vm, settings } = ctx;
    if (st.mode === 'live' && st.live) {
      // QEMU stopped the guest itself (stop-and-copy); the source must be postmigrate now.
      st.stoppedAt = st.live.stoppedAt;
      st.haltedAt = st.stoppedAt;
      const runState = await st.live.sourceRunState();
      if (runState !== 'postmigrate') throw new Error(`source is ${runState} after the live migration, expected postmigrate`);
      return runState;
    }
    // the boot its kubelet reports now: after the stop, node Ready counts only from another boot
    const before = await ctx.guest.nodeState(vm.nodeName).catch(() => undefined);
    st.bootBefore = before?.bootId;
    checkpoint(ctx, 'stopping the source');
    st.stoppedAt = Date.now();
    if (st.mirror) {
      const how = await st.mirror.haltSource(settings.powerdownTimeoutMs);
      st.haltedAt = Date.now();
      return how;
    }
    const how = await source.stopVm(environment.name, vm, { powerdownTimeoutMs: settings.powerdownTimeoutMs, signal: ctx.signal });
    st.haltedAt = Date.now();
    await assertStopped(source, environment.name, vm);
    return how;
  },
  converge: async (_ctx, st) => {
    st.bytes = await need(st.mirror, 'mirror').converge();
  },
  fence: async (ctx, st) => {
    const { source, environment, vm } = ctx;
    checkpoint(ctx, 'fencing the source');
    // quitSource returns only once the source host's process scan proved the QEMU gone (it throws
    // when unsure): asking again here would add a round trip to the downtime; `start` asks again anyway
    if (st.mirror) await st.mirror.quitSource();
    else if (st.live) await st.live.quitSource();
    else {
      const s = await source.vmStatus(environment.name, vm);
      // Fail closed: fencing never kills a guest that is still executing; that is `stop`'s job.
      if (s.qmpStatus === 'running') throw new Error(`refusing to fence: VM ${vm.name} is running on ${source.host.name}`);
      checkpoint(ctx, 'fencing the source');
      if (live(s.state)) await source.stopVm(environment.name, vm, { powerdownTimeoutMs: 0 });
      await assertStopped(source, environment.name, vm);
    }
    st.sourceFenced = true;
  },
  transfer: async (ctx, st) => {
    if (st.mode === 'precopy') {
      st.bytes += await (st.mirror ? st.mirror.copyFiles(ctx.signal) : ctx.engines.copyNonDisk(ctx.signal));
      return;
    }
    st.bytes = await ctx.engines.copyAll({ signal: ctx.signal, onProgress: (p) => ctx.observer.progress(p) });
    ctx.observer.progress({ bytesTransferred: st.bytes, bytesTotal: st.bytes, bytesPerSecond: 0, etaSeconds: 0 });
  },
  verify: async (ctx, st) => {
    const session = st.live ?? st.mirror;
    if (!session) return ctx.engines.verify();
    const how = await session.verify();
    ctx.observer.progress({ message: how });
    return how;
  },
  start: async (ctx, st) => {
    const { source, target, environment, vm } = ctx;
    // Fencing: the source must be proven stopped right before the target runs.
    await assertStopped(source, environment.name, vm);
    // the live session knows its target is paused; otherwise look: a retry or a resume may find it
    // running already (lost reply), paused (handover not done) or without QEMU (boot it)
    const onTarget = st.live ? undefined : await target.vmStatus(environment.name, vm);
    checkpoint(ctx, 'starting the target');
    st.startingAt = Date.now();
    // recorded on the target host itself before the guest may run there: a journal lost or restored
    // from an older backup can never turn this copy into a copy target again (RAN_MARKER_FILE)
    await target.markRanHere?.(environment.name, vm, ctx.migrationUid);
    // from here on the target may run: a failure rolls forward, never back (rule 2)
    st.targetStarted = true;
    if (st.live) st.runningAt = await st.live.resumeTarget();
    else if (onTarget?.qmpStatus === 'running') st.runningAt ??= Date.now();
    else if (onTarget && live(onTarget.state)) st.runningAt = await ctx.engines.resumeTarget();
    else {
      await target.startVm(environment.name, vm);
      st.runningAt = Date.now();
    }
  },
  nodeReady: async (ctx, st) => {
    const t0 = Date.now();
    await ctx.guest.waitNodeReady(ctx.vm.nodeName, { timeoutMs: ctx.settings.nodeReadyTimeoutMs, signal: ctx.signal, ...(st.bootBefore !== undefined ? { notBoot: st.bootBefore } : {}) });
    st.readyAt = Date.now();
    st.nodeReadyMs = st.readyAt - (st.runningAt ?? t0);
  },
  memberHealthy: (ctx) => ctx.safety.guard.waitMemberHealthy(ctx.vm, { timeoutMs: ctx.settings.nodeReadyTimeoutMs, signal: ctx.signal }),
  lbIn: async (ctx, st) => {
    await ctx.safety.loadBalancer?.addBackend(ctx.vm, ctx.signal);
    st.lbOut = false;
  },
  uncordon: (ctx) => ctx.guest.uncordon(ctx.vm.nodeName),
  commit: (ctx) => ctx.store.setPlacement(ctx.environment.name, ctx.vm.name, ctx.target.host.name),
  cleanup: async (ctx) => {
    const { source, environment, vm } = ctx;
    // The copy was verified and the VM is healthy on the target: only now may the source go.
    const onSource = await source.vmStatus(environment.name, vm);
    if (live(onSource.state)) throw new Error(`refusing to clean up: VM ${vm.name} still has a live QEMU on ${source.host.name}`);
    checkpoint(ctx, 'removing the source image');
    // rm -rf is idempotent: a half-done removal is finished by the retry (roll forward), never undone
    if (onSource.state !== 'absent') await source.removeVmDir(environment.name, vm);
  },
  rollback: async () => undefined,
};

function need<T>(v: T | undefined, what: string): T {
  if (v === undefined) throw new Error(`no ${what} in this run (the step list is inconsistent)`);
  return v;
}

/** Back to where we started: VM running on the source, back in the load balancer, node schedulable. */
async function rollback(ctx: MoveContext, st: MoveState): Promise<void> {
  const { source, target, vm, environment, guest } = ctx;
  const env = environment.name;
  await stepRunner(ctx)('rollback', async () => {
    // A live strategy session still holds the source QEMU: let it undo its own work first.
    if (st.mirror && !st.sourceFenced) await st.mirror.abortAndResume();
    if (st.live && !st.sourceFenced && !st.targetStarted) await st.live.abort(new Error('rolling back'));
    // QEMU serves one QMP client at a time: while the session holds the target's, stopping it would wait out timeouts and end in SIGKILL
    if (st.live && st.sourceFenced && !st.targetStarted) await st.live.release();
    const onSource = await source.vmStatus(env, vm);
    let targetUnreachable: string | undefined;
    const onTarget = await target.vmStatus(env, vm).catch((err: Error): VmStatus => {
      // Cold/pre-copy before `start`: no QEMU of this VM was ever started on the target, so an
      // unreachable target cannot be running it. Live: its paused QEMU holds the guest — fail closed.
      if (st.mode === 'live' || st.targetStarted) throw err;
      targetUnreachable = err.message;
      return { state: 'stopped' };
    });
    if (onSource.state === 'absent') {
      // The source files are gone only after a complete, verified move: nothing to roll back to.
      throw new Error(`source files of ${vm.name} are gone; leaving the VM on ${target.host.name}`);
    }
    if (live(onTarget.state) || st.targetStarted) {
      await target.stopVm(env, vm, { powerdownTimeoutMs: ctx.settings.powerdownTimeoutMs });
      await assertStopped(target, env, vm);
    }
    const targetStopped = () => (targetUnreachable ? Promise.resolve() : assertStopped(target, env, vm));
    if (onSource.state === 'stopped') {
      await targetStopped();
      await source.startVm(env, vm, { lockHolder: ctx.migrationUid });
    } else if (onSource.qmpStatus !== 'running') {
      // paused for a cutover, or shut down by an interrupted ACPI cutover (shutdown action pause)
      if (!source.resumeVm) throw new Error(`source QEMU of ${vm.name} is ${onSource.qmpStatus ?? onSource.state} and cannot be resumed here`);
      await targetStopped();
      await source.resumeVm(env, vm, { lockHolder: ctx.migrationUid });
    }
    // the status will say "runs again": only if it does
    const after = await source.vmStatus(env, vm);
    if (after.state !== 'running') throw new Error(`VM ${vm.name} is ${after.qmpStatus ?? after.state} on ${source.host.name} after the rollback, not running`);
    // the source runs again and is the VM's only copy: nothing left to guard
    await source.unlockSource(env, vm, ctx.migrationUid);
    if (targetUnreachable) ctx.observer.progress({ message: `target ${target.host.name} unreachable during the rollback (${targetUnreachable}); its never-started copy is removed by the next attempt` });
    else if (onTarget.state !== 'absent') await target.removeVmDir(env, vm, { staleCopy: true });
    if (st.lbOut) await ctx.safety.loadBalancer?.addBackend(vm, ctx.signal);
    await guest.uncordon(vm.nodeName);
  });
}

function stepRunner(ctx: MoveContext) {
  const { store, migrationUid, environment, vm, observer } = ctx;
  return async function run<T>(step: MoveStep, fn: () => Promise<T>): Promise<T> {
    // A cancelled move still locates the VM (precheck) so that it can roll back from wherever an earlier run left it.
    if (ctx.signal.aborted && step !== 'rollback' && (step !== 'precheck' || ctx.signal.reason instanceof Handover)) throw Object.assign(new Error('migration aborted'), { step });
    await store.journal(migrationUid, environment.name, vm.name, step, 'begin', step === 'precheck' && ctx.migrationName ? { migration: ctx.migrationName } : undefined);
    await store.updateMove(migrationUid, environment.name, vm.name, { step });
    observer.progress({ step });
    observer.step(step, 'begin', {});
    const started = Date.now();
    try {
      const result = await fn();
      const durationMs = Date.now() - started;
      // a step that says how it went (stop: powerdown or quit; verify: how the data was compared) has it journaled
      const outcome = typeof result === 'string' && result ? { message: result } : {};
      await store.journal(migrationUid, environment.name, vm.name, step, 'end', { durationMs, ...outcome });
      observer.step(step, 'end', { durationMs, ...outcome });
      return result;
    } catch (err) {
      if (err instanceof LiveFellBack) {
        // A clean live abort is an outcome of the step, not a failure of the move.
        await store.journal(migrationUid, environment.name, vm.name, step, 'end', { durationMs: Date.now() - started, message: `fell back: ${err.message}` });
        observer.step(step, 'end', { durationMs: Date.now() - started, message: err.message });
        throw err;
      }
      const message = (err as Error).message;
      await store.journal(migrationUid, environment.name, vm.name, step, 'fail', { message });
      observer.step(step, 'fail', { durationMs: Date.now() - started, message });
      throw Object.assign(err as Error, { step: (err as { step?: MoveStep }).step ?? step });
    }
  };
}
