/**
 * Host-side recorder of the test guest's serial line protocol (scripts/guest/guestd.c): connects to
 * the VM's heartbeat.sock on every host the VM may be on (source and target are local here),
 * reconnects whenever QEMU goes away or comes up, and timestamps every line on arrival
 * (performance.now(), ms). Guest-observed downtime = the longest gap between heartbeats across a move.
 *
 * Reusable as a "is this VM really running" probe: isBeating() says whether the guest made progress
 * recently, which a live QEMU process alone does not prove (paused, inmigrate, shut down, hung).
 */
import { readFile } from 'node:fs/promises';
import net from 'node:net';

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

export function parseVerdict(line: GuestLine): Verdict | undefined {
  const ok = /^VERIFY ok records=(\d+) first=(\d+) last=(\d+) boot=(\d+)$/.exec(line.text);
  if (ok) return { ok: true, records: Number(ok[1]), first: Number(ok[2]), last: Number(ok[3]), boot: Number(ok[4]), t: line.t };
  const bad = /^VERIFY FAIL (.*)$/.exec(line.text);
  return bad ? { ok: false, reason: bad[1] ?? '', t: line.t } : undefined;
}

export class GuestObserver {
  readonly lines: GuestLine[] = [];
  readonly beats: Beat[] = [];
  private readonly socks = new Map<string, net.Socket>();
  private stopped = false;
  private readonly waiters = new Set<() => void>();

  constructor(readonly paths: string[]) {
    for (const p of paths) this.connect(p);
  }

  private connect(path: string): void {
    if (this.stopped) return;
    const s = net.connect(path);
    let buf = '';
    let retried = false;
    const retry = (): void => {
      if (retried) return;
      retried = true;
      if (this.socks.get(path) === s) this.socks.delete(path);
      if (!this.stopped) setTimeout(() => this.connect(path), 20);
    };
    s.on('connect', () => this.socks.set(path, s));
    s.on('data', (d: Buffer) => {
      const t = performance.now();
      buf += d.toString('latin1');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const text = buf.slice(0, nl).replace(/\r$/, '');
        buf = buf.slice(nl + 1);
        this.onLine({ t, text, from: path });
      }
    });
    s.on('error', retry);
    s.on('close', retry);
  }

  private onLine(l: GuestLine): void {
    const hb = /^HB (\d+) (\d+) (\d+)$/.exec(l.text);
    if (hb) this.beats.push({ t: l.t, beat: Number(hb[1]), acked: Number(hb[2]), boot: Number(hb[3]), from: l.from });
    else this.lines.push(l);
    for (const w of [...this.waiters]) w();
  }

  /** Resolves with the first line (not heartbeat) matching `re` that arrived at or after `since`. */
  waitFor(re: RegExp, opts: { since?: number; timeoutMs?: number } = {}): Promise<GuestLine> {
    const since = opts.since ?? 0;
    const find = (): GuestLine | undefined => this.lines.find((l) => l.t >= since && re.test(l.text));
    return this.waitUntil(find, opts.timeoutMs ?? 60_000, `guest line ${re}`);
  }

  /** Resolves with the first heartbeat at or after `since` (optionally from one socket path). */
  waitBeat(opts: { since?: number; from?: string; timeoutMs?: number } = {}): Promise<Beat> {
    const since = opts.since ?? 0;
    const find = (): Beat | undefined => this.beats.find((b) => b.t >= since && (opts.from === undefined || b.from === opts.from));
    return this.waitUntil(find, opts.timeoutMs ?? 60_000, `a heartbeat${opts.from ? ` from ${opts.from}` : ''}`);
  }

  private waitUntil<T>(find: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
    const now = find();
    if (now !== undefined) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const v = find();
        if (v === undefined) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(v);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        const tail = this.lines.slice(-5).map((l) => l.text).join(' | ');
        reject(new Error(`no ${what} within ${timeoutMs} ms (last guest lines: ${tail || 'none'}; ${this.beats.length} heartbeats)`));
      }, timeoutMs);
      this.waiters.add(check);
    });
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
    const sock = from ? this.socks.get(from) : undefined;
    if (!sock) throw new Error(`guest is not connected: no heartbeat socket to send "${text}" to`);
    const since = performance.now();
    sock.write(`${text}\n`);
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
   */
  async bootVerdict(consoleLog: string, opts: { since?: number; timeoutMs?: number } = {}): Promise<Verdict & { via: 'port' | 'console' }> {
    const since = opts.since ?? 0;
    const deadline = Date.now() + (opts.timeoutMs ?? 60_000);
    for (;;) {
      const line = this.lines.find((l) => l.t >= since && /^VERIFY /.test(l.text));
      if (line) return { ...(parseVerdict(line) as Verdict), via: 'port' };
      const text = await readFile(consoleLog, 'latin1').catch(() => '');
      const v = text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.startsWith('VERIFY ')).at(-1);
      const parsed = v ? parseVerdict({ t: performance.now(), text: v, from: consoleLog }) : undefined;
      if (parsed) return { ...parsed, via: 'console' };
      if (Date.now() > deadline) {
        const tail = this.lines.slice(-5).map((l) => l.text).join(' | ');
        throw new Error(`no boot verdict within ${opts.timeoutMs ?? 60_000} ms on the heartbeat port or in ${consoleLog} (last guest lines: ${tail || 'none'}; ${this.beats.length} heartbeats)`);
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  /** The first verdict (boot-time verification or requested) at or after `since`. */
  async verdict(opts: { since?: number; timeoutMs?: number } = {}): Promise<Verdict> {
    return parseVerdict(await this.waitFor(/^VERIFY /, opts)) as Verdict;
  }

  stop(): void {
    this.stopped = true;
    for (const s of this.socks.values()) s.destroy();
    this.socks.clear();
  }
}
