/**
 * test/tools/kstatus (test/world/kstatusCheck.ts) on hand-written objects: sigs.k8s.io/cli-utils
 * kstatus `status.Compute` and Flux's `spec.healthCheckExprs` evaluation (fluxcd/pkg/runtime/cel),
 * so later tests can trust its verdicts on VMMigration objects. The first run builds the Go tool
 * (scripts/build-kstatus-check.sh caches it), which takes minutes on this machine.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { judge, kstatusCheckBinary } from '../world/kstatusCheck.js';

const widget = (status?: object, generation = 1) => ({
  apiVersion: 'example.com/v1',
  kind: 'Widget',
  metadata: { name: 'w', namespace: 'default', generation },
  spec: { size: 1 },
  ...(status === undefined ? {} : { status }),
});

const WIDGET_EXPRS = [
  {
    apiVersion: 'example.com/v1',
    kind: 'Widget',
    current: "status.phase == 'Done'",
    failed: "status.phase == 'Broken'",
    inProgress: "status.phase == 'Working'",
  },
];

describe('kstatus-check: real kstatus and Flux healthCheckExprs verdicts', () => {
  beforeAll(async () => {
    await kstatusCheckBinary();
  }, 30 * 60_000);

  it('kstatus: a CR without status and without observedGeneration is Current (as is Flux without healthCheckExprs)', async () => {
    // kstatus has no rule for an unknown kind: with no status.observedGeneration to compare and no
    // Ready/Reconciling/Stalled condition it has nothing to wait for, so the object is Current at once.
    const deploymentLike = {
      apiVersion: 'example.com/v1',
      kind: 'Gizmo',
      metadata: { name: 'g', namespace: 'default', generation: 1 },
      spec: { replicas: 3, selector: { matchLabels: { app: 'g' } }, template: { metadata: { labels: { app: 'g' } } } },
    };
    const [r] = await judge([deploymentLike], []);
    expect(r!.kstatus).toEqual({ status: 'Current', message: 'Resource is current' });
    expect(r!.flux).toEqual({ status: 'Current', message: 'Resource is current' });
  });

  it('kstatus: metadata.generation 2, status.observedGeneration 1 → InProgress', async () => {
    const [r] = await judge([{ ...widget({ observedGeneration: 1 }, 2), kind: 'Gizmo' }], []);
    expect(r!.kstatus.status).toBe('InProgress');
    expect(r!.kstatus.message).toBe('Gizmo generation is 2, but latest observed generation is 1');
  });

  it('kstatus: Ready=True with observedGeneration == generation → Current', async () => {
    const [r] = await judge([{ ...widget({ observedGeneration: 2, conditions: [{ type: 'Ready', status: 'True' }] }, 2), kind: 'Gizmo' }], []);
    expect(r!.kstatus).toEqual({ status: 'Current', message: 'Resource is Ready' });
  });

  it('kstatus: Stalled=True → Failed, with the condition message', async () => {
    const stalled = { type: 'Stalled', status: 'True', reason: 'NoHost', message: 'no host can take the VMs' };
    const [r] = await judge([{ ...widget({ observedGeneration: 1, conditions: [stalled] }), kind: 'Gizmo' }], []);
    expect(r!.kstatus).toEqual({ status: 'Failed', message: 'no host can take the VMs' });
  });

  it('Flux healthCheckExprs: Done → Current, Broken → Failed, Working → InProgress, anything else → InProgress', async () => {
    const out = await judge(
      [widget({ phase: 'Done' }), widget({ phase: 'Broken' }), widget({ phase: 'Working' }), widget({ phase: 'Queued' })],
      WIDGET_EXPRS,
    );
    expect(out.map((r) => r.flux.status)).toEqual(['Current', 'Failed', 'InProgress', 'InProgress']);
    // kstatus knows nothing of status.phase: all four are Current to it
    expect(out.map((r) => r.kstatus.status)).toEqual(['Current', 'Current', 'Current', 'Current']);
  });

  it('Flux healthCheckExprs: a mismatched observedGeneration is InProgress before any expression runs', async () => {
    const [r] = await judge([widget({ observedGeneration: 1, phase: 'Done' }, 2)], WIDGET_EXPRS);
    expect(r!.flux.status).toBe('InProgress');
  });

  it('Flux healthCheckExprs: an object with no status is an evaluation error (Flux: Unknown, waits until its timeout)', async () => {
    // The expressions are parsed, not type-checked (not all CRDs have the five standard top-level
    // fields), so `status.phase` on an object without status fails at evaluation; the first
    // expression evaluated is inProgress, and its error ends the evaluation.
    const [noStatus, emptyStatus] = await judge([widget(), widget({})], WIDGET_EXPRS);
    expect(noStatus!.flux).toEqual({
      status: 'Error',
      message: "failed to evaluate the CEL expression 'status.phase == 'Working'': no such attribute(s): status.phase",
    });
    expect(emptyStatus!.flux).toEqual({
      status: 'Error',
      message: "failed to evaluate the CEL expression 'status.phase == 'Working'': no such key: phase",
    });
    // kstatus, for the same objects: Current
    expect(noStatus!.kstatus.status).toBe('Current');
  });

  it('Flux healthCheckExprs: inProgress is evaluated before failed, failed before current', async () => {
    const exprs = [{ apiVersion: 'example.com/v1', kind: 'Widget', current: 'true', failed: 'true', inProgress: 'true' }];
    const noInProgress = [{ apiVersion: 'example.com/v1', kind: 'Widget', current: 'true', failed: 'true' }];
    const [a] = await judge([widget()], exprs);
    const [b] = await judge([widget()], noInProgress);
    expect(a!.flux.status).toBe('InProgress');
    expect(b!.flux.status).toBe('Failed');
  });

  it('Flux refuses healthCheckExprs without current', async () => {
    const [r] = await judge([widget({ phase: 'Done' })], [{ apiVersion: 'example.com/v1', kind: 'Widget', failed: 'true' }]);
    expect(r!.flux.status).toBe('Error');
    expect(r!.flux.message).toMatch(/expression Current not specified/);
  });
});
