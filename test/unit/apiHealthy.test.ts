/**
 * A student's guest API server decides how it answers /readyz: one that drips a byte every half
 * second must not hold the operator's check (and the move, and its worker) for ever.
 */
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import { afterEach, describe, expect, it } from 'vitest';
import { GuestCluster } from '../../src/guest/guestCluster.js';

const servers: Server[] = [];
// a self-signed certificate for 127.0.0.1, as the guest kubeconfig's CA
const tls = (() => {
  const dir = mkdtempSync(join(tmpdir(), 'vmops-readyz-'));
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', join(dir, 'k'), '-out', join(dir, 'c')], { stdio: 'ignore' });
    return { key: readFileSync(join(dir, 'k')), cert: readFileSync(join(dir, 'c')) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
})();
afterEach(() => {
  for (const s of servers.splice(0)) {
    s.closeAllConnections();
    s.close();
  }
});

async function guestApi(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<GuestCluster> {
  const server = createServer(tls, handler);
  servers.push(server);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const kc = new KubeConfig();
  kc.loadFromClusterAndUser({ name: 'g', server: `https://127.0.0.1:${(server.address() as AddressInfo).port}`, caData: tls.cert.toString('base64'), skipTLSVerify: false }, { name: 'u', token: 't' });
  return new GuestCluster(kc);
}

describe('GuestCluster.apiHealthy', () => {
  it('a /readyz that drips one byte every 0.5 s is "not healthy" once its bound has passed, not never', async () => {
    let drips = 0;
    const guest = await guestApi((_req, res) => {
      res.writeHead(200);
      const t = setInterval(() => {
        drips++;
        res.write('o');
      }, 500);
      res.on('close', () => clearInterval(t));
    });
    expect(await guest.apiHealthy(2000)).toBe(false);
    // it did drip: the idle timeout alone (what bounded it before) would never have fired
    expect(drips).toBeGreaterThan(1);
  });

  it('a 200 is healthy; another status or a body beyond 64 KiB is not', async () => {
    expect(await (await guestApi((_q, r) => r.end('ok'))).apiHealthy(10_000)).toBe(true);
    expect(await (await guestApi((_q, r) => { r.writeHead(500); r.end('no'); })).apiHealthy(10_000)).toBe(false);
    expect(await (await guestApi((_q, r) => r.end(Buffer.alloc(1 << 20, 0x61)))).apiHealthy(10_000)).toBe(false);
  });

  it('the move\'s abort signal ends the check at once', async () => {
    const guest = await guestApi(() => undefined);
    const ac = new AbortController();
    const p = guest.apiHealthy(600_000, ac.signal);
    ac.abort();
    expect(await p).toBe(false);
  });
});
