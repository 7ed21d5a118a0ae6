#!/usr/bin/env node
// Writes the manifests that are derived from a single source, so the copies never drift:
//   manifests/monitoring/prometheusrule.yaml  from manifests/monitoring/rules.yaml (Prometheus Operator)
//   manifests/argocd/argocd-cm.yaml           from manifests/argocd/vmmigration-health.lua (Argo CD)
//   node scripts/gen-manifests.mjs          write them
//   node scripts/gen-manifests.mjs --check  exit 1 if one is not up to date
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parse, stringify } from 'yaml';

const manifests = resolve(import.meta.dirname, '../manifests');
const header = (src) => `# GENERATED from ${src} by scripts/gen-manifests.mjs - edit that file, then re-run the script.\n`;

export function prometheusRuleYaml() {
  const { groups } = parse(readFileSync(resolve(manifests, 'monitoring/rules.yaml'), 'utf8'));
  const doc = {
    apiVersion: 'monitoring.coreos.com/v1',
    kind: 'PrometheusRule',
    metadata: { name: 'vm-migration-operator', namespace: 'vm-migration-system', labels: { 'app.kubernetes.io/name': 'vm-migration-operator' } },
    spec: { groups },
  };
  return header('rules.yaml') + stringify(doc, { lineWidth: 0 });
}

export function argocdConfigMapYaml() {
  const lua = readFileSync(resolve(manifests, 'argocd/vmmigration-health.lua'), 'utf8');
  const doc = {
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name: 'argocd-cm', namespace: 'argocd', labels: { 'app.kubernetes.io/part-of': 'argocd' } },
    data: { 'resource.customizations.health.vmops.dev_VMMigration': lua },
  };
  return `${header('vmmigration-health.lua')}# Merge into Argo CD's argocd-cm (e.g. as a kustomize patch of your Argo CD installation).\n${stringify(doc, { lineWidth: 0 })}`;
}

export const GENERATED = {
  'monitoring/prometheusrule.yaml': prometheusRuleYaml,
  'argocd/argocd-cm.yaml': argocdConfigMapYaml,
};

if (process.argv[1] && resolve(process.argv[1]) === resolve(import.meta.filename)) {
  const check = process.argv.includes('--check');
  let stale = 0;
  for (const [file, make] of Object.entries(GENERATED)) {
    const path = resolve(manifests, file);
    const text = make();
    if (!check) writeFileSync(path, text);
    else if (readFileSync(path, 'utf8') !== text) {
      console.error(`${path} is out of date: run node scripts/gen-manifests.mjs`);
      stale++;
    }
  }
  process.exit(stale ? 1 : 0);
}
