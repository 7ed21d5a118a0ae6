/** The command line as a person meets it: --help for every command, errors that name the flag or file. */
import { execFile } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliArgs } from '../world/cli.js';

const ROOT = join(import.meta.dirname, '../..');
// Each call starts a Node (~1.2 CPU-s from dist/, ~2.7 through tsx: test/world/cli.ts); the unit lane runs
// at nice 10 beside the VM lanes, where a test with five of them at once took 47 s of wall time through
// tsx (a fresh-clone run). The timeouts leave room for that: nothing here is about time.
function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, cliArgs(...args), { cwd: ROOT, env: { ...process.env, KUBECONFIG: '/nonexistent' } }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

describe('vm-migration-operator command line', () => {
  it('--help lists every command; COMMAND --help explains its flags', async () => {
    const all = await cli(['--help']);
    expect(all.code).toBe(0);
    for (const c of ['run', 'plan', 'inventory', 'status']) expect(all.stdout).toContain(`vm-migration-operator ${c}`);
    const helps = await Promise.all(['run', 'plan', 'inventory', 'status'].map((c) => cli([c, '--help'])));
    for (const [i, h] of helps.entries()) {
      expect(h.code).toBe(0);
      expect(h.stdout.split('\n')[0]).toMatch(new RegExp(`^vm-migration-operator ${['run', 'plan', 'inventory', 'status'][i]} `));
      expect(h.stdout.split('\n').length).toBeGreaterThan(3);
    }
    expect(helps[3]!.stdout).toContain('--watch');
  }, 300_000);

  it('names the unknown command, the misspelt flag, the missing flag and the missing file', async () => {
    const [unknown, misspelt, missing, file, name] = await Promise.all([
      cli(['migrate']), cli(['run', '--inventroy', 'x']), cli(['inventory']), cli(['plan', '-f', '/no/such/migration.yaml']), cli(['status']),
    ]);
    expect(unknown).toMatchObject({ code: 2, stderr: expect.stringContaining('error: unknown command "migrate"') });
    expect(misspelt).toMatchObject({ code: 2, stderr: expect.stringContaining("error: Unknown option '--inventroy'") });
    expect(missing).toMatchObject({ code: 2, stderr: expect.stringContaining('error: missing --db') });
    expect(file).toMatchObject({ code: 2, stderr: expect.stringContaining('error: --file /no/such/migration.yaml: no such file') });
    expect(name).toMatchObject({ code: 2, stderr: expect.stringContaining('error: status takes exactly one NAME') });
  }, 300_000);

  it('a file that is there but wrong is named with its flag', async () => {
    const dir = join(ROOT, '.sandbox/cli-help');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'broken.yaml'), 'spec: [unclosed\n');
    const r = await cli(['plan', '-f', join(dir, 'broken.yaml')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^error: --file ${join(dir, 'broken.yaml')}: `));
  }, 300_000);
});
