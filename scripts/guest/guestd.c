/*
 * guestd: PID 1 of the test guest (exec'd by /init after the modules are loaded).
 *
 *   heartbeat  one line every vmops.hb ms on /dev/ttyS1 (QEMU: unix socket heartbeat.sock):
 *                "HB <beat> <acked> <boot>"   acked = last log record made durable (fdatasync returned)
 *   writer     appends 512-byte records (magic, seq, boot, slot, crc32) to a ring on the data disk
 *              (/dev/<vmops.log>, first vmops.logmib MiB), O_DIRECT + fdatasync, vmops.rate per second
 *   verify     at boot and on request ("verify\n" received on ttyS1): reads the whole ring with O_DIRECT
 *              (the disk, not the page cache) and prints
 *                "VERIFY ok records=<n> first=<seq> last=<seq> boot=<b>"  or  "VERIFY FAIL <reason>"
 *   burst      on request ("burst <n>\n" received on ttyS1): a separate process prints "BURST <i> <n>"
 *              for i = 1..n as fast as it can, then "BURST done <n>" — the serial line saturated while
 *              the other processes keep printing, to prove that no line is lost or torn
 *   dirtier    with vmops.dirtymib=N: rewrites one word in every page of an N MiB buffer, vmops.dirtyrate
 *              MiB/s (0 = as fast as it can): RAM that a live migration has to send again and again
 *   power      the ACPI power button (input event KEY_POWER from button.ko via evdev): the writer
 *              finishes its record, everything is synced, "POWEROFF clean acked=<seq>" is printed and
 *              the guest powers off. vmops.acpi=ignore makes the guest ignore the button ("POWER ignored").
 *   echo       with vmops.echo=PORT: a TCP server on the guest's address(es) answering every line
 *              "<text>" with "ECHO <boot> <text>" — a student's service whose connections must survive a
 *              live move, and whose boot says the guest on the other end is the same one (init gives eth0
 *              its address from vmops.ip=ADDR/PREFIX)
 *   console    once a second PID 1 prints on the console only (ttyS0, QEMU: serial.log, a file that
 *              never pushes back):  "CONSOLE <n> hb=<beats written whole> ttyS1.tx=<bytes>"  with the
 *              transmit count of ttyS1's UART from /proc/tty/driver/serial — when the heartbeat port
 *              goes silent, a console that keeps counting with a frozen tx says the UART is stuck (the
 *              guest runs), a console that stops says the guest is hung.
 *
 * Raw ring instead of a file system: the check does not depend on fs recovery after a killed guest,
 * and a torn write can only affect the one record that was never acknowledged.
 * Three processes share one page: the heartbeat must keep beating while the writer waits for a flush.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define REC 512
#define MAGIC 0x31474c53504f4d56ULL /* "VMOPSLG1" little endian */

struct shared {
  volatile uint64_t acked;      /* last durable seq */
  volatile uint32_t boot;
  volatile int stop;            /* writer: finish and exit */
  volatile int verify_req;      /* set by the heartbeat on "verify" */
  int line_lock;                /* held while one process writes one line to the tty */
  volatile uint64_t hb_written; /* last heartbeat whose line reached the tty whole */
};

static struct shared *sh;
static char logdev[64] = "vda";
static long logmib = 8, rate = 50, hb_ms = 10, dirtymib = 0, dirtyrate = 0, echo_port = 0;
static int acpi_ignore = 0;
static int tty = -1;

static uint64_t now_ns(void);

/* The processes take turns at the tty, one whole line each (a lock in the shared page). A holder
 * that died mid-line (the heartbeat is killed at power-off) is outwaited, not waited for forever. */
static void lines_lock(void) {
  if (!sh) return;
  uint64_t give_up = now_ns() + 15000000000ULL;
  while (__atomic_exchange_n(&sh->line_lock, 1, __ATOMIC_ACQUIRE) && now_ns() < give_up) usleep(100);
}
static void lines_unlock(void) {
  if (sh) __atomic_store_n(&sh->line_lock, 0, __ATOMIC_RELEASE);
}

/* The tty is O_NONBLOCK (the heartbeat reads host commands without blocking), so a write can take
 * part of a line or nothing: EAGAIN when the UART's buffer is full, and also whenever another
 * process is writing (tty_write_lock() only tries the lock under O_NONBLOCK). Such lines were lost
 * or torn; the rest is now written as soon as there is room. QEMU drops the bytes no client takes,
 * but holds the UART while a connected client is slow to read (and, after a live migration that
 * loaded such a held UART with no client on the target's socket, for good: see the console beat);
 * 10 s bounds the wait. */
static int tty_write_all(const char *p, size_t n) {
  uint64_t give_up = now_ns() + 10000000000ULL;
  while (n > 0) {
    ssize_t w = write(tty, p, n);
    if (w > 0) { p += w; n -= (size_t)w; continue; }
    if ((w < 0 && errno != EAGAIN && errno != EINTR) || now_ns() > give_up) return 0;
    struct pollfd room = {tty, POLLOUT, 0};
    (void)poll(&room, 1, 10);
    usleep(200);
  }
  return 1;
}

/* 1 if the line reached the tty whole (or there is no tty to write to) */
static int emit(int console, const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return 0;
  if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  int whole = 1;
  if (tty >= 0) {
    lines_lock();
    whole = tty_write_all(buf, (size_t)n);
    lines_unlock();
  }
  if (console) (void)!write(2, buf, n);
  return whole;
}
#define say(...) emit(1, __VA_ARGS__)

static uint32_t crc_table[256];
static void crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}
static uint32_t crc32(const unsigned char *p, size_t n) {
  uint32_t c = 0xffffffffu;
  while (n--) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

static void fill(unsigned char *r, uint64_t seq, uint32_t boot, uint32_t slot) {
  memset(r, 0, REC);
  uint64_t m = MAGIC;
  memcpy(r, &m, 8);
  memcpy(r + 8, &seq, 8);
  memcpy(r + 16, &boot, 4);
  memcpy(r + 20, &slot, 4);
  uint64_t x = seq * 0x9e3779b97f4a7c15ULL + 1;
  for (int i = 24; i < REC - 4; i += 8) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    memcpy(r + i, &x, REC - 4 - i < 8 ? REC - 4 - i : 8);
  }
  uint32_t c = crc32(r, REC - 4);
  memcpy(r + REC - 4, &c, 4);
}

struct verdict { int ok; uint64_t first, last, n; uint32_t boot; char why[128]; };

/* Reads the ring (O_DIRECT) and checks: every record with our magic is intact and in its slot, and
 * the records form one contiguous run of sequence numbers ending at the highest one. */
static struct verdict verify(int fd, uint64_t slots) {
  struct verdict v = {1, 0, 0, 0, 0, ""};
  const size_t chunk = 1 << 20;
  unsigned char *buf, expect[REC];
  if (posix_memalign((void **)&buf, 4096, chunk)) { v.ok = 0; snprintf(v.why, sizeof v.why, "no memory"); return v; }
  uint64_t minseq = UINT64_MAX;
  for (uint64_t off = 0; off < slots * REC; off += chunk) {
    ssize_t got = pread(fd, buf, chunk, off);
    if (got != (ssize_t)chunk) { v.ok = 0; snprintf(v.why, sizeof v.why, "read at %llu: %s", (unsigned long long)off, got < 0 ? strerror(errno) : "short"); break; }
    for (size_t i = 0; i < chunk; i += REC) {
      unsigned char *r = buf + i;
      uint64_t m, seq; uint32_t boot, slot, crc;
      memcpy(&m, r, 8);
      if (m != MAGIC) continue;
      memcpy(&seq, r + 8, 8); memcpy(&boot, r + 16, 4); memcpy(&slot, r + 20, 4); memcpy(&crc, r + REC - 4, 4);
      uint64_t at = (off + i) / REC;
      fill(expect, seq, boot, slot);
      if (crc != crc32(r, REC - 4) || memcmp(expect, r, REC) != 0 || slot != at || seq % slots != at || seq == 0) {
        if (v.ok) snprintf(v.why, sizeof v.why, "corrupt record in slot %llu (seq %llu)", (unsigned long long)at, (unsigned long long)seq);
        v.ok = 0;
        continue;
      }
      v.n++;
      if (seq > v.last) { v.last = seq; v.boot = boot; }
      if (seq < minseq) minseq = seq;
    }
  }
  free(buf);
  v.first = v.n ? minseq : 0;
  if (v.ok && v.n && v.last - v.first + 1 != v.n) {
    v.ok = 0;
    snprintf(v.why, sizeof v.why, "missing records: %llu present between %llu and %llu", (unsigned long long)v.n, (unsigned long long)v.first, (unsigned long long)v.last);
  }
  return v;
}

static void report(struct verdict v) {
  if (v.ok) say("VERIFY ok records=%llu first=%llu last=%llu boot=%u", (unsigned long long)v.n, (unsigned long long)v.first, (unsigned long long)v.last, v.boot);
  else say("VERIFY FAIL %s", v.why);
}

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static void sleep_until(uint64_t ns) {
  struct timespec t = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
}

static void writer(void) {
  char path[80];
  snprintf(path, sizeof path, "/dev/%s", logdev);
  int fd = -1;
  for (int i = 0; i < 200 && fd < 0; i++) {
    fd = open(path, O_RDWR | O_DIRECT);
    if (fd < 0) usleep(50000);
  }
  if (fd < 0) { say("WRITER FAIL open %s: %s", path, strerror(errno)); _exit(1); }
  uint64_t slots = (uint64_t)logmib * 1024 * 1024 / REC;
  struct verdict v = verify(fd, slots);
  report(v);
  if (!v.ok) { say("WRITER stopped: log is not intact"); _exit(1); }
  uint32_t boot = v.boot + 1;
  sh->boot = boot;
  sh->acked = v.last;
  uint64_t seq = v.last;
  unsigned char *rec;
  if (posix_memalign((void **)&rec, 4096, REC)) _exit(1);
  uint64_t period = rate > 0 ? 1000000000ULL / rate : 100000000ULL;
  uint64_t next = now_ns();
  say("WRITER start boot=%u rate=%ld slots=%llu", boot, rate, (unsigned long long)slots);
  while (!sh->stop) {
    if (sh->verify_req) {
      report(verify(fd, slots));
      sh->verify_req = 0;
    }
    if (rate > 0) {
      seq++;
      fill(rec, seq, boot, (uint32_t)(seq % slots));
      if (pwrite(fd, rec, REC, (off_t)(seq % slots) * REC) != REC || fdatasync(fd) != 0) {
        say("WRITER FAIL write seq %llu: %s", (unsigned long long)seq, strerror(errno));
        _exit(1);
      }
      sh->acked = seq;
    }
    next += period;
    uint64_t t = now_ns();
    if (next < t) next = t;
    sleep_until(next);
  }
  say("WRITER stopped acked=%llu", (unsigned long long)sh->acked);
  _exit(0);
}

static void dirtier(void) {
  size_t len = (size_t)dirtymib * 1024 * 1024;
  volatile uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (buf == MAP_FAILED) { say("DIRTIER FAIL mmap %ld MiB", dirtymib); _exit(1); }
  say("DIRTIER start %ld MiB at %ld MiB/s", dirtymib, dirtyrate);
  uint64_t pass = 0, next = now_ns();
  for (;;) {
    pass++;
    for (long m = 0; m < dirtymib; m++) {
      for (size_t pg = 0; pg < 256; pg++) buf[((size_t)m * 256 + pg) * 512] = pass;
      if (dirtyrate > 0) {
        next += 1000000000ULL / (uint64_t)dirtyrate;
        uint64_t t = now_ns();
        if (next < t) next = t;
        sleep_until(next);
      }
    }
  }
}

static void burst(long n) {
  /* twice forked: the burst process is PID 1's to reap, not the heartbeat's */
  pid_t c = fork();
  if (c < 0) { say("BURST FAIL fork"); return; }
  if (c > 0) { waitpid(c, NULL, 0); return; }
  if (fork() != 0) _exit(0);
  for (long i = 1; i <= n; i++) emit(0, "BURST %ld %ld", i, n);
  emit(0, "BURST done %ld", n);
  _exit(0);
}

/* one connection: each line back with the boot this guest runs */
static void echo_conn(int c) {
  char in[512], out[600];
  size_t len = 0;
  int one = 1;
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  for (;;) {
    ssize_t n = read(c, in + len, sizeof in - 1 - len);
    if (n <= 0) _exit(0);
    len += (size_t)n;
    char *nl;
    while ((nl = memchr(in, '\n', len))) {
      *nl = 0;
      int k = snprintf(out, sizeof out, "ECHO %u %s\n", sh->boot, in);
      if (k > 0 && write(c, out, (size_t)k < sizeof out ? (size_t)k : sizeof out - 1) < 0) _exit(0);
      size_t used = (size_t)(nl + 1 - in);
      memmove(in, nl + 1, len - used);
      len -= used;
    }
    if (len >= sizeof in - 1) len = 0; /* a line too long for us: dropped, not echoed in pieces */
  }
}

static void echo_server(void) {
  signal(SIGCHLD, SIG_IGN); /* connections reap themselves */
  int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)echo_port), .sin_addr = { htonl(INADDR_ANY) } };
  if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) {
    say("ECHO FAIL port %ld: %s", echo_port, strerror(errno));
    _exit(1);
  }
  say("ECHO listening on port %ld", echo_port);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    if (fork() == 0) { close(s); echo_conn(c); }
    close(c);
  }
}

static void heartbeat(void) {
  uint64_t beat = 0, next = now_ns();
  char in[64];
  size_t inlen = 0;
  for (;;) {
    beat++;
    if (emit(0, "HB %llu %llu %u", (unsigned long long)beat, (unsigned long long)sh->acked, sh->boot)) sh->hb_written = beat;
    /* commands from the host, line by line */
    ssize_t n;
    while ((n = read(tty, in + inlen, sizeof in - 1 - inlen)) > 0) {
      inlen += n;
      char *nl;
      while ((nl = memchr(in, '\n', inlen))) {
        *nl = 0;
        if (strcmp(in, "verify") == 0) sh->verify_req = 1;
        else if (strncmp(in, "burst ", 6) == 0 && atol(in + 6) > 0) burst(atol(in + 6));
        size_t used = nl + 1 - in;
        memmove(in, nl + 1, inlen - used);
        inlen -= used;
      }
      if (inlen >= sizeof in - 1) inlen = 0;
    }
    next += (uint64_t)hb_ms * 1000000ULL;
    uint64_t t = now_ns();
    if (next < t) next = t;
    sleep_until(next);
  }
}

static void params(void) {
  char cmd[2048] = "";
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd >= 0) {
    ssize_t n = read(fd, cmd, sizeof cmd - 1);
    if (n > 0) cmd[n] = 0;
    close(fd);
  }
  for (char *t = strtok(cmd, " \n"); t; t = strtok(NULL, " \n")) {
    if (!strncmp(t, "vmops.log=", 10) && strlen(t + 10) < sizeof logdev && !strchr(t + 10, '/')) strcpy(logdev, t + 10);
    else if (!strncmp(t, "vmops.logmib=", 13)) logmib = atol(t + 13);
    else if (!strncmp(t, "vmops.rate=", 11)) rate = atol(t + 11);
    else if (!strncmp(t, "vmops.hb=", 9)) hb_ms = atol(t + 9);
    else if (!strncmp(t, "vmops.dirtymib=", 15)) dirtymib = atol(t + 15);
    else if (!strncmp(t, "vmops.dirtyrate=", 16)) dirtyrate = atol(t + 16);
    else if (!strncmp(t, "vmops.echo=", 11)) echo_port = atol(t + 11);
    else if (!strcmp(t, "vmops.acpi=ignore")) acpi_ignore = 1;
  }
  if (logmib < 1) logmib = 1;
  if (hb_ms < 1) hb_ms = 10;
  if (rate < 0) rate = 0;
}

/* evdev devices that can report KEY_POWER (the ACPI power button; QEMU's system_powerdown) */
static int acpi_button_found;
static int open_power_buttons(struct pollfd *fds, int max) {
  int n = 0;
  DIR *d = opendir("/dev/input");
  if (!d) return 0;
  struct dirent *e;
  while ((e = readdir(d)) && n < max) {
    if (strncmp(e->d_name, "event", 5)) continue;
    char p[300];
    snprintf(p, sizeof p, "/dev/input/%s", e->d_name);
    int fd = open(p, O_RDONLY | O_NONBLOCK);
    if (fd < 0) continue;
    unsigned long keys[KEY_MAX / (8 * sizeof(long)) + 1] = {0};
    if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) >= 0 && (keys[KEY_POWER / (8 * sizeof(long))] >> (KEY_POWER % (8 * sizeof(long)))) & 1) {
      char name[64] = "";
      if (ioctl(fd, EVIOCGNAME(sizeof name - 1), name) >= 0 && strstr(name, "Power Button")) acpi_button_found = 1;
      fds[n].fd = fd;
      fds[n].events = POLLIN;
      n++;
    } else {
      close(fd);
    }
  }
  closedir(d);
  return n;
}

/* ACPI fixed-event counter of the power button: a second witness besides the input event */
static long pwr_count(void) {
  char b[64] = "";
  int f = open("/sys/firmware/acpi/interrupts/ff_pwr_btn", O_RDONLY);
  if (f < 0) return -1;
  ssize_t k = read(f, b, sizeof b - 1);
  close(f);
  if (k <= 0) return -1;
  b[k] = 0;
  return atol(b);
}

/* bytes the 8250 driver handed to ttyS1's UART ("1: uart:16550A port:000002F8 irq:3 tx:<n> rx:<n> ..."), or -1 */
static long ttys1_tx(void) {
  char b[4096];
  size_t len = 0;
  int f = open("/proc/tty/driver/serial", O_RDONLY);
  if (f < 0) return -1;
  for (ssize_t k; len < sizeof b - 1 && (k = read(f, b + len, sizeof b - 1 - len)) > 0;) len += (size_t)k;
  close(f);
  b[len] = 0;
  char *l = strstr(b, "\n1: ");
  if (!l) return -1;
  char *eol = strchr(l + 1, '\n');
  char *tx = strstr(l, " tx:");
  if (!tx || (eol && tx > eol)) return -1;
  return atol(tx + 4);
}

/* the console beat: ttyS0 only (see the header) */
static void console_beat(void) {
  static uint64_t n = 0;
  char buf[128];
  int k = snprintf(buf, sizeof buf, "CONSOLE %llu hb=%llu ttyS1.tx=%ld\n", (unsigned long long)++n, (unsigned long long)sh->hb_written, ttys1_tx());
  if (k > 0) (void)!write(2, buf, (size_t)k < sizeof buf ? (size_t)k : sizeof buf - 1);
}

static void power_pressed(pid_t wr, pid_t hb) {
  int status;
  if (acpi_ignore) { say("POWER ignored (vmops.acpi=ignore)"); return; }
  say("POWER button: shutting down");
  sh->stop = 1;
  if (wr > 0) waitpid(wr, &status, 0);
  sync();
  say("POWEROFF clean acked=%llu", (unsigned long long)sh->acked);
  kill(hb, SIGKILL);
  reboot(RB_POWER_OFF);
  for (;;) pause();
}

int main(void) {
  crc_init();
  params();
  tty = open("/dev/ttyS1", O_RDWR | O_NOCTTY | O_NONBLOCK);
  if (tty >= 0) {
    struct termios t;
    if (tcgetattr(tty, &t) == 0) {
      cfmakeraw(&t);
      tcsetattr(tty, TCSANOW, &t);
    }
  }
  sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (sh == MAP_FAILED) { sh = NULL; say("GUESTD FAIL mmap"); return 1; }
  memset((void *)sh, 0, sizeof *sh);
  say("GUESTD start log=/dev/%s logmib=%ld rate=%ld hb=%ldms acpi=%s", logdev, logmib, rate, hb_ms, acpi_ignore ? "ignore" : "on");

  pid_t hb = fork();
  if (hb == 0) heartbeat();
  pid_t wr = fork();
  if (wr == 0) writer();
  if (dirtymib > 0 && fork() == 0) dirtier();
  if (echo_port > 0 && fork() == 0) echo_server();

  struct pollfd fds[8];
  int nfds = 0, scans = 0;
  long pwr_seen = pwr_count();
  uint64_t next_console = now_ns() + 1000000000ULL;
  for (;;) {
    if (now_ns() >= next_console) {
      console_beat();
      next_console += 1000000000ULL;
      if (next_console < now_ns()) next_console = now_ns() + 1000000000ULL;
    }
    /* the button's event node may appear after we start (evdev, devtmpfs): rescan until it is there */
    if (!acpi_button_found && scans < 100) {
      for (int i = 0; i < nfds; i++) close(fds[i].fd);
      nfds = open_power_buttons(fds, 8);
      if (acpi_button_found) say("GUESTD ACPI power button ready");
      else if (++scans == 100) say("GUESTD no ACPI power button: power-down will not be answered");
    }
    /* PID 1 reaps every orphan */
    int status;
    pid_t dead;
    while ((dead = waitpid(-1, &status, WNOHANG)) > 0) {
      if (dead == wr) { say("WRITER exited (%d)", WIFEXITED(status) ? WEXITSTATUS(status) : -1); wr = -1; }
    }
    int ready = poll(fds, nfds, 50);
    long c = pwr_count();
    if (c > pwr_seen && pwr_seen >= 0) power_pressed(wr, hb);
    if (c >= 0) pwr_seen = c;
    if (ready <= 0) continue;
    for (int i = 0; i < nfds; i++) {
      struct input_event ev;
      while (read(fds[i].fd, &ev, sizeof ev) == (ssize_t)sizeof ev) {
        if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1) power_pressed(wr, hb);
      }
    }
  }
}
