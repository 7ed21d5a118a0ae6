/**
 * The guest's control plane judged by etcd itself: member list, every member's status (leader, raft index,
 * errors, learner) and the cluster's alarms, asked through etcd's v3 JSON gateway over TLS, plus the API
 * servers' /readyz. Quorum rule as Cluster API's KubeadmControlPlane applies it: with the member about to stop
 * gone, `voting − unhealthy − 1 ≥ ⌊voting/2⌋ + 1`, learners, unreachable members and members with alarms or
 * errors counting as unhealthy.
 */
import type { VMSpec } from '../api/inventory.js';
import type { ControlPlaneGuard, SafetyVerdict } from '../migrate/guestSafety.js';
import { tlsRequest, type TlsMaterial } from './tlsRequest.js';
import type { Duplex } from 'node:stream';
import { sleep } from '../util/sleep.js';

export interface ControllerEndpoint {
  /** inventory VM name */
  vm: string;
  /** guest node name; kubeadm names each etcd member after its node */
  nodeName: string;
  /** the VM's address, where its etcd member and API server listen */
  address: string;
}

export interface EtcdGuardOptions {
  controllers: ControllerEndpoint[];
  etcdPort: number;
  apiServerPort: number;
  /**
   * etcd client TLS material and the CA of the API servers' serving certificates (from the guest kubeconfig),
   * fetched when first needed (they live in Secrets); never logged nor put into messages.
   */
  credentials: () => Promise<{ etcdTls: TlsMaterial; apiServerCa: string }>;
  /** a stream to address:port opened from where controller `vm` lives (its hypervisor) */
  dial: (vm: string, address: string, port: number) => Promise<Duplex>;
  requestTimeoutMs?: number;
  /** a member is caught up when its raft index is at most this far behind the leader's */
  maxRaftLag?: number;
  pollMs?: number;
  leaderMoveTimeoutMs?: number;
}

interface EtcdStatus {
  memberId: string;
  leader: string;
  raftIndex: number;
  raftTerm: number;
  isLearner: boolean;
  errors: string[];
}

export interface MemberView {
  id: string;
  name: string;
  isLearner: boolean;
  controller?: ControllerEndpoint;
  status?: EtcdStatus;
  /** why its status could not be read */
  error?: string;
  alarms: string[];
}

export interface ClusterView {
  /** undefined when no member answered the member list */
  members?: MemberView[];
  /** the leader most members report ('' if none) */
  leaderId: string;
  /** per controller that did not answer: why */
  unreachable: Map<string, string>;
}

export interface QuorumInput {
  /** members other than the one about to stop, each with its problems (empty = healthy) */
  others: { label: string; isLearner: boolean; problems: string[] }[];
  /** voting members of the cluster, the stopping one included */
  voting: number;
}

/** Cluster API's rule: stopping one member leaves `voting − unhealthy − 1` healthy voters, which must be a quorum of `voting`. */
export function quorumAfterStop(input: QuorumInput): { ok: boolean; remaining: number; quorum: number; unhealthy: string[] } {
  const unhealthy = input.others.filter((m) => m.problems.length > 0);
  const remaining = input.voting - unhealthy.length - 1;
  const quorum = Math.floor(input.voting / 2) + 1;
  return { ok: remaining >= quorum, remaining, quorum, unhealthy: unhealthy.map((m) => `${m.label}: ${m.problems.join(', ')}`) };
}


const num = (v: unknown): number => (typeof v === 'string' || typeof v === 'number' ? Number(v) : 0);
const id = (v: unknown): string => (typeof v === 'string' || typeof v === 'number' ? String(v) : '0');

export class EtcdGuard implements ControlPlaneGuard {
  private readonly timeoutMs: number;
  private readonly maxLag: number;
  private readonly pollMs: number;

  private creds: Promise<{ etcdTls: TlsMaterial; apiServerCa: string }> | undefined;

  constructor(private readonly o: EtcdGuardOptions) {
    this.timeoutMs = o.requestTimeoutMs ?? 3000;
    this.maxLag = o.maxRaftLag ?? 100;
    this.pollMs = o.pollMs ?? 500;
  }

  private controller(vm: string): ControllerEndpoint {
    const c = this.o.controllers.find((x) => x.vm === vm);
    if (!c) throw new Error(`VM ${vm} is not a controller with an address in the inventory`);
    return c;
  }

  /** Fetched once; a failed fetch is retried on the next call instead of being remembered. */
  private credentials(): Promise<{ etcdTls: TlsMaterial; apiServerCa: string }> {
    this.creds ??= this.o.credentials().catch((err: unknown) => {
      this.creds = undefined;
      throw err;
    });
    return this.creds;
  }

  private async etcd<T>(c: ControllerEndpoint, path: string, body: unknown, signal?: AbortSignal): Promise<T> {
    const { etcdTls } = await this.credentials();
    const dial = (address: string, port: number) => this.o.dial(c.vm, address, port);
    const r = await tlsRequest(dial, { address: c.address, port: this.o.etcdPort }, etcdTls, { method: 'POST', path, body, timeoutMs: this.timeoutMs, signal });
    if (r.status !== 200) throw new Error(`etcd ${path} answered HTTP ${r.status}: ${r.body.slice(0, 300)}`);
    return JSON.parse(r.body) as T;
  }

  private async status(c: ControllerEndpoint, signal?: AbortSignal): Promise<EtcdStatus> {
    const s = await this.etcd<{ header?: { member_id?: string }; leader?: string; raftIndex?: string; raftTerm?: string; isLearner?: boolean; errors?: string[] }>(c, '/v3/maintenance/status', {}, signal);
    return { memberId: id(s.header?.member_id), leader: id(s.leader), raftIndex: num(s.raftIndex), raftTerm: num(s.raftTerm), isLearner: s.isLearner ?? false, errors: s.errors ?? [] };
  }

  /** /readyz of a controller's API server (anonymous: kube-apiserver serves it to system:public-info-viewer) */
  async apiServerReady(vm: string, signal?: AbortSignal): Promise<string | undefined> {
    const c = this.controller(vm);
    const { apiServerCa } = await this.credentials();
    try {
      const dial = (address: string, port: number) => this.o.dial(c.vm, address, port);
      const r = await tlsRequest(dial, { address: c.address, port: this.o.apiServerPort }, { ca: apiServerCa }, { method: 'GET', path: '/readyz', timeoutMs: this.timeoutMs, signal });
      return r.status === 200 ? undefined : `API server /readyz answered HTTP ${r.status}`;
    } catch (err) {
      return `API server unreachable (${(err as Error).message})`;
    }
  }

  /** Everything etcd says about itself, asked from every controller in parallel. */
  async view(signal?: AbortSignal): Promise<ClusterView> {
    const answers = await Promise.all(
      this.o.controllers.map(async (c) => {
        try {
          return { c, status: await this.status(c, signal) };
        } catch (err) {
          return { c, error: (err as Error).message };
        }
      }),
    );
    const unreachable = new Map(answers.filter((a) => a.error).map((a) => [a.c.vm, a.error!]));
    const votes = new Map<string, number>();
    for (const a of answers) if (a.status && a.status.leader !== '0') votes.set(a.status.leader, (votes.get(a.status.leader) ?? 0) + 1);
    const leaderId = [...votes.entries()].sort((x, y) => y[1] - x[1])[0]?.[0] ?? '';
    for (const a of answers) {
      if (!a.status) continue;
      try {
        const list = await this.etcd<{ members?: { ID?: string; name?: string; clientURLs?: string[]; isLearner?: boolean }[] }>(a.c, '/v3/cluster/member/list', {}, signal);
        const alarms = await this.etcd<{ alarms?: { memberID?: string; alarm?: string }[] }>(a.c, '/v3/maintenance/alarm', {}, signal);
        const members = (list.members ?? []).map((m): MemberView => {
          const mid = id(m.ID);
          const controller = this.o.controllers.find(
            (c) => m.name === c.nodeName || m.name === c.vm || (m.clientURLs ?? []).some((u) => new URL(u).hostname.replace(/^\[|\]$/g, '') === c.address),
          );
          const ans = controller ? answers.find((x) => x.c === controller) : undefined;
          const view: MemberView = { id: mid, name: m.name ?? mid, isLearner: m.isLearner ?? false, alarms: (alarms.alarms ?? []).filter((x) => id(x.memberID) === mid).map((x) => x.alarm ?? 'UNKNOWN') };
          if (controller) view.controller = controller;
          if (ans?.status) view.status = ans.status;
          if (ans?.error) view.error = ans.error;
          return view;
        });
        return { members, leaderId, unreachable };
      } catch (err) {
        unreachable.set(a.c.vm, (err as Error).message);
      }
    }
    return { leaderId, unreachable };
  }

  private label(m: MemberView): string {
    return m.controller ? `${m.controller.vm} (etcd member ${m.name})` : `etcd member ${m.name}`;
  }

  /** Why a member is not healthy; empty when it is. */
  problems(m: MemberView, view: ClusterView): string[] {
    const p: string[] = [];
    if (m.isLearner) p.push('is a learner');
    if (!m.controller) p.push('not a controller of the inventory, cannot be asked');
    else if (m.error) p.push(`unreachable (${m.error})`);
    else if (m.status) {
      if (m.status.errors.length) p.push(`reports errors: ${m.status.errors.join('; ')}`);
      if (m.status.memberId !== m.id) p.push(`answers as another member (${m.status.memberId})`);
      if (m.status.leader === '0') p.push('sees no leader');
      else if (view.leaderId && m.status.leader !== view.leaderId) p.push('disagrees on the leader');
    }
    for (const a of m.alarms) p.push(`alarm ${a}`);
    return p;
  }

  async checkSafeToStop(vm: VMSpec): Promise<SafetyVerdict> {
    const target = this.controller(vm.name);
    const view = await this.view();
    if (!view.members) {
      const why = [...view.unreachable.entries()].map(([k, v]) => `${k}: ${v}`).join('; ');
      return { safe: false, reason: 'WaitingForQuorum', message: `no etcd member answered: ${why}` };
    }
    const me = view.members.find((m) => m.controller === target);
    const others = view.members.filter((m) => m !== me);
    const voting = view.members.filter((m) => !m.isLearner).length;
    const q = quorumAfterStop({ voting, others: others.map((m) => ({ label: this.label(m), isLearner: m.isLearner, problems: this.problems(m, view) })) });
    const leader = view.members.find((m) => m.id === view.leaderId);
    if (!q.ok || !leader) {
      const missing = me ? '' : ` (${vm.name} has no etcd member)`;
      const detail = q.unhealthy.length ? `unhealthy: ${q.unhealthy.join('; ')}` : 'no leader';
      return {
        safe: false,
        reason: 'WaitingForQuorum',
        message: `stopping ${vm.name}${missing} would leave ${q.remaining} of ${voting} voting etcd members healthy, quorum needs ${q.quorum}; ${detail}`,
      };
    }
    const notReady: string[] = [];
    const others2 = this.o.controllers.filter((c) => c !== target);
    const ready = await Promise.all(others2.map(async (c) => ({ c, why: await this.apiServerReady(c.vm) })));
    for (const r of ready) if (r.why) notReady.push(`${r.c.vm}: ${r.why}`);
    if (notReady.length) return { safe: false, reason: 'WaitingForAPIServer', message: `API servers not ready: ${notReady.join('; ')}` };
    return {
      safe: true,
      reason: 'QuorumSafe',
      message: `without ${vm.name} etcd keeps ${q.remaining} of ${voting} voting members healthy (quorum ${q.quorum}), leader ${this.label(leader)}; API servers of ${others2.map((c) => c.vm).join(', ')} ready`,
    };
  }

  async moveLeadershipAway(vm: VMSpec, signal: AbortSignal): Promise<{ movedTo?: string }> {
    const target = this.controller(vm.name);
    const view = await this.view(signal);
    if (!view.members) throw new Error(`cannot ask etcd who leads: ${[...view.unreachable.values()].join('; ')}`);
    const me = view.members.find((m) => m.controller === target);
    if (!me || view.leaderId !== me.id) return {};
    const leaderIndex = me.status?.raftIndex ?? 0;
    const candidates = view.members
      .filter((m) => m !== me && this.problems(m, view).length === 0 && m.status && leaderIndex - m.status.raftIndex <= this.maxLag)
      .sort((a, b) => (b.status?.raftIndex ?? 0) - (a.status?.raftIndex ?? 0));
    const to = candidates[0];
    if (!to) {
      const why = view.members.filter((m) => m !== me).map((m) => `${this.label(m)}: ${this.problems(m, view).join(', ') || 'behind the leader'}`);
      throw new Error(`no healthy, caught-up etcd member to move leadership to from ${vm.name}: ${why.join('; ')}`);
    }
    await this.etcd(target, '/v3/maintenance/transfer-leadership', { targetID: to.id }, signal);
    const deadline = Date.now() + (this.o.leaderMoveTimeoutMs ?? 15_000);
    for (;;) {
      const [a, b] = await Promise.all([this.status(to.controller!, signal).catch(() => undefined), this.status(target, signal).catch(() => undefined)]);
      if (a?.leader === to.id && (!b || b.leader === to.id)) return { movedTo: to.controller!.vm };
      if (Date.now() > deadline) throw new Error(`etcd leadership did not move from ${vm.name} to ${to.controller!.vm} within ${this.o.leaderMoveTimeoutMs ?? 15_000} ms`);
      await sleep(100, signal);
    }
  }

  /** Why vm's member / API server are not yet fit to serve again; undefined when they are. */
  async memberNotHealthy(vm: string, signal?: AbortSignal): Promise<string | undefined> {
    const c = this.controller(vm);
    const view = await this.view(signal);
    if (!view.members) return `no etcd member answered: ${[...view.unreachable.entries()].map(([k, v]) => `${k}: ${v}`).join('; ')}`;
    const me = view.members.find((m) => m.controller === c);
    if (!me) return `${vm} has no etcd member`;
    const p = this.problems(me, view);
    if (p.length) return `${this.label(me)}: ${p.join(', ')}`;
    const leader = view.members.find((m) => m.id === view.leaderId);
    if (!leader?.status || !me.status) return 'no leader';
    const lag = leader.status.raftIndex - me.status.raftIndex;
    if (lag > this.maxLag) return `${this.label(me)} is ${lag} raft entries behind the leader`;
    return this.apiServerReady(vm, signal);
  }

  async waitMemberHealthy(vm: VMSpec, opts: { timeoutMs: number; signal: AbortSignal }): Promise<void> {
    const deadline = Date.now() + opts.timeoutMs;
    for (;;) {
      const why = await this.memberNotHealthy(vm.name, opts.signal);
      if (!why) return;
      if (Date.now() > deadline) throw new Error(`${vm.name} not healthy after ${Math.round(opts.timeoutMs / 1000)} s: ${why}`);
      await sleep(this.pollMs, opts.signal);
    }
  }
}
