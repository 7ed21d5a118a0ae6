/**
 * The fencing probe's fail-closed branches on the real kernel: a /proc that is not a procfs, and a
 * procfs mounted with hidepid for a non-root login, make it answer "unsure", never "stopped".
 * Needs root (unshare -m, mount) like the rest of the test world.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { PROBE_SCRIPT } from '../../src/hosts/hypervisor.js';
import { HOST_USER, ensureHostUser } from '../world/hosts.js';

const run = promisify(execFile);

async function probeUnder(mountProc: string, asUser?: string): Promise<string> {
  const probe = asUser ? `runuser -u ${asUser} -- perl -e "$1" /nonexistent/env/vm env.vm /env/vm/` : 'perl -e "$1" /nonexistent/env/vm env.vm /env/vm/';
  const { stdout } = await run('unshare', ['-m', 'sh', '-c', `${mountProc} && ${probe}`, 'sh', PROBE_SCRIPT]);
  return stdout.trim();
}

describe('fencing probe fails closed', () => {
  it('answers "absent" on a normal /proc when nothing matches', async () => {
    expect(await probeUnder('true')).toBe('absent');
  });
  it('answers "unsure" when /proc is not a procfs', async () => {
    expect(await probeUnder('mount -t tmpfs none /proc')).toMatch(/^unsure \/proc is not a procfs/);
  });
  it('answers "unsure" for a non-root login when /proc hides other users\' processes', async () => {
    await ensureHostUser();
    expect(await probeUnder('mount -t proc -o hidepid=2 proc /proc', HOST_USER)).toMatch(/^unsure .*hidepid/);
    // root sees every process regardless
    expect(await probeUnder('mount -t proc -o hidepid=2 proc /proc')).toBe('absent');
  });
});
