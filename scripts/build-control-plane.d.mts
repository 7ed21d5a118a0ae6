/** Type declarations for scripts/build-control-plane.mjs (imported by test/world/controlPlane.ts). */
export declare const VERSIONS: { kubernetes: string; etcd: string; kwok: string };
/** The bin directory of the cached control plane (may not be built yet; built when `<dir>/.complete` exists). */
export declare function controlPlaneBinDir(): string;
/** Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok if needed (synchronous, serialised by a lock file); returns the bin dir. */
export declare function ensureControlPlane(): string;
