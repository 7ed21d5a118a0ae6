/**
 * `BENCH_PARTS=ha npm run bench`: what the student sees while the operator moves the HA environment
 * (test/world/haSandbox.ts: etcd ×3, kube-apiserver ×3, NGINX on the beachhead, KWOK workers) with
 * load-balancer awareness on and the student's kubectl loop through the beachhead running — once per
 * strategy: cold (the baseline, same run), pre-copy and live, moving the environment host01 → host02
 * → host01 → host02. Per strategy: the beachhead's own outage (its VM not running, from the world's
 * transitions) and the requests that overlapped it, the requests during the rest of the move, and how
 * long each controller was out of NGINX. Asserts nothing beyond each migration Succeeding.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CustomObjectsApi } from '@kubernetes/client-node';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../src/api/types.js';
import { startHaSandbox } from '../test/world/haSandbox.js';
import { KubectlStudent, summarize, type StudentSample } from '../test/world/haStudent.js';
import { REPO_ROOT, SECRET_NAMESPACE } from '../test/world/sandbox.js';
import { until } from '../test/world/until.js';

const STRATEGIES: Array<{ name: string; target: string; spec: Record<string, unknown> }> = [
  { name: 'cold', target: 'host02', spec: { strategy: 'Rolling' } },
  { name: 'pre-copy', target: 'host01', spec: { strategy: 'Rolling', transfer: { precopy: true } } },
  { name: 'live', target: 'host02', spec: { strategy: 'LiveMigrate', live: { fallback: 'None' } } },
];

export async function runHa(): Promise<string> {
  const sb = await startHaSandbox({ dir: join(REPO_ROOT, '.sandbox', 'bench-ha'), log: (l) => console.error(`[ha] ${l}`) });
  try {
    const operator = await sb.startOperator({ loadBalancer: true, logFile: join(sb.dir, 'operator.log') });
    const api = sb.kc.makeApiClient(CustomObjectsApi);
    const rows: string[] = [];
    try {
      for (const s of STRATEGIES) {
        const student = new KubectlStudent(sb.ha.kubeconfigPath, { cacheDir: join(sb.dir, `kubectl-cache-${s.name}`) });
        const lb: Array<{ at: number; down: string[] }> = [];
        let sampling = true;
        const lbLoop = (async () => {
          while (sampling) {
            const conf = await readFile(sb.ha.nginxConfigPath, 'utf8').catch(() => '');
            lb.push({ at: Date.now(), down: [...conf.matchAll(/server (\S+):\d+[^;]* down;/g)].map((m) => sb.environment.vms.find((v) => v.address === m[1])?.name ?? m[1]!) });
            await new Promise((r) => setTimeout(r, 100));
          }
        })();
        await student.start();
        await new Promise((r) => setTimeout(r, 2000));
        const from = Date.now();
        const name = `ha-${s.name}`;
        await api.createNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, body: {
          apiVersion: `${GROUP}/${VERSION}`, kind: 'VMMigration', metadata: { name, namespace: SECRET_NAMESPACE },
          spec: { environments: [sb.environment.name], targetHost: s.target, shutdown: { powerdownTimeout: '1s' }, drain: { timeout: '2m' }, nodeReadyTimeout: '3m', ...s.spec },
        } });
        const t0 = Date.now();
        await until(`${name} Succeeded`, 900_000, async () => {
          const o = (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: SECRET_NAMESPACE, plural: PLURAL, name })) as VMMigration;
          if (o.status?.phase === 'Failed') throw new Error(`${name} failed: ${o.status.message}`);
          return o.status?.phase === 'Succeeded';
        }, 500);
        const seconds = (Date.now() - t0) / 1000;
        await new Promise((r) => setTimeout(r, 2000));
        const samples = await student.stop();
        sampling = false;
        await lbLoop;

        // the beachhead's outage: from leaving "running" to running again (+2 s for requests in flight)
        const ts = sb.ha.transitions.filter((t) => t.vm === 'beachhead' && t.at >= from);
        const down = ts.find((t) => t.state !== 'running');
        const back = down ? ts.find((t) => t.at > down.at && t.state === 'running') : undefined;
        const outageS = down && back ? (back.at - down.at) / 1000 : 0;
        const inOutage = (x: StudentSample) => down !== undefined && back !== undefined && x.at <= back.at + 2000 && x.at + x.ms >= down.at;
        const b = summarize(samples.filter(inOutage));
        const r = summarize(samples.filter((x) => !inOutage(x)));
        const out: Record<string, number> = {};
        for (let i = 1; i < lb.length; i++) for (const vm of lb[i - 1]!.down) out[vm] = (out[vm] ?? 0) + (lb[i]!.at - lb[i - 1]!.at) / 1000;
        const lbOut = ['controller-1', 'controller-2', 'controller-3'].map((c) => `${(out[c] ?? 0).toFixed(1)}`).join(' / ');
        rows.push(`| ${s.name} | ${seconds.toFixed(0)} s | ${outageS.toFixed(1)} s | ${b.sent} / ${b.failed} / ${b.worstMs} ms | ${r.sent} / ${r.failed} / ${r.p99Ms} ms / ${r.worstMs} ms | ${lbOut} s |`);
        console.error(`[ha] ${rows.at(-1)}`);
      }
    } finally {
      await operator.stop();
    }
    return [
      '### HA environment moved with the student\'s kubectl loop through NGINX (load-balancer awareness on)',
      '',
      '| strategy | move | beachhead down | requests during the beachhead outage (+2 s): sent / failed / worst | rest of the move: sent / failed / p99 / worst | controllers 1/2/3 out of NGINX |',
      '|---|---|---|---|---|---|',
      ...rows,
    ].join('\n');
  } finally {
    await sb.stop();
  }
}
