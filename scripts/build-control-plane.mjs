#!/usr/bin/env node
// Builds the test control plane (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) and KWOK from the Go module proxy, the way envtest ships
// binaries for Go operators, and caches them by version outside the git tree.
//
// Each component is built inside a throw-away wrapper module that requires the
// upstream module and rewrites that module's *local* replace directives
// (k8s.io/kubernetes → ./staging/src/..., etcd → ../api) to the published
// versions, so the replace list is derived from the upstream go.mod instead of
// being hard-coded here.
//
// Usage:
//   node scripts/build-control-plane.mjs               build (if needed), print nothing
//   node scripts/build-control-plane.mjs --print-dir   ONLY print the bin dir (no build);
//                                                      the build is done when <dir>/.complete exists
//   node scripts/build-control-plane.mjs --build --print-dir   build (if needed), then print the dir
//
// Concurrent builders (two test runs, a manual run) are serialised by a lock
// file next to the bin dir; a waiting builder returns once .complete appears.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';

export const VERSIONS = {
  kubernetes: process.env.VMOPS_K8S_VERSION ?? 'v1.33.13',
  etcd: process.env.VMOPS_ETCD_VERSION ?? 'v3.5.21',
  kwok: process.env.VMOPS_KWOK_VERSION ?? 'v0.7.0',
};

const cacheRoot = process.env.VMOPS_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'vm-migration-operator');
const binDir = join(cacheRoot, 'controlplane', `k8s-${VERSIONS.kubernetes}_etcd-${VERSIONS.etcd}_kwok-${VERSIONS.kwok}`, 'bin');

function go(args, cwd) {
  return execFileSync('go', args, {
    cwd,
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, GOFLAGS: '-mod=mod', CGO_ENABLED: '0' },
    maxBuffer: 64 << 20,
  }).toString();
}

function parseGoMod(path) {
  const json = JSON.parse(execFileSync('go', ['mod', 'edit', '-json', path]).toString());
  return { require: json.Require ?? [], replace: json.Replace ?? [] };
}

/** staging modules of k8s.io/kubernetes vMAJ.MIN.PATCH are published as v0.MIN.PATCH */
function stagingVersion(k8sVersion) {
  const m = /^v1\.(\d+)\.(\d+)$/.exec(k8sVersion);
  if (!m) throw new Error(`unexpected Kubernetes version ${k8sVersion}`);
  return `v0.${m[1]}.${m[2]}`;
}

function buildComponent({ name, module, version, packages, ldflags, localVersion, output }) {
  const outputs = output ? [output] : packages.map((p) => p.split('/').pop());
  if (outputs.every((o) => existsSync(join(binDir, o)))) return;
  const work = join(cacheRoot, 'build', `${name}-${version}`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  writeFileSync(join(work, 'go.mod'), `module vmops.dev/build/${name}\n\ngo 1.24\n`);
  const info = JSON.parse(go(['mod', 'download', '-json', `${module}@${version}`], work));
  const upstream = parseGoMod(info.GoMod);
  const required = new Map(upstream.require.map((r) => [r.Path, r.Version]));
  const edits = [`-require=${module}@${version}`];
  for (const r of upstream.replace) {
    const target = r.New.Path;
    const isLocal = target.startsWith('./') || target.startsWith('../');
    if (isLocal && target.includes('FORBIDDEN')) continue;
    if (isLocal) {
      const req = required.get(r.Old.Path);
      const v = req && req !== 'v0.0.0' ? req : localVersion(r.Old.Path);
      edits.push(`-replace=${r.Old.Path}=${r.Old.Path}@${v}`);
    } else {
      const old = r.Old.Version ? `${r.Old.Path}@${r.Old.Version}` : r.Old.Path;
      edits.push(`-replace=${old}=${target}@${r.New.Version}`);
    }
  }
  go(['mod', 'edit', ...edits], work);
  for (const p of packages) go(['get', `${p}@${version}`], work);
  const started = Date.now();
  go(['build', '-trimpath', '-ldflags', ['-s', '-w', ...ldflags].join(' '), '-o', output ? join(binDir, output) : binDir + '/', ...packages], work);
  console.error(`[control-plane] built ${name} ${version} in ${((Date.now() - started) / 1000).toFixed(0)} s`);
}

export function controlPlaneBinDir() {
  return binDir;
}

function sleepSync(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** One build at a time per cache: concurrent callers (parallel test files, a second shell) wait for it. */
function withBuildLock(fn) {
  const lock = join(cacheRoot, 'build.lock');
  mkdirSync(cacheRoot, { recursive: true });
  for (;;) {
    try {
      mkdirSync(lock);
      writeFileSync(join(lock, 'pid'), String(process.pid));
      break;
    } catch {
      let owner = 0;
      try { owner = Number(readFileSync(join(lock, 'pid'), 'utf8')); } catch { /* being created */ }
      let alive = false;
      try { if (owner) { process.kill(owner, 0); alive = true; } } catch { /* dead owner */ }
      if (owner && !alive) rmSync(lock, { recursive: true, force: true });
      else sleepSync(2000);
    }
  }
  try {
    return fn();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

export function ensureControlPlane() {
  const marker = join(binDir, '.complete');
  if (existsSync(marker)) return binDir;
  return withBuildLock(() => (existsSync(marker) ? binDir : buildAll(marker)));
}

function buildAll(marker) {
  const t0 = Date.now();
  mkdirSync(binDir, { recursive: true });
  const k8s = VERSIONS.kubernetes;
  const minor = /^v1\.(\d+)\./.exec(k8s)[1];
  const versionFlags = [
    ['k8s.io/component-base/version', k8s],
    ['k8s.io/client-go/pkg/version', k8s],
  ].flatMap(([pkg, v]) => [`-X ${pkg}.gitVersion=${v}`, `-X ${pkg}.gitMajor=1`, `-X ${pkg}.gitMinor=${minor}`, `-X ${pkg}.gitTreeState=clean`]);
  buildComponent({
    name: 'etcd', module: 'go.etcd.io/etcd/server/v3', version: VERSIONS.etcd,
    packages: ['go.etcd.io/etcd/server/v3'], ldflags: [],
    localVersion: () => VERSIONS.etcd, output: 'etcd',
  });
  buildComponent({
    name: 'kubernetes', module: 'k8s.io/kubernetes', version: k8s,
    packages: ['k8s.io/kubernetes/cmd/kube-apiserver', 'k8s.io/kubernetes/cmd/kube-controller-manager', 'k8s.io/kubernetes/cmd/kube-scheduler'],
    ldflags: versionFlags, localVersion: () => stagingVersion(k8s),
  });
  buildComponent({
    name: 'kwok', module: 'sigs.k8s.io/kwok', version: VERSIONS.kwok,
    packages: ['sigs.k8s.io/kwok/cmd/kwok'], ldflags: [`-X sigs.k8s.io/kwok/pkg/consts.Version=${VERSIONS.kwok}`],
    localVersion: () => { throw new Error('kwok has unexpected local replaces'); },
  });
  writeFileSync(marker, JSON.stringify({ ...VERSIONS, builtSeconds: Math.round((Date.now() - t0) / 1000) }) + '\n');
  rmSync(join(cacheRoot, 'build'), { recursive: true, force: true });
  console.error(`[control-plane] ready in ${binDir} after ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  return binDir;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  // --print-dir only names the cache directory (it does not build).
  if (process.argv.includes('--print-dir')) console.log(binDir);
  else ensureControlPlane();
}
