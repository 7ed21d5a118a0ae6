import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ApiException, type V1Lease } from '@kubernetes/client-node';
import { LeaseLeaderElector, type LeaseApi, type LeaderElectorOptions } from '../../src/controller/runtime/leaderElection.js';

/** In-memory Lease store with resourceVersion conflicts, JSON round-trips (like the wire) and fault injection. */
class FakeLeaseApi implements LeaseApi {
  lease?: V1Lease;
  rv = 1;
  down = false;
  writes = 0;
  private fail() {
    if (this.down) throw new Error('connection refused');
  }
  async readNamespacedLease(_p?: { name: string; namespace: string }): Promise<V1Lease> {
    this.fail();
    if (!this.lease) throw new ApiException(404, 'not found', {}, {});
    return JSON.parse(JSON.stringify(this.lease)) as V1Lease;
  }
  async createNamespacedLease(p: { namespace: string; body: V1Lease }): Promise<V1Lease> {
    this.fail();
    if (this.lease) throw new ApiException(409, 'already exists', {}, {});
    return this.store(p.body);
  }
  async replaceNamespacedLease(p: { body: V1Lease }): Promise<V1Lease> {
    this.fail();
    if (!this.lease) throw new ApiException(404, 'not found', {}, {});
    if (p.body.metadata?.resourceVersion !== this.lease.metadata?.resourceVersion) throw new ApiException(409, 'conflict', {}, {});
    return this.store(p.body);
  }
  private store(body: V1Lease): V1Lease {
    this.writes++;
    const copy = JSON.parse(JSON.stringify(body)) as V1Lease;
    copy.metadata = { ...copy.metadata, resourceVersion: String(++this.rv) };
    this.lease = copy;
    return JSON.parse(JSON.stringify(copy)) as V1Lease;
  }
}

interface Candidate {
  elector: LeaseLeaderElector;
  log: string[];
  signal?: AbortSignal;
}

function candidate(api: LeaseApi, identity: string, extra: Partial<LeaderElectorOptions> = {}): Candidate {
  const c: Candidate = { log: [] } as unknown as Candidate;
  c.elector = new LeaseLeaderElector({
    api,
    namespace: 'ops',
    name: 'vmops-leader',
    identity,
    onStartedLeading: (signal) => {
      c.signal = signal;
      c.log.push('start');
    },
    onStoppedLeading: (reason) => c.log.push(`stop: ${reason}`),
    ...extra,
  });
  return c;
}

describe('LeaseLeaderElector', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('validates timing options', () => {
    const api = new FakeLeaseApi();
    const base = { api, namespace: 'n', name: 'l', identity: 'a', onStartedLeading: () => {} };
    expect(() => new LeaseLeaderElector({ ...base, leaseDurationSeconds: 10, renewDeadlineSeconds: 10 })).toThrow(/leaseDuration/);
    expect(() => new LeaseLeaderElector({ ...base, renewDeadlineSeconds: 2, retryPeriodSeconds: 2 })).toThrow(/renewDeadline/);
    expect(() => new LeaseLeaderElector({ ...base, identity: '' })).toThrow(/identity/);
  });

  it('creates the Lease, leads, and keeps renewing with MicroTime timestamps', async () => {
    const api = new FakeLeaseApi();
    const a = candidate(api, 'a');
    a.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    expect(a.log).toEqual(['start']);
    expect(a.elector.isLeader).toBe(true);
    expect(a.signal?.aborted).toBe(false);
    expect(api.lease?.spec).toMatchObject({ holderIdentity: 'a', leaseDurationSeconds: 15, leaseTransitions: 0 });
    expect(String(api.lease?.spec?.renewTime)).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
    const firstRenew = api.lease?.spec?.renewTime;
    const writes = api.writes;
    await vi.advanceTimersByTimeAsync(10_000);
    expect(api.writes).toBeGreaterThanOrEqual(writes + 4); // every 2 s
    expect(api.lease?.spec?.renewTime).not.toEqual(firstRenew);
    expect(api.lease?.spec?.acquireTime).toEqual(api.lease?.spec?.acquireTime); // unchanged while renewing
    expect(a.log).toEqual(['start']);
    await a.elector.stop();
  });

  it('two candidates: exactly one leads; after release the other takes over within a retry period', async () => {
    const api = new FakeLeaseApi();
    const a = candidate(api, 'a');
    const b = candidate(api, 'b');
    a.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    b.elector.start();
    for (let i = 0; i < 30; i++) {
      await vi.advanceTimersByTimeAsync(1000);
      expect(a.elector.isLeader && b.elector.isLeader).toBe(false);
    }
    expect(a.elector.isLeader).toBe(true);
    expect(b.elector.isLeader).toBe(false);
    expect(b.elector.leader).toBe('a');

    await a.elector.release();
    expect(a.signal?.aborted).toBe(true);
    expect(a.log).toEqual(['start', 'stop: stopped']);
    expect(api.lease?.spec?.holderIdentity).toBe('');
    await vi.advanceTimersByTimeAsync(2_400); // ≤ retryPeriod × 1.2
    expect(b.elector.isLeader).toBe(true);
    expect(b.log).toEqual(['start']);
    expect(api.lease?.spec).toMatchObject({ holderIdentity: 'b', leaseTransitions: 1 });
    await b.elector.stop();
  });

  it('a leader that cannot renew steps down after renewDeadline, before anyone else may take over', async () => {
    const api = new FakeLeaseApi();
    const a = candidate(api, 'a');
    a.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    const b = candidate(api, 'b');
    b.elector.start();
    await vi.advanceTimersByTimeAsync(100);
    // a is partitioned from the API server; b still reaches it
    const realReplace = api.replaceNamespacedLease.bind(api);
    const realRead = api.readNamespacedLease.bind(api);
    let partitioned = true;
    const onlyB = <T>(fn: () => Promise<T>, who: string) => (partitioned && who === 'a' ? Promise.reject(new Error('partition')) : fn());
    (a.elector as unknown as { api: LeaseApi }).api = {
      readNamespacedLease: (p) => onlyB(() => realRead(p), 'a'),
      createNamespacedLease: (p) => onlyB(() => api.createNamespacedLease(p), 'a'),
      replaceNamespacedLease: (p) => onlyB(() => realReplace(p), 'a'),
    };
    const partitionAt = Date.now();
    let aLostAt = 0;
    let bLeadAt = 0;
    for (let t = 0; t < 30_000; t += 100) {
      await vi.advanceTimersByTimeAsync(100);
      if (!aLostAt && !a.elector.isLeader) aLostAt = Date.now();
      if (!bLeadAt && b.elector.isLeader) bLeadAt = Date.now();
      expect(a.elector.isLeader && b.elector.isLeader).toBe(false);
    }
    expect(a.signal?.aborted).toBe(true);
    expect(a.log[1]).toMatch(/renewDeadline/);
    expect(aLostAt - partitionAt).toBeLessThanOrEqual(10_100);
    expect(bLeadAt).toBeGreaterThan(aLostAt);
    expect(bLeadAt - partitionAt).toBeGreaterThanOrEqual(13_000); // waited out the lease (15 s from its last observed renew)
    partitioned = false;
    await vi.advanceTimersByTimeAsync(10_000);
    expect(a.elector.isLeader).toBe(false); // b keeps it
    expect(a.elector.leader).toBe('b');
    await a.elector.stop();
    await b.elector.stop();
  });

  it('a leader whose Lease was taken over steps down at its next renew', async () => {
    const api = new FakeLeaseApi();
    const a = candidate(api, 'a');
    a.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    // someone force-writes the holder (e.g. an admin or a split-brain peer)
    api.lease!.spec!.holderIdentity = 'intruder';
    api.lease!.metadata!.resourceVersion = String(++api.rv);
    await vi.advanceTimersByTimeAsync(2_000);
    expect(a.elector.isLeader).toBe(false);
    expect(a.log[1]).toMatch(/taken over by intruder/);
    expect(a.signal?.aborted).toBe(true);
    await a.elector.stop();
    expect(api.lease?.spec?.holderIdentity).toBe('intruder'); // release never clobbers someone else's lease
  });

  it('takes over a Lease whose holder died, only after leaseDuration since observing it', async () => {
    const api = new FakeLeaseApi();
    api.lease = {
      metadata: { name: 'vmops-leader', namespace: 'ops', resourceVersion: '1' },
      spec: { holderIdentity: 'dead', leaseDurationSeconds: 15, renewTime: new Date(0).toISOString() as unknown as Date },
    };
    const b = candidate(api, 'b');
    const started = Date.now();
    b.elector.start();
    let leadAt = 0;
    for (let t = 0; t < 25_000 && !leadAt; t += 100) {
      await vi.advanceTimersByTimeAsync(100);
      if (b.elector.isLeader) leadAt = Date.now();
    }
    expect(leadAt - started).toBeGreaterThanOrEqual(15_000);
    expect(leadAt - started).toBeLessThan(15_000 + 2_500);
    expect(api.lease?.spec).toMatchObject({ holderIdentity: 'b', leaseTransitions: 1 });
    await b.elector.stop();
  });

  it('loses the optimistic-concurrency race without leading', async () => {
    const api = new FakeLeaseApi();
    api.lease = { metadata: { name: 'vmops-leader', namespace: 'ops', resourceVersion: '1' }, spec: { holderIdentity: '' } };
    const origReplace = api.replaceNamespacedLease.bind(api);
    let raced = false;
    api.replaceNamespacedLease = async (p) => {
      if (!raced) {
        raced = true;
        // another replica wins between our read and our write
        api.lease = { ...api.lease!, metadata: { ...api.lease!.metadata, resourceVersion: String(++api.rv) }, spec: { holderIdentity: 'other', leaseDurationSeconds: 15 } };
      }
      return origReplace(p);
    };
    const c = candidate(api, 'c');
    c.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    expect(c.elector.isLeader).toBe(false);
    expect(api.lease?.spec?.holderIdentity).toBe('other');
    await vi.advanceTimersByTimeAsync(5_000);
    expect(c.elector.isLeader).toBe(false);
    expect(c.log).toEqual([]);
    await c.elector.stop();
  });

  it('a hung API call does not keep a leader past its renew deadline', async () => {
    const api = new FakeLeaseApi();
    const a = candidate(api, 'a');
    a.elector.start();
    await vi.advanceTimersByTimeAsync(0);
    api.readNamespacedLease = () => new Promise(() => {}); // never answers
    await vi.advanceTimersByTimeAsync(10_100);
    expect(a.elector.isLeader).toBe(false);
    expect(a.signal?.aborted).toBe(true);
    const stop = a.elector.stop({ release: false });
    await vi.advanceTimersByTimeAsync(10_000);
    await stop;
  });
});
