/** Type declarations for scripts/gen-prometheusrule.mjs (imported by test/unit/monitoring.test.ts). */
/** The text manifests/monitoring/prometheusrule.yaml must have: a PrometheusRule wrapping rules.yaml's groups. */
export declare function prometheusRuleYaml(): string;
