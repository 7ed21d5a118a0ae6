/**
 * Which VMs of an environment are *running* (vCPUs going), not merely present as a QEMU process: a paused
 * QEMU, an incoming live-migration target (`inmigrate`) or a source after switchover (`postmigrate`) runs
 * nothing. Asked on each QEMU's second monitor (`qmp-observe.sock`, see src/hosts/qemuArgv.ts), so the
 * operator's own monitor (one client at a time) is never taken from it.
 */
import { readdir, readFile } from 'node:fs/promises';
import net from 'node:net';
import { QmpClient } from '../../src/hosts/qmp.js';

export type VmRunState = 'running' | 'frozen' | 'off';

interface QemuProc {
  pid: string;
  vm: string;
  socket: string;
  client?: QmpClient;
  connecting?: Promise<void>;
  connectFailed?: boolean;
  status?: string;
}

async function qemuProcesses(environment: string, dirPrefix: string): Promise<{ pid: string; vm: string; socket: string }[]> {
  const out: { pid: string; vm: string; socket: string }[] = [];
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid)) continue;
    const raw = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (!raw) continue;
    const argv = raw.split('\0');
    if (!(argv[0]?.split('/').pop() ?? '').startsWith('qemu-system')) continue;
    const n = argv.indexOf('-name');
    const name = n >= 0 ? argv[n + 1]?.split(',')[0] : undefined;
    if (!name?.startsWith(`${environment}.`)) continue;
    const sockArg = argv.find((a) => a.startsWith('unix:') && a.includes('/qmp-observe.sock'));
    const socket = sockArg?.slice('unix:'.length).split(',')[0];
    if (!socket?.startsWith(dirPrefix)) continue;
    out.push({ pid, vm: name.slice(environment.length + 1), socket });
  }
  return out;
}

export class VmRunStateObserver {
  private readonly procs = new Map<string, QemuProc>();
  private readonly states = new Map<string, VmRunState>();
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  private running = false;

  constructor(
    private readonly environment: string,
    private readonly vms: string[],
    private readonly opts: {
      /** only QEMUs whose VM directory is below this path (this test world's hosts) */
      dirPrefix: string;
      intervalMs?: number;
      onChange: (vm: string, state: VmRunState, previous: VmRunState) => Promise<void>;
      onError?: (err: unknown) => void;
    },
  ) {
    for (const vm of vms) this.states.set(vm, 'off');
  }

  state(vm: string): VmRunState {
    return this.states.get(vm) ?? 'off';
  }

  /** qemu names (`env.vm`) of the running VMs: what the KWOK liveness bridge follows */
  runningQemuNames(): Set<string> {
    return new Set(this.vms.filter((v) => this.state(v) === 'running').map((v) => `${this.environment}.${v}`));
  }

  start(): void {
    this.running = true;
    const loop = async () => {
      if (!this.running) return;
      this.ticking = this.tick().catch((err: unknown) => this.opts.onError?.(err));
      await this.ticking;
      if (this.running) this.timer = setTimeout(() => void loop(), this.opts.intervalMs ?? 100);
    };
    void loop();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    await this.ticking;
    for (const p of this.procs.values()) p.client?.close();
    this.procs.clear();
  }

  private connect(p: QemuProc): void {
    p.connecting ??= (async () => {
      try {
        const sock = net.connect(p.socket);
        await new Promise<void>((res, rej) => {
          sock.once('connect', res);
          sock.once('error', rej);
        });
        p.client = await QmpClient.open(sock, { timeoutMs: 2000 });
      } catch (err) {
        p.client = undefined; // not up yet; next tick retries
        // said once per process: a monitor that never answers must show in the world's log
        if (!p.connectFailed) this.opts.onError?.(new Error(`QMP observer of ${p.vm} (pid ${p.pid}) not connected: ${(err as Error).message}`));
        p.connectFailed = true;
      } finally {
        p.connecting = undefined;
      }
    })();
  }

  /** One observation pass; transitions are reported in order, each awaited. */
  async tick(): Promise<void> {
    // only this observer's VMs: QEMU serves one client per monitor socket, so a connection held to
    // another observer's VM starves that observer (two observers once split one environment this way)
    const seen = (await qemuProcesses(this.environment, this.opts.dirPrefix)).filter((s) => this.vms.includes(s.vm));
    const live = new Set(seen.map((s) => s.pid));
    for (const [pid, p] of this.procs) {
      if (!live.has(pid)) {
        p.client?.close();
        this.procs.delete(pid);
      }
    }
    for (const s of seen) if (!this.procs.has(s.pid)) this.procs.set(s.pid, { ...s });
    await Promise.all(
      [...this.procs.values()].map(async (p) => {
        if (!p.client || p.client.isClosed) {
          p.client = undefined;
          this.connect(p);
          await p.connecting;
        }
        if (!p.client) return;
        try {
          p.status = (await p.client.execute<{ status: string }>('query-status', undefined, { timeoutMs: 1000 })).status;
        } catch (err) {
          // exiting or wedged: keep the last known status until the process is gone
          this.opts.onError?.(new Error(`query-status of ${p.vm} (pid ${p.pid}) failed: ${(err as Error).message}`));
          p.client.close();
          p.client = undefined;
        }
      }),
    );
    for (const vm of this.vms) {
      const mine = [...this.procs.values()].filter((p) => p.vm === vm);
      const prev = this.state(vm);
      // a process whose status is not known yet (just started, daemonizing, monitor busy) changes nothing
      const known = mine.filter((p) => p.status !== undefined);
      const next: VmRunState = mine.some((p) => p.status === 'running') ? 'running' : known.length ? 'frozen' : mine.length ? prev : 'off';
      if (next !== prev) {
        // published once its effects are in place: a test that saw "off" and then reached the VM's
        // address before the blackhole rule was added got an answer from a VM it had just stopped
        // (a fresh-clone CI run lost guestHa's first test, and the rest of the file with it, this way)
        try {
          await this.opts.onChange(vm, next, prev);
        } finally {
          this.states.set(vm, next);
        }
      }
    }
  }
}
