/**
 * What a hostile or broken SSH peer (a student's beachhead, a wedged host) can do to an exec: never
 * confirm the channel, print without end, offer another host-key type than the one pinned. The peer
 * is ssh2's own server in this process, acting exactly that way.
 */
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { Server, utils, type ServerChannel } from 'ssh2';
import { afterEach, describe, expect, it } from 'vitest';
import type { HostSpec } from '../../src/api/inventory.js';
import { HostConnection } from '../../src/hosts/ssh.js';


const ed25519 = utils.generateKeyPairSync('ed25519');
const rsa = utils.generateKeyPairSync('rsa', { bits: 2048 });
const client = utils.generateKeyPairSync('ed25519');
const servers: Server[] = [];
const conns: HostConnection[] = [];

afterEach(() => {
  for (const c of conns.splice(0)) c.close();
  for (const s of servers.splice(0)) s.close();
});

/** An SSH server on 127.0.0.1 that accepts any key and runs `behaviour` for each exec. */
async function peer(hostKeys: string[], behaviour: 'never-confirm' | ((ch: ServerChannel) => void)): Promise<number> {
  const server = new Server({ hostKeys }, (c) => {
    c.on('authentication', (ctx) => ctx.accept());
    c.on('error', () => undefined);
    c.on('session', (accept) => {
      // the channel is never confirmed: the client's exec waits for an answer that never comes
      if (behaviour === 'never-confirm') return;
      const session = accept();
      session.on('exec', (acc) => behaviour(acc()));
    });
  });
  servers.push(server);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

async function connect(port: number, hostKey: string): Promise<HostConnection> {
  const host: HostSpec = { name: 'peer', address: '127.0.0.1', port, user: 'u', hostKey, vmDir: '/srv/vms' };
  const c = await HostConnection.connect(host, { privateKey: client.private }, { retries: 0, readyTimeoutMs: 10_000 });
  conns.push(c);
  return c;
}

describe('HostConnection.exec against a hostile peer', () => {
  it('a channel the host never confirms fails the exec at its timeout (the timeout covers the opening)', async () => {
    const c = await connect(await peer([ed25519.private], 'never-confirm'), ed25519.public);
    await expect(c.exec(['nginx', '-T'], { timeoutMs: 1500 })).rejects.toThrow(/timed out after 1500 ms \(the host never opened the channel\)/);
  });

  it('an abort signal ends an exec whose channel was never confirmed', async () => {
    const c = await connect(await peer([ed25519.private], 'never-confirm'), ed25519.public);
    const ac = new AbortController();
    const p = c.exec(['cat', '/etc/nginx/nginx.conf'], { signal: ac.signal });
    ac.abort(new Error('leadership lost'));
    await expect(p).rejects.toThrow(/cancelled: leadership lost/);
  });

  it('a command that prints without end is stopped at the output bound, not buffered', async () => {
    let stopped = false;
    const c = await connect(await peer([ed25519.private], (ch) => {
      const chunk = Buffer.alloc(64 << 10, 0x61);
      const pump = (): void => {
        while (!stopped && ch.write(chunk));
        if (!stopped) ch.once('drain', pump);
      };
      ch.on('close', () => (stopped = true));
      pump();
    }), ed25519.public);
    await expect(c.exec(['cat', '/dev/zero'], { maxOutputBytes: 4 << 20, timeoutMs: 60_000 })).rejects.toThrow(/printed more than 4194304 bytes/);
  });

  it('a host offering ed25519 and RSA connects when the inventory pins its RSA key (the key type is negotiated from the pin)', async () => {
    const port = await peer([ed25519.private, rsa.private], (ch) => {
      ch.write('ok\n');
      ch.exit(0);
      ch.end();
    });
    const c = await connect(port, rsa.public);
    expect((await c.exec(['true'], { timeoutMs: 10_000 })).stdout.toString()).toBe('ok\n');
  });
});
