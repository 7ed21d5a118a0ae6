/**
 * Transfer mode Direct's pieces that run without a host: the forced command (run here by the real
 * sh and perl), the authorized_keys rewrite (the real script on a temporary file) and the tag.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, statSync, writeFileSync, chmodSync, truncateSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { AUTHORIZE_SH, directTag, forcedWriterCommand } from '../../src/transfer/direct.js';

const dir = mkdtempSync(join(tmpdir(), 'vmops-direct-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const frame = (t: string, a: number, b: number): Buffer => {
  const h = Buffer.alloc(17);
  h.write(t, 0, 'latin1');
  h.writeBigUInt64BE(BigInt(a), 1);
  h.writeBigUInt64BE(BigInt(b), 9);
  return h;
};

describe('the forced command of a direct copy', () => {
  it('holds only hex inside its quotes, and refuses a path that is not a safe absolute path', () => {
    const cmd = forcedWriterCommand('/srv/vms/env/vm/disk0.qcow2.partial');
    expect(cmd).toMatch(/^perl -e 'eval pack\(q\(H\*\), q\([0-9a-f]+\)\); if \(\$@\) \{ print STDERR \$@; exit 1 \}'$/);
    expect(cmd).not.toContain('"');
    expect(() => forcedWriterCommand('/srv/vms/a b')).toThrow(/not a valid absolute path/);
    expect(() => forcedWriterCommand('relative/x')).toThrow(/not a valid absolute path/);
    expect(() => forcedWriterCommand('/srv/../etc/passwd')).toThrow(/not a valid absolute path/);
  });

  it('run by sh as sshd runs it, writes the frames into its one file whatever command the client asked for, and reports the segment', () => {
    const partial = join(dir, 'disk.partial');
    writeFileSync(partial, '');
    truncateSync(partial, 8192);
    const data = Buffer.from('direct-copy-bytes');
    const stream = Buffer.concat([frame('D', 4096, data.length), data, frame('E', 0, 0)]);
    // sshd runs the forced command with the user's shell; SSH_ORIGINAL_COMMAND is what the client asked for, ignored
    const r = spawnSync('sh', ['-c', forcedWriterCommand(partial)], { input: stream, env: { ...process.env, SSH_ORIGINAL_COMMAND: 'rm -rf /' } });
    expect(r.stderr.toString()).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout.toString()).toBe('E 0\nEND\n');
    const got = readFileSync(partial);
    expect(got.subarray(4096, 4096 + data.length).toString()).toBe('direct-copy-bytes');
    expect(got.length).toBe(8192);
  });

  it('fails with the writer\'s message (not silently) when its file is missing', () => {
    const r = spawnSync('sh', ['-c', forcedWriterCommand(join(dir, 'missing.partial'))], { input: Buffer.alloc(0) });
    expect(r.status).toBe(1);
    expect(r.stderr.toString()).toMatch(/open .*missing\.partial/);
  });
});

describe('the authorized_keys rewrite', () => {
  const tag = directTag('env-a', 'vm1');
  const run = (file: string, removeTag: string, line: string) => spawnSync('sh', ['-c', AUTHORIZE_SH, 'vmops-authorize', file, removeTag, line]);

  it('removes every line of the VM\'s tag, keeps every other line and the file mode, appends the new line', () => {
    const file = join(dir, 'authorized_keys');
    const operatorKey = 'ssh-ed25519 AAAAoperator operator@cluster';
    const otherVm = `restrict ssh-ed25519 AAAAother ${directTag('env-a', 'vm1-x')}aaaaaaaaaaaa`;
    writeFileSync(file, `${operatorKey}\nrestrict ssh-ed25519 AAAAstale ${tag}111111111111\n${otherVm}\n`);
    chmodSync(file, 0o600);
    const line = `restrict,from="10.0.0.1" ssh-ed25519 AAAAnew ${tag}222222222222`;
    expect(run(file, tag, line).status).toBe(0);
    expect(readFileSync(file, 'utf8')).toBe(`${operatorKey}\n${otherVm}\n${line}\n`);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    // revocation: the tag's lines go, nothing is added
    expect(run(file, tag, '').status).toBe(0);
    expect(readFileSync(file, 'utf8')).toBe(`${operatorKey}\n${otherVm}\n`);
    // no temporary file left next to it (the lock file stays, empty)
    expect(execFileSync('ls', ['-A', dir]).toString().split('\n').filter((f) => f.startsWith('authorized_keys.vmops-') && f !== 'authorized_keys.vmops-lock')).toEqual([]);
  });

  it('refuses a file that does not exist instead of creating one', () => {
    const r = run(join(dir, 'nope'), tag, 'x');
    expect(r.status).toBe(3);
    expect(r.stderr.toString()).toMatch(/does not exist/);
  });

  it('tags only safe names, and one VM\'s tag is never a prefix match of another\'s', () => {
    expect(directTag('env-a', 'vm1')).toBe('vmops-direct:env-a/vm1:');
    expect(`vmops-direct:env-a/vm1.x:`.includes(directTag('env-a', 'vm1'))).toBe(false);
    expect(() => directTag('env a', 'vm1')).toThrow(/not a valid name/);
  });
});
