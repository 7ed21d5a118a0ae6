/**
 * The Prometheus Operator's own CRDs (ServiceMonitor, PrometheusRule), taken from its Go module
 * (example/prometheus-operator-crd/, the files its releases ship) through the Go module proxy and
 * cached in the module cache, so the shipped monitoring objects are validated against the real
 * schemas by the real API server.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export const PROMETHEUS_OPERATOR_MODULE = 'github.com/prometheus-operator/prometheus-operator';
export const PROMETHEUS_OPERATOR_VERSION = process.env.VMOPS_PROMETHEUS_OPERATOR_VERSION ?? 'v0.80.1';

/** Paths of the ServiceMonitor and PrometheusRule CRD files (downloads the module once, ~4 MB). */
export async function monitoringCrdFiles(): Promise<string[]> {
  const { stdout } = await execFileP('go', ['mod', 'download', '-json', `${PROMETHEUS_OPERATOR_MODULE}@${PROMETHEUS_OPERATOR_VERSION}`], { maxBuffer: 1 << 20 });
  const { Dir, Error: err } = JSON.parse(stdout) as { Dir?: string; Error?: string };
  if (!Dir) throw new Error(`go mod download ${PROMETHEUS_OPERATOR_MODULE}: ${err ?? 'no directory'}`);
  const crdDir = join(Dir, 'example/prometheus-operator-crd');
  return ['monitoring.coreos.com_servicemonitors.yaml', 'monitoring.coreos.com_prometheusrules.yaml'].map((f) => join(crdDir, f));
}
