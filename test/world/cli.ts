/**
 * How tests start the operator's command line. scripts/test.sh type-checks by compiling the tree
 * (tsc, into dist/) and sets VMOPS_TEST_CLI=dist: tests then run dist/src/cli/main.js, what the
 * container image ships, at ~1.2 CPU-s per start instead of ~2.7 through tsx (the suite starts the
 * operator and its CLI well over a hundred times on two shared cores). Run directly (vitest), tests
 * take the sources through tsx, never a stale build.
 */
import { join } from 'node:path';

const REPO_ROOT = join(import.meta.dirname, '../..');

/** Node's arguments (for `process.execPath`) that run `vm-migration-operator ARGS…`. */
export function cliArgs(...args: string[]): string[] {
  const entry = process.env.VMOPS_TEST_CLI === 'dist' ? [join(REPO_ROOT, 'dist/src/cli/main.js')] : ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts')];
  return [...entry, ...args];
}
