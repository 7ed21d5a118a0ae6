/**
 * Operations on one hypervisor host: QEMU VM lifecycle and the file operations the migration needs.
 * Every path is validated before it reaches a remote command line; process identity is always
 * re-checked through /proc/<pid>/cmdline so a recycled pid is never mistaken for (or killed as) our VM.
 */
import { assertSafePath, qemuName, vmDirectory, type HostSpec, type VMSpec } from '../api/inventory.js';
import { TIMEOUTS } from '../api/types.js';
import { log as rootLog, type Logger } from '../util/log.js';
import { sleep } from '../util/sleep.js';
import { buildQemuArgv, definitionDrift, resolveHostQemu } from './qemuArgv.js';
import { resumeSource } from './qmpRunState.js';
import { QmpClient } from './qmp.js';
import type { HostConnection } from './ssh.js';

export type VmState = 'absent' | 'stopped' | 'running' | 'paused' | 'other';

export interface VmStatus {
  state: VmState;
  /** QEMU RunState from query-status (running, paused, shutdown, postmigrate, ...) */
  qmpStatus?: string;
  pid?: number;
}

export interface VmFileInfo {
  name: string;
  size: number;
}

/**
 * The one /proc liveness rule, as a shell function for the host scripts: `alive PID` succeeds while
 * the process exists and is not a zombie (a zombie cannot touch the disks any more); sets $st.
 */
export const PROC_ALIVE_FN = "alive() { st=$(sed 's/.*) //' \"/proc/$1/stat\" 2>/dev/null | cut -d' ' -f1); [ -n \"$st\" ] && [ \"$st\" != Z ] && [ \"$st\" != X ]; }";

/**
 * Ends a qemu-nbd started by us: pid from its pidfile, identity checked through /proc/<pid>/cmdline
 * (must be qemu-nbd serving that socket), SIGTERM (qemu-nbd flushes and exits), SIGKILL after 10 s.
 */
export const NBD_STOP_FN = [
  PROC_ALIVE_FN,
  'nbd_stop() {',
  '  pid=$(tr -dc 0-9 < "$1" 2>/dev/null || true)',
  '  [ -n "$pid" ] || return 0',
  '  tr "\\0" "\\n" < "/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$2" || return 0',
  '  kill -TERM "$pid" 2>/dev/null || return 0',
  '  i=0',
  '  while alive "$pid"; do',
  '    i=$((i+1)); if [ $i -gt 200 ]; then kill -KILL "$pid"; return 3; fi',
  '    sleep 0.05',
  '  done',
  '  rm -f -- "$1"',
  '}',
].join('\n');
/**
 * Leftovers of a mirror or live migration whose operator died: every qemu-nbd with a pidfile in the
 * VM directory (identity checked, see NBD_STOP_FN) is stopped, its socket and pidfile and the live
 * migration's sockets and verification temp files removed. Relay `.partial` files stay: a cold copy
 * resumes from them.
 */
const CLEAR_EXPORTS_SCRIPT = [
  NBD_STOP_FN,
  '[ -d "$1" ] || exit 0',
  'for p in "$1"/*.nbd.pid; do',
  '  [ -e "$p" ] || continue',
  '  nbd_stop "$p" "--socket=${p%.nbd.pid}.nbd.sock" || exit $?',
  '  rm -f -- "$p" "${p%.nbd.pid}.nbd.sock"',
  'done',
  // temp files of a guest-data verification whose SSH session died with the operator
  'rm -f -- "$1"/*.nbd.sock "$1/nbd.sock" "$1/migrate.sock" "$1"/*.verify.??????',
].join('\n');

/**
 * Fixed Perl script (perl-base is Essential on Debian), data only via @ARGV (VM directory, QEMU -name,
 * "/<environment>/<vm>/"). Liveness never rests on the pidfile: every process in /proc is examined,
 * and a QEMU belongs to the VM if an argument or its working directory points into the VM directory,
 * or if its -name matches and it does not run from the same VM's directory under another vmDir. Prints "absent", "stopped",
 * "pid <n> <state>" followed by the NUL-separated cmdline, or "unsure <reason>" whenever the scan
 * cannot be trusted (no procfs, hidepid hiding other users' processes, a cmdline that cannot be
 * read, more than one QEMU for the VM): fencing fails closed. A zombie counts as gone: it cannot touch the disks.
 */
export const PROBE_SCRIPT = String.raw`
use strict;
my ($dir, $name, $tail) = @ARGV;
sub unsure { print "unsure $_[0]\n"; exit 0; }
opendir(my $dh, '/proc') or unsure('cannot read /proc');
my @pids = grep { /^[0-9]+$/ } readdir($dh);
closedir($dh);
unsure('/proc is not a procfs (own process not listed)') unless grep { $_ == $$ } @pids;
if ($> != 0 && open(my $m, '<', '/proc/self/mountinfo')) {
  while (<$m>) { unsure('/proc is mounted with hidepid: processes of other users are invisible') if / - proc .*hidepid=(1|2|invisible|noaccess)/; }
}
my (@found, $unreadable);
for my $p (@pids) {
  next if $p == $$;
  my $c;
  if (open(my $f, '<', "/proc/$p/cmdline")) { local $/; $c = <$f>; close $f; }
  elsif (-e "/proc/$p") { $unreadable++; next; }
  next unless defined $c && length $c;
  my @a = split /\0/, $c;
  next unless $a[0] =~ m{(^|/)qemu-system[^/]*$};
  my ($inDir, $named, $elsewhere) = (0, 0, 0);
  for my $i (0 .. $#a) {
    $named = 1 if $a[$i] eq '-name' && defined $a[$i + 1] && (split /,/, $a[$i + 1])[0] eq $name;
    $inDir = 1 if index($a[$i], "$dir/") >= 0;
    $elsewhere = 1 if index($a[$i], $tail) >= 0 && index($a[$i], "$dir/") < 0;
  }
  my $cwd = readlink("/proc/$p/cwd");
  $inDir = 1 if defined $cwd && ($cwd eq $dir || index($cwd, "$dir/") == 0);
  # Same -name but running from this VM's directory of another inventory host on the same machine
  # (test world: hosts are loopback addresses of one machine): not a user of this directory's disks.
  next unless $inDir || ($named && !$elsewhere);
  open(my $s, '<', "/proc/$p/stat") or next;
  my $st = <$s>;
  close $s;
  $st =~ s/.*\) //;
  my $state = (split / /, $st)[0];
  next if $state eq 'Z' || $state eq 'X';
  push @found, [$p, $state, $c];
}
unsure("cannot read the command line of $unreadable process(es)") if $unreadable;
unsure(scalar(@found) . ' QEMU processes for this VM (pids ' . join(' ', map { $_->[0] } @found) . ')') if @found > 1;
if (@found == 1) { print "pid $found[0][0] $found[0][1]\n$found[0][2]"; exit 0; }
print -d $dir ? "stopped\n" : "absent\n";
`;

/**
 * The source lock: a file in the VM directory that a move creates (O_EXCL, via noclobber) before its
 * first side effect and that stays until the move finished (the directory goes with cleanup), rolled
 * back (the rollback's own start is the holder's) or an administrator cleared it. While it exists the
 * operator starts or resumes that copy for nobody but the holding migration: a retry of another
 * migration or a second replica cannot bring up the stale copy. QEMU started by hand ignores it:
 * the file is what tells a human (README, "The source lock").
 * Prints "absent" (no VM directory), "locked" (created now) or the existing lock's content.
 */
export const SOURCE_LOCK_FILE = 'migration.lock';
/**
 * The lock is written whole to a temporary file and linked into place (a hard link is exclusive, like
 * O_EXCL): a disk that fills up mid-write leaves no half-written lock, which nobody could read — not
 * the move, not `unlock-source` — and which would block the VM for good.
 */
export const LOCK_SCRIPT = [
  '[ -d "$1" ] || { echo absent; exit 0; }',
  'tmp="$1/.migration.lock.$$"',
  `if printf '%s\\n' "$2" > "$tmp" 2>/dev/null && ln -- "$tmp" "$1/${SOURCE_LOCK_FILE}" 2>/dev/null; then rm -f -- "$tmp"; echo locked; exit 0; fi`,
  'rm -f -- "$tmp"',
  `[ -e "$1/${SOURCE_LOCK_FILE}" ] || { echo "cannot write $1/${SOURCE_LOCK_FILE} (disk full?)" >&2; exit 4; }`,
  `cat -- "$1/${SOURCE_LOCK_FILE}"`,
].join('\n');

/**
 * "The guest may have run from this directory": written by a move's `start` step on the target right
 * before its QEMU boots or resumes the guest, and never removed but with the directory. From then on
 * this copy may hold writes no other copy has (DESIGN rule 2), whatever a journal says — a database
 * restored from an older backup has no record of that start. A copy (relay, direct, mirror, live
 * incoming) onto a directory that carries it is refused, and so is removing it as a stale target.
 */
export const RAN_MARKER_FILE = 'guest-ran-here';
/** Prints "ran" (the marker is there: nothing happens), else creates the directory and prints "ok". */
const COPY_TARGET_SCRIPT = `[ -e "$1/${RAN_MARKER_FILE}" ] && { echo ran; exit 0; }
mkdir -p -- "$1" && echo ok`;

/**
 * What a host must offer to run a VM as the inventory defines it. $1 QEMU binary, $2 machine type,
 * $3 accelerator, $4 CPU model (empty: QEMU's default), then the VM's bridges. Prints "version <QEMU's
 * version line>" and one line per thing missing: "qemu", "machine", "kvm", "cpu", "bridge <name>",
 * "bridge-acl <name>" (QEMU's bridge helper reads its ACL from /etc/qemu: `allow <bridge>` or `allow all`).
 */
const READINESS_SCRIPT = [
  'b=$1; m=$2; a=$3; c=$4; shift 4',
  'if ! command -v "$b" >/dev/null 2>&1; then echo qemu; exit 0; fi',
  'echo "version $("$b" --version 2>/dev/null | head -n 1)"',
  '"$b" -machine help 2>/dev/null | awk \'NR > 1 {print $1}\' | grep -qxF -- "$m" || echo machine',
  'if [ "$a" = kvm ] && ! [ -w /dev/kvm ]; then echo kvm; fi',
  'if [ -n "$c" ]; then "$b" -cpu help 2>/dev/null | awk \'{print $2}\' | grep -qxF -- "${c%%,*}" || echo cpu; fi',
  'for br in "$@"; do',
  '  [ -d "/sys/class/net/$br/bridge" ] || echo "bridge $br"',
  '  cat /etc/qemu/*.conf 2>/dev/null | awk -v br="$br" \'$1 == "allow" && ($2 == br || $2 == "all") {ok = 1} END {exit !ok}\' || echo "bridge-acl $br"',
  'done',
].join('\n');

/** What Hypervisor.readiness found: the host's QEMU (version line, machine type, accelerator) and what it lacks for a VM. */
export interface HostReadiness {
  version?: string;
  machine: string;
  accel: string;
  missing: string[];
}

/** Who holds a VM's source copy (see SOURCE_LOCK_FILE); no secrets, shown to administrators as is. */
export interface SourceLock {
  /** the holding VMMigration's uid */
  uid: string;
  /** its namespace/name, when known */
  migration?: string;
  /** the host the move takes the VM to */
  target: string;
  since: string;
}

function parseLock(text: string): SourceLock {
  try {
    const v = JSON.parse(text) as Partial<SourceLock>;
    if (typeof v.uid === 'string' && typeof v.target === 'string') return { uid: v.uid, target: v.target, since: String(v.since ?? '?'), ...(typeof v.migration === 'string' ? { migration: v.migration } : {}) };
  } catch {
    // fall through: an unreadable lock is still a lock (fail closed)
  }
  return { uid: '(unreadable lock file)', target: '?', since: '?' };
}

/** PROC_ALIVE_FN for a known pid: exit 0 = still alive. */
const ALIVE_SCRIPT = `${PROC_ALIVE_FN}\nalive "$1"`;

export class Hypervisor {
  private readonly log: Logger;

  constructor(
    readonly host: HostSpec,
    readonly conn: HostConnection,
    /** the caller's logger: a move passes one carrying migration, environment and VM */
    log: Logger = rootLog,
  ) {
    this.log = log.child({ component: 'hypervisor', host: host.name });
  }

  /** The same host and connection, logging with the given (e.g. per-move) logger. */
  withLogger(log: Logger): Hypervisor {
    return new Hypervisor(this.host, this.conn, log);
  }

  vmDir(environment: string, vm: VMSpec): string {
    return vmDirectory(this.host, environment, vm.name);
  }

  /**
   * Finds the live QEMU of this VM, if any, by scanning /proc (see PROBE_SCRIPT). "Stopped" also
   * requires that nothing answers on the VM's QMP socket: a QEMU in another PID namespace is
   * invisible in this /proc but still holds the disks. Anything unsure throws: fencing fails closed.
   */
  /**
   * How the VM's live QEMU differs, in what its guest sees, from the VM as the inventory defines it
   * (what the operator would start on the target); undefined when no QEMU of it runs here. Read from
   * the process's own command line, so a VM the cloud started with its own tooling is judged too.
   */
  async definitionDrift(environment: string, vm: VMSpec): Promise<{ extra: string[]; missing: string[] } | undefined> {
    const p = await this.probe(environment, vm);
    if (p.state !== 'alive') return undefined;
    return definitionDrift(p.argv, buildQemuArgv(this.vmDir(environment, vm), environment, vm, { qemu: this.host.qemu }));
  }

  private async probe(environment: string, vm: VMSpec): Promise<{ state: 'absent' | 'stopped' } | { state: 'alive'; pid: number; argv: string[] }> {
    const dir = this.vmDir(environment, vm);
    const name = qemuName(environment, vm.name);
    const unsure = (why: string) => new Error(`on ${this.host.name}: cannot prove that VM ${name} is stopped: ${why}; refusing to act on it`);
    const out = await this.conn.execOk(['perl', '-e', PROBE_SCRIPT, dir, name, `/${environment}/${vm.name}/`]);
    const nl = out.indexOf(0x0a);
    const head = out.subarray(0, nl < 0 ? out.length : nl).toString('utf8').trim();
    if (head.startsWith('unsure ')) throw unsure(head.slice('unsure '.length));
    if (head === 'absent') return { state: 'absent' };
    if (head === 'stopped') {
      if (await this.qmpSocketAnswers(`${dir}/qmp.sock`)) throw unsure('its QMP socket answers but no QEMU process for it is visible');
      return { state: 'stopped' };
    }
    const m = /^pid (\d+) \S+$/.exec(head);
    if (!m || nl < 0) throw new Error(`on ${this.host.name}: unexpected probe output ${JSON.stringify(head.slice(0, 80))}`);
    const argv = out
      .subarray(nl + 1)
      .toString('utf8')
      .split('\0')
      .filter((a) => a.length > 0);
    // The script matched by -name or by a path in the VM directory; either way this QEMU holds (or may hold) the VM's disks.
    if (!(argv[0]?.split('/').pop() ?? '').startsWith('qemu-system')) throw unsure(`probe matched a non-QEMU process (pid ${m[1]})`);
    return { state: 'alive', pid: Number(m[1]), argv };
  }

  /**
   * True if something accepts connections on the socket. sshd answers "open failed" when the connect
   * itself fails (no file, a stale socket nobody listens on); any other failure (connection lost,
   * forwarding prohibited) means the question was not answered, which is not a "no".
   */
  private async qmpSocketAnswers(path: string): Promise<boolean> {
    try {
      const ch = await this.conn.openUnixSocket(path);
      ch.destroy();
      return true;
    } catch (err) {
      if (/Channel open failure: open failed/.test((err as Error).message)) return false;
      throw new Error(`on ${this.host.name}: cannot check the QMP socket ${path}: ${(err as Error).message}`);
    }
  }

  /** Polls until nothing accepts connections on the socket (true) or the time is up (false). */
  private async waitQmpSocketClosed(path: string, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (await this.qmpSocketAnswers(path)) {
      if (Date.now() >= deadline) return false;
      await sleep(50);
    }
    return true;
  }

  private async isPidAlive(pid: number): Promise<boolean> {
    const r = await this.conn.exec(['sh', '-c', ALIVE_SCRIPT, 'alive', String(pid)]);
    return r.code === 0;
  }

  private async openQmp(environment: string, vm: VMSpec, timeoutMs = 10_000): Promise<QmpClient> {
    const sock = await this.conn.openUnixSocket(`${this.vmDir(environment, vm)}/qmp.sock`);
    return QmpClient.open(sock, { timeoutMs });
  }

  private static mapRunState(status: string): VmState {
    if (status === 'running') return 'running';
    if (status === 'paused') return 'paused';
    return 'other';
  }

  async vmStatus(environment: string, vm: VMSpec): Promise<VmStatus> {
    const p = await this.probe(environment, vm);
    if (p.state !== 'alive') return { state: p.state };
    let qmp: QmpClient | undefined;
    try {
      qmp = await this.openQmp(environment, vm);
      const st = await qmp.execute<{ status: string; running: boolean }>('query-status', undefined, { timeoutMs: 10_000 });
      return { state: Hypervisor.mapRunState(st.status), qmpStatus: st.status, pid: p.pid };
    } catch (err) {
      // QEMU's monitor serves one client at a time; a busy or wedged monitor must not be reported as "stopped".
      this.log.warn({ environment, vm: vm.name, err: (err as Error).message }, 'QEMU alive but QMP unreachable');
      return { state: 'other', pid: p.pid };
    } finally {
      qmp?.close();
    }
  }

  /** The VM directory's source lock, if one is there. */
  async sourceLock(environment: string, vm: VMSpec): Promise<SourceLock | undefined> {
    const file = `${this.vmDir(environment, vm)}/${SOURCE_LOCK_FILE}`;
    const r = await this.conn.exec(['cat', '--', file]);
    if (r.code === 0) return parseLock(r.stdout.toString('utf8'));
    if (/No such file or directory/.test(r.stderr.toString())) return undefined;
    throw new Error(`on ${this.host.name}: cannot read ${file} (${r.code}): ${r.stderr.toString().trim()}`);
  }

  /**
   * Takes the source lock for a move (idempotent for its holder). Refused when another migration
   * holds it. "absent": the VM directory is gone (cleaned up after a verified move), nothing to hold.
   */
  async lockSource(environment: string, vm: VMSpec, holder: Omit<SourceLock, 'since'>): Promise<'locked' | 'held' | 'absent'> {
    const dir = this.vmDir(environment, vm);
    const content = JSON.stringify({ ...holder, since: new Date().toISOString() });
    const out = (await this.conn.execOk(['sh', '-c', LOCK_SCRIPT, 'lock-source', dir, content])).toString('utf8').trim();
    if (out === 'absent' || out === 'locked') return out;
    const lock = parseLock(out);
    if (lock.uid === holder.uid) return 'held';
    throw new Error(this.lockedMessage(environment, vm, lock));
  }

  /** Removes the source lock if `uid` holds it; another holder's lock stays (and is reported). */
  async unlockSource(environment: string, vm: VMSpec, uid: string): Promise<void> {
    const lock = await this.sourceLock(environment, vm);
    if (!lock) return;
    if (lock.uid !== uid) throw new Error(this.lockedMessage(environment, vm, lock));
    await this.conn.execOk(['rm', '-f', '--', `${this.vmDir(environment, vm)}/${SOURCE_LOCK_FILE}`]);
  }

  private lockedMessage(environment: string, vm: VMSpec, lock: SourceLock): string {
    return `VM ${qemuName(environment, vm.name)} on ${this.host.name} is locked by migration ${lock.migration ? `${lock.migration} (uid ${lock.uid})` : lock.uid}, moving it to ${lock.target} since ${lock.since} (${this.vmDir(environment, vm)}/${SOURCE_LOCK_FILE}); this copy may be stale. If that move is over, clear it with \`vm-migration-operator unlock-source ${lock.uid} ${environment}/${vm.name}\``;
  }

  /** Refuses while a migration other than `holder` holds the VM's source lock. */
  private async assertNotLocked(environment: string, vm: VMSpec, holder: string | undefined): Promise<void> {
    const lock = await this.sourceLock(environment, vm);
    if (lock && lock.uid !== holder) throw new Error(this.lockedMessage(environment, vm, lock));
  }

  /** `lockHolder`: the migration whose source lock may be on this copy (its rollback starts it again). */
  async startVm(environment: string, vm: VMSpec, opts: { startTimeoutMs?: number; lockHolder?: string } = {}): Promise<VmStatus> {
    const dir = this.vmDir(environment, vm);
    const p = await this.probe(environment, vm);
    if (p.state === 'alive') throw new Error(`VM ${qemuName(environment, vm.name)} already has a live QEMU (pid ${p.pid}) on ${this.host.name}`);
    if (p.state === 'absent') throw new Error(`VM directory ${dir} does not exist on ${this.host.name}`);
    await this.assertNotLocked(environment, vm, opts.lockHolder);
    const argv = buildQemuArgv(dir, environment, vm, { qemu: this.host.qemu });
    const name = qemuName(environment, vm.name);
    const t0 = Date.now();
    // -daemonize returns once QEMU has initialised (or failed), so a bad disk is reported here with QEMU's message.
    try {
      await this.conn.execOk(argv, { timeoutMs: 60_000 });
    } catch (err) {
      // A QEMU that failed after its QMP socket listened (e.g. a missing kernel) can still be exiting
      // when its parent returns: the next probe would find the socket answering and no process to
      // match, and refuse to act (fail closed). Return the failure once it has settled.
      await this.waitQmpSocketClosed(`${dir}/qmp.sock`, 5000).catch(() => undefined);
      throw err;
    }

    const deadline = t0 + (opts.startTimeoutMs ?? TIMEOUTS.vmStartMs);
    let lastErr = '';
    while (Date.now() < deadline) {
      const st = await this.vmStatus(environment, vm);
      if (st.state === 'running') {
        this.log.info({ environment, vm: vm.name, pid: st.pid, ms: Date.now() - t0 }, 'VM started');
        return st;
      }
      if (st.state === 'stopped') throw new Error(`QEMU for ${name} on ${this.host.name} exited right after start; see ${dir}/serial.log`);
      lastErr = st.qmpStatus ?? st.state;
      await sleep(100);
    }
    throw new Error(`VM ${name} on ${this.host.name} did not reach running (last: ${lastErr})`);
  }

  /** Polls until the pid is gone or the deadline passes; true = gone. */
  private async waitGone(pid: number, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (true) {
      if (!(await this.isPidAlive(pid))) return true;
      if (Date.now() >= deadline || signal?.aborted) return false;
      await sleep(100);
    }
  }

  /**
   * Stops the VM and returns only once its QEMU process is proven gone: the disks may be copied
   * and started elsewhere afterwards, so a survivor would mean two writers on one disk.
   */
  async stopVm(environment: string, vm: VMSpec, opts: { powerdownTimeoutMs: number; quitTimeoutMs?: number; signal?: AbortSignal }): Promise<'powerdown' | 'quit' | 'already-stopped'> {
    const p = await this.probe(environment, vm);
    if (p.state !== 'alive') return 'already-stopped';
    const pid = p.pid;
    const ctx = { environment, vm: vm.name, pid };

    let qmp: QmpClient | undefined;
    try {
      qmp = await this.openQmp(environment, vm);
      await qmp.execute('system_powerdown');
    } catch (err) {
      this.log.warn({ ...ctx, err: (err as Error).message }, 'system_powerdown failed; will quit');
    }
    try {
      if (await this.waitGone(pid, opts.powerdownTimeoutMs, opts.signal)) return 'powerdown';
      // leadership lost (or cancelled) during the guest's shutdown: no quit from a replica that may no
      // longer act — the next leader finds the VM running or stopped and stops it itself
      opts.signal?.throwIfAborted();

      try {
        if (!qmp || qmp.isClosed) {
          qmp?.close();
          qmp = await this.openQmp(environment, vm);
        }
        // QEMU may exit before the reply arrives; the process check below is the truth.
        await qmp.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => undefined);
      } catch (err) {
        this.log.warn({ ...ctx, err: (err as Error).message }, 'QMP quit failed; will kill');
      }
      if (await this.waitGone(pid, opts.quitTimeoutMs ?? TIMEOUTS.vmQuitMs)) return 'quit';

      // Last resort; re-check identity first so a recycled pid is never killed.
      const again = await this.probe(environment, vm);
      if (again.state === 'alive' && again.pid === pid) {
        this.log.warn(ctx, 'QEMU ignored quit; sending SIGKILL');
        await this.conn.exec(['kill', '-9', String(pid)]);
      }
      if (await this.waitGone(pid, 10_000)) return 'quit';
      throw new Error(`QEMU ${qemuName(environment, vm.name)} (pid ${pid}) on ${this.host.name} survived SIGKILL; host needs attention`);
    } finally {
      qmp?.close();
    }
  }

  /** The uid of the migration that recorded the guest may have run from this VM directory (RAN_MARKER_FILE), if one did. */
  async ranHere(environment: string, vm: VMSpec): Promise<string | undefined> {
    const file = `${this.vmDir(environment, vm)}/${RAN_MARKER_FILE}`;
    const r = await this.conn.exec(['cat', '--', file]);
    if (r.code === 0) return r.stdout.toString('utf8').trim().slice(0, 200) || '(empty marker)';
    if (/No such file or directory|Not a directory/.test(r.stderr.toString())) return undefined;
    throw new Error(`on ${this.host.name}: cannot read ${file} (${r.code}): ${r.stderr.toString().trim()}`);
  }

  /** Records, before the target runs the guest, that it may have (see RAN_MARKER_FILE); idempotent. */
  async markRanHere(environment: string, vm: VMSpec, migrationUid: string): Promise<void> {
    const dir = this.vmDir(environment, vm);
    assertSafePath('directory', dir);
    // written to a temporary name and renamed: a full disk leaves no half-written marker
    await this.conn.execOk(['sh', '-c', 'printf "%s\\n" "$2" > "$1/.ran.$$" && mv -f -- "$1/.ran.$$" "$1/$3"', 'mark-ran', dir, migrationUid, RAN_MARKER_FILE]);
  }

  /**
   * Creates a copy's target directory, refusing one the guest may have run from: a stale copy must
   * never be written over the newest one (RAN_MARKER_FILE).
   */
  async ensureCopyTarget(dir: string): Promise<void> {
    assertSafePath('directory', dir);
    const out = (await this.conn.execOk(['sh', '-c', COPY_TARGET_SCRIPT, 'copy-target', dir])).toString('utf8').trim();
    if (out === 'ran') throw new Error(`refusing to copy into ${dir} on ${this.host.name}: the guest may have run from it (${RAN_MARKER_FILE}); its disks may hold writes no other copy has`);
    if (out !== 'ok') throw new Error(`on ${this.host.name}: unexpected output preparing ${dir}: ${JSON.stringify(out.slice(0, 80))}`);
  }

  /**
   * Whether this host can run `vm` as the inventory defines it — its QEMU, machine type, accelerator,
   * CPU model, and each NIC's bridge (and the bridge helper's ACL for it) — asked before anything is
   * touched. Returns QEMU's version line and what is missing, in words for a condition.
   */
  async readiness(vm: VMSpec): Promise<HostReadiness> {
    const q = resolveHostQemu(this.host.qemu);
    const bridges = [...new Set((vm.nics ?? []).map((n) => n.bridge))];
    const out = (await this.conn.execOk(['sh', '-c', READINESS_SCRIPT, 'readiness', q.binary, q.machine, q.accel, vm.cpu?.model ?? '', ...bridges], { timeoutMs: 60_000, maxOutputBytes: 64 << 10 })).toString('utf8');
    let version: string | undefined;
    const missing: string[] = [];
    for (const line of out.split('\n').map((l) => l.trim()).filter(Boolean)) {
      if (line.startsWith('version ')) version = line.slice('version '.length);
      else if (line === 'qemu') missing.push(`no ${q.binary}`);
      else if (line === 'machine') missing.push(`QEMU has no machine type ${q.machine}`);
      else if (line === 'kvm') missing.push('no usable /dev/kvm (accel kvm)');
      else if (line === 'cpu') missing.push(`QEMU has no CPU model ${vm.cpu?.model.split(',')[0] ?? ''}`);
      else if (line.startsWith('bridge-acl ')) missing.push(`QEMU's bridge helper may not use bridge ${line.slice('bridge-acl '.length)} (no "allow ${line.slice('bridge-acl '.length)}" in /etc/qemu/*.conf)`);
      else if (line.startsWith('bridge ')) missing.push(`no bridge ${line.slice('bridge '.length)}`);
    }
    return { ...(version ? { version } : {}), machine: q.machine, accel: q.accel, missing };
  }

  /** Regular files directly inside the VM directory (not only those in VMSpec.files: stale .partial files show up too). */
  async listVmFiles(environment: string, vm: VMSpec): Promise<VmFileInfo[]> {
    const dir = this.vmDir(environment, vm);
    const out = await this.conn.execOk(['find', dir, '-mindepth', '1', '-maxdepth', '1', '-type', 'f', '-printf', '%f\\t%s\\n']);
    return out
      .toString('utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const [name = '', size = '0'] = line.split('\t');
        return { name, size: Number(size) };
      })
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  async ensureDir(path: string): Promise<void> {
    assertSafePath('directory', path);
    await this.conn.execOk(['mkdir', '-p', '--', path]);
  }

  /**
   * Deletes a VM directory; refuses while a QEMU for the VM is alive (its disks are in use), and with
   * `staleCopy` (a target copy that never ran: a rollback, an interrupted copy) also when the guest
   * may have run from it (RAN_MARKER_FILE).
   */
  async removeVmDir(environment: string, vm: VMSpec, opts: { staleCopy?: boolean } = {}): Promise<void> {
    const dir = this.vmDir(environment, vm);
    const root = this.host.vmDir.replace(/\/+$/, '');
    if (!dir.startsWith(`${root}/`) || dir.split('/').length < root.split('/').length + 2) {
      throw new Error(`refusing to remove ${dir}: not a VM directory under ${root}`);
    }
    const p = await this.probe(environment, vm);
    if (p.state === 'absent') return;
    if (p.state === 'alive') throw new Error(`refusing to remove ${dir} on ${this.host.name}: QEMU pid ${p.pid} is alive`);
    if (opts.staleCopy && (await this.ranHere(environment, vm)) !== undefined) {
      throw new Error(`refusing to remove ${dir} on ${this.host.name} as a stale copy: the guest may have run from it (${RAN_MARKER_FILE})`);
    }
    await this.conn.execOk(['rm', '-rf', '--', dir]);
  }

  /**
   * Removes the temporary raw copies a guest-data verification makes beside the VM's disks
   * (<disk>.verify.XXXXXX), left on the source too when the operator died mid-comparison: each is as
   * large as the VM's data.
   */
  async sweepScratch(environment: string, vm: VMSpec): Promise<void> {
    const dir = this.vmDir(environment, vm);
    assertSafePath('directory', dir);
    await this.conn.execOk(['sh', '-c', '[ -d "$1" ] || exit 0; rm -f -- "$1"/*.verify.??????', 'sweep-scratch', dir]);
  }

  /** Stops qemu-nbd exports and removes migration sockets an interrupted move left in the VM directory. */
  async clearStaleExports(environment: string, vm: VMSpec): Promise<void> {
    const dir = this.vmDir(environment, vm);
    assertSafePath('directory', dir);
    const r = await this.conn.exec(['sh', '-c', CLEAR_EXPORTS_SCRIPT, 'clear-exports', dir]);
    if (r.code !== 0) throw new Error(`clearing stale exports in ${dir} on ${this.host.name} failed (${r.code}): ${r.stderr.toString().trim()}`);
  }

  /**
   * Runs a halted guest again (a rollback of a cutover): paused → cont; shut down by ACPI with the
   * shutdown action "pause" → system_reset + cont. Returns once QMP reports running.
   */
  async resumeVm(environment: string, vm: VMSpec, opts: { lockHolder?: string } = {}): Promise<void> {
    await this.assertNotLocked(environment, vm, opts.lockHolder);
    const qmp = await this.openQmp(environment, vm);
    try {
      await resumeSource(qmp);
      const s = (await qmp.execute<{ status: string }>('query-status')).status;
      if (s !== 'running') throw new Error(`VM ${qemuName(environment, vm.name)} is ${s} on ${this.host.name} after cont`);
    } finally {
      qmp.close();
    }
  }

  async exists(path: string): Promise<boolean> {
    assertSafePath('file', path);
    const r = await this.conn.exec(['test', '-e', path]);
    if (r.code === 0) return true;
    if (r.code === 1) return false;
    throw new Error(`on ${this.host.name}: test -e ${path} failed (${r.code}): ${r.stderr}`);
  }

  async removeFile(path: string): Promise<void> {
    assertSafePath('file', path);
    await this.conn.execOk(['rm', '-f', '--', path]);
  }
}
