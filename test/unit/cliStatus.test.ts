import { describe, expect, it } from 'vitest';
import type { VMMigration } from '../../src/api/types.js';
import { renderStatus } from '../../src/cli/status.js';
import { planTable } from '../../src/cli/planTable.js';

const NOW = new Date('2026-11-27T06:10:00Z');
const vmm: VMMigration = {
  apiVersion: 'vmops.dev/v1alpha1', kind: 'VMMigration',
  metadata: { name: 'move-student-42', namespace: 'vm-migration-system', uid: 'u', generation: 1 },
  spec: { environments: ['student-42'], targetHost: 'host02' },
  status: {
    phase: 'Running', observedGeneration: 1, progress: '2/4', currentVM: 'student-42/node-2', startedAt: '2026-11-27T06:00:00Z',
    message: 'moving 4 VM(s) to host02',
    conditions: [{ type: 'Ready', status: 'False', reason: 'InProgress', message: 'moving 4 VM(s) to host02', lastTransitionTime: 't' }],
    plan: ['beachhead', 'node-1', 'node-2', 'controller-1'].map((vm, i) => ({ order: i + 1, environment: 'student-42', vm, role: 'worker', node: vm, from: 'host01', to: 'host02' })),
    vms: [
      { environment: 'student-42', name: 'beachhead', phase: 'Succeeded', attempts: 1, outageSeconds: 1.234, outage: { until: 'GuestResumed', startedAt: '2026-11-27T06:01:00.000Z', endedAt: '2026-11-27T06:01:01.234Z', stopToStartSeconds: 1.234 }, bytesTransferred: 64 << 20, startedAt: '2026-11-27T06:00:00Z', finishedAt: '2026-11-27T06:02:00Z' },
      { environment: 'student-42', name: 'node-1', phase: 'Succeeded', attempts: 1, outageSeconds: 14.25, outage: { until: 'NodeReady', startedAt: '2026-11-27T06:05:00.000Z', endedAt: '2026-11-27T06:05:14.250Z', shutdownSeconds: 2, copySeconds: 1, bootSeconds: 11.25, stopToStartSeconds: 3.5 }, bytesTransferred: 64 << 20, startedAt: '2026-11-27T06:02:00Z', finishedAt: '2026-11-27T06:06:00Z' },
      { environment: 'student-42', name: 'node-2', phase: 'Running', step: 'transfer', attempts: 1, bytesTransferred: 16 << 20, bytesTotal: 64 << 20, bytesPerSecond: 8 << 20, etaSeconds: 6, startedAt: '2026-11-27T06:08:00Z' },
      { environment: 'student-42', name: 'controller-1', phase: 'Pending', attempts: 0 },
    ],
  },
};

describe('status NAME (rendered from the resource status only)', () => {
  it('shows the headline, conditions, an environment bar and one row per VM with bar, rate, ETA and the student\'s outage beside the operator\'s stop→start', () => {
    const text = renderStatus(vmm, NOW);
    const lines = text.split('\n');
    expect(lines[0]).toBe('VMMigration vm-migration-system/move-student-42   Running   2/4 VMs   target host02   elapsed 10m00s   ETA 3m06s');
    expect(text).toContain('Ready        False  InProgress: moving 4 VM(s) to host02');
    // (1 + 1 + 0.25 + 0) / 4 of the environment's data-weighted progress
    expect(text).toContain('ENVIRONMENT student-42   ███████████░░░░░░░░░  56%   2/4 VMs   host01 → host02');
    const row = (vm: string) => lines.find((l) => l.trimStart().startsWith(`${vm} `))!;
    expect(lines.find((l) => l.includes('PHASE'))).toMatch(/OUTAGE \(STUDENT'S\)$/);
    expect(row('beachhead')).toMatch(/Succeeded\s+█{20} 100%\s+64\.0 MiB\s+1\.23 s \(live pause\)$/);
    expect(row('node-1')).toMatch(/Succeeded\s+█{20} 100%\s+64\.0 MiB\s+14\.3 s \(to node Ready, stop→start 3\.5 s\)$/);
    expect(row('node-2')).toMatch(/Running\s+transfer\s+█████░{15} {2}25%\s+16\.0 MiB of 64\.0 MiB\s+8\.0 MiB\/s\s+6s$/);
    expect(row('controller-1')).toMatch(/Pending\s+░{20} {3}0%$/);
  });

  it('says when the status is for an older generation, and prints a failed VM\'s message', () => {
    const failed = structuredClone(vmm);
    failed.metadata.generation = 2;
    failed.status!.phase = 'Failed';
    failed.status!.vms![2] = { ...failed.status!.vms![2]!, phase: 'RolledBack', message: 'student-42/node-2 failed at step transfer: no space (rolled back: VM runs on host01 again)' };
    const text = renderStatus(failed, NOW);
    expect(text).toContain('(status is for generation 1; the spec is at 2)');
    expect(text).toContain('      student-42/node-2 failed at step transfer: no space (rolled back: VM runs on host01 again)');
    expect(text.split('\n')[0]).not.toContain('ETA');
  });

  it('a resource the operator has not picked up yet', () => {
    const fresh = { ...vmm, status: undefined };
    expect(renderStatus(fresh, NOW).split('\n')[0]).toContain('Pending (not picked up yet)   0/? VMs');
  });
});

describe('plan table', () => {
  it('estimates copy time from the last move\'s bytes at the measured throughput, and says "?" without history', () => {
    const lines = planTable(vmm.status!.plan!, {
      lastMove: new Map([['student-42/beachhead', { bytes: 600 << 20, outageSeconds: 8.8 }]]), throughput: 10 << 20, samples: 3,
    });
    expect(lines[0]).toMatch(/^ORDER\s+ENVIRONMENT\s+VM\s+ROLE\s+FROM\s+TO\s+DATA\s+EST\. COPY\s+EST\. OUTAGE$/);
    expect(lines[1]).toMatch(/^1\s+student-42\s+beachhead\s+worker\s+host01\s+host02\s+600\.0 MiB\s+1m00s\s+8\.8 s \(last move\)$/);
    expect(lines[2]).toMatch(/node-1\s+worker\s+host01\s+host02\s+\?\s+\?\s+\?$/);
    expect(lines.at(-1)).toContain('10.0 MiB/s (measured over the last 3 move(s)); 1/4 VM(s) have history');
    expect(planTable(vmm.status!.plan!, { lastMove: new Map(), throughput: undefined, samples: 0 }).at(-1)).toContain('no completed move in the store yet');
  });
});
