/**
 * The Dockerfile cannot be built here (no container engine), so it is linted: dockerfilelint
 * (a pinned dev dependency: a unit test never reaches the registry) must find nothing, and must
 * find the usual mistakes in a deliberately bad file (so a pass means something).
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, '../..');
const LINTER = join(ROOT, 'node_modules', '.bin', 'dockerfilelint');

interface Report { files: Array<{ issues_count: number; issues: Array<{ line: string; title: string }> }> }
async function lint(file: string): Promise<Report> {
  // exit code = number of issues; the JSON report is on stdout either way
  const r = await execFileP(LINTER, ['-o', 'json', file], { cwd: ROOT }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }));
  return JSON.parse(r.stdout) as Report;
}

describe('Dockerfile', () => {
  it('passes dockerfilelint', async () => {
    const r = await lint(join(ROOT, 'Dockerfile'));
    expect(r.files[0]!.issues).toEqual([]);
  }, 120_000);

  it('the linter does flag an unpinned base, apt without -y and cache cleanup, sudo', async () => {
    const dir = join(ROOT, '.sandbox/dockerfile-lint');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'Dockerfile'), 'FROM node\nRUN apt-get update\nRUN apt-get install zstd\nRUN sudo npm ci\n');
    const titles = (await lint(join(dir, 'Dockerfile'))).files[0]!.issues.map((i) => i.title);
    expect(titles).toEqual(expect.arrayContaining(['Base Image Missing Tag', 'Missing parameter for `apt-get`', 'Use Of sudo Is Not Allowed']));
  }, 120_000);

  it('is multi-stage, pinned, and runs as the non-root user the Deployment expects', () => {
    const text = readFileSync(join(ROOT, 'Dockerfile'), 'utf8');
    const froms = text.match(/^FROM \S+/gm) ?? [];
    expect(froms.length).toBe(2);
    for (const f of froms) expect(f).toMatch(/^FROM node:\d+\.\d+\.\d+-bookworm-slim$/);
    expect(text).toMatch(/^USER 10001:10001$/m);
    expect(text).toMatch(/^COPY --from=build /m);
  });
});
