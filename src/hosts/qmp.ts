/**
 * Minimal QMP (QEMU Machine Protocol) client over any byte stream, typically a unix socket
 * forwarded through SSH. Commands are serialised: QEMU's monitor handles one at a time anyway,
 * and ordering matters for the operator (e.g. stop before quit).
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${qmpClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/**
 * Emits 'event' (QmpEvent) for every asynchronous event, plus the event name itself
 * (e.g. 'SHUTDOWN', 'STOP', 'RESUME', 'JOB_STATUS_CHANGE') with the event object; 'close' when the stream ends.
 */
export class QmpClient extends EventEmitter {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  private greetingWaiter: { resolve: (v: unknown) => void; reject: (e: Error) => void } | undefined;

  private constructor(private readonly stream: Duplex) {
    super();
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => this.onData(chunk));
    stream.on('error', (err: Error) => this.fail(err));
    stream.on('close', () => this.fail(new Error('QMP connection closed')));
    stream.on('end', () => this.fail(new Error('QMP connection closed')));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  static async open(stream: Duplex, opts: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const c = new QmpClient(stream);
    const timeoutMs = opts.timeoutMs ?? 10_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        new Promise((resolve, reject) => {
          c.greetingWaiter = { resolve, reject };
        }),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
        }),
      ]);
      await c.execute('qmp_capabilities', undefined, { timeoutMs });
    } catch (err) {
      c.close();
      throw err;
    } finally {
      if (timer) clearTimeout(timer);
    }
    return c;
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        this.fail(new Error(`QMP sent invalid JSON: ${line.slice(0, 200)}`));
        return;
      }
      this.onMessage(msg);
    }
  }

  private onMessage(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      this.greetingWaiter?.resolve(msg.QMP);
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      this.emit('event', ev);
      this.emit(ev.event, ev);
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) return;
    this.pending.delete(id);
    if ('error' in msg) {
      const e = (msg.error ?? {}) as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? 'unknown error'));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.greetingWaiter?.reject(err);
    this.greetingWaiter = undefined;
    for (const p of this.pending.values()) p.reject(new Error(`QMP ${p.command}: ${err.message}`));
    this.pending.clear();
    this.emit('close');
  }

  execute<T = unknown>(command: string, args?: object, opts: { timeoutMs?: number } = {}): Promise<T> {
    const run = (): Promise<T> => this.send<T>(command, args, opts.timeoutMs ?? 30_000);
    const p = this.queue.then(run, run);
    // Keep the chain alive regardless of this command's outcome.
    this.queue = p.catch(() => undefined);
    return p;
  }

  private send<T>(command: string, args: object | undefined, timeoutMs: number): Promise<T> {
    if (this.closed) return Promise.reject(new Error(`QMP ${command}: connection closed`));
    const id = `op-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        command,
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.stream.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /**
   * Waits `ms`, or less when one of the named events arrives first (or the connection closes): a
   * poll loop that sits inside a guest's downtime wakes on QEMU's news instead of its own timer.
   */
  nap(ms: number, events: string[]): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        for (const e of events) this.removeListener(e, done);
        this.removeListener('close', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      for (const e of events) this.once(e, done);
      this.once('close', done);
    });
  }

  /** Resolves with the first event of that name (optionally matching), or rejects on timeout/close. */
  waitForEvent(name: string, timeoutMs: number, match?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.removeListener(name, onEv);
        this.removeListener('close', onClose);
      };
      const onEv = (ev: QmpEvent): void => {
        if (match && !match(ev)) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (): void => {
        cleanup();
        reject(new Error(`QMP connection closed while waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`no QMP ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.on(name, onEv);
      this.once('close', onClose);
    });
  }

  close(): void {
    this.fail(new Error('QMP client closed'));
    this.stream.end();
    this.stream.destroy();
  }
}
