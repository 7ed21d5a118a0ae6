/**
 * Executes one VMMigration outside the reconcile call: plan, then each VM
 * move in order, reporting to status, events and metrics as it goes.
 */
import { CoreV1Api, type KubeConfig } from '@kubernetes/client-node';
import pRetry from 'p-retry';
import type { EnvironmentSpec } from '../api/inventory.js';
import { settingsFrom, strategyName, type PlanEntry, type VMMigration, type VMMigrationStatus, type VMStatus } from '../api/types.js';
import { GuestCluster } from '../guest/guestCluster.js';
import type { HostPool } from '../hosts/pool.js';
import * as metrics from '../metrics/metrics.js';
import { moveVm, MoveError, type MoveStep } from '../migrate/vmMove.js';
import { planMigration } from '../planner/plan.js';
import type { Store } from '../store/store.js';
import type { Logger } from '../util/log.js';
import { setCondition } from './conditions.js';
import { EventRecorder, StatusWriter } from './statusWriter.js';

export interface RunnerDeps {
  kc: KubeConfig;
  store: Store;
  pool: HostPool;
  events: EventRecorder;
  log: Logger;
  /** the newest copy of the object from the informer cache (spec.paused may change while we run) */
  latest: () => VMMigration | undefined;
  /** environments claimed by running migrations in this process; two migrations never move one environment at once */
  claimEnvironments: (uid: string, envs: string[]) => string[];
  releaseEnvironments: (uid: string) => void;
  statusIntervalMs?: number;
}

const STEP_EVENT_REASON: Partial<Record<MoveStep, string>> = {
  cordon: 'Cordoned', drain: 'Drained', stop: 'VMStopped', transfer: 'DisksCopied', start: 'VMStarted',
  nodeReady: 'NodeReady', uncordon: 'Uncordoned', cleanup: 'SourceCleaned', rollback: 'RolledBack',
};

export async function runMigration(vmm: VMMigration, deps: RunnerDeps, signal: AbortSignal): Promise<void> {
  const { store, log } = deps;
  const generation = vmm.metadata.generation ?? 1;
  const settings = settingsFrom(vmm.spec);
  const writer = new StatusWriter(deps.kc, vmm, vmm.status ?? {}, log, deps.statusIntervalMs);
  const now = () => new Date().toISOString();
  const strategy = strategyName(settings);
  try {
    let plan: PlanEntry[] | undefined = vmm.status?.plan;
    const resuming = plan !== undefined && vmm.status?.phase === 'Running';
    if (!resuming) {
      const hosts = await store.hosts();
      const envs = await store.environments();
      const result = planMigration(hosts, envs, settings);
      if (result.problems.length > 0) {
        const message = result.problems.join('; ');
        writer.update((s) => fail(s, generation, 'InvalidReference', message, now()));
        await writer.flush();
        deps.events.emit(vmm, 'Warning', 'InvalidReference', message);
        metrics.recordMigrationFinished(strategy, false);
        return;
      }
      plan = result.entries;
      writer.update((s) => {
        s.observedGeneration = generation;
        s.plan = plan;
        s.vms = plan!.map((e): VMStatus => ({ environment: e.environment, name: e.vm, phase: 'Pending', attempts: 0 }));
        s.progress = `0/${plan!.length}`;
      });
      if (settings.dryRun) {
        writer.update((s) => {
          s.phase = 'Succeeded';
          s.message = `dry run: ${plan!.length} VM(s) would move to ${settings.targetHost}`;
          s.finishedAt = now();
          s.conditions = setCondition(s.conditions, { type: 'Ready', status: 'True', reason: 'DryRun', message: s.message, observedGeneration: generation });
          s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'False', reason: 'DryRun', message: 'nothing was moved', observedGeneration: generation });
          s.conditions = setCondition(s.conditions, { type: 'Degraded', status: 'False', reason: 'DryRun', message: 'nothing was moved', observedGeneration: generation });
        });
        await writer.flush();
        return;
      }
    }
    const entries = plan!;
    const envNames = [...new Set(entries.map((e) => e.environment))];
    const busy = deps.claimEnvironments(vmm.metadata.uid, envNames);
    if (busy.length > 0) {
      writer.update((s) => {
        s.phase = 'Pending';
        s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'False', reason: 'WaitingForEnvironment', message: `environment(s) ${busy.join(', ')} are being moved by another VMMigration`, observedGeneration: generation });
      });
      await writer.flush();
      throw new RetryLater(10_000);
    }

    writer.update((s) => {
      s.phase = 'Running';
      s.startedAt ??= now();
      s.message = `moving ${entries.length} VM(s) to ${settings.targetHost}`;
      s.conditions = setCondition(s.conditions, { type: 'Ready', status: 'False', reason: 'InProgress', message: s.message, observedGeneration: generation });
      s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'True', reason: 'Migrating', message: s.message, observedGeneration: generation });
      s.conditions = setCondition(s.conditions, { type: 'Degraded', status: 'False', reason: 'AsExpected', message: 'no failures', observedGeneration: generation });
    });
    await writer.flush();
    if (!resuming) {
      deps.events.emit(vmm, 'Normal', 'Started', `moving ${entries.length} VM(s) to ${settings.targetHost}`);
      metrics.recordMigrationStarted(strategy);
    }
    metrics.migrationsActive.inc();
    try {
      let done = 0;
      for (const entry of entries) {
        const moveKey = { migrationUid: vmm.metadata.uid, environment: entry.environment, vm: entry.vm, fromHost: entry.from, toHost: entry.to };
        const record = await store.ensureMove(moveKey);
        if (record.phase === 'Succeeded') {
          done++;
          continue;
        }
        await waitWhilePaused(deps, writer, generation, signal);
        const vmStatus = (patch: Partial<VMStatus>) => writer.update((s) => {
          const v = s.vms?.find((x) => x.environment === entry.environment && x.name === entry.vm);
          if (v) Object.assign(v, patch);
        });
        writer.update((s) => {
          s.currentVM = `${entry.environment}/${entry.vm}`;
          s.progress = `${done}/${entries.length}`;
        });
        vmStatus({ phase: 'Running', attempts: record.attempts + 1, startedAt: now(), message: undefined });
        await store.updateMove(vmm.metadata.uid, entry.environment, entry.vm, { phase: 'Running', attempts: record.attempts + 1, startedAt: now() });
        const vmLog = log.child({ environment: entry.environment, vm: entry.vm });
        const stepTimers = new Map<MoveStep, () => number>();
        let reportedBytes = 0;
        try {
          const env = await mustEnvironment(store, entry.environment);
          const vmSpec = env.vms.find((v) => v.name === entry.vm);
          if (!vmSpec) throw new MoveError('precheck', `VM ${entry.vm} is no longer in environment ${entry.environment}`, 'untouched');
          const [sourceHost, targetHost] = await Promise.all([store.host(entry.from), store.host(entry.to)]);
          if (!sourceHost || !targetHost) throw new MoveError('precheck', `host ${!sourceHost ? entry.from : entry.to} is no longer in the inventory`, 'untouched');
          const [source, target] = await Promise.all([deps.pool.hypervisor(sourceHost), deps.pool.hypervisor(targetHost)]);
          const guest = GuestCluster.fromKubeconfigYaml(await guestKubeconfig(deps.kc, env));
          const result = await moveVm({
            migrationUid: vmm.metadata.uid, environment: env, vm: vmSpec, source, target, guest, store, settings, signal, log: vmLog,
            reconnect: (h) => deps.pool.connectFresh(h),
            observer: {
              step(step, event, info) {
                if (event === 'begin') stepTimers.set(step, metrics.startStepTimer(step));
                else stepTimers.get(step)?.();
                if (event === 'begin') vmLog.info({ step }, 'step started');
                else if (event === 'end') vmLog.info({ step, durationMs: info.durationMs }, 'step done');
                else vmLog.warn({ step, message: info.message }, 'step failed');
                const reason = STEP_EVENT_REASON[step];
                if (event === 'end' && reason) deps.events.emit(vmm, 'Normal', reason, `${entry.environment}/${entry.vm}: ${step} done in ${((info.durationMs ?? 0) / 1000).toFixed(1)} s`);
                if (event === 'fail') deps.events.emit(vmm, 'Warning', 'StepFailed', `${entry.environment}/${entry.vm}: ${step} failed: ${info.message ?? ''}`);
              },
              progress: (update) => {
                vmStatus(update);
                // Bytes count in metrics as they move, not only when a VM is done.
                if (update.bytesTransferred !== undefined && update.bytesTransferred > reportedBytes) {
                  metrics.recordTransferBytes(update.bytesTransferred - reportedBytes);
                  reportedBytes = update.bytesTransferred;
                }
                if (update.bytesPerSecond !== undefined) metrics.transferRate.set(update.bytesPerSecond);
              },
            },
          });
          done++;
          metrics.recordVmMove('success', result.downtimeMs / 1000);
          if (result.bytes > reportedBytes) metrics.recordTransferBytes(result.bytes - reportedBytes);
          metrics.transferRate.set(0);
          await store.updateMove(vmm.metadata.uid, entry.environment, entry.vm, { phase: 'Succeeded', finishedAt: now(), downtimeMs: result.downtimeMs, bytes: result.bytes });
          vmStatus({ phase: 'Succeeded', finishedAt: now(), downtimeSeconds: result.downtimeMs / 1000, bytesTransferred: result.bytes, step: undefined, message: `downtime ${(result.downtimeMs / 1000).toFixed(1)} s, node Ready ${(result.nodeReadyMs / 1000).toFixed(1)} s after start` });
          writer.update((s) => { s.progress = `${done}/${entries.length}`; });
          await writer.flush();
        } catch (err) {
          // Errors before moveVm (connecting, reading the Secret) happen before any side effect.
          const moveErr = err instanceof MoveError ? err : new MoveError('precheck', (err as Error).message, 'untouched');
          if (moveErr.outcome === 'interrupted') {
            // Leave the move 'Running' in the store: the next leader resumes it from the journal.
            await writer.flush().catch(() => undefined);
            throw new Aborted(moveErr.message);
          }
          const where = { untouched: 'nothing was changed', 'rolled-back': `rolled back: VM runs on ${entry.from} again`, stuck: 'rollback FAILED, manual attention needed', interrupted: 'interrupted' }[moveErr.outcome];
          const message = `${entry.environment}/${entry.vm} failed at step ${moveErr.step}: ${moveErr.message} (${where})`;
          const phase = moveErr.outcome === 'rolled-back' ? 'RolledBack' : 'Failed';
          metrics.recordVmMove(moveErr.outcome === 'rolled-back' ? 'rolled_back' : 'failure');
          await store.updateMove(vmm.metadata.uid, entry.environment, entry.vm, { phase, finishedAt: now(), message });
          vmStatus({ phase, finishedAt: now(), message });
          if (signal.aborted) throw new Aborted(message);
          writer.update((s) => fail(s, generation, 'MoveFailed', message, now()));
          await writer.flush();
          deps.events.emit(vmm, 'Warning', 'MigrationFailed', message);
          metrics.recordMigrationFinished(strategy, false);
          return;
        }
      }
      writer.update((s) => {
        s.phase = 'Succeeded';
        s.currentVM = '';
        s.progress = `${done}/${entries.length}`;
        s.finishedAt = now();
        s.message = `${entries.length} VM(s) now run on ${settings.targetHost}`;
        s.conditions = setCondition(s.conditions, { type: 'Ready', status: 'True', reason: 'Succeeded', message: s.message, observedGeneration: generation });
        s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'False', reason: 'Completed', message: s.message, observedGeneration: generation });
      });
      await writer.flush();
      deps.events.emit(vmm, 'Normal', 'Succeeded', `${entries.length} VM(s) now run on ${settings.targetHost}`);
      metrics.recordMigrationFinished(strategy, true);
    } finally {
      metrics.migrationsActive.dec();
      deps.releaseEnvironments(vmm.metadata.uid);
    }
  } finally {
    writer.close();
  }
}

export class RetryLater extends Error {
  constructor(readonly afterMs: number) {
    super(`retry in ${afterMs} ms`);
  }
}

export class Aborted extends Error {}

function fail(s: VMMigrationStatus, generation: number, reason: string, message: string, at: string): void {
  s.phase = 'Failed';
  s.observedGeneration = generation;
  s.message = message;
  s.finishedAt = at;
  s.currentVM = '';
  s.conditions = setCondition(s.conditions, { type: 'Ready', status: 'False', reason, message, observedGeneration: generation });
  s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'False', reason, message, observedGeneration: generation });
  s.conditions = setCondition(s.conditions, { type: 'Degraded', status: 'True', reason, message, observedGeneration: generation });
}

async function waitWhilePaused(deps: RunnerDeps, writer: StatusWriter, generation: number, signal: AbortSignal): Promise<void> {
  let announced = false;
  while (deps.latest()?.spec.paused) {
    if (!announced) {
      writer.update((s) => {
        s.phase = 'Paused';
        s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'False', reason: 'Paused', message: 'spec.paused is true; the next VM starts when it is false', observedGeneration: generation });
      });
      await writer.flush();
      announced = true;
    }
    signal.throwIfAborted();
    await new Promise((r) => setTimeout(r, 1000));
  }
  if (announced) {
    writer.update((s) => {
      s.phase = 'Running';
      s.conditions = setCondition(s.conditions, { type: 'Progressing', status: 'True', reason: 'Migrating', message: 'resumed', observedGeneration: generation });
    });
  }
}

async function mustEnvironment(store: Store, name: string): Promise<EnvironmentSpec> {
  const env = await store.environment(name);
  if (!env) throw new MoveError('precheck', `environment ${name} is no longer in the inventory`, 'untouched');
  return env;
}

/** The guest cluster is reached only through the kubeconfig in the environment's Secret. */
async function guestKubeconfig(kc: KubeConfig, env: EnvironmentSpec): Promise<string> {
  const core = kc.makeApiClient(CoreV1Api);
  const { namespace, name, key } = env.kubeconfigSecret;
  const secret = await pRetry(() => core.readNamespacedSecret({ name, namespace }), {
    retries: 3, minTimeout: 500, shouldRetry: ({ error }) => (error as { code?: number }).code !== 404,
  }).catch((err: { code?: number; message: string }) => {
    throw new MoveError('precheck', err.code === 404 ? `kubeconfig Secret ${namespace}/${name} of environment ${env.name} not found` : `cannot read Secret ${namespace}/${name}: ${err.message}`, 'untouched');
  });
  const data = secret.data?.[key];
  if (!data) throw new MoveError('precheck', `Secret ${namespace}/${name} has no key "${key}" (kubeconfig of environment ${env.name})`, 'untouched');
  return Buffer.from(data, 'base64').toString('utf8');
}
