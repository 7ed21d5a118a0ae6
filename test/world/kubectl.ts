import { spawn } from 'node:child_process';
import { liveness } from './budget.js';
import { REPO_ROOT } from './sandbox.js';

/**
 * The machine's real kubectl against a test control plane; stdin optional (for `apply -f -`).
 * A kubectl still running after `budgetMs` (a liveness budget, scaled by VMOPS_TIME_SCALE; kubectl
 * itself has no request timeout) is killed and reported as failed, not left behind for the next file.
 */
export function kubectlRun(kubeconfigPath: string, args: string[], stdin?: string, budgetMs = 300_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn('kubectl', ['--kubeconfig', kubeconfigPath, ...args], { cwd: REPO_ROOT });
    let stdout = '';
    let stderr = '';
    const budget = liveness(budgetMs);
    const killer = setTimeout(() => {
      stderr += `\n[test world] kubectl ${args.join(' ')} still running after ${budget} ms: killed\n`;
      p.kill('SIGKILL');
    }, budget);
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('close', (code) => {
      clearTimeout(killer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
    p.stdin.end(stdin ?? '');
  });
}
