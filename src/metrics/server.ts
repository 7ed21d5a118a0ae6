import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import { log as rootLog } from '../util/log.js';
import { registry as defaultRegistry } from './metrics.js';

export interface Readiness {
  ready: boolean;
  reason?: string;
}

export interface MetricsServerOptions {
  /** 0 picks a free port */
  port: number;
  /** default 0.0.0.0 */
  host?: string;
  readiness: () => Readiness | Promise<Readiness>;
  /** liveness; default always alive */
  liveness?: () => Readiness | Promise<Readiness>;
  registry?: Registry;
}

export interface MetricsServer {
  port: number;
  close(): Promise<void>;
}

const log = rootLog.child({ component: 'metrics-server' });

function send(res: ServerResponse, status: number, body: string, contentType = 'text/plain; charset=utf-8'): void {
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store' });
  res.end(body);
}

/** Serve GET /metrics (Prometheus text format), /healthz and /readyz (200 "ok" or 503 "<reason>"). */
export async function startMetricsServer(opts: MetricsServerOptions): Promise<MetricsServer> {
  const reg = opts.registry ?? defaultRegistry;

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      send(res, 405, 'method not allowed\n');
      return;
    }
    switch (path) {
      case '/metrics': {
        const body = await reg.metrics();
        send(res, 200, body, reg.contentType);
        return;
      }
      case '/healthz':
      case '/livez': {
        const l = opts.liveness ? await opts.liveness() : { ready: true };
        send(res, l.ready ? 200 : 503, l.ready ? 'ok\n' : `not alive: ${l.reason ?? 'unknown'}\n`);
        return;
      }
      case '/readyz': {
        const r = await opts.readiness();
        send(res, r.ready ? 200 : 503, r.ready ? 'ok\n' : `not ready: ${r.reason ?? 'unknown'}\n`);
        return;
      }
      default:
        send(res, 404, 'not found\n');
    }
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      log.error({ err, url: req.url }, 'metrics server handler failed');
      if (!res.headersSent) send(res, 500, 'internal error\n');
      else res.destroy();
    });
  });
  server.keepAliveTimeout = 5_000;

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host ?? '0.0.0.0', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  log.info({ port, host: opts.host ?? '0.0.0.0' }, 'metrics server listening');

  return {
    port,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        server.closeAllConnections();
      }),
  };
}
