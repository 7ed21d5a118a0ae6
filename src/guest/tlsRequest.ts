/**
 * HTTPS over a stream the caller opened (e.g. a direct-tcpip channel of a hypervisor's SSH connection):
 * the guest's etcd members and API servers sit on the VMs' network, which only the hypervisors reach.
 * The server certificate is verified against the given CA and the endpoint's address (IP SAN).
 */
import { request } from 'node:https';
import { connect } from 'node:tls';
import type { Duplex } from 'node:stream';

export interface TlsMaterial {
  /** PEM CA the server certificate must chain to */
  ca: string;
  /** client certificate and key (PEM) for servers that require them (etcd with --client-cert-auth) */
  cert?: string;
  key?: string;
}

/** Opens a byte stream to address:port; how is the caller's business (SSH direct-tcpip, plain TCP). */
export type Dial = (address: string, port: number) => Promise<Duplex>;

export interface TlsResponse {
  status: number;
  body: string;
}

/**
 * One request; resolves with status and body, rejects on connection/TLS failure or after timeoutMs.
 * Error messages name the endpoint and the failure, never the TLS material.
 */
export async function tlsRequest(
  dial: Dial,
  endpoint: { address: string; port: number },
  tls: TlsMaterial,
  req: { method: 'GET' | 'POST'; path: string; body?: unknown; timeoutMs: number; signal?: AbortSignal },
): Promise<TlsResponse> {
  const where = `${endpoint.address}:${endpoint.port}`;
  let stream: Duplex | undefined;
  let finished = false;
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${where}: no answer within ${req.timeoutMs} ms`)), req.timeoutMs);
    if (req.signal) {
      onAbort = () => reject(new Error(`${where}: aborted`));
      if (req.signal.aborted) onAbort();
      else req.signal.addEventListener('abort', onAbort, { once: true });
    }
  });
  const work = (async (): Promise<TlsResponse> => {
    const socket = await dial(endpoint.address, endpoint.port);
    stream = socket;
    if (finished) socket.destroy(); // the deadline passed while the channel was opening
    const payload = req.body === undefined ? undefined : JSON.stringify(req.body);
    return new Promise<TlsResponse>((resolve, reject) => {
      const r = request(
        {
          method: req.method,
          path: req.path,
          host: endpoint.address,
          port: endpoint.port,
          // no agent: with createConnection given, node uses it instead of dialling itself
          headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) },
          createConnection: () =>
            // host (an IP) without servername: identity is checked against the certificate's IP SANs
            connect({ socket, host: endpoint.address, ca: tls.ca, cert: tls.cert, key: tls.key }),
        },
        (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (d: string) => (body += d));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
          res.on('error', (e) => reject(new Error(`${where}: ${e.message}`)));
        },
      );
      r.on('error', (e) => reject(new Error(`${where}: ${e.message}`)));
      r.end(payload);
    });
  })();
  try {
    return await Promise.race([work, deadline]);
  } finally {
    finished = true;
    clearTimeout(timer);
    if (onAbort) req.signal?.removeEventListener('abort', onAbort);
    stream?.destroy();
    work.catch(() => undefined);
  }
}
