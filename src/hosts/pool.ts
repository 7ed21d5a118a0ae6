import type { HostSpec } from '../api/inventory.js';
import { Hypervisor } from './hypervisor.js';
import { HostConnection } from './ssh.js';

/**
 * One live SSH connection per hypervisor host, shared by all moves; a dead
 * connection is replaced on next use instead of failing every later step.
 */
export class HostPool {
  private readonly connecting = new Map<string, Promise<HostConnection>>();

  constructor(private readonly identity: { privateKey: string | Buffer }) {}

  async hypervisor(host: HostSpec): Promise<Hypervisor> {
    let pending = this.connecting.get(host.name);
    if (pending) {
      const conn = await pending.catch(() => undefined);
      if (conn?.isAlive && sameEndpoint(conn.host, host)) return new Hypervisor(host, conn);
      conn?.close();
    }
    pending = HostConnection.connect(host, this.identity);
    this.connecting.set(host.name, pending);
    pending.catch(() => this.connecting.delete(host.name));
    return new Hypervisor(host, await pending);
  }

  /** A dedicated new connection (the caller closes it): relay retries after a dropped connection. */
  connectFresh(host: HostSpec): Promise<HostConnection> {
    return HostConnection.connect(host, this.identity);
  }

  closeAll(): void {
    for (const p of this.connecting.values()) void p.then((c) => c.close(), () => undefined);
    this.connecting.clear();
  }
}

function sameEndpoint(a: HostSpec, b: HostSpec): boolean {
  return a.address === b.address && a.port === b.port && a.user === b.user && a.hostKey === b.hostKey;
}
