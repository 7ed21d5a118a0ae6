/**
 * A long-lived segment hasher on one host for one file (HASHER in scripts.ts): a copy attempt asks
 * it for each segment's sha256 over one SSH exec channel, instead of opening a channel and starting
 * a shell, Perl and openssl per segment (measured here: ~60 ms of starts per segment under load,
 * 128 of them for a 2 GiB direct copy). Requests are answered in order; when the process ends or
 * a request times out, every request still open is rejected (the segments are resent).
 */
import { RemoteCommandError, type HostConnection, type SpawnedCommand } from '../hosts/ssh.js';
import { opsText, type Segment } from './plan.js';
import { HASHER, HASHER_SH } from './scripts.js';

interface Pending {
  index: number;
  resolve: (hex: string) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export class SegmentHasher {
  private readonly pending: Pending[] = [];
  private buf = '';
  private errOut = '';
  private failure: Error | undefined;

  private constructor(
    private readonly conn: HostConnection,
    private readonly path: string,
    private readonly proc: SpawnedCommand,
    private readonly timeoutMs: number,
  ) {
    proc.stderr.on('data', (d: Buffer) => (this.errOut = (this.errOut + d.toString('utf8')).slice(-2000)));
    proc.stdout.on('data', (d: Buffer) => this.onData(d.toString('utf8')));
    proc.stdin.on('error', () => undefined);
    void proc.exit.then((code) => this.fail(new RemoteCommandError(conn.host.name, ['relay-hasher', path], code, this.errOut || 'hasher ended')));
  }

  /** Starts the hasher of `path` on `conn`'s host; `flush`: write the file's dirty pages back before each answer. */
  static async start(conn: HostConnection, path: string, opts: { flush: boolean; timeoutMs: number }): Promise<SegmentHasher> {
    const proc = await conn.spawn(['sh', '-c', HASHER_SH, 'relay-hasher', HASHER, path, opts.flush ? '1' : '0']);
    return new SegmentHasher(conn, path, proc, opts.timeoutMs);
  }

  /** sha256 (hex) of the segment's extents in the file */
  hash(seg: Segment): Promise<string> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.fail(new Error(`on ${this.conn.host.name}: hashing segment ${seg.index} of ${this.path} timed out after ${this.timeoutMs} ms`));
        this.proc.kill();
      }, this.timeoutMs);
      this.pending.push({ index: seg.index, resolve, reject, timer });
      this.proc.stdin.write(opsText([seg], true));
    });
  }

  /** Lets the hasher finish the requests it has and end. */
  close(): void {
    this.proc.stdin.end();
  }

  kill(): void {
    this.fail(new Error('hasher stopped'));
    this.proc.kill();
  }

  private onData(text: string): void {
    this.buf += text;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const m = /^H (\d+) ([0-9a-f]{64})\s/.exec(`${line}\n`);
      const p = this.pending.shift();
      if (!p) continue;
      clearTimeout(p.timer);
      if (m && Number(m[1]) === p.index) p.resolve(m[2] as string);
      else p.reject(new Error(`on ${this.conn.host.name}: hasher of ${this.path} answered ${JSON.stringify(line.slice(0, 120))} for segment ${p.index}`));
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const p of this.pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(this.failure);
    }
  }
}
