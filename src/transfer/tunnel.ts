/**
 * A byte tunnel between two hypervisor hosts that goes through the operator, so the hosts need no
 * trust in (nor network route to) each other:
 *
 *   process on A ──connect──▶ unix socket on A (bound by A's sshd, remote stream-local forwarding)
 *        ──SSH to A──▶ operator ──SSH to B──▶ unix socket (or TCP port) on B (local forwarding on B)
 *
 * Every connection made to the socket on A becomes one pair of SSH channels spliced in the operator,
 * with backpressure end to end (stream.pipe on both directions). QEMU's NBD client (drive-mirror to
 * `nbd+unix:///export?socket=...`) and QEMU migration (`unix:/path`) both work through it.
 *
 * The socket on A is created by sshd with StreamLocalBindMask (default 0177): only A's login user —
 * the one QEMU runs as — can connect. OpenSSH does not unlink the socket file when the forwarding is
 * cancelled, so close() removes it with rm.
 */
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import type { Channel, Client } from 'ssh2';
import { assertSafePath } from '../api/inventory.js';
import type { HostConnection } from '../hosts/ssh.js';
import { log } from '../util/log.js';

const logger = log.child({ component: 'tunnel' });

/** sun_path is 108 bytes including the terminating NUL. */
export const MAX_UNIX_SOCKET_PATH = 107;

export type TunnelDestination = { unixPath: string } | { tcpHost: string; tcpPort: number };

export interface TunnelStats {
  /** bytes that went from A to B (written by the client on A) */
  bytesAtoB: number;
  /** bytes that went from B to A */
  bytesBtoA: number;
  /** connections accepted on A so far */
  connections: number;
  /** connections currently open */
  active: number;
  /** last error seen on a connection (the tunnel itself stays up), for diagnostics */
  lastError?: string;
}

export interface Tunnel {
  /** unix socket on host A; every connection to it reaches the destination on host B */
  readonly socketPathOnA: string;
  readonly destination: TunnelDestination;
  /** live counters (the object is updated in place) */
  readonly stats: TunnelStats;
  /** stop accepting, tear down open connections, remove the socket file on A; idempotent */
  close(): Promise<void>;
}

export interface TunnelOptions {
  /** connection to host A, where the socket is created */
  a: HostConnection;
  /** connection to host B, where connections are delivered */
  b: HostConnection;
  /** absolute path of the socket to create on A; its directory must exist and be writable by A's login user */
  socketPathOnA: string;
  destination: TunnelDestination;
}

/**
 * The ssh2 Client under a HostConnection. HostConnection is expected to expose it as `sshClient`
 * (see report); until then the private field is used, which is the same object.
 */
export function sshClientOf(conn: HostConnection): Client {
  const c = conn as unknown as { sshClient?: Client; client?: Client };
  const client = c.sshClient ?? c.client;
  if (!client) throw new Error(`HostConnection to ${conn.host.name} does not expose its ssh2 Client`);
  return client;
}

type UnixHandler = (accept: () => Channel, reject: () => void) => void;

/**
 * ssh2 emits every incoming stream-local connection of a Client as one 'unix connection' event; an
 * unanswered one hangs the peer. One dispatcher per Client routes by socket path and rejects the rest.
 */
const dispatchers = new WeakMap<Client, Map<string, UnixHandler>>();

function routeFor(client: Client): Map<string, UnixHandler> {
  let routes = dispatchers.get(client);
  if (routes) return routes;
  const table = new Map<string, UnixHandler>();
  routes = table;
  dispatchers.set(client, table);
  client.on('unix connection', (info, accept, reject) => {
    const h = table.get(info.socketPath);
    if (h) h(accept, reject);
    else reject();
  });
  return routes;
}

function forwardIn(client: Client, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      client.openssh_forwardInStreamLocal(path, (err) => (err ? reject(err) : resolve()));
    } catch (err) {
      reject(err as Error);
    }
  });
}

function unforwardIn(client: Client, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      client.openssh_unforwardInStreamLocal(path, (err) => (err ? reject(err) : resolve()));
    } catch (err) {
      reject(err as Error);
    }
  });
}

function connectOut(conn: HostConnection, dest: TunnelDestination): Promise<Duplex> {
  if ('unixPath' in dest) return conn.openUnixSocket(dest.unixPath);
  const client = sshClientOf(conn);
  return new Promise((resolve, reject) => {
    try {
      client.forwardOut('127.0.0.1', 0, dest.tcpHost, dest.tcpPort, (err, ch) =>
        err ? reject(new Error(`on ${conn.host.name}: cannot connect to ${dest.tcpHost}:${dest.tcpPort}: ${err.message}`)) : resolve(ch),
      );
    } catch (err) {
      reject(err as Error);
    }
  });
}

/** A fresh, short socket path inside `dir` (which must exist on the host). */
export function tunnelSocketPath(dir: string, prefix: string): string {
  const p = `${dir.replace(/\/+$/, '')}/${prefix}-${randomBytes(4).toString('hex')}.sock`;
  assertSafePath('tunnel socket', p);
  return p;
}

export async function openTunnel(opts: TunnelOptions): Promise<Tunnel> {
  const { a, b, destination } = opts;
  const socketPathOnA = opts.socketPathOnA;
  assertSafePath('tunnel socket', socketPathOnA);
  if (Buffer.byteLength(socketPathOnA) > MAX_UNIX_SOCKET_PATH) {
    throw new Error(`tunnel socket path ${socketPathOnA} is longer than ${MAX_UNIX_SOCKET_PATH} bytes (unix socket limit)`);
  }
  if ('unixPath' in destination) assertSafePath('tunnel destination', destination.unixPath);
  else if (!Number.isInteger(destination.tcpPort) || destination.tcpPort < 1 || destination.tcpPort > 65535) {
    throw new Error(`tunnel destination port ${destination.tcpPort} is invalid`);
  }

  const clientA = sshClientOf(a);
  const routes = routeFor(clientA);
  if (routes.has(socketPathOnA)) throw new Error(`a tunnel on ${a.host.name}:${socketPathOnA} is already open`);

  const stats: TunnelStats = { bytesAtoB: 0, bytesBtoA: 0, connections: 0, active: 0 };
  const open = new Set<{ destroy(): void }>();
  let closed = false;
  const ctx = { from: a.host.name, to: b.host.name, socket: socketPathOnA };

  routes.set(socketPathOnA, (accept, reject) => {
    if (closed) return reject();
    const chA = accept();
    stats.connections++;
    stats.active++;
    let chB: Duplex | undefined;
    let finished = false;
    const pair = {
      destroy: (): void => {
        if (finished) return;
        finished = true;
        // ssh2 silently discards writes to a channel once it has sent CLOSE: bytes still queued here
        // are lost, so say so (outside a deliberate teardown, where the caller discards the connection).
        const pending = chA.writableLength + (chB?.writableLength ?? 0);
        if (pending > 0 && !closed) {
          stats.lastError ??= `connection released with ${pending} bytes not delivered`;
          logger.warn({ ...ctx, pending }, 'tunnel connection released with bytes not delivered');
        }
        stats.active--;
        open.delete(pair);
        chA.destroy();
        chB?.destroy();
      },
    };
    open.add(pair);
    const fail = (side: string) => (err: Error): void => {
      stats.lastError = `${side}: ${err.message}`;
      logger.warn({ ...ctx, side, err: err.message }, 'tunnel connection error');
      pair.destroy();
    };
    chA.on('error', fail('A'));
    // Data that arrives before B is connected is buffered by the paused channel (SSH window backpressure).
    chA.pause();
    connectOut(b, destination).then(
      (s) => {
        chB = s;
        if (finished) {
          s.destroy();
          return;
        }
        s.on('error', fail('B'));
        chA.on('data', (d: Buffer) => {
          stats.bytesAtoB += d.length;
        });
        s.on('data', (d: Buffer) => {
          stats.bytesBtoA += d.length;
        });
        // Half-close is propagated by pipe(); the pair is released once both directions are done,
        // i.e. once each side has *flushed* what pipe() wrote into it ('finish'), not merely once its
        // source ended: destroying on 'end' dropped data still queued behind the SSH window.
        let done = 0;
        const onFinish = (): void => {
          if (++done === 2) setImmediate(() => pair.destroy());
        };
        chA.once('finish', onFinish);
        s.once('finish', onFinish);
        // One side closing must not discard what is still queued towards the other side: ssh2's
        // Channel.destroy() sends CLOSE at once and drops every later write, and the reply may
        // still be waiting for SSH window (a client that reads slowly). This was the rare echo
        // mismatch of the tunnel test (test/integration/tunnel.test.ts, slow reader). End the other
        // side gracefully and release the pair once it has flushed; give up only on a peer that
        // made no progress reading for 30 s.
        const closeAfterFlush = (other: Duplex, side: string): void => {
          if (other.writableFinished || other.destroyed) return pair.destroy();
          other.once('finish', () => pair.destroy());
          other.end();
          let left = other.writableLength;
          const watchdog = setInterval(() => {
            if (finished) return clearInterval(watchdog);
            if (other.writableLength < left) {
              left = other.writableLength;
              return;
            }
            clearInterval(watchdog);
            stats.lastError = `${side}: peer stopped reading for 30 s with ${left} bytes not delivered`;
            pair.destroy();
          }, 30_000);
          watchdog.unref();
        };
        chA.once('close', () => closeAfterFlush(s, 'B'));
        s.once('close', () => closeAfterFlush(chA, 'A'));
        chA.pipe(s);
        s.pipe(chA);
        chA.resume();
      },
      (err: Error) => fail('B')(err),
    );
  });

  try {
    await forwardIn(clientA, socketPathOnA);
  } catch (err) {
    routes.delete(socketPathOnA);
    throw new Error(`on ${a.host.name}: cannot bind tunnel socket ${socketPathOnA}: ${(err as Error).message}`);
  }
  logger.debug({ ...ctx, destination }, 'tunnel open');

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      closed = true;
      await unforwardIn(clientA, socketPathOnA).catch((err: Error) => logger.debug({ ...ctx, err: err.message }, 'unforward failed'));
      routes.delete(socketPathOnA);
      for (const p of [...open]) p.destroy();
      // sshd leaves the socket file behind.
      await a.exec(['rm', '-f', '--', socketPathOnA]).catch(() => undefined);
      logger.debug({ ...ctx, ...stats }, 'tunnel closed');
    })();
    return closing;
  };
  return { socketPathOnA, destination, stats, close };
}
