/**
 * The operator tunnel under stress, between two real sshd hosts: many parallel connections with
 * distinct random payloads of varied sizes (so a lost, duplicated, reordered or cross-connection
 * byte shows), both half-close orders, a destination that speaks first (like an NBD server), and
 * the same again while the CPU is saturated.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openTunnel, tunnelSocketPath, type Tunnel } from '../../src/transfer/tunnel.js';
import { adoptHostFile, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { LOOPBACK } from '../world/loopback.js';
import { until } from '../world/until.js';

interface Served {
  server: net.Server;
  path: string;
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('operator tunnel under stress (real sshd on both ends)', () => {
  let two: TwoHosts;
  let dirA: string;
  let dirB: string;
  const servers: net.Server[] = [];

  beforeAll(async () => {
    two = await startTwoHosts({ tmpPrefix: 'vmop-tunnel-', firstAddress: LOOPBACK.tunnel.first });
    dirA = path.join(two.h1.vmDir, 'tun');
    dirB = path.join(two.h2.vmDir, 'tun');
    await two.c1.execOk(['mkdir', '-p', dirA]);
    await two.c2.execOk(['mkdir', '-p', dirB]);
  });

  afterAll(async () => {
    for (const s of servers) s.close();
    await two?.stop();
  });

  async function serve(name: string, handler: (s: net.Socket) => void): Promise<Served> {
    const p = path.join(dirB, name);
    const server = net.createServer({ allowHalfOpen: true }, handler);
    await new Promise<void>((r) => server.listen(p, r));
    await adoptHostFile(p);
    servers.push(server);
    return { server, path: p };
  }

  /** Client on A: writes `payload` (in random-sized pieces), half-closes, returns everything read until the peer's end. */
  function exchange(socketPath: string, payload: Buffer, opts: { endFirst?: boolean } = {}): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ path: socketPath, allowHalfOpen: true });
      const got: Buffer[] = [];
      s.on('data', (d: Buffer) => got.push(d));
      s.on('error', reject);
      s.on('end', () => {
        s.end();
        resolve(Buffer.concat(got));
      });
      if (opts.endFirst) {
        s.end();
        return;
      }
      let off = 0;
      const writeSome = (): void => {
        while (off < payload.length) {
          const n = Math.min(payload.length - off, 1 + Math.floor(Math.random() * 300_000));
          const ok = s.write(payload.subarray(off, off + n));
          off += n;
          if (!ok) {
            s.once('drain', writeSome);
            return;
          }
        }
        s.end();
      };
      writeSome();
    });
  }

  async function echoRound(tun: Tunnel, count: number, maxBytes: number): Promise<void> {
    const payloads = Array.from({ length: count }, (_, i) => randomBytes(i % 7 === 0 ? i % 3 : Math.floor(Math.random() * maxBytes)));
    const before = { ...tun.stats };
    const echoes = await Promise.all(payloads.map((p) => exchange(tun.socketPathOnA, p)));
    const bad = echoes
      .map((e, i) => ({ i, sent: payloads[i]!.length, got: e.length, same: e.equals(payloads[i]!) }))
      .filter((r) => !r.same);
    expect(bad).toEqual([]);
    const total = payloads.reduce((n, p) => n + p.length, 0);
    expect(tun.stats.bytesAtoB - before.bytesAtoB).toBe(total);
    expect(tun.stats.bytesBtoA - before.bytesBtoA).toBe(total);
    expect(tun.stats.connections - before.connections).toBe(count);
    await expect.poll(() => tun.stats.active, { timeout: 10_000 }).toBe(0);
  }

  it('echoes 48 parallel connections of 0 B – 6 MiB byte for byte, three rounds', async () => {
    const echo = await serve('echo.sock', (s) => s.pipe(s));
    const tun = await openTunnel({ a: two.c1, b: two.c2, socketPathOnA: tunnelSocketPath(dirA, 'e'), destination: { unixPath: echo.path } });
    try {
      for (let round = 0; round < 3; round++) await echoRound(tun, 48, 6 << 20);
      expect(tun.stats.lastError).toBeUndefined();
    } finally {
      await tun.close();
    }
  });

  it('delivers everything to a client that reads only after the destination has finished and closed', async () => {
    // The echo is complete and B's channel closed while most of the reply still waits in the
    // operator behind A's SSH window (the client is not reading): releasing the pair on that close
    // used to drop the queued bytes (ssh2 discards writes to a channel it has sent CLOSE on).
    const clients = 4;
    let finished = 0;
    const echo = await serve('echo-slow.sock', (s) => {
      s.pipe(s);
      s.on('close', () => finished++);
    });
    const tun = await openTunnel({ a: two.c1, b: two.c2, socketPathOnA: tunnelSocketPath(dirA, 'r'), destination: { unixPath: echo.path } });
    try {
      const results = await Promise.all(
        Array.from({ length: clients }, async () => {
          const payload = randomBytes(3 << 20);
          const got = await new Promise<Buffer>((resolve, reject) => {
            const s = net.connect({ path: tun.socketPathOnA, allowHalfOpen: true });
            const chunks: Buffer[] = [];
            s.pause();
            s.on('error', reject);
            s.end(payload);
            // 3 MiB fits in the buffers along the way (two SSH windows, the operator's stream
            // buffers): the client reads once every echo has finished and closed its end on B.
            until('every echo finished and closed on B', 60_000, async () => finished >= clients, 50).then(() => {
              s.on('data', (d: Buffer) => chunks.push(d));
              s.on('end', () => resolve(Buffer.concat(chunks)));
              s.resume();
            }, reject);
          });
          return { sent: payload.length, got: got.length, same: got.equals(payload) };
        }),
      );
      for (const r of results) expect(r).toEqual({ sent: 3 << 20, got: 3 << 20, same: true });
      expect(tun.stats.lastError).toBeUndefined();
    } finally {
      await tun.close();
    }
  });

  it('delivers a destination that speaks first and closes first (server greeting, then its own end) completely', async () => {
    const greeting = randomBytes(3 << 20);
    // like qemu-nbd: sends first; then reads the client's bytes and answers with their hash; ends its side first
    const speaker = await serve('speaker.sock', (s) => {
      const h = createHash('sha256');
      s.write(greeting);
      s.on('data', (d: Buffer) => h.update(d));
      s.on('end', () => s.end(h.digest('hex')));
    });
    const tun = await openTunnel({ a: two.c1, b: two.c2, socketPathOnA: tunnelSocketPath(dirA, 's'), destination: { unixPath: speaker.path } });
    try {
      const payloads = Array.from({ length: 24 }, () => randomBytes(Math.floor(Math.random() * (4 << 20))));
      const got = await Promise.all(payloads.map((p) => exchange(tun.socketPathOnA, p)));
      got.forEach((g, i) => {
        expect(g.length).toBe(greeting.length + 64);
        expect(g.subarray(0, greeting.length).equals(greeting)).toBe(true);
        expect(g.subarray(greeting.length).toString()).toBe(sha(payloads[i]!));
      });
      // the client ending at once still gets everything the server sends
      const quiet = await Promise.all(Array.from({ length: 8 }, () => exchange(tun.socketPathOnA, Buffer.alloc(0), { endFirst: true })));
      for (const q of quiet) expect(q.subarray(0, greeting.length).equals(greeting)).toBe(true);
    } finally {
      await tun.close();
    }
  });

  it('stays byte-exact while both cores are saturated', async () => {
    const burners: ChildProcess[] = [];
    const burner = 'const end = Date.now() + 120000; while (Date.now() < end) {}';
    for (let i = 0; i < 3; i++) burners.push(spawn(process.execPath, ['-e', burner], { stdio: 'ignore' }));
    const echo = await serve('echo-busy.sock', (s) => s.pipe(s));
    const tun = await openTunnel({ a: two.c1, b: two.c2, socketPathOnA: tunnelSocketPath(dirA, 'b'), destination: { unixPath: echo.path } });
    try {
      for (let round = 0; round < 2; round++) await echoRound(tun, 32, 4 << 20);
    } finally {
      for (const b of burners) b.kill('SIGKILL');
      await tun.close();
    }
  });
});
