/**
 * The test world's liveness bridge (test/world/guestCluster.ts) talks to a guest API that the tests
 * power off. A request in flight when its peer went away behind the HA world's blackhole never
 * learns it (the FIN is dropped with the machine), and an unbounded request then waits forever:
 * a fresh-clone run lost 600 s in guestHa's afterAll (bridge.stop() awaiting such a tick).
 */
import net from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';
import { afterEach, describe, expect, it } from 'vitest';
import { VmLivenessBridge } from '../world/guestCluster.js';

describe('VmLivenessBridge against an API server that never answers', () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });

  it('a request the peer took and never answered ends with the bridge\'s request timeout; stop() returns', async () => {
    // a "powered-off" API server: takes the connection and the request, answers nothing, never closes
    const sockets: net.Socket[] = [];
    let requested!: () => void;
    const gotRequest = new Promise<void>((r) => (requested = r));
    const server = net.createServer((s) => {
      sockets.push(s);
      s.once('data', () => requested());
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => {
      for (const s of sockets) s.destroy();
      server.close();
    });
    const port = (server.address() as net.AddressInfo).port;
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'c', server: `http://127.0.0.1:${port}`, skipTLSVerify: true }],
      users: [{ name: 'u', token: 'not-a-secret' }],
      contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
      currentContext: 'x',
    });
    const errors: unknown[] = [];
    const bridge = new VmLivenessBridge(kc, [{ nodeName: 'n1', qemuName: 'env.n1' }], {
      live: async () => new Set(['env.n1']),
      onError: (e) => errors.push(e),
      requestTimeoutMs: 1000,
    });
    bridge.start();
    await gotRequest;
    await bridge.stop();
    expect(errors.map((e) => String((e as Error).name))).toContain('AbortError');
    // the kubeconfig the bridge was given is not changed: its other users keep their own (watches, for one)
    expect(Object.hasOwn(kc, 'applySecurityAuthentication')).toBe(false);
  }, 60_000);
});
