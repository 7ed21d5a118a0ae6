/**
 * One authenticated SSH connection to a hypervisor host. Commands are passed as argv arrays and
 * every element is single-quoted, so the remote shell never interprets operator-supplied data.
 */
import type { Duplex, Readable, Writable } from 'node:stream';
import pRetry, { AbortError } from 'p-retry';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import { assertSafePath, type HostSpec } from '../api/inventory.js';
import { log } from '../util/log.js';

const logger = log.child({ component: 'ssh' });

export class HostKeyMismatchError extends Error {
  constructor(readonly host: string) {
    super(`SSH host key of host ${host} does not match the inventory's hostKey; refusing to connect (possible MITM or re-installed host)`);
    this.name = 'HostKeyMismatchError';
  }
}

export class RemoteCommandError extends Error {
  constructor(
    readonly host: string,
    readonly argv: string[],
    readonly code: number,
    readonly stderr: string,
  ) {
    super(`on ${host}: ${argv[0] ?? ''} exited with ${code}: ${stderr.trim().slice(0, 2000)}`);
    this.name = 'RemoteCommandError';
  }
}

export interface ExecResult {
  stdout: Buffer;
  stderr: string;
  /** exit status; 128+n style is not synthesised: a signal-killed command reports -1 */
  code: number;
}

/**
 * A streaming remote command. stdout must be consumed (or resume()d) even if unused: the channel
 * only reports its end, and so `exit`, once its readable side has been read to EOF.
 */
/** stdout (and stderr) an exec collects at most, unless the caller says otherwise */
export const DEFAULT_MAX_OUTPUT_BYTES = 16 << 20;

export interface ExecOptions {
  stdin?: Buffer | string;
  /** bounds the whole call, the channel's opening included */
  timeoutMs?: number;
  /** ends the call (and the remote command) early */
  signal?: AbortSignal;
  /** stdout beyond this fails the call (stderr beyond it is dropped); default DEFAULT_MAX_OUTPUT_BYTES */
  maxOutputBytes?: number;
}

export interface SpawnedCommand {
  stdin: Writable;
  stdout: Readable;
  stderr: Readable;
  /** resolves with the exit status (-1 if killed by a signal or the channel closed without one) */
  exit: Promise<number>;
  /** best effort: signal the remote process and close the channel */
  kill(): void;
}

/** POSIX single-quote: the only character needing care inside '...' is ' itself. */
export function shellQuote(arg: string): string {
  if (arg.includes('\0')) throw new Error('argument contains a NUL byte');
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

export function shellCommand(argv: string[]): string {
  if (argv.length === 0) throw new Error('empty argv');
  return argv.map(shellQuote).join(' ');
}

/** Raw key blob of an OpenSSH public-key line ("ssh-ed25519 AAAA... comment"). */
function hostKeyBlob(host: HostSpec): Buffer {
  const b64 = host.hostKey.trim().split(/\s+/)[1];
  if (!b64) throw new Error(`host ${host.name}: hostKey is not an OpenSSH public-key line`);
  return Buffer.from(b64, 'base64');
}

/** The host-key algorithms that can present the pinned key (an RSA key signs with SHA-2 or SHA-1). */
function hostKeyAlgorithms(host: HostSpec): NonNullable<NonNullable<ConnectConfig['algorithms']>['serverHostKey']> {
  const type = host.hostKey.trim().split(/\s+/)[0] ?? '';
  if (type === 'ssh-rsa') return ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'];
  if (['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521'].includes(type)) return [type as 'ssh-ed25519'];
  throw new Error(`host ${host.name}: hostKey type ${JSON.stringify(type.slice(0, 40))} is not supported (ssh-ed25519, ecdsa-sha2-*, ssh-rsa)`);
}

export class HostConnection {
  private alive = true;

  private constructor(
    readonly host: HostSpec,
    private readonly client: Client,
  ) {
    const markDead = (): void => {
      this.alive = false;
    };
    client.on('error', (err) => {
      markDead();
      logger.warn({ host: host.name, err: err.message }, 'ssh connection error');
    });
    client.on('close', markDead);
    client.on('end', markDead);
  }

  /** the underlying ssh2 client, for stream-local tunnels (src/transfer/tunnel.ts) */
  get sshClient(): Client {
    return this.client;
  }

  /** false once the transport errored or closed; a dead connection must be replaced, not reused. */
  get isAlive(): boolean {
    return this.alive;
  }

  static async connect(
    host: HostSpec,
    identity: { privateKey: string | Buffer },
    opts: { readyTimeoutMs?: number; retries?: number } = {},
  ): Promise<HostConnection> {
    const expected = hostKeyBlob(host);
    return pRetry(
      async () => {
        const client = new Client();
        let mismatch = false;
        const cfg: ConnectConfig = {
          host: host.address,
          port: host.port,
          username: host.user,
          privateKey: identity.privateKey,
          readyTimeout: opts.readyTimeoutMs ?? 20_000,
          keepaliveInterval: 10_000,
          keepaliveCountMax: 3,
          // GCM is AES-NI accelerated and needs no separate MAC pass: the relay's bottleneck is crypto in this process.
          algorithms: {
            cipher: ['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr'],
            // only the pinned key's type: a host that also offers another type would otherwise present
            // that one, and a correct pin would fail as a possible man in the middle
            serverHostKey: hostKeyAlgorithms(host),
          },
          hostVerifier: (key: Buffer) => {
            const ok = key.length === expected.length && key.equals(expected);
            if (!ok) mismatch = true;
            return ok;
          },
        };
        try {
          await new Promise<void>((resolve, reject) => {
            const onError = (err: Error): void => {
              client.removeListener('ready', onReady);
              reject(err);
            };
            const onReady = (): void => {
              client.removeListener('error', onError);
              // Nagle's algorithm held a small message (a QMP command, an exec request) until the host's
              // delayed ACK, ~40 ms: measured on every round trip in a live handover, with the guest down
              client.setNoDelay(true);
              resolve();
            };
            client.once('ready', onReady);
            client.once('error', onError);
            client.connect(cfg);
          });
        } catch (err) {
          client.end();
          if (mismatch) throw new AbortError(new HostKeyMismatchError(host.name));
          const e = err as Error & { level?: string };
          // Wrong credentials will not fix themselves by retrying.
          if (e.level === 'client-authentication') {
            throw new AbortError(new Error(`SSH authentication to host ${host.name} failed: ${e.message}`));
          }
          throw new Error(`SSH connect to host ${host.name} (${host.address}:${host.port}) failed: ${e.message}`);
        }
        return new HostConnection(host, client);
      },
      {
        retries: opts.retries ?? 3,
        minTimeout: 200,
        maxTimeout: 2000,
        onFailedAttempt: ({ error, attemptNumber, retriesLeft }) => {
          logger.warn({ host: host.name, attemptNumber, retriesLeft, err: error.message }, 'ssh connect attempt failed');
        },
      },
    );
  }

  /**
   * ssh2 may deliver the exit status in the same packet batch as the exec
   * reply, i.e. before any listener attached after an `await`: the exit
   * listener is attached synchronously here, or the code is lost (-1).
   */
  private openExec(argv: string[]): Promise<{ ch: ClientChannel; exitCode: () => number }> {
    const cmd = shellCommand(argv);
    return new Promise((resolve, reject) => {
      try {
        this.client.exec(cmd, (err, ch) => {
          if (err) return reject(err);
          let code = -1;
          ch.on('exit', (c: number | null) => {
            if (typeof c === 'number') code = c;
          });
          resolve({ ch, exitCode: () => code });
        });
      } catch (err) {
        // ssh2 throws synchronously when the socket is already gone.
        reject(err as Error);
      }
    });
  }

  /**
   * Runs a command and collects its output. `timeoutMs` bounds the whole call, the channel's opening
   * included (a host that never confirms the channel must not hang a move); `signal` ends it early;
   * `maxOutputBytes` (stdout and stderr each; default 16 MiB) ends a command that prints more — what a
   * student controls (a config file, a guest's answer) must not grow the operator's memory unbounded.
   */
  exec(argv: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const limit = opts.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
    return new Promise<ExecResult>((resolve, reject) => {
      let ch: ClientChannel | undefined;
      let settled = false;
      const kill = (c: ClientChannel | undefined): void => {
        if (!c) return;
        try {
          c.signal('KILL');
        } catch {
          // the channel may already be closing; close() below still releases it
        }
        c.close();
      };
      const settle = (fn: () => void): void => {
        if (settled) return;
        settled = true;
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const fail = (err: Error): void => settle(() => {
        kill(ch);
        reject(err);
      });
      const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => fail(new Error(`on ${this.host.name}: ${argv[0] ?? ''} timed out after ${opts.timeoutMs} ms${ch ? '' : ' (the host never opened the channel)'}`)), opts.timeoutMs);
      const onAbort = (): void => fail(new Error(`on ${this.host.name}: ${argv[0] ?? ''} cancelled: ${String((opts.signal?.reason as Error | undefined)?.message ?? opts.signal?.reason ?? 'aborted')}`));
      if (opts.signal?.aborted) return onAbort();
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      this.openExec(argv).then(({ ch: c, exitCode }) => {
        if (settled) return kill(c);
        ch = c;
        const out: Buffer[] = [];
        const err: Buffer[] = [];
        let outBytes = 0;
        let errBytes = 0;
        c.on('data', (d: Buffer) => {
          outBytes += d.length;
          if (outBytes > limit) return fail(new Error(`on ${this.host.name}: ${argv[0] ?? ''} printed more than ${limit} bytes; stopped`));
          out.push(d);
        });
        c.stderr.on('data', (d: Buffer) => {
          errBytes += d.length;
          if (errBytes <= limit) err.push(d);
        });
        c.on('error', (e: Error) => fail(e));
        c.on('close', () => settle(() => resolve({ stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8'), code: exitCode() })));
        if (opts.stdin !== undefined) c.end(opts.stdin);
        else c.end();
      }, (e: Error) => fail(e));
    });
  }

  async execOk(argv: string[], opts: ExecOptions = {}): Promise<Buffer> {
    const r = await this.exec(argv, opts);
    if (r.code !== 0) throw new RemoteCommandError(this.host.name, argv, r.code, r.stderr);
    return r.stdout;
  }

  async spawn(argv: string[]): Promise<SpawnedCommand> {
    const { ch, exitCode } = await this.openExec(argv);
    const exit = new Promise<number>((resolve) => {
      ch.once('close', () => resolve(exitCode()));
    });
    return {
      stdin: ch,
      stdout: ch,
      stderr: ch.stderr,
      exit,
      kill: () => {
        try {
          ch.signal('KILL');
        } catch {
          // channel already closed
        }
        ch.close();
      },
    };
  }

  /** A byte stream to a unix socket on the host (QMP), tunnelled by sshd; no socat needed on the host. */
  openUnixSocket(path: string): Promise<Duplex> {
    assertSafePath('unix socket', path);
    return new Promise((resolve, reject) => {
      try {
        this.client.openssh_forwardOutStreamLocal(path, (err, ch) => (err ? reject(new Error(`on ${this.host.name}: cannot open unix socket ${path}: ${err.message}`)) : resolve(ch)));
      } catch (err) {
        reject(err as Error);
      }
    });
  }

  /**
   * A TCP stream to address:port opened *by the host* (direct-tcpip): how the operator reaches services inside
   * the VMs on that host's network (a guest's etcd, its API server) without routes from the operator to them.
   */
  openTcp(address: string, port: number): Promise<Duplex> {
    if (!/^[A-Za-z0-9.:-]+$/.test(address)) throw new Error(`not a host name or IP address: ${JSON.stringify(address)}`);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`invalid port ${port}`);
    return new Promise((resolve, reject) => {
      try {
        this.client.forwardOut('127.0.0.1', 0, address, port, (err, ch) => (err ? reject(new Error(`on ${this.host.name}: cannot connect to ${address}:${port}: ${err.message}`)) : resolve(ch)));
      } catch (err) {
        reject(err as Error);
      }
    });
  }

  close(): void {
    this.alive = false;
    this.client.end();
  }
}
