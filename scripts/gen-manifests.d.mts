/** Type declarations for scripts/gen-manifests.mjs (imported by the manifest tests). */
/** The text manifests/monitoring/prometheusrule.yaml must have: a PrometheusRule wrapping rules.yaml's groups. */
export declare function prometheusRuleYaml(): string;
/** The text manifests/argocd/argocd-cm.yaml must have: argocd-cm data with the Lua health check. */
export declare function argocdConfigMapYaml(): string;
/** manifests-relative path → generator of its exact text */
export declare const GENERATED: Record<string, () => string>;
