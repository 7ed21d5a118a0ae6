/**
 * Room promised to moves in flight. A capacity check reads a host's free disk and memory right
 * before a VM moves; moves already on their way (mirrored ahead, parallel environments, the scratch
 * copies of a pre-copy or live verification) have not written or started everything they will, so
 * their needs are held here until they end and taken off what the next check reads. Counting what
 * a move already wrote twice errs on the safe side: a VM waits, a disk never fills.
 */
import type { HostCapacity } from '../planner/placement.js';

export interface Need {
  diskBytes: number;
  memoryBytes: number;
}

export class HostReservations {
  private readonly held = new Map<string, Map<string, Need>>();

  /** Holds `need` on `host` for `key` (one move) until the returned release is called; idempotent per key. */
  reserve(host: string, key: string, need: Need): () => void {
    let m = this.held.get(host);
    if (!m) this.held.set(host, (m = new Map()));
    m.set(key, need);
    return () => {
      m.delete(key);
      if (m.size === 0) this.held.delete(host);
    };
  }

  /** What `host` has left once the other moves' needs are taken off (`key`'s own need is not). */
  remaining(capacity: HostCapacity, except?: string): HostCapacity {
    let disk = 0;
    let memory = 0;
    for (const [k, n] of this.held.get(capacity.host) ?? []) {
      if (k === except) continue;
      disk += n.diskBytes;
      memory += n.memoryBytes;
    }
    return { ...capacity, diskFreeBytes: capacity.diskFreeBytes - disk, memAvailableBytes: capacity.memAvailableBytes - memory };
  }
}
