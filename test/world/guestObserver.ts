/**
 * Host-side recorder of the test guest's serial line protocol (scripts/guest/guestd.c): connects to
 * the VM's heartbeat.sock on every host the VM may be on (source and target are local here),
 * reconnects whenever QEMU goes away or comes up, and timestamps every line on arrival
 * (performance.now() ms of this thread). Guest-observed downtime = the longest gap between heartbeats
 * across a move.
 *
 * The sockets are read by a worker thread, not on the test's event loop. QEMU sends a serial port's
 * bytes one send() each; a reader that falls a few hundred bytes behind (a test process busy relaying
 * a live migration through its SSH tunnels is) makes QEMU's send fail with EAGAIN, and the 16550 then
 * waits for the socket with its transmitter held (tsr_retry > 0, THRE clear). That state migrates, and
 * QEMU 7.2 re-arms the wait on the target only if a client is connected to the target's socket when
 * the device state loads (serial_post_load → tcp_chr_add_watch, which returns nothing without a
 * client): otherwise the guest's ttyS1 stays silent for good (strategies.test.ts "QEMU 7.2: …"
 * reproduces both cases). The worker drains every socket at once and reconnects every 20 ms whatever
 * the test's event loop is doing, so neither a lagging reader nor a missing client at the switchover
 * depends on it.
 *
 * Reusable as a "is this VM really running" probe: isBeating() says whether the guest made progress
 * recently, which a live QEMU process alone does not prove (paused, inmigrate, shut down, hung).
 * Every failed wait names what each socket did (connected, closed, unreachable, when) and ends with
 * the tail of each VM directory's console (serial.log: guestd prints a CONSOLE line every second with
 * ttyS1's transmit count, so "the UART is stuck" and "the guest is hung" read differently).
 */
import { open, readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { QmpClient } from '../../src/hosts/qmp.js';
import { liveness, noteWait } from './budget.js';

export interface GuestLine {
  /** arrival time, performance.now() ms */
  t: number;
  text: string;
  /** the socket path it came from */
  from: string;
}

export interface Beat {
  t: number;
  beat: number;
  /** last log record the guest made durable (fdatasync returned) before this beat */
  acked: number;
  boot: number;
  from: string;
}

export type Verdict = { ok: true; records: number; first: number; last: number; boot: number; t: number } | { ok: false; reason: string; t: number };

export interface Gap {
  ms: number;
  /** last beat before the gap and first beat after it */
  before?: Beat;
  after?: Beat;
}

/** What the observer's connection to one socket did: connected, closed, or could not connect (the first time of each reason). */
export interface SocketEvent {
  t: number;
  event: 'connect' | 'close' | 'unreachable';
  detail?: string;
}

/** One CONSOLE line of guestd (ttyS0, serial.log): printed every second by PID 1 whatever ttyS1 does. */
export interface ConsoleBeat {
  n: number;
  /** heartbeats written whole to ttyS1 so far */
  hb: number;
  /** bytes the guest's 8250 driver handed to ttyS1's UART (/proc/tty/driver/serial) */
  tx: number;
}

export function parseVerdict(line: GuestLine): Verdict | undefined {
  const ok = /^VERIFY ok records=(\d+) first=(\d+) last=(\d+) boot=(\d+)$/.exec(line.text);
  if (ok) return { ok: true, records: Number(ok[1]), first: Number(ok[2]), last: Number(ok[3]), boot: Number(ok[4]), t: line.t };
  const bad = /^VERIFY FAIL (.*)$/.exec(line.text);
  return bad ? { ok: false, reason: bad[1] ?? '', t: line.t } : undefined;
}

/** The CONSOLE lines in a VM's serial.log (guestd.c: "CONSOLE <n> hb=<written> ttyS1.tx=<bytes>"). */
export async function consoleBeats(serialLog: string): Promise<ConsoleBeat[]> {
  const text = await readFile(serialLog, 'latin1').catch(() => '');
  const out: ConsoleBeat[] = [];
  for (const l of text.split('\n')) {
    const m = /^CONSOLE (\d+) hb=(\d+) ttyS1\.tx=(\d+)/.exec(l.replace(/\r$/, ''));
    if (m) out.push({ n: Number(m[1]), hb: Number(m[2]), tx: Number(m[3]) });
  }
  return out;
}

/** The last `lines` lines of a file (its last 4 KiB at most), or a note why there are none. */
async function tail(file: string, lines: number): Promise<string> {
  let fh;
  try {
    fh = await open(file, 'r');
    const { size } = await fh.stat();
    const n = Math.min(size, 4096);
    const buf = Buffer.alloc(n);
    await fh.read(buf, 0, n, size - n);
    const got = buf.toString('latin1').split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
    return got.slice(-lines).join(' | ') || '(empty)';
  } catch (err) {
    return `(${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`;
  } finally {
    await fh?.close();
  }
}

/**
 * What QEMU itself says of the VM's heartbeat port (chardev serial1, asked on the second monitor
 * qmp-observe.sock, which the operator never uses): whether a client is connected to it. QEMU names
 * an unconnected server socket "disconnected:unix:…".
 */
export async function heartbeatPortClient(vmDir: string, timeoutMs = 10_000): Promise<'connected' | 'disconnected'> {
  const sock = net.connect(path.join(vmDir, 'qmp-observe.sock'));
  sock.on('error', () => undefined);
  const qmp = await QmpClient.open(sock, { timeoutMs });
  try {
    const devs = await qmp.execute<Array<{ label: string; filename: string }>>('query-chardev', undefined, { timeoutMs });
    const hb = devs.find((d) => d.filename.includes('/heartbeat.sock'));
    if (!hb) throw new Error(`no heartbeat chardev in ${vmDir} (query-chardev: ${devs.map((d) => `${d.label}=${d.filename}`).join(', ')})`);
    return hb.filename.startsWith('disconnected:') ? 'disconnected' : 'connected';
  } finally {
    qmp.close();
  }
}

// ── the reader thread ──────────────────────────────────────────────────────────────────────────────
// One worker for every observer of this process. It stamps each chunk with process.hrtime (the
// process's monotonic clock, the same in every thread); HR_TO_PERF turns that into this thread's
// performance.now() (both count from uv_hrtime: the difference is a constant).

const READER = String.raw`
const { parentPort } = require('node:worker_threads');
const net = require('node:net');
const now = () => Number(process.hrtime.bigint()) / 1e6;
const conns = new Map();
const post = (m) => parentPort.postMessage(m);
function open(c) {
  if (!c.wanted) return;
  let done = false;
  let buf = '';
  const s = net.connect({
    path: c.path,
    onread: {
      buffer: Buffer.alloc(65536),
      callback: (n, b) => {
        const t = now();
        buf += b.toString('latin1', 0, n);
        const lines = [];
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          lines.push(buf.slice(0, nl).replace(/\r$/, ''));
          buf = buf.slice(nl + 1);
        }
        if (lines.length) post({ k: 'lines', id: c.id, path: c.path, t, lines });
      },
    },
  });
  c.sock = s;
  const gone = (err) => {
    if (done) return;
    done = true;
    if (c.sock === s) c.sock = undefined;
    if (c.connected) {
      c.connected = false;
      c.reason = undefined;
      post({ k: 'state', id: c.id, path: c.path, t: now(), event: 'close', detail: err ? err.code || err.message : undefined });
    } else {
      const why = err ? err.code || err.message : 'closed';
      if (why !== c.reason) post({ k: 'state', id: c.id, path: c.path, t: now(), event: 'unreachable', detail: why });
      c.reason = why;
    }
    if (c.wanted) c.timer = setTimeout(() => open(c), 20);
  };
  s.on('connect', () => {
    c.connected = true;
    c.reason = undefined;
    if (c.paused) s.pause();
    post({ k: 'state', id: c.id, path: c.path, t: now(), event: 'connect' });
  });
  s.on('error', gone);
  s.on('close', () => gone());
}
parentPort.on('message', (m) => {
  const key = m.id + '\n' + m.path;
  let c = conns.get(key);
  if (m.op === 'watch') {
    if (c && c.wanted) return;
    c = c || { id: m.id, path: m.path, paused: false };
    c.wanted = true;
    conns.set(key, c);
    open(c);
  } else if (!c) {
    return;
  } else if (m.op === 'unwatch') {
    c.wanted = false;
    clearTimeout(c.timer);
    if (c.sock) c.sock.destroy();
    conns.delete(key);
  } else if (m.op === 'pause') {
    c.paused = true;
    if (c.sock && c.connected) c.sock.pause();
  } else if (m.op === 'resume') {
    c.paused = false;
    if (c.sock && c.connected) c.sock.resume();
  } else if (m.op === 'write') {
    if (c.sock && c.connected) c.sock.write(m.text);
  }
});
`;

type FromReader =
  | { k: 'lines'; id: number; path: string; t: number; lines: string[] }
  | { k: 'state'; id: number; path: string; t: number; event: SocketEvent['event']; detail?: string };

const HR_TO_PERF = performance.now() - Number(process.hrtime.bigint()) / 1e6;
const observers = new Map<number, GuestObserver>();
let reader: Worker | undefined;
let nextId = 1;

function toReader(m: { op: 'watch' | 'unwatch' | 'pause' | 'resume' | 'write'; id: number; path: string; text?: string }): void {
  if (!reader) {
    reader = new Worker(READER, { eval: true });
    // a test process ends when its tests end, whatever the reader is waiting for
    reader.unref();
    reader.on('message', (msg: FromReader) => observers.get(msg.id)?.fromReader(msg));
    reader.on('error', (err) => {
      for (const o of observers.values()) o.readerFailed(err);
    });
  }
  reader.postMessage(m);
}

export class GuestObserver {
  readonly lines: GuestLine[] = [];
  readonly beats: Beat[] = [];
  /** per socket path, what the observer's connection did, in order */
  readonly sockets = new Map<string, SocketEvent[]>();
  private readonly connected = new Set<string>();
  private readonly detached = new Set<string>();
  private readonly id = nextId++;
  private stopped = false;
  private failure: Error | undefined;
  private readonly waiters = new Set<() => void>();

  /** `detached`: paths not connected to until attach() (a test that needs a port without a client). */
  constructor(
    readonly paths: string[],
    opts: { detached?: string[] } = {},
  ) {
    observers.set(this.id, this);
    for (const p of paths) {
      this.sockets.set(p, []);
      if (opts.detached?.includes(p)) this.detached.add(p);
      else toReader({ op: 'watch', id: this.id, path: p });
    }
  }

  /** Starts connecting to `path` (again), every 20 ms until QEMU accepts. */
  attach(path: string): void {
    if (this.stopped || !this.detached.delete(path)) return;
    toReader({ op: 'watch', id: this.id, path });
  }

  /** Closes the connection to `path` and stops connecting to it. */
  detach(path: string): void {
    if (this.stopped || this.detached.has(path)) return;
    this.detached.add(path);
    toReader({ op: 'unwatch', id: this.id, path });
    this.connected.delete(path);
  }

  /** Stops reading `path` (the connection stays; QEMU's sends back up until they fail with EAGAIN). */
  pauseReading(path: string): void {
    toReader({ op: 'pause', id: this.id, path });
  }

  resumeReading(path: string): void {
    toReader({ op: 'resume', id: this.id, path });
  }

  /** Is the observer connected to `path` now (as far as this thread has heard)? */
  isConnected(path: string): boolean {
    return this.connected.has(path);
  }

  /** @internal the reader thread's report */
  fromReader(m: FromReader): void {
    const t = m.t + HR_TO_PERF;
    if (m.k === 'lines') {
      for (const text of m.lines) this.onLine({ t, text, from: m.path });
    } else {
      this.sockets.get(m.path)?.push({ t, event: m.event, ...(m.detail ? { detail: m.detail } : {}) });
      if (m.event === 'connect') this.connected.add(m.path);
      else this.connected.delete(m.path);
    }
    for (const w of [...this.waiters]) w();
  }

  /** @internal */
  readerFailed(err: Error): void {
    this.failure = new Error(`the guest observer's reader thread failed: ${err.message}`);
    for (const w of [...this.waiters]) w();
  }

  private onLine(l: GuestLine): void {
    const hb = /^HB (\d+) (\d+) (\d+)$/.exec(l.text);
    if (hb) this.beats.push({ t: l.t, beat: Number(hb[1]), acked: Number(hb[2]), boot: Number(hb[3]), from: l.from });
    else this.lines.push(l);
  }

  /** Resolves with the first line (not heartbeat) matching `re` that arrived at or after `since` (timeoutMs: a liveness budget, scaled). */
  waitFor(re: RegExp, opts: { since?: number; timeoutMs?: number } = {}): Promise<GuestLine> {
    const since = opts.since ?? 0;
    const find = (): GuestLine | undefined => this.lines.find((l) => l.t >= since && re.test(l.text));
    return this.waitUntil(find, opts.timeoutMs ?? 60_000, `guest line ${re}`);
  }

  /**
   * Resolves with the first heartbeat at or after `since` (optionally from one socket path, and one
   * that satisfies `where`); timeoutMs is a liveness budget (scaled).
   */
  waitBeat(opts: { since?: number; from?: string; where?: (b: Beat) => boolean; what?: string; timeoutMs?: number } = {}): Promise<Beat> {
    const since = opts.since ?? 0;
    const find = (): Beat | undefined => this.beats.find((b) => b.t >= since && (opts.from === undefined || b.from === opts.from) && (opts.where === undefined || opts.where(b)));
    return this.waitUntil(find, opts.timeoutMs ?? 60_000, opts.what ?? `a heartbeat${opts.from ? ` from ${opts.from}` : ''}`);
  }

  private waitUntil<T>(find: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
    const budget = liveness(timeoutMs);
    const t0 = performance.now();
    const now = find();
    if (now !== undefined) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.failure) {
          clearTimeout(timer);
          this.waiters.delete(check);
          reject(this.failure);
          return;
        }
        const v = find();
        if (v === undefined) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        noteWait(what, budget, performance.now() - t0);
        resolve(v);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        void this.describe()
          .catch((err: unknown) => `no description: ${(err as Error).message}`)
          .then((d) => reject(new Error(`timed out after ${budget} ms waiting for ${what} (${d})`)));
      }, budget);
      this.waiters.add(check);
    });
  }

  /**
   * Everything a failed wait should say: the last guest lines and heartbeat, what each socket
   * connection did and when, and the tail of each VM directory's console (serial.log).
   */
  async describe(): Promise<string> {
    const now = performance.now();
    const ms = (t: number): string => `${(t / 1000).toFixed(2)}s`;
    const lastLines = this.lines.slice(-5).map((l) => l.text).join(' | ');
    const last = this.lastBeat();
    const parts = [
      `now ${ms(now)}`,
      `last guest lines: ${lastLines || 'none'}`,
      `${this.beats.length} heartbeats${last ? `, the last (#${last.beat}) from ${last.from} at ${ms(last.t)}` : ''}`,
    ];
    for (const p of this.paths) {
      const evs = (this.sockets.get(p) ?? []).slice(-8).map((e) => `${e.event}${e.detail ? `(${e.detail})` : ''}@${ms(e.t)}`);
      const state = this.detached.has(p) ? 'detached' : this.connected.has(p) ? 'connected' : 'not connected';
      const console = await tail(path.join(path.dirname(p), 'serial.log'), 4);
      parts.push(`${p}: ${state}; ${evs.join(' ') || 'no connection yet'}; console: ${console}`);
    }
    return parts.join('; ');
  }

  lastBeat(): Beat | undefined {
    return this.beats[this.beats.length - 1];
  }

  /** Last heartbeat that arrived before `t`. */
  beatBefore(t: number): Beat | undefined {
    for (let i = this.beats.length - 1; i >= 0; i--) if ((this.beats[i] as Beat).t < t) return this.beats[i];
    return undefined;
  }

  /** Did the guest make progress (a heartbeat) within the last `withinMs`? */
  isBeating(withinMs = 500): boolean {
    const b = this.lastBeat();
    return b !== undefined && performance.now() - b.t <= withinMs;
  }

  /** Longest interval without heartbeats that ends in [from, to] (the beat before `from` counts as its start). */
  longestGap(from: number, to: number = performance.now()): Gap {
    let best: Gap = { ms: 0 };
    let prev: Beat | undefined;
    for (const b of this.beats) {
      if (b.t > to) break;
      if (prev && b.t >= from && b.t - prev.t > best.ms) best = { ms: b.t - prev.t, before: prev, after: b };
      prev = b;
    }
    return best;
  }

  /** The switch between two sockets: last beat from `from`, first beat from `to` after it (the handover gap of a move). */
  handover(from: string, to: string): Gap {
    let before: Beat | undefined;
    for (const b of this.beats) {
      if (b.from === from) before = b;
      else if (b.from === to && before) return { ms: b.t - before.t, before, after: b };
    }
    return { ms: NaN, before };
  }

  /** Sends one command line (guestd.c: "verify", "burst <n>") to the guest on the socket it last beat on; returns the time it was sent. */
  command(text: string): number {
    const from = this.lastBeat()?.from;
    if (!from || !this.connected.has(from)) throw new Error(`guest is not connected: no heartbeat socket to send "${text}" to`);
    const since = performance.now();
    toReader({ op: 'write', id: this.id, path: from, text: `${text}\n` });
    return since;
  }

  /** Asks the running guest to verify its whole log now; resolves with its verdict. */
  async verify(timeoutMs = 60_000): Promise<Verdict> {
    const since = this.command('verify');
    const line = await this.waitFor(/^VERIFY /, { since, timeoutMs });
    return parseVerdict(line) as Verdict;
  }

  /**
   * The boot-time verdict of the guest whose console is `consoleLog` (QEMU's serial.log, rewritten at
   * each start): from the heartbeat port, or from the console when the port missed it. The port can
   * lose lines: QEMU's socket chardev drops what the guest writes while no client is attached. (A
   * demo run once saw a VERIFY line missing between two lines that arrived: guestd's non-blocking
   * tty writes dropped lines on EAGAIN; fixed, see realGuest.test.ts "arrives whole and in order".)
   * timeoutMs is a liveness budget (scaled).
   */
  async bootVerdict(consoleLog: string, opts: { since?: number; timeoutMs?: number } = {}): Promise<Verdict & { via: 'port' | 'console' }> {
    const since = opts.since ?? 0;
    const budget = liveness(opts.timeoutMs ?? 60_000);
    const t0 = performance.now();
    const deadline = Date.now() + budget;
    for (;;) {
      const line = this.lines.find((l) => l.t >= since && /^VERIFY /.test(l.text));
      if (line) {
        noteWait('boot verdict', budget, performance.now() - t0);
        return { ...(parseVerdict(line) as Verdict), via: 'port' };
      }
      const text = await readFile(consoleLog, 'latin1').catch(() => '');
      const v = text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.startsWith('VERIFY ')).at(-1);
      const parsed = v ? parseVerdict({ t: performance.now(), text: v, from: consoleLog }) : undefined;
      if (parsed) {
        noteWait('boot verdict', budget, performance.now() - t0);
        return { ...parsed, via: 'console' };
      }
      if (Date.now() > deadline) throw new Error(`no boot verdict within ${budget} ms on the heartbeat port or in ${consoleLog} (${await this.describe()})`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  /** The first verdict (boot-time verification or requested) at or after `since`. */
  async verdict(opts: { since?: number; timeoutMs?: number } = {}): Promise<Verdict> {
    return parseVerdict(await this.waitFor(/^VERIFY /, opts)) as Verdict;
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    for (const p of this.paths) if (!this.detached.has(p)) toReader({ op: 'unwatch', id: this.id, path: p });
    this.connected.clear();
    observers.delete(this.id);
    if (observers.size === 0 && reader) {
      void reader.terminate();
      reader = undefined;
    }
  }
}
