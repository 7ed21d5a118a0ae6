/**
 * `npm run demo`: bring up the sandbox, run the operator, apply
 * manifests/examples/migration.yaml with kubectl and show the move live.
 *   --keep   leave the sandbox running afterwards (Ctrl-C to tear it down)
 */
import { CustomObjectsApi } from '@kubernetes/client-node';
import { join } from 'node:path';
import { vmDirectory } from '../../src/api/inventory.js';
import { GROUP, PLURAL, VERSION, type VMMigration, type VMStatus } from '../../src/api/types.js';
import { REPO_ROOT, SECRET_NAMESPACE, startSandbox } from './sandbox.js';

const keep = process.argv.includes('--keep');
const tty = process.stdout.isTTY;
const t0 = Date.now();
const elapsed = () => `${((Date.now() - t0) / 1000).toFixed(0).padStart(4)}s`;
const say = (line: string) => console.log(`${elapsed()}  ${line}`);

function mib(n = 0): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function bar(done = 0, total = 0, width = 20): string {
  const f = total > 0 ? Math.min(1, done / total) : 0;
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${(f * 100).toFixed(0).padStart(3)}%`;
}

function render(o: VMMigration): string[] {
  const s = o.status ?? {};
  const lines = [`VMMigration ${o.metadata.name}: ${s.phase ?? 'Pending'}  ${s.progress ?? ''}  ${s.currentVM ? `now: ${s.currentVM}` : ''}`];
  for (const v of s.vms ?? []) lines.push(vmLine(v));
  return lines;
}

function vmLine(v: VMStatus): string {
  const step = v.phase === 'Running' ? (v.step ?? '') : '';
  const rate = v.phase === 'Running' && v.bytesPerSecond ? `${mib(v.bytesPerSecond)}/s${v.etaSeconds !== undefined ? ` ETA ${v.etaSeconds} s` : ''}` : '';
  const down = v.outageSeconds !== undefined ? `outage ${v.outageSeconds.toFixed(1)} s` : rate;
  return `  ${v.name.padEnd(13)} ${v.phase.padEnd(10)} ${step.padEnd(10)} ${bar(v.bytesTransferred, v.bytesTotal)} ${mib(v.bytesTransferred).padStart(10)}  ${down}`;
}

async function main(): Promise<void> {
  const sb = await startSandbox({ dir: join(REPO_ROOT, '.sandbox', 'demo'), guest: process.env.VMOPS_DEMO_GUEST === 'none' ? 'none' : 'linux', log: say });
  let stopping = false;
  const teardown = async () => {
    if (stopping) return;
    stopping = true;
    say('tearing the sandbox down…');
    await sb.stop();
  };
  process.on('SIGINT', () => void teardown().then(() => process.exit(130)));
  try {
    say(`sandbox ready: control plane ${sb.controlPlane.server}, hosts ${sb.hosts.hosts.map((h) => `${h.name}=${h.address}:${h.port}`).join(' ')}`);
    say('starting the operator (out of cluster, leader election on)…');
    const op = await sb.startOperator();
    say(`operator ready; metrics on ${op.metricsUrl}/metrics, log ${join(sb.dir, 'operator.log')}`);
    say('$ kubectl apply -f manifests/examples/migration.yaml');
    const applied = await sb.kubectl(['apply', '-f', 'manifests/examples/migration.yaml']);
    process.stdout.write(applied.stdout);

    const api = sb.kc.makeApiClient(CustomObjectsApi);
    const started = Date.now();
    const startedPerf = performance.now();
    let last: VMMigration | undefined;
    let printed = 0;
    let lastText = '';
    for (;;) {
      last = (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name: 'move-student-42' })) as VMMigration;
      const lines = render(last);
      const text = lines.join('\n');
      if (tty) {
        if (printed > 0) process.stdout.write(`\x1b[${printed}A\x1b[0J`);
        process.stdout.write(`${text}\n`);
        printed = lines.length;
      } else {
        // Without a terminal, print only when a phase or step changes.
        const key = `${last.status?.phase}|${(last.status?.vms ?? []).map((v) => `${v.phase}:${v.step ?? ''}`).join(',')}`;
        if (key !== lastText) console.log(`${elapsed()}\n${text}`);
        lastText = key;
      }
      if (last.status?.phase === 'Succeeded' || last.status?.phase === 'Failed') break;
      if (Date.now() - started > 20 * 60_000) throw new Error('migration did not finish within 20 minutes');
      await new Promise((r) => setTimeout(r, tty ? 250 : 1000));
    }
    const total = (Date.now() - started) / 1000;
    console.log('');
    say('$ kubectl get vmm -n vm-migration-system');
    process.stdout.write((await sb.kubectl(['get', 'vmm', '-n', SECRET_NAMESPACE])).stdout);
    console.log('\nSummary');
    console.log('  VM             from    → to       outage (shutdown + copy + boot)      stop→start   bytes moved');
    let bytes = 0;
    for (const v of last.status?.vms ?? []) {
      const p = last.status?.plan?.find((x) => x.vm === v.name);
      bytes += v.bytesTransferred ?? 0;
      const o = v.outage;
      const parts = o?.until === 'NodeReady' ? `(${o.shutdownSeconds?.toFixed(1)} + ${o.copySeconds?.toFixed(1)} + ${o.bootSeconds?.toFixed(1)})` : o ? '(live pause)' : '';
      console.log(`  ${v.name.padEnd(14)} ${(p?.from ?? '').padEnd(7)} → ${(p?.to ?? '').padEnd(7)}  ${(v.outageSeconds?.toFixed(1) ?? '-').padStart(6)} s ${parts.padEnd(24)} ${(o?.stopToStartSeconds.toFixed(2) ?? '-').padStart(8)} s  ${mib(v.bytesTransferred).padStart(12)}   ${v.phase}`);
    }
    console.log(`  total: ${total.toFixed(1)} s wall time, ${mib(bytes)} moved, result ${last.status?.phase}: ${last.status?.message ?? ''}`);
    console.log("  outage: the student's, from the stop until the node is Ready again; stop→start: the operator's share, without the boot");
    console.log('  the same environment moved by hand with the cloud\'s runbook: ~150 s of outage per VM (rolling), ~25 min for all at once');
    if (sb.observers.size > 0) {
      console.log('\nSeen from inside the guests (heartbeat every 10 ms, fsync\'d log verified by the guest after its boot on the target)');
      for (const [name, obs] of sb.observers) {
        // the last VMs moved may still be booting on the target: wait (≤ 60 s) for their verdict
        const to = last.status?.plan?.find((x) => x.vm === name)?.to;
        const host = sb.hosts.hosts.find((h) => h.name === to);
        const v = host ? await obs.bootVerdict(join(vmDirectory(host, sb.environment.name, name), 'serial.log'), { since: startedPerf, timeoutMs: 60_000 }).catch(() => undefined) : undefined;
        const verdict = v && `${v.ok ? `VERIFY ok records=${v.records} first=${v.first} last=${v.last} boot=${v.boot}` : `VERIFY FAIL ${v.reason}`}${v.via === 'console' ? ` (read from its console on ${to})` : ''}`;
        await obs.waitBeat({ since: performance.now(), timeoutMs: 60_000 }).catch(() => undefined);
        const gap = obs.longestGap(startedPerf);
        const clean = obs.lines.some((l) => l.t >= startedPerf && l.text.startsWith('POWEROFF clean'));
        const outage = last.status?.vms?.find((x) => x.name === name)?.outageSeconds;
        console.log(`  ${name.padEnd(14)} longest heartbeat gap ${(gap.ms / 1000).toFixed(2)} s (operator's outage ${outage?.toFixed(1) ?? '-'} s)  ${clean ? 'clean ACPI shutdown' : 'no clean shutdown seen'}  ${verdict ?? 'no verification seen'}`);
      }
    }
    const metrics = await (await fetch(`${op.metricsUrl}/metrics`)).text();
    console.log('\nFrom /metrics:');
    for (const l of metrics.split('\n')) if (/^vmops_(migrations_(started|succeeded|failed)_total|vm_moves_total|transfer_bytes_total|vm_(outage|stop_to_start)_seconds_(sum|count))/.test(l)) console.log(`  ${l}`);
    if (last.status?.phase !== 'Succeeded') process.exitCode = 1;
    if (keep) {
      say(`sandbox kept: export KUBECONFIG=${sb.controlPlane.kubeconfigPath}; Ctrl-C to tear down`);
      await new Promise(() => undefined);
    }
  } finally {
    await teardown();
  }
}

main().catch((err: Error) => {
  console.error(`demo failed: ${err.stack ?? err.message}`);
  process.exit(1);
});
