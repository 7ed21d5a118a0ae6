#!/usr/bin/env node
// Writes manifests/monitoring/prometheusrule.yaml from manifests/monitoring/rules.yaml (the single
// source of the rules), so Prometheus Operator clusters and plain Prometheus get the same rules.
//   node scripts/gen-prometheusrule.mjs          write the file
//   node scripts/gen-prometheusrule.mjs --check  exit 1 if the file is not up to date
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parse, stringify } from 'yaml';

const dir = resolve(import.meta.dirname, '../manifests/monitoring');
const source = resolve(dir, 'rules.yaml');
const target = resolve(dir, 'prometheusrule.yaml');

export function prometheusRuleYaml() {
  const { groups } = parse(readFileSync(source, 'utf8'));
  const doc = {
    apiVersion: 'monitoring.coreos.com/v1',
    kind: 'PrometheusRule',
    metadata: {
      name: 'vm-migration-operator',
      namespace: 'vm-migration-system',
      labels: { 'app.kubernetes.io/name': 'vm-migration-operator' },
    },
    spec: { groups },
  };
  return `# GENERATED from rules.yaml by scripts/gen-prometheusrule.mjs - edit rules.yaml, then re-run it.\n${stringify(doc, { lineWidth: 0 })}`;
}

if (process.argv[1] && resolve(process.argv[1]) === resolve(import.meta.filename)) {
  const text = prometheusRuleYaml();
  if (process.argv.includes('--check')) {
    if (readFileSync(target, 'utf8') !== text) {
      console.error(`${target} is out of date: run node scripts/gen-prometheusrule.mjs`);
      process.exit(1);
    }
  } else {
    writeFileSync(target, text);
  }
}
