/**
 * A TCP proxy in front of a real server whose path can be cut the way a powered-off host or a
 * dropped route cuts it: `blackhole()` stops forwarding on every open connection and accepts new
 * ones without ever answering (no RST, no FIN — the client's requests hang); `restore()` resets
 * the cut connections (as a peer that comes back does) and forwards again.
 */
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';

export class TcpProxy {
  private readonly pairs = new Set<{ client: Socket; upstream?: Socket }>();
  private cut = false;

  private constructor(private readonly server: Server, readonly port: number) {}

  static async start(upstream: { host: string; port: number }, listenHost = '127.0.0.1'): Promise<TcpProxy> {
    const holder: { proxy?: TcpProxy } = {};
    const server = createServer((client) => holder.proxy!.accept(client, upstream));
    await new Promise<void>((res, rej) => server.once('error', rej).listen(0, listenHost, () => res()));
    holder.proxy = new TcpProxy(server, (server.address() as AddressInfo).port);
    return holder.proxy;
  }

  private accept(client: Socket, upstream: { host: string; port: number }): void {
    const pair: { client: Socket; upstream?: Socket } = { client };
    this.pairs.add(pair);
    const drop = () => {
      this.pairs.delete(pair);
      client.destroy();
      pair.upstream?.destroy();
    };
    client.on('error', drop).on('close', drop);
    if (this.cut) {
      client.pause(); // accepted, never answered
      return;
    }
    const up = connect(upstream.port, upstream.host);
    pair.upstream = up;
    up.on('error', drop).on('close', drop);
    client.pipe(up);
    up.pipe(client);
  }

  /** Every byte from now on is dropped, in both directions, on open and new connections. */
  blackhole(): void {
    this.cut = true;
    for (const { client, upstream } of this.pairs) {
      client.unpipe();
      upstream?.unpipe();
      client.pause();
      upstream?.pause();
    }
  }

  /** The path is back: connections cut meanwhile are reset, new ones are forwarded. */
  restore(): void {
    this.cut = false;
    for (const { client, upstream } of [...this.pairs]) {
      if (client.isPaused()) {
        client.resetAndDestroy();
        upstream?.destroy();
      }
    }
  }

  async close(): Promise<void> {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream?.destroy();
    }
    await new Promise<void>((res) => this.server.close(() => res()));
  }
}
