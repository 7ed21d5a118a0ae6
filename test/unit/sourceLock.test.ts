/**
 * The source lock is written by a shell script on the host (src/hosts/hypervisor.ts LOCK_SCRIPT); run
 * here by the real `sh` on a real full filesystem (a tmpfs of 8 KiB, filled).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LOCK_SCRIPT, SOURCE_LOCK_FILE } from '../../src/hosts/hypervisor.js';

const holder = JSON.stringify({ uid: 'u1', target: 'host02', since: '2026-12-07T00:00:00Z', migration: `ns/${'m'.repeat(4000)}` });
const lock = (dir: string, content = holder) => spawnSync('sh', ['-c', LOCK_SCRIPT, 'lock-source', dir, content], { encoding: 'utf8' });

describe('the source lock script', () => {
  let full: string;
  beforeAll(() => {
    full = mkdtempSync(join(tmpdir(), 'vmops-lockfs-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8k', 'tmpfs', full]);
    mkdirSync(join(full, 'vm'));
    // fill it: the lock's 4 KiB no longer fit
    spawnSync('dd', ['if=/dev/zero', `of=${join(full, 'fill')}`, 'bs=1k', 'count=64'], { stdio: 'ignore' });
  });
  afterAll(() => {
    spawnSync('umount', [full]);
    rmSync(full, { recursive: true, force: true });
  });

  it('on a full disk it fails and leaves no lock (a half-written one would block the VM and unlock-source for good)', () => {
    const r = lock(join(full, 'vm'));
    expect(r.status).toBe(4);
    expect(r.stderr).toMatch(/cannot write .*migration\.lock \(disk full\?\)/);
    expect(readdirSync(join(full, 'vm'))).toEqual([]);
  });

  it('takes the lock once; a second taker reads the holder, whole', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmops-lock-'));
    try {
      expect(lock(dir).stdout.trim()).toBe('locked');
      const again = lock(dir, JSON.stringify({ uid: 'u2', target: 'host03', since: 'x' }));
      expect(JSON.parse(again.stdout)).toMatchObject({ uid: 'u1', target: 'host02' });
      expect(readdirSync(dir)).toEqual([SOURCE_LOCK_FILE]);
      expect(lock(join(dir, 'gone')).stdout.trim()).toBe('absent');
      writeFileSync(join(dir, 'x'), '');
      expect(existsSync(join(dir, SOURCE_LOCK_FILE))).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
