/**
 * What `kubectl apply -k manifests/` installs, built by the real `kubectl kustomize`, checked for
 * what the Deployment must have (probes, security context, replicas + election, read-only mounts)
 * and for consistency with the code (every VMOPS_* variable it sets is one the CLI reads). The
 * same objects are applied to a real API server in test/integration/inCluster.test.ts.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { V1Deployment, V1PolicyRule, V1Role } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments, stringify } from 'yaml';
import { GENERATED } from '../../scripts/gen-manifests.mjs';

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, '../..');
type Obj = { apiVersion: string; kind: string; metadata: { name: string; namespace?: string; labels?: Record<string, string> }; [k: string]: unknown };

async function kustomize(dir: string): Promise<Obj[]> {
  const { stdout } = await execFileP('kubectl', ['kustomize', dir], { cwd: ROOT, maxBuffer: 16 << 20 });
  return parseAllDocuments(stdout).map((d) => d.toJSON() as Obj);
}
const find = <T>(objs: Obj[], kind: string) => objs.filter((o) => o.kind === kind) as unknown as T[];

describe('kubectl kustomize manifests/', () => {
  it('installs exactly CRD, namespace, RBAC, Deployment, PDB and metrics Service, all in vm-migration-system', async () => {
    const objs = await kustomize('manifests');
    expect(objs.map((o) => o.kind).sort()).toEqual(['CustomResourceDefinition', 'Deployment', 'Namespace', 'PodDisruptionBudget', 'Role', 'RoleBinding', 'Service', 'ServiceAccount']);
    for (const o of objs.filter((x) => !['CustomResourceDefinition', 'Namespace'].includes(x.kind))) expect(o.metadata.namespace, `${o.kind}/${o.metadata.name}`).toBe('vm-migration-system');
    const crd = objs.find((o) => o.kind === 'CustomResourceDefinition')!;
    expect(crd, 'the CRD is crds/ itself, not a copy').toEqual(parseAllDocuments(readFileSync(join(ROOT, 'crds/vmops.dev_vmmigrations.yaml'), 'utf8'))[0]!.toJSON());
  });

  it('runs two replicas with leader election, probes, limits and a locked-down security context', async () => {
    const [d] = find<V1Deployment>(await kustomize('manifests'), 'Deployment');
    const pod = d!.spec!.template.spec!;
    const c = pod.containers[0]!;
    const env = Object.fromEntries((c.env ?? []).map((e) => [e.name, e]));
    expect(d!.spec!.replicas).toBe(2);
    expect(env.VMOPS_LEADER_ELECT?.value).toBe('true');
    expect(env.VMOPS_DB?.valueFrom?.secretKeyRef).toEqual({ name: 'vm-migration-db', key: 'url' });
    expect(c.livenessProbe?.httpGet).toMatchObject({ path: '/healthz', port: 'metrics' });
    expect(c.readinessProbe?.httpGet).toMatchObject({ path: '/readyz', port: 'metrics' });
    expect(c.ports?.find((p) => p.name === 'metrics')?.containerPort).toBe(Number(env.VMOPS_METRICS_PORT?.value));
    expect(c.resources?.requests).toMatchObject({ cpu: expect.any(String), memory: expect.any(String) });
    expect(c.resources?.limits).toMatchObject({ memory: expect.any(String) });
    expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } });
    expect(pod.securityContext?.runAsUser).toBeGreaterThan(0);
    expect(c.securityContext).toMatchObject({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, privileged: false, capabilities: { drop: ['ALL'] } });
    expect(c.securityContext?.capabilities?.add).toBeUndefined();
    const mounts = Object.fromEntries((c.volumeMounts ?? []).map((m) => [m.name, m]));
    expect(mounts.inventory?.readOnly).toBe(true);
    expect(mounts.ssh?.readOnly).toBe(true);
    expect(env.VMOPS_SSH_KEY?.value?.startsWith(`${mounts.ssh!.mountPath}/`)).toBe(true);
    expect(env.VMOPS_INVENTORY?.value?.startsWith(`${mounts.inventory!.mountPath}/`)).toBe(true);
    // the key file is root:fsGroup; the operator (non-root, in fsGroup) must be able to read it, nobody else
    const ssh = pod.volumes?.find((v) => v.name === 'ssh')?.secret;
    expect(ssh?.defaultMode).toBe(0o440);
    expect(pod.securityContext?.fsGroup).toBe(pod.securityContext?.runAsGroup);
    expect(pod.serviceAccountName).toBe('vm-migration-operator');
  });

  it('sets only environment variables the CLI reads', async () => {
    const [d] = find<V1Deployment>(await kustomize('manifests'), 'Deployment');
    const main = readFileSync(join(ROOT, 'src/cli/main.ts'), 'utf8');
    for (const e of d!.spec!.template.spec!.containers[0]!.env ?? []) expect(main, e.name).toContain(`process.env.${e.name}`);
  });

  it('grants a namespaced Role only: no wildcard, no Secret listing, no deleting or creating VMMigrations', async () => {
    const objs = await kustomize('manifests');
    expect(objs.some((o) => o.kind === 'ClusterRole' || o.kind === 'ClusterRoleBinding')).toBe(false);
    const rules: V1PolicyRule[] = find<V1Role>(objs, 'Role').flatMap((r) => r.rules ?? []);
    for (const r of rules) {
      expect([...(r.apiGroups ?? []), ...(r.resources ?? []), ...r.verbs]).not.toContain('*');
      if (r.resources?.includes('secrets')) expect(r.verbs).toEqual(['get']);
      if (r.resources?.includes('vmmigrations')) {
        expect(r.verbs).not.toContain('delete');
        expect(r.verbs).not.toContain('create');
      }
    }
  });

  it('with the monitoring and sqlite components: ServiceMonitor on the metrics Service, PrometheusRule, dashboard ConfigMap; one replica on a PVC', async () => {
    const site = join(ROOT, '.sandbox/kustomize-site');
    mkdirSync(site, { recursive: true });
    writeFileSync(join(site, 'kustomization.yaml'), stringify({ resources: ['../../manifests'], components: ['../../manifests/monitoring', '../../manifests/components/sqlite'] }));
    const objs = await kustomize(site);
    const svc = objs.find((o) => o.kind === 'Service') as unknown as { metadata: { labels: Record<string, string> }; spec: { ports: Array<{ name: string }> } };
    const sm = objs.find((o) => o.kind === 'ServiceMonitor') as unknown as { spec: { selector: { matchLabels: Record<string, string> }; endpoints: Array<{ port: string }> } };
    expect(svc.metadata.labels).toMatchObject(sm.spec.selector.matchLabels);
    expect(svc.spec.ports.map((p) => p.name)).toContain(sm.spec.endpoints[0]!.port);
    expect(objs.find((o) => o.kind === 'PrometheusRule')).toBeDefined();
    const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === 'vm-migration-operator-dashboard') as unknown as { metadata: { labels: Record<string, string> }; data: Record<string, string> };
    expect(cm.metadata.labels.grafana_dashboard).toBe('1');
    expect(JSON.parse(cm.data['grafana-dashboard.json']!).uid).toBe('vmops-overview');
    const [d] = find<V1Deployment>(objs, 'Deployment');
    expect(d!.spec!.replicas).toBe(1);
    expect(d!.spec!.strategy?.type).toBe('Recreate');
    const c = d!.spec!.template.spec!.containers[0]!;
    expect(c.env?.find((e) => e.name === 'VMOPS_DB')).toEqual({ name: 'VMOPS_DB', value: '/var/lib/vmops/state.db' });
    expect(c.volumeMounts?.find((m) => m.name === 'state')?.mountPath).toBe('/var/lib/vmops');
    expect(objs.find((o) => o.kind === 'PersistentVolumeClaim')?.metadata.name).toBe('vm-migration-state');
  });

  it('generated files (PrometheusRule, argocd-cm) are up to date with their sources', () => {
    for (const [file, make] of Object.entries(GENERATED)) expect(readFileSync(join(ROOT, 'manifests', file), 'utf8'), `${file}: run node scripts/gen-manifests.mjs`).toBe(make());
  });
});
