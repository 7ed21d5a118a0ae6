/**
 * Direct mode: the source host streams to the target host itself, so the operator no longer carries
 * every byte twice, without giving the hosts lasting trust in each other:
 *
 *   - the source makes a key pair for this one copy (ssh-keygen, in a 0700 directory of its own);
 *     the private key never leaves it, the operator reads only the public key;
 *   - the operator authorizes that key on the target for this copy only: `restrict` (no shell, no
 *     pty, no forwarding), `from=` the source's inventory address, `expiry-time=` an hour ahead,
 *     and a forced command that can only run the relay's WRITER into this one `.partial` file (the
 *     program and the path are hex inside the command: no quoting to get wrong);
 *   - the source connects with `-b` its own address and the target's pinned host key only;
 *   - when the copy ends (or fails), the line is removed from the target and the key directory
 *     from the source. Lines of an operator that died mid-copy carry the VM's tag and are removed
 *     before the next direct copy of that VM, and expire on their own in any case.
 *
 * The operator still verifies every segment: it hashes the segment's extents on the source file
 * and on the target's partial file and compares (relay.ts).
 */
import { randomBytes } from 'node:crypto';
import { assertSafeName, assertSafePath, type HostSpec } from '../api/inventory.js';
import type { HostConnection } from '../hosts/ssh.js';
import { WRITER } from './scripts.js';

/**
 * sh: $1 = authorized_keys file (empty: ~/.ssh/authorized_keys), $2 = tag to remove, $3 = line to
 * add (empty: none). Under an flock, rewrites the file without the tag's lines (plus the new line)
 * and renames it into place, so the operator's own key line is never lost to a half-written file.
 */
export const AUTHORIZE_SH = [
  'f=${1:-$HOME/.ssh/authorized_keys}',
  '[ -f "$f" ] || { echo "authorized keys file $f does not exist" >&2; exit 3; }',
  'exec 9>>"$f.vmops-lock" && flock -w 30 9 || { echo "cannot lock $f.vmops-lock" >&2; exit 3; }',
  'tmp=$(mktemp "$f.vmops-XXXXXX") || exit 3',
  'grep -v -F -e " $2" -- "$f" > "$tmp"; rc=$?',
  '[ "$rc" -le 1 ] || { rm -f "$tmp"; exit 3; }',
  'if [ -n "$3" ]; then printf "%s\\n" "$3" >> "$tmp" || { rm -f "$tmp"; exit 3; }; fi',
  'chmod --reference="$f" "$tmp" && mv -f -- "$tmp" "$f" || { rm -f "$tmp"; exit 3; }',
].join('\n');

/**
 * sh: $1 = key directory prefix (/tmp/vmops-direct+<env>+<vm>+), $2 = known_hosts line of the target,
 * $3 = key comment. Removes key directories an earlier copy of this VM left behind, makes a fresh
 * one with an ed25519 key pair and the target's pinned host key; prints the directory, then the public key.
 */
export const KEYGEN_SH = [
  'umask 077',
  'for d in "$1"*; do [ -d "$d" ] && rm -rf -- "$d"; done',
  'd=$(mktemp -d "$1XXXXXX") || exit 3',
  'ssh-keygen -q -t ed25519 -N "" -C "$3" -f "$d/key" </dev/null >/dev/null || { rm -rf -- "$d"; exit 3; }',
  'printf "%s\\n" "$2" > "$d/known_hosts" || exit 3',
  'echo "$d"',
  'cat "$d/key.pub"',
].join('\n');

/**
 * sh: the source's half of a direct copy. $1 READER, $2 source file, $3 key directory, $4 source
 * address, $5 target port, $6 target user, $7 target address, $8 bytes/s (0 = unlimited), $9 THROTTLE.
 * stdin: the READER's ops; stdout: the target WRITER's "E <seg>" / "END" lines, through ssh.
 */
export const DIRECT_STREAM_SH = [
  // a function's $1.. are its own arguments: the ssh command line is built from named copies
  'key=$3 from=$4 port=$5 user=$6 to=$7',
  's() { ssh -F /dev/null -T -i "$key/key" -o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes \\',
  '  -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$key/known_hosts" -o GlobalKnownHostsFile=/dev/null -o ControlMaster=no \\',
  '  -o ConnectTimeout=15 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \\',
  '  -o Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com \\',
  '  -b "$from" -p "$port" -l "$user" -- "$to" vmops-direct-write; }',
  // no throttle, no extra pipe stage: one copy less per byte
  'if [ "$8" -gt 0 ]; then perl -e "$1" f "$2" | perl -e "$9" "$8" | s; else perl -e "$1" f "$2" | s; fi',
].join('\n');

/**
 * perl: copies stdin to stdout at no more than $ARGV[0] bytes per second. perl-base only (Time::HiRes
 * is not in it): POSIX::times's wall clock in clock ticks, select() for fractional sleeps.
 */
export const THROTTLE = String.raw`
use strict; use warnings; use POSIX ();
my $rate = shift; binmode STDIN; binmode STDOUT;
my $tck = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;
sub now { (POSIX::times())[0] / $tck }
my ($t0, $sent) = (now(), 0);
while (1) {
  my $n = sysread(STDIN, my $buf, 262144);
  die "read: $!\n" unless defined $n;
  last if $n == 0;
  my $w = 0;
  while ($w < $n) { my $r = syswrite(STDOUT, $buf, $n - $w, $w); die "write: $!\n" unless defined $r; $w += $r }
  $sent += $n;
  my $ahead = $sent / $rate - (now() - $t0);
  select(undef, undef, undef, $ahead) if $ahead > 0;
}
`;

/** How long an authorization stays valid even if nobody removes it. */
const AUTHORIZATION_LIFETIME_MS = 60 * 60_000;

/** The tag every authorized_keys line of this VM's direct copies carries (its removal key). */
export function directTag(environment: string, vm: string): string {
  assertSafeName('environment', environment);
  assertSafeName('VM', vm);
  return `${DIRECT_TAG_PREFIX}${environment}/${vm}:`;
}

/** `[address]:port` as known_hosts and sshd write it (plain address for port 22). */
function knownHostsName(host: HostSpec): string {
  return host.port === 22 ? host.address : `[${host.address}]:${host.port}`;
}

/** OpenSSH's expiry-time, UTC. */
function expiryTime(atMs: number): string {
  return `${new Date(atMs).toISOString().replace(/[-:T]/g, '').slice(0, 12)}Z`;
}

/** The forced command: WRITER into `partial`, both as hex (only [0-9a-f] inside the quotes). */
export function forcedWriterCommand(partial: string): string {
  assertSafePath('target path', partial);
  const program = `@ARGV = (pack(q(H*), q(${Buffer.from(partial).toString('hex')})));\n${WRITER}`;
  return `perl -e 'eval pack(q(H*), q(${Buffer.from(program).toString('hex')})); if ($@) { print STDERR $@; exit 1 }'`;
}

export interface DirectChannel {
  /** argv for the source host: stream the ops' segments of `sourcePath` straight into the target's partial file */
  streamArgv(reader: string, sourcePath: string): string[];
  /**
   * removes the authorization from the target and the key directory from the source, through the
   * connections given (a retry may have replaced the ones the channel was opened with)
   */
  close(source: HostConnection, target: HostConnection): Promise<void>;
}

export interface DirectOptions {
  source: HostConnection;
  target: HostConnection;
  environment: string;
  vm: string;
  /** the target file being written: the forced command writes `<targetPath>.partial` only */
  partial: string;
  /** bytes per second on the wire (0/undefined = unlimited) */
  bytesPerSec?: number;
}

/** Removes every authorization of this VM's direct copies from the target's authorized_keys. */
export async function revokeDirect(target: HostConnection, environment: string, vm: string): Promise<void> {
  await target.execOk(['sh', '-c', AUTHORIZE_SH, 'vmops-authorize', target.host.authorizedKeysFile ?? '', directTag(environment, vm), '']);
}

/** The tag's prefix that every direct copy's authorized_keys line carries, whatever its VM. */
export const DIRECT_TAG_PREFIX = 'vmops-direct:';

/**
 * Removes what direct copies of any VM left on a host — authorized_keys lines tagged vmops-direct and
 * key directories /tmp/vmops-direct+… — as an operator does when it starts leading, before any copy:
 * one killed mid-copy leaves both, and that VM's next direct copy may be far away or never come.
 */
export async function sweepDirect(conn: HostConnection): Promise<void> {
  const r = await conn.exec(['sh', '-c', AUTHORIZE_SH, 'vmops-authorize', conn.host.authorizedKeysFile ?? '', DIRECT_TAG_PREFIX, ''], { timeoutMs: 60_000 });
  // no authorized_keys file: no direct copy ever authorized anything there
  if (r.code !== 0 && !/does not exist/.test(r.stderr)) throw new Error(`on ${conn.host.name}: removing direct-copy authorizations failed (${r.code}): ${r.stderr.trim().slice(0, 300)}`);
  await conn.execOk(['sh', '-c', 'for d in /tmp/vmops-direct+*; do [ -d "$d" ] && rm -rf -- "$d"; done; exit 0'], { timeoutMs: 60_000 });
}

/** Sets up one file's direct copy: a fresh key on the source, authorized on the target for this file only. */
export async function openDirectChannel(o: DirectOptions): Promise<DirectChannel> {
  const src = o.source.host;
  const dst = o.target.host;
  const tag = directTag(o.environment, o.vm);
  const nonce = randomBytes(6).toString('hex');
  // "+" is in no inventory name: one VM's prefix never matches another's directories
  const keyPrefix = `/tmp/vmops-direct+${o.environment}+${o.vm}+`;
  const hostKey = dst.hostKey.trim().split(/\s+/).slice(0, 2).join(' ');
  const out = (await o.source.execOk(['sh', '-c', KEYGEN_SH, 'vmops-keygen', keyPrefix, `${knownHostsName(dst)} ${hostKey}`, `${tag}${nonce}`])).toString('utf8').split('\n');
  const keyDir = out[0]?.trim() ?? '';
  const pub = /^(ssh-ed25519 [A-Za-z0-9+/]+={0,2})(?: |$)/.exec(out[1]?.trim() ?? '')?.[1];
  // exactly what mktemp made: the key directory is later removed with rm -rf
  if (!(keyDir.startsWith(keyPrefix) && /^[A-Za-z0-9]{6,}$/.test(keyDir.slice(keyPrefix.length))) || !pub) throw new Error(`on ${src.name}: could not make a key pair for the direct copy (ssh-keygen output not understood)`);
  const removeKey = async (source: HostConnection): Promise<void> => {
    await source.execOk(['rm', '-rf', '--', keyDir]);
  };
  try {
    const line = `restrict,from="${src.address}",expiry-time="${expiryTime(Date.now() + AUTHORIZATION_LIFETIME_MS)}",command="${forcedWriterCommand(o.partial)}" ${pub} ${tag}${nonce}`;
    // the VM's older lines (an operator that died mid-copy) go in the same rewrite
    await o.target.execOk(['sh', '-c', AUTHORIZE_SH, 'vmops-authorize', dst.authorizedKeysFile ?? '', tag, line]);
  } catch (err) {
    await removeKey(o.source).catch(() => undefined);
    throw err;
  }
  return {
    streamArgv: (reader, sourcePath) => {
      assertSafePath('source path', sourcePath);
      return ['sh', '-c', DIRECT_STREAM_SH, 'vmops-direct', reader, sourcePath, keyDir, src.address, String(dst.port), dst.user, dst.address, String(Math.max(0, Math.floor(o.bytesPerSec ?? 0))), THROTTLE];
    },
    async close(source, target) {
      await Promise.all([revokeDirect(target, o.environment, o.vm), removeKey(source)]);
    },
  };
}
