/**
 * The fixed Perl programs the relay runs on the hosts (perl-base is Essential on Debian, so every
 * hypervisor has it). Data never reaches a shell: file paths arrive as argv, extent lists on stdin.
 *
 * Frame format (reader "f" mode → writer): 17-byte header `type(1) a(u64 BE) b(u64 BE)`;
 * `D off len` is followed by len bytes of file data to write at off; `E seg 0` ends a segment
 * (the writer then reports "E <seg>" on stdout). Holes are never sent: the target file is created
 * with `truncate`, so every byte not written stays a hole.
 */

/** READER mode file < ops: mode f = framed stream, z = check that the D extents are all zero bytes (hashing is the HASHER's). */
export const READER = String.raw`
use strict; use warnings;
my ($mode, $path) = @ARGV;
binmode STDIN; binmode STDOUT;
my $in = do { local $/; <STDIN> } // '';
open(my $f, '<', $path) or die "open $path: $!\n"; binmode $f;
sub out { my $w = 0; while ($w < length $_[0]) { my $n = syswrite(STDOUT, $_[0], length($_[0]) - $w, $w); die "write: $!\n" unless defined $n; $w += $n } }
for my $op (split /\n/, $in) {
  my ($t, $o, $l) = split / /, $op;
  if ($t eq 'E') { out(pack('a1Q>Q>', 'E', $o, 0)) if $mode eq 'f'; next }
  die "bad op\n" unless $t eq 'D';
  out(pack('a1Q>Q>', 'D', $o, $l)) if $mode eq 'f';
  sysseek($f, $o, 0) or die "seek $path: $!\n";
  while ($l > 0) {
    my $n = sysread($f, my $buf, $l > 1048576 ? 1048576 : $l);
    die "read $path: $!\n" unless defined $n;
    die "$path: unexpected end of file at $o\n" if $n == 0;
    if ($mode eq 'z') { die "nonzero data at $o\n" if $buf =~ /[^\0]/ } elsif ($mode eq 'f') { out($buf) } else { die "bad mode\n" }
    $l -= $n; $o += $n;
  }
}
print "zero\n" if $mode eq 'z';
`;

/** WRITER partial < frames: writes D frames at their offsets, prints "E <seg>" after each segment, "END" at a clean end. */
export const WRITER = String.raw`
use strict; use warnings; use Fcntl;
my $path = shift;
sysopen(my $f, $path, O_RDWR) or die "open $path: $!\n"; binmode $f;
binmode STDIN; $| = 1;
sub rd { my $n = shift; my $b = ''; while (length($b) < $n) { my $r = sysread(STDIN, $b, $n - length($b), length($b)); die "read: $!\n" unless defined $r; if ($r == 0) { return undef if length($b) == 0; die "stream truncated\n" } } return $b }
while (defined(my $h = rd(17))) {
  my ($t, $o, $l) = unpack('a1Q>Q>', $h);
  if ($t eq 'E') { print "E $o\n"; next }
  die "bad frame\n" unless $t eq 'D';
  sysseek($f, $o, 0) or die "seek $path: $!\n";
  while ($l > 0) {
    my $d = rd($l > 1048576 ? 1048576 : $l);
    die "stream truncated\n" unless defined $d;
    my $w = 0;
    while ($w < length $d) { my $r = syswrite($f, $d, length($d) - $w, $w); die "write $path: $!\n" unless defined $r; $w += $r }
    $l -= length $d;
  }
}
close($f) or die "close $path: $!\n";
print "END\n";
`;

/** sh: probe a source file: "size mtime ctime inode", then "zstd=0|1" (its extents: MAP_SH, streamed). */
export const PROBE_SH = [
  'stat -L -c "%s %.9Y %.9Z %i" "$1" || exit 3',
  'if command -v zstd >/dev/null 2>&1; then echo zstd=1; else echo zstd=0; fi',
].join('\n');

/** sh: $1 file: its qemu-img extent map, one JSON entry per line (or NOMAP without a working qemu-img). */
export const MAP_SH = 'qemu-img map -U -f raw --output=json "$1" 2>/dev/null || echo NOMAP';

/** sh: $1 partial, $2 size, $3 fresh(1|0): (re)creates the sparse partial file; prints "new" or "kept". */
export const PREPARE_SH = [
  'if [ "$3" = 1 ] || [ ! -f "$1" ]; then rm -f "$1" && truncate -s "$2" "$1" && echo new; else truncate -s "$2" "$1" && echo kept; fi',
  'if command -v zstd >/dev/null 2>&1; then echo zstd=1; else echo zstd=0; fi',
].join('\n');


/**
 * HASHER file sync(0|1) cmd…, stdin = segment requests (`D off len` lines, then `E seg`): for each
 * request prints `H <seg> <sha256>`, the digest `cmd` (openssl dgst -sha256 -r, or sha256sum -b)
 * computed over the requested extents' bytes — only once every byte was read and hashed. One process serves a whole copy attempt, so a segment's check
 * costs no SSH channel, shell or Perl start. With sync=1 the file's dirty pages are written back
 * (fdatasync, in a child beside the hashing) before the result is printed: on the target this runs
 * while later segments still stream, so the commit's final sync finds little left instead of the
 * whole file (with this much RAM the kernel's background writeback would start only after the
 * copy). A failed write-back or hash ends the process, and the segments it had not answered are
 * resent.
 */
export const HASHER = String.raw`
use strict; use warnings; use IO::Handle; use POSIX ();
my ($path, $sync, @cmd) = @ARGV;
open(my $f, '<', $path) or die "open $path: $!\n"; binmode $f;
binmode STDIN; STDOUT->autoflush(1);
my @ext;
while (my $line = <STDIN>) {
  chomp $line;
  my ($t, $a, $b) = split / /, $line;
  if ($t eq 'D') { push @ext, [$a, $b]; next }
  die "bad request\n" unless $t eq 'E' && defined $a && $a =~ /^\d+$/;
  my $pid;
  if ($sync) { $pid = fork() // die "fork: $!\n"; if ($pid == 0) { POSIX::_exit($f->sync ? 0 : 1) } }
  pipe(my $rd, my $wr) or die "pipe: $!\n";
  my $child = open(my $h, '|-') // die "fork: $!\n";
  if ($child == 0) { close $rd; open(STDOUT, '>&', $wr) or POSIX::_exit(126); { no warnings; exec { $cmd[0] } @cmd } POSIX::_exit(127) }
  close $wr; binmode $h;
  fcntl($h, 1031, 1048576); # F_SETPIPE_SZ: fewer wake-ups of the digest process (measured ~10% less CPU); may fail, harmless
  for my $e (@ext) {
    my ($o, $l) = @$e;
    sysseek($f, $o, 0) or die "seek $path: $!\n";
    while ($l > 0) {
      my $n = sysread($f, my $buf, $l > 1048576 ? 1048576 : $l);
      die "read $path: $!\n" unless defined $n;
      die "$path: unexpected end of file at $o\n" if $n == 0;
      my $w = 0;
      while ($w < $n) { my $r = syswrite($h, $buf, $n - $w, $w); die "hash: $!\n" unless defined $r; $w += $r }
      $l -= $n; $o += $n;
    }
  }
  close($h) or die "@cmd failed\n";
  my ($hex) = (do { local $/; <$rd> } // '') =~ /^([0-9a-f]{64})\s/ or die "@cmd printed no digest\n";
  close $rd;
  if ($pid) { waitpid($pid, 0); die "fdatasync $path failed\n" if $? != 0 }
  print "H $a $hex\n";
  @ext = ();
}
`;

/** sh: $1 = HASHER, $2 = file, $3 = sync (0|1): runs HASHER with openssl (SHA-NI) or, without it, sha256sum. */
export const HASHER_SH = 'if command -v openssl >/dev/null 2>&1; then exec perl -e "$1" "$2" "$3" openssl dgst -sha256 -r; else exec perl -e "$1" "$2" "$3" sha256sum -b; fi';
