/**
 * Executes one VMMigration outside the reconcile call: plan, then each VM move in order, reporting
 * to status, events and metrics as it goes. Kubernetes plumbing only: what a step does and when is
 * decided in src/migrate; this file maps outcomes to phase, conditions, Events and metrics.
 */
import { CoreV1Api, type KubeConfig } from '@kubernetes/client-node';
import pRetry from 'p-retry';
import type { EnvironmentSpec, HostSpec } from '../api/inventory.js';
import { settingsFrom, strategyName, type PlanEntry, type VMMigration, type VMStatus } from '../api/types.js';
import { GuestCluster } from '../guest/guestCluster.js';
import { loadGuestKubeconfig } from '../guest/kubeconfig.js';
import { measureHosts } from '../hosts/capacity.js';
import { HostReservations } from '../migrate/reservations.js';
import type { HostPool } from '../hosts/pool.js';
import { HostKeyMismatchError } from '../hosts/ssh.js';
import * as metrics from '../metrics/metrics.js';
import { hypervisorEngines } from '../migrate/engines.js';
import { HostBandwidth, qemuStreamShare } from '../transfer/throttle.js';
import type { ControlPlaneGuard, LoadBalancerControl, SafetyVerdict } from '../migrate/guestSafety.js';
import { readinessGuard } from '../migrate/readinessGuard.js';
import { runFleet, TurnWithdrawn, type FleetOutcome, type Turn } from '../migrate/fleet.js';
import { boundVmList, environmentSummaries, initialVmList, patchEnvironment, patchVm, targetsText } from '../migrate/fleetStatus.js';
import { afterMove, resumePlan, safetyWait } from '../migrate/rules.js';
import { describeOutage, outageStatus } from '../migrate/outage.js';
import { moveVm, MoveError, type MoveContext, type MoveResult, type MoveStep } from '../migrate/vmMove.js';
import { planMigration } from '../planner/plan.js';
import { sourceScratchFits, vmFits, type HostCapacity } from '../planner/placement.js';
import type { MoveRecord, Store } from '../store/store.js';
import type { Logger } from '../util/log.js';
import { sleep } from '../util/sleep.js';
import { setState, type MigrationState } from './conditions.js';
import { StatusWriter, type EventRecorder } from './statusWriter.js';
import { changesSomething, moveMode, STEP_TABLE } from '../migrate/steps.js';

/** What the runner writes status through (StatusWriter; a unit test may pass its own). */
export type StatusSink = Pick<StatusWriter, 'update' | 'flush' | 'close' | 'current'>;

export interface RunnerDeps {
  kc: KubeConfig;
  store: Store;
  pool: Pick<HostPool, 'hypervisor' | 'connectFresh'>;
  events: Pick<EventRecorder, 'emit'>;
  log: Logger;
  /** the newest copy of the object from the informer cache (spec.paused may change while we run) */
  latest: () => VMMigration | undefined;
  /** environments claimed by running migrations in this process; two migrations never move one environment at once */
  claimEnvironments: (uid: string, envs: string[]) => string[];
  releaseEnvironments: (uid: string) => void;
  statusIntervalMs?: number;
  /**
   * The guest-safety parts for one environment: the control-plane guard and, if the environment
   * describes one, its load balancer. Default: readinessGuard (node readiness + /readyz), no LB.
   */
  guestSafety?: (env: EnvironmentSpec, guest: GuestCluster) => { guard: ControlPlaneGuard; loadBalancer?: LoadBalancerControl };
  /** replaceable for unit tests of the bookkeeping */
  statusSink?: (vmm: VMMigration) => StatusSink;
  openGuest?: (env: EnvironmentSpec) => Promise<GuestCluster>;
  move?: (ctx: MoveContext) => Promise<MoveResult>;
  /** measured room on hosts (src/hosts/capacity.ts over the pool); absent = not measured, and status says so */
  capacity?: { host(h: HostSpec): Promise<HostCapacity>; vmBytes(h: HostSpec, environment: string, vm: string): Promise<number> };
  /** room promised to moves in flight; default: one registry for the whole process */
  reservations?: HostReservations;
  /** the VMMigration (namespace/name) holding an environment, for the waiting condition */
  holderOf?: (environment: string) => string | undefined;
}

/**
 * How a run ended, for the work queue: done (finished, failed or dry-run; its status says which) or
 * to be run again after a while (not safe yet, waiting for the window, an environment held by another
 * migration). A run stopped on purpose (leadership lost, deleted) throws Aborted instead.
 */
export type RunEnd = { kind: 'done' } | { kind: 'retry'; afterMs: number };

/** The run stopped on purpose (handover, deletion); nothing to retry here. */
export class Aborted extends Error {}

/** Room promised to the moves in flight of every migration this process runs (src/migrate/reservations.ts). */
const sharedReservations = new HostReservations();

export async function runMigration(vmm: VMMigration, deps: RunnerDeps, signal: AbortSignal): Promise<RunEnd> {
  const endRun = metrics.migrationRunStarted();
  const writer = deps.statusSink?.(vmm) ?? new StatusWriter(deps.kc, vmm, vmm.status ?? {}, deps.log, deps.statusIntervalMs, () => latestOf(deps, vmm)?.metadata.generation);
  try {
    return (await execute(vmm, deps, writer, signal)) ?? { kind: 'done' };
  } finally {
    endRun();
    writer.close();
  }
}

async function execute(vmm: VMMigration, deps: RunnerDeps, writer: StatusSink, signal: AbortSignal): Promise<RunEnd | void> {
  const { store, log } = deps;
  const reservations = deps.reservations ?? sharedReservations;
  // The generation whose spec this run acts on now: edits of what may change during a run (paused,
  // cancel, the window; per VM: bandwidth limit, drain and shutdown options, timeouts) are read as they
  // come, so each status write says which generation it reflects (kubectl wait, kstatus, Flux, Argo CD).
  const generation = () => latestOf(deps, vmm)?.metadata.generation ?? vmm.metadata.generation ?? 1;
  const settings = settingsFrom(vmm.spec);
  /** the spec as it is now (the plan, strategy and transfer mode are fixed for the run: CEL keeps them) */
  const currentSettings = () => settingsFrom(latestOf(deps, vmm)?.spec ?? vmm.spec);
  const uid = vmm.metadata.uid;
  const strategy = strategyName(settings);
  const state = async (st: MigrationState, reason: string, message: string) => {
    writer.update((s) => setState(s, generation(), st, reason, message));
    await writer.flush();
  };
  const finishFailed = async (reason: string, message: string) => {
    await state('failed', reason, message);
    deps.events.emit(vmm, 'Warning', reason === 'MoveFailed' ? 'MigrationFailed' : reason, message);
    metrics.recordMigrationFinished(strategy, false);
  };
  /** Not safe yet: Progressing=False with the verdict's reason, re-queued with backoff until safetyWaitTimeout. */
  const waitOrFail = async (verdict: Pick<SafetyVerdict, 'reason' | 'message'>): Promise<RunEnd> => {
    const now = Date.now();
    const since = Date.parse(writer.current.waitingSince ?? new Date(now).toISOString());
    const next = safetyWait(since, now, settings.safetyWaitTimeoutMs);
    if (next.fail) {
      await finishFailed('SafetyWaitTimeout', `${verdict.message} (still not safe after ${Math.round(next.waitedMs / 1000)} s; spec.safetyWaitTimeout)`);
      throw new Aborted(verdict.message);
    }
    const announce = writer.current.conditions?.find((c) => c.type === 'Progressing')?.reason !== verdict.reason;
    writer.update((s) => {
      setState(s, generation(), 'waiting', verdict.reason, verdict.message);
      s.waitingSince ??= new Date(since).toISOString();
    });
    await writer.flush();
    if (announce) deps.events.emit(vmm, 'Normal', verdict.reason, verdict.message);
    return { kind: 'retry', afterMs: next.retryAfterMs };
  };

  let plan: PlanEntry[] | undefined;
  const stored = await store.moves(uid);
  const resuming = vmm.status?.phase === 'Running' && (stored.length > 0 || vmm.status.plan !== undefined);
  if (resuming) {
    // the operator's own store is the truth; status is read back only without one, and validated
    const r = resumePlan({ status: vmm.status?.plan, stored, hosts: (await store.hosts()).map((h) => h.name), environments: await store.environments(), spec: settings });
    if (r.problems.length > 0) return finishFailed('InvalidStatusPlan', `cannot resume: ${r.problems.join('; ')}`);
    if (r.statusIgnored) {
      log.warn({ reason: r.statusIgnored }, 'status.plan ignored');
      deps.events.emit(vmm, 'Warning', 'StatusPlanIgnored', r.statusIgnored);
    }
    plan = r.entries;
    const entries = plan;
    writer.update((s) => { s.plan = entries; });
  } else {
    const hosts = await store.hosts();
    const capacity = deps.capacity ? await measureHosts(hosts, deps.capacity, log) : undefined;
    const result = planMigration(hosts, await store.environments(), settings, capacity?.readings, capacity?.unreachable);
    if (result.problems.length > 0) return finishFailed(result.reason ?? 'InvalidReference', result.problems.join('; '));
    plan = result.entries;
    const entries = plan;
    const reasons = new Map(result.environments.map((c) => [c.environment, c.reason]));
    writer.update((s) => {
      s.observedGeneration = generation();
      s.plan = entries;
      s.vms = initialVmList(entries);
      s.environments = environmentSummaries(entries, reasons);
      s.environmentProgress = `0/${s.environments.length}`;
      s.progress = `0/${entries.length}`;
    });
    if (settings.dryRun) return state('dryRun', 'DryRun', `dry run: ${entries.length} VM(s) of ${reasons.size} environment(s) would move (${targetsText(entries)})`);
    // the whole plan goes into the store before the first move: a resume reads it from there
    for (const e of entries) await store.ensureMove({ migrationUid: uid, environment: e.environment, vm: e.vm, fromHost: e.from, toHost: e.to });
  }
  const entries = plan!;
  const busy = deps.claimEnvironments(uid, [...new Set(entries.map((e) => e.environment))]);
  if (busy.length > 0) return waitOrFail({ reason: 'WaitingForEnvironment', message: `environment(s) ${busy.map((e) => `${e} (held by VMMigration ${deps.holderOf?.(e) ?? '?'})`).join(', ')} are being moved by another VMMigration` });

  try {
    const startedMessage = `moving ${entries.length} VM(s) (${targetsText(entries)})`;
    const waitingBefore = writer.current.waitingSince;
    writer.update((s) => {
      s.startedAt ??= new Date().toISOString();
      // A re-check during a wait keeps the waiting condition until a step changes something again.
      if (!waitingBefore) setState(s, generation(), 'running', 'InProgress', startedMessage);
    });
    await writer.flush();
    if (!resuming) {
      deps.events.emit(vmm, 'Normal', 'Started', startedMessage);
      metrics.recordMigrationStarted(strategy);
    }
    const finished = new Set<PlanEntry>();
    const records = new Map<PlanEntry, MoveRecord>();
    for (const entry of entries) {
      const record = await store.ensureMove({ migrationUid: uid, environment: entry.environment, vm: entry.vm, fromHost: entry.from, toHost: entry.to });
      records.set(entry, record);
      if (record.phase === 'Succeeded') finished.add(entry);
    }
    let done = finished.size;
    let warnedNoLb = false;
    // one budget per host for this run's relay copies, however many move at once
    const bandwidth = settings.bandwidthPerHostBytesPerSec ? new HostBandwidth(settings.bandwidthPerHostBytesPerSec) : undefined;
    // mirrors and live streams: a fixed share each (QEMU limits them itself)
    const qemuStreamBytesPerSec = settings.bandwidthPerHostBytesPerSec ? qemuStreamShare(settings.bandwidthPerHostBytesPerSec, settings.maxOutboundPerHost, settings.maxInboundPerHost) : undefined;
    const moveOne = async (entry: PlanEntry, turn?: Turn, underway?: () => void): Promise<FleetOutcome> => {
      const record = records.get(entry)!;
      const name = `${entry.environment}/${entry.vm}`;
      const now = () => new Date().toISOString();
      const vmStatus = (patch: Partial<VMStatus>) => writer.update((s) => patchVm(s, entry.environment, entry.vm, patch));
      writer.update((s) => {
        s.currentVM = [...new Set([...(s.currentVM ? s.currentVM.split(', ') : []), name])].join(', ');
        s.progress = `${done}/${entries.length}`;
        patchEnvironment(s, entry.environment, { phase: 'Running', message: undefined });
      });
      vmStatus({ phase: 'Running', attempts: record.attempts + 1, startedAt: now(), message: undefined });
      await store.updateMove(uid, entry.environment, entry.vm, { phase: 'Running', attempts: record.attempts + 1, startedAt: now() });
      const vmLog = log.child({ environment: entry.environment, vm: entry.vm });
      const stepTimers = new Map<MoveStep, () => number>();
      const inFlight = metrics.moveInFlight();
      let reportedBytes = 0;
      const reservationKey = `${uid}/${name}`;
      // this VM moves with the spec as it is now (limits, timeouts, drain and shutdown options edited since the run began)
      const vmSettings = currentSettings();
      const releases: (() => void)[] = [];
      try {
        const env = await mustEnvironment(store, entry.environment);
        const vmSpec = env.vms.find((v) => v.name === entry.vm);
        if (!vmSpec) throw new MoveError('precheck', `VM ${entry.vm} is no longer in environment ${entry.environment}`, 'untouched');
        const [sourceHost, targetHost] = await Promise.all([store.host(entry.from), store.host(entry.to)]);
        if (!sourceHost || !targetHost) throw new MoveError('precheck', `host ${!sourceHost ? entry.from : entry.to} is no longer in the inventory`, 'untouched');
        const connect = async (h: typeof sourceHost) => (await deps.pool.hypervisor(h).catch((err: Error) => {
          // Another host key is a refusal, not an outage: waiting would not fix the inventory or the host.
          if (err instanceof HostKeyMismatchError) throw new MoveError('precheck', err.message, 'untouched');
          throw new MoveError('precheck', `hypervisor ${h.name} is unreachable: ${err.message}`, 'waiting', { safe: false, reason: 'WaitingForHost', message: `hypervisor ${h.name} is unreachable: ${err.message}` });
        })).withLogger(vmLog);
        const [source, target] = await Promise.all([connect(sourceHost), connect(targetHost)]);
        if (record.phase === 'Pending' && deps.capacity) {
          // Room on the target, right before this VM moves (also for a hand-named target).
          // pre-copy and live compare the copies through a temporary raw copy of the data on each host
          const scratch = moveMode(settings) !== 'cold';
          const [bytes, room, sourceRoom] = await Promise.all([
            deps.capacity.vmBytes(sourceHost, entry.environment, entry.vm), deps.capacity.host(targetHost), scratch ? deps.capacity.host(sourceHost) : undefined,
          ]);
          const scratchBytes = scratch ? bytes : 0;
          // what moves already on their way were promised comes off what the hosts report
          const fit = vmFits({ vm: name, target: entry.to, allocatedBytes: bytes, scratchBytes, memoryBytes: vmSpec.memoryMiB * 1048576, capacity: reservations.remaining(room, reservationKey), placement: settings.placement });
          const srcFit = sourceRoom ? sourceScratchFits({ vm: name, source: entry.from, scratchBytes, capacity: reservations.remaining(sourceRoom, reservationKey), placement: settings.placement }) : { ok: true as const };
          for (const f of [fit, srcFit]) if (!f.ok) throw new MoveError('precheck', f.message, 'waiting', { safe: false, reason: 'WaitingForCapacity', message: f.message });
          releases.push(reservations.reserve(entry.to, reservationKey, { diskBytes: bytes + scratchBytes, memoryBytes: vmSpec.memoryMiB * 1048576 }));
          if (scratch) releases.push(reservations.reserve(entry.from, reservationKey, { diskBytes: scratchBytes, memoryBytes: 0 }));
        }
        const guest = await (deps.openGuest ?? ((e) => openGuestCluster(deps.kc, e)))(env);
        const safety = (deps.guestSafety ?? ((_e, g) => ({ guard: readinessGuard(g) })))(env, guest);
        const result = await (deps.move ?? moveVm)({
          migrationUid: uid, migrationName: `${vmm.metadata.namespace}/${vmm.metadata.name}`, environment: env, vm: vmSpec,
          source, target, guest, safety, store, settings: vmSettings, currentSettings, signal, log: vmLog, ...(turn ? { turn } : {}),
          engines: hypervisorEngines({ source, target, environment: env.name, vm: vmSpec, settings: vmSettings, log: vmLog, reconnect: (h) => deps.pool.connectFresh(h), sharedBandwidth: bandwidth?.forCopy(entry.from, entry.to), qemuStreamBytesPerSec }),
          observer: {
            step(step, event, info) {
              if (event === 'begin') stepTimers.set(step, metrics.startStepTimer(step));
              else stepTimers.get(step)?.();
              // a cut-over held for the window or for its turn is planned, not stuck
              if (STEP_TABLE[step].planned) inFlight.plannedWait(event === 'begin');
              else inFlight.progress();
              // QEMU's live figures describe the RAM migration only: gone with its step
              if (step === 'live' && event !== 'begin') metrics.recordLiveFigures(undefined);
              if (event === 'begin') vmLog.info({ step }, 'step started');
              else if (event === 'end') vmLog.info({ step, durationMs: info.durationMs }, 'step done');
              else vmLog.warn({ step, message: info.message }, 'step failed');
              // a step that changes something began (checks and gates change nothing)
              const changing = event === 'begin' && changesSomething(step);
              if (changing) underway?.();
              if (changing && writer.current.waitingSince) {
                // the wait is over: the move changes something again
                writer.update((s) => setState(s, generation(), 'running', 'InProgress', startedMessage));
              }
              const reason = STEP_TABLE[step].eventReason;
              if (event === 'end' && reason) deps.events.emit(vmm, 'Normal', reason, `${name}: ${step} done in ${((info.durationMs ?? 0) / 1000).toFixed(1)} s`);
              if (event === 'fail') deps.events.emit(vmm, 'Warning', 'StepFailed', `${name}: ${step} failed: ${info.message ?? ''}`);
            },
            progress: (update) => {
              vmStatus(update);
              // Bytes count in metrics as they move, not only when a VM is done.
              if (update.bytesTransferred !== undefined && update.bytesTransferred > reportedBytes) {
                metrics.recordTransferBytes(update.bytesTransferred - reportedBytes);
                reportedBytes = update.bytesTransferred;
                inFlight.progress();
              }
              if (update.bytesPerSecond !== undefined) metrics.transferRate.set(update.bytesPerSecond);
              if (update.live) metrics.recordLiveFigures(update.live);
            },
            waiting: (verdict) => {
              if (verdict) {
                const announce = writer.current.conditions?.find((c) => c.type === 'Progressing')?.reason !== verdict.reason;
                writer.update((s) => {
                  setState(s, generation(), 'waiting', verdict.reason, `${name}: ${verdict.message}`);
                  s.waitingSince ??= new Date().toISOString();
                });
                if (announce) deps.events.emit(vmm, 'Normal', verdict.reason, `${name}: ${verdict.message}`);
              } else {
                writer.update((s) => setState(s, generation(), 'running', 'InProgress', startedMessage));
              }
            },
            resumed: (info) => {
              vmStatus({ message: `resumed at ${info.from}: ${info.why}` });
              deps.events.emit(vmm, 'Normal', 'Resumed', `${name}: resuming at ${info.from}: ${info.why}`);
            },
            noLoadBalancer: () => {
              if (warnedNoLb) return;
              warnedNoLb = true;
              deps.events.emit(vmm, 'Warning', 'NoLoadBalancerControl', `environment ${entry.environment} describes no load balancer: controller VMs move without taking their API server out of it first`);
            },
          },
        });
        done++;
        const { outage } = result;
        metrics.recordVmMove('success', outage);
        if (result.bytes > reportedBytes) metrics.recordTransferBytes(result.bytes - reportedBytes);
        metrics.transferRate.set(0);
        await store.updateMove(uid, entry.environment, entry.vm, {
          phase: 'Succeeded', finishedAt: now(), bytes: result.bytes,
          ...(outage ? { outageMs: Math.round(outage.seconds * 1000), stopToStartMs: Math.round(outage.stopToStartSeconds * 1000) } : {}),
        });
        const outageText = outage ? describeOutage(outage) : 'no outage figure: the VM was not running when its move began';
        vmStatus({ phase: 'Succeeded', finishedAt: now(), bytesTransferred: result.bytes, step: undefined, message: outageText, ...(outage ? outageStatus(outage) : {}) });
        deps.events.emit(vmm, 'Normal', 'VMMoved', `${name}: on ${entry.to}; ${outageText}`);
        writer.update((s) => {
          s.progress = `${done}/${entries.length}`;
          s.currentVM = (s.currentVM ?? '').split(', ').filter((x) => x && x !== name).join(', ');
          s.vms = boundVmList(s.vms ?? []);
          const summary = s.environments?.find((x) => x.name === entry.environment);
          if (summary) patchEnvironment(s, entry.environment, { vmsDone: summary.vmsDone + 1, phase: summary.vmsDone + 1 === summary.vmsTotal ? 'Succeeded' : 'Running' });
        });
        await writer.flush();
        return { kind: 'moved' };
      } catch (err) {
        // Errors before moveVm (reading the Secret, a vanished inventory entry) happen before any side effect.
        const moveErr = err instanceof MoveError ? err : new MoveError('precheck', (err as Error).message, 'untouched');
        const verdict = afterMove(moveErr.outcome);
        if (verdict === 'handover') {
          // Leave the move 'Running' in the store: the next leader resumes it from the journal.
          await writer.flush().catch(() => undefined);
          throw new Aborted(moveErr.message);
        }
        if (moveErr.step === 'turn' && (moveErr.outcome === 'rolled-back' || moveErr.outcome === 'untouched') && moveErr.cause instanceof TurnWithdrawn) {
          // mirrored ahead, never cut over: the mirror (if one started) is dropped, the VM left as it was; not a failed move
          const message = `not moved: ${moveErr.cause.message}; ${moveErr.outcome === 'rolled-back' ? 'its mirror ahead was dropped, the VM never stopped' : 'nothing was changed'}`;
          vmStatus({ phase: 'Pending', attempts: record.attempts, message });
          await store.updateMove(uid, entry.environment, entry.vm, { phase: 'Pending', attempts: record.attempts, message });
          writer.update((s) => { s.currentVM = (s.currentVM ?? '').split(', ').filter((x) => x && x !== name).join(', '); });
          return { kind: 'withdrawn' };
        }
        if (verdict === 'wait') {
          // a wait touched nothing: it does not count as an attempt
          vmStatus({ phase: 'Pending', attempts: record.attempts, message: moveErr.message });
          await store.updateMove(uid, entry.environment, entry.vm, { phase: 'Pending', attempts: record.attempts, message: moveErr.message });
          writer.update((s) => patchEnvironment(s, entry.environment, { phase: 'Waiting', message: moveErr.message }));
          return { kind: 'wait', verdict: moveErr.verdict ?? { reason: 'Waiting', message: moveErr.message } };
        }
        const where = {
          untouched: 'nothing was changed', 'rolled-back': `rolled back: VM runs on ${entry.from} again`, stuck: 'rollback FAILED, manual attention needed',
          'stuck-on-target': `Degraded: stays on ${entry.to}; source image kept on ${entry.from}, release it with \`vm-migration-operator release-source\` once checked`, waiting: '', interrupted: '',
        }[moveErr.outcome];
        const message = `${name} failed at step ${moveErr.step}: ${moveErr.message} (${where})`;
        const phase = moveErr.outcome === 'rolled-back' ? 'RolledBack' : moveErr.outcome === 'stuck-on-target' ? 'Degraded' : 'Failed';
        metrics.recordVmMove(moveErr.outcome === 'rolled-back' ? 'rolled_back' : moveErr.outcome === 'stuck' || moveErr.outcome === 'stuck-on-target' ? 'stuck' : 'failure');
        await store.updateMove(uid, entry.environment, entry.vm, { phase, finishedAt: now(), message });
        vmStatus({ phase, finishedAt: now(), message });
        writer.update((s) => patchEnvironment(s, entry.environment, { phase: 'Failed', message }));
        if (signal.aborted) throw new Aborted(message);
        return { kind: 'failed', message };
      } finally {
        inFlight.ended();
        for (const release of releases) release();
      }
    };

    if (signal.aborted) {
      // Cancelled (deleted) while no run was active: only a move already in flight goes on, to roll back; no new VM starts.
      for (const entry of entries) if (records.get(entry)!.phase === 'Running') await moveOne(entry);
      throw new Aborted('cancelled: no further VM is started');
    }
    const stop = await runFleet({
      entries, finished, settings, signal, moveOne,
      beforeRound: () => waitWhilePaused(deps, writer, generation, signal),
      cancelled: () => new Set(deps.latest()?.spec.cancel ?? settings.cancel),
      onWaiting: (waiting) => writer.update((s) => {
        for (const w of waiting) if (s.environments?.find((e) => e.name === w.environment)?.phase !== 'Failed') patchEnvironment(s, w.environment, { message: w.reason });
      }),
    });
    const leftVms = new Map<string, string[]>();
    for (const key of stop.cancelled) {
      const [env, vm] = key.split('/') as [string, string | undefined];
      if (vm) leftVms.set(env, [...(leftVms.get(env) ?? []), vm]);
      writer.update((s) => (vm ? patchVm(s, env, vm, { phase: 'Cancelled', message: 'spec.cancel: left where it is' }) : patchEnvironment(s, env, { phase: 'Cancelled', message: 'spec.cancel: left where it is' })));
    }
    // an environment with VMs cancelled one by one is not moved whole: it says so instead of Succeeded
    for (const [env, vms] of leftVms) writer.update((s) => patchEnvironment(s, env, { phase: 'Cancelled', message: `spec.cancel: ${vms.join(', ')} left where ${vms.length === 1 ? 'it is' : 'they are'}; the environment's other VMs moved or stay as their status says` }));
    if (stop.kind === 'aborted') {
      await writer.flush().catch(() => undefined);
      throw stop.error;
    }
    if (stop.kind === 'failed') return await finishFailed('MoveFailed', stop.message);
    if (stop.kind === 'wait') return await waitOrFail(stop.verdict);
    if (stop.kind === 'window') {
      writer.update((s) => setState(s, generation(), 'waiting', 'WaitingForWindow', stop.message));
      await writer.flush();
      return { kind: 'retry', afterMs: stop.retryAfterMs };
    }
    writer.update((s) => { s.progress = `${done}/${entries.length}`; });
    const cancelledEnvs = stop.cancelled.filter((k) => !k.includes('/'));
    const cancelledVms = stop.cancelled.filter((k) => k.includes('/'));
    const skipped = `${cancelledEnvs.length > 0 ? `; ${cancelledEnvs.length} environment(s) cancelled: ${cancelledEnvs.join(', ')}` : ''}${cancelledVms.length > 0 ? `; ${cancelledVms.length} VM(s) cancelled: ${cancelledVms.join(', ')}` : ''}`;
    const message = `${done} VM(s) moved (${targetsText(entries)})${skipped}`;
    await state('succeeded', 'Succeeded', message);
    deps.events.emit(vmm, 'Normal', 'Succeeded', message);
    metrics.recordMigrationFinished(strategy, true);
  } finally {
    deps.releaseEnvironments(uid);
  }
}

/** The informer's copy of this VMMigration (not a namesake created after a delete). */
function latestOf(deps: RunnerDeps, vmm: VMMigration): VMMigration | undefined {
  const l = deps.latest();
  return l && l.metadata.uid === vmm.metadata.uid ? l : undefined;
}

async function waitWhilePaused(deps: RunnerDeps, writer: StatusSink, generation: () => number, signal: AbortSignal): Promise<void> {
  let announced = false;
  while (deps.latest()?.spec.paused) {
    if (!announced) {
      writer.update((s) => setState(s, generation(), 'paused', 'Paused', 'spec.paused is true; the next VM starts when it is false'));
      await writer.flush();
      announced = true;
    } else if ((writer.current.observedGeneration ?? 0) < generation()) {
      // another edit while paused (a limit, a window): seen, the status says so
      writer.update(() => undefined);
      await writer.flush();
    }
    await sleep(1000, signal);
  }
  if (announced) writer.update((s) => setState(s, generation(), 'running', 'InProgress', 'resumed'));
}

async function mustEnvironment(store: Store, name: string): Promise<EnvironmentSpec> {
  const env = await store.environment(name);
  if (!env) throw new MoveError('precheck', `environment ${name} is no longer in the inventory`, 'untouched');
  return env;
}

/** The guest cluster is reached only through the kubeconfig in the environment's Secret. */
async function openGuestCluster(kc: KubeConfig, env: EnvironmentSpec): Promise<GuestCluster> {
  const core = kc.makeApiClient(CoreV1Api);
  const { namespace, name, key } = env.kubeconfigSecret;
  const secret = await pRetry(() => core.readNamespacedSecret({ name, namespace }), {
    retries: 3, minTimeout: 500, shouldRetry: ({ error }) => (error as { code?: number }).code !== 404,
  }).catch((err: { code?: number; message: string }) => {
    throw new MoveError('precheck', err.code === 404 ? `kubeconfig Secret ${namespace}/${name} of environment ${env.name} not found` : `cannot read Secret ${namespace}/${name}: ${err.message}`, 'untouched');
  });
  const data = secret.data?.[key];
  if (!data) throw new MoveError('precheck', `Secret ${namespace}/${name} has no key "${key}" (kubeconfig of environment ${env.name})`, 'untouched');
  try {
    return new GuestCluster(loadGuestKubeconfig(Buffer.from(data, 'base64').toString('utf8'), env.kubeconfigSecret));
  } catch (err) {
    throw new MoveError('precheck', (err as Error).message, 'untouched');
  }
}

