/**
 * A moved VM is the same VM on the network: the real test guest with a virtio NIC on a host bridge
 * (fixed MAC, its own address) serves TCP; a connection to it from the host, established before a
 * live move, carries requests through the move and after it, answered by the same boot of the same
 * guest. The L2 network learns the guest's new port from QEMU's self-announce (RARP frames with the
 * guest's MAC, counted by an nftables rule on the bridge), and the bridge's forwarding table follows.
 * The student's outage seen over that network (the longest wait for an answer) is printed beside
 * QEMU's own pause figure.
 *
 * Both hosts share this machine's network namespace, so one bridge stands for the L2 network that
 * joins the hosts (the taps of the source and the target QEMU are two ports of it).
 */
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vmDirectory, type VMSpec } from '../../src/api/inventory.js';
import { liveMigrate } from '../../src/migrate/strategies.js';
import { liveness } from '../world/budget.js';
import { GuestObserver } from '../world/guestObserver.js';
import { installGuest, realGuestVm } from '../world/guestImage.js';
import { allowVmBridge, startTwoHosts, type TwoHosts } from '../world/hosts.js';
import { LOOPBACK } from '../world/loopback.js';
import { until } from '../world/until.js';

const ENV = 'env-net';
const BRIDGE = 'br-vmops-net';
const HOST_ADDRESS = '10.213.77.1';
const GUEST_ADDRESS = '10.213.77.2';
const PORT = 7007;
const MAC = '52:54:00:0e:0e:01';
const NFT_TABLE = 'vmops_net_announce';

const nft = (...args: string[]) => execFileSync('nft', args, { encoding: 'utf8' });
/** RARP frames (EtherType 0x8035) from the guest's MAC that entered the bridge: only QEMU's self-announce sends them */
function announcesSeen(): number {
  const rules = (JSON.parse(nft('-j', 'list', 'table', 'bridge', NFT_TABLE)) as { nftables: { rule?: { expr: { counter?: { packets: number } }[] } }[] }).nftables;
  return rules.flatMap((r) => r.rule?.expr ?? []).reduce((n, e) => n + (e.counter?.packets ?? 0), 0);
}
/** The bridge port the forwarding table sends the guest's MAC to (undefined: not learnt). */
function portOfGuest(): string | undefined {
  const fdb = JSON.parse(execFileSync('bridge', ['-j', 'fdb', 'show', 'br', BRIDGE], { encoding: 'utf8' })) as { mac: string; ifname?: string; flags?: string[] }[];
  return fdb.find((e) => e.mac === MAC && !(e.flags ?? []).includes('permanent'))?.ifname;
}
const portExists = (port: string) => {
  try {
    execFileSync('ip', ['link', 'show', port], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
};

/** A line-oriented TCP client of the guest's echo service, keeping every answer with its arrival time. */
class EchoClient {
  readonly answers: { t: number; boot: number; text: string }[] = [];
  closed: string | undefined;
  private rest = '';
  private constructor(private readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      const t = performance.now();
      const lines = (this.rest + d).split('\n');
      this.rest = lines.pop() ?? '';
      for (const l of lines) {
        const m = /^ECHO (\d+) (.*)$/.exec(l);
        if (m) this.answers.push({ t, boot: Number(m[1]), text: m[2]! });
      }
    });
    socket.on('error', (err) => { this.closed ??= err.message; });
    socket.on('close', () => { this.closed ??= 'closed'; });
  }
  static async connect(): Promise<EchoClient> {
    return until(`a TCP connection to the guest's echo service ${GUEST_ADDRESS}:${PORT}`, liveness(60_000), () => new Promise<EchoClient | undefined>((res) => {
      const s = net.connect({ host: GUEST_ADDRESS, port: PORT, timeout: 2000 });
      s.once('connect', () => { s.setTimeout(0); res(new EchoClient(s)); });
      s.once('error', () => res(undefined));
      s.once('timeout', () => { s.destroy(); res(undefined); });
    }), 250);
  }
  send(text: string): number {
    this.socket.write(`${text}\n`);
    return performance.now();
  }
  answered(text: string) {
    return this.answers.find((a) => a.text === text);
  }
  end(): void {
    this.socket.destroy();
  }
}

describe('a moved VM is the same VM on its network (real guest, NIC on a bridge, live move)', () => {
  let two: TwoHosts;
  let obs: GuestObserver;
  let client: EchoClient | undefined;
  const vm: VMSpec = realGuestVm('net', { writesPerSecond: 20, ip: `${GUEST_ADDRESS}/24`, echoPort: PORT, nics: [{ bridge: BRIDGE, mac: MAC, model: 'virtio-net-pci' }] });

  beforeAll(async () => {
    allowVmBridge(BRIDGE, `${HOST_ADDRESS}/24`);
    nft('add', 'table', 'bridge', NFT_TABLE);
    nft('flush', 'table', 'bridge', NFT_TABLE);
    nft('add', 'chain', 'bridge', NFT_TABLE, 'pre', '{ type filter hook prerouting priority 0; }');
    nft('add', 'rule', 'bridge', NFT_TABLE, 'pre', 'ether', 'saddr', MAC, 'ether', 'type', '0x8035', 'counter');
    two = await startTwoHosts({ tmpPrefix: 'vmop-net-', firstAddress: LOOPBACK.vmNetwork.first });
    const dirs = [vmDirectory(two.h1, ENV, vm.name), vmDirectory(two.h2, ENV, vm.name)];
    await installGuest(dirs[0]!, { seed: 11 });
    obs = new GuestObserver(dirs.map((d) => path.join(d, 'heartbeat.sock')));
    const t0 = performance.now();
    expect((await two.hv1.startVm(ENV, vm)).state).toBe('running');
    expect(await obs.verdict({ since: t0, timeoutMs: liveness(120_000) })).toMatchObject({ ok: true });
    await obs.waitFor(/^ECHO listening on port \d+$/, { since: t0, timeoutMs: liveness(60_000) });
  }, liveness(300_000));

  afterAll(async () => {
    client?.end();
    obs?.stop();
    for (const hv of [two?.hv1, two?.hv2]) await hv?.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
    await two?.stop();
    try {
      nft('delete', 'table', 'bridge', NFT_TABLE);
    } catch {
      // never created
    }
  });

  it('a TCP connection established before the move carries requests through it and after it, answered by the same boot; the network learns the new port from QEMU\'s announce', async () => {
    client = await EchoClient.connect();
    client.send('hello');
    const first = await until('the first answer', liveness(30_000), async () => client!.answered('hello'), 50);
    const sourcePort = portOfGuest();
    expect(sourcePort, 'the bridge learnt the guest\'s MAC on the source QEMU\'s tap').toBeDefined();
    const announcesBefore = announcesSeen();

    // a request every 20 ms through the whole move, on the one connection
    const sent = new Map<number, number>();
    let seq = 0;
    const pinger = setInterval(() => sent.set(++seq, client!.send(`seq ${seq}`)), 20);
    let result: Awaited<ReturnType<typeof liveMigrate>>;
    try {
      result = await liveMigrate({ source: two.hv1, target: two.hv2, environment: ENV, vm, downtimeLimitMs: 300, convergenceTimeoutMs: liveness(120_000) });
      // and a while after it, on the target
      const after = seq;
      await until('25 requests answered after the move', liveness(60_000), async () => (client!.answered(`seq ${after + 25}`) ? true : undefined), 50);
    } finally {
      clearInterval(pinger);
    }
    const last = seq;
    await until('every request answered', liveness(30_000), async () => (client!.answered(`seq ${last}`) ? true : undefined), 50);

    expect(client.closed, 'the connection was never reset or closed').toBeUndefined();
    expect((await two.hv2.vmStatus(ENV, vm)).qmpStatus).toBe('running');
    expect((await two.hv1.vmStatus(ENV, vm)).state).not.toBe('running');
    // every request answered once, in order, by the boot that answered before the move: the same guest, not a rebooted copy
    const answers = client.answers.filter((a) => a.text.startsWith('seq '));
    expect(answers.map((a) => a.text)).toEqual(Array.from({ length: last }, (_, i) => `seq ${i + 1}`));
    expect(new Set(client.answers.map((a) => a.boot))).toEqual(new Set([first.boot]));

    // QEMU announced the guest on its new port (RARP from its MAC), and the bridge forwards there now
    const announces = announcesSeen() - announcesBefore;
    expect(announces).toBeGreaterThan(0);
    const targetPort = portOfGuest();
    expect(targetPort).toBeDefined();
    expect(targetPort).not.toBe(sourcePort);
    expect(portExists(sourcePort!), `the source QEMU's tap ${sourcePort} is gone with it`).toBe(false);

    // the student's outage over the network: the longest wait for an answer to a request sent during the move
    let worst = { seq: 0, ms: 0 };
    for (const a of answers) {
      const n = Number(a.text.slice(4));
      const ms = a.t - sent.get(n)!;
      if (ms > worst.ms) worst = { seq: n, ms };
    }
    console.log(`[network] ${last} requests on one TCP connection through a live move, all answered by boot ${first.boot}; longest wait for an answer ${worst.ms.toFixed(0)} ms (seq ${worst.seq}); QEMU's pause ${result!.qemuDowntimeMs} ms, stop→running ${result!.measuredDowntimeMs} ms; ${announces} RARP announce(s) from ${MAC}; bridge port ${sourcePort} → ${targetPort}`);
  }, liveness(400_000));
});
