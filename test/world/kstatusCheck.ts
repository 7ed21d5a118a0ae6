/**
 * Judges objects with the libraries platform teams run, through test/tools/kstatus (Go):
 * `kstatus` is sigs.k8s.io/cli-utils kstatus `status.Compute`; `flux` is what Flux's
 * kustomize-controller computes with `spec.healthCheckExprs` (github.com/fluxcd/pkg/runtime/cel's
 * StatusReader; for a GroupKind without an entry, Flux's default generic reader). A CEL expression
 * that fails to evaluate (e.g. it names a field the object lacks) comes back as flux status
 * "Error" with the error as message: Flux itself reports such an object as Unknown and keeps waiting.
 * The tool is built once (scripts/build-kstatus-check.sh caches it; a first build takes minutes).
 */
import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);
const REPO_ROOT = resolve(import.meta.dirname, '../..');
export const BUILD_SCRIPT = resolve(REPO_ROOT, 'scripts/build-kstatus-check.sh');

export interface Verdict {
  status: string;
  message: string;
}
export interface Judgement {
  kstatus: Verdict;
  flux: Verdict;
}

let binary: Promise<string> | undefined;

/** The built tool's path; builds it on first use in this process. */
export function kstatusCheckBinary(): Promise<string> {
  binary ??= execFileP('bash', [BUILD_SCRIPT], { cwd: REPO_ROOT, maxBuffer: 16 << 20, timeout: 30 * 60_000 }).then(
    ({ stdout }) => {
      const path = stdout.trim();
      if (!path) throw new Error('build-kstatus-check.sh printed no path');
      return path;
    },
    (err: unknown) => {
      binary = undefined; // let a later call try again
      throw err;
    },
  );
  return binary;
}

function run(file: string, input: string): Promise<string> {
  return new Promise((resolveP, reject) => {
    const child = execFile(file, [], { timeout: 60_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`kstatus-check failed: ${err.message}${stderr ? `\n${stderr}` : ''}`));
      else resolveP(stdout);
    });
    child.stdin!.end(input);
  });
}

/** kstatus's and Flux's verdicts for each object, in order. */
export async function judge(objects: object[], healthCheckExprs: object[]): Promise<Judgement[]> {
  const bin = await kstatusCheckBinary();
  const stdout = await run(bin, JSON.stringify({ healthCheckExprs, objects }));
  const out = JSON.parse(stdout) as Judgement[];
  if (!Array.isArray(out) || out.length !== objects.length) {
    throw new Error(`kstatus-check returned ${Array.isArray(out) ? out.length : typeof out} results for ${objects.length} objects`);
  }
  return out;
}
