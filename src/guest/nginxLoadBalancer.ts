/**
 * The beachhead's NGINX `stream` load balancer, driven over SSH: a controller's API server is taken out of
 * the upstream by marking its `server` line `down` (and put back by removing the flag), with the config file
 * replaced atomically (temp file + rename), `nginx -t`, a graceful reload, and the previous file restored
 * when the test or the reload fails. Taking a backend out waits until no connection to it is left:
 * old workers finish their sessions and exit (bounded by the config's `worker_shutdown_timeout`).
 */
import type { LoadBalancerSpec, VMSpec } from '../api/inventory.js';
import type { LoadBalancerControl } from '../migrate/guestSafety.js';
import { sleep } from '../util/sleep.js';

/** What the load balancer needs of an SSH connection (HostConnection provides it). */
export interface RemoteShell {
  exec(argv: string[], opts?: { stdin?: Buffer | string; timeoutMs?: number }): Promise<{ stdout: Buffer; stderr: string; code: number }>;
}

/** The inventory's description of the NGINX (LoadBalancerSpec), plus how to reach it and its backends. */
export interface NginxLoadBalancerOptions extends Pick<LoadBalancerSpec, 'configPath' | 'upstream' | 'nginxBinary' | 'mainConfig' | 'prefix' | 'sourceAddress'> {
  /** an SSH connection to the load balancer's machine (opened or reused by the caller) */
  connect: () => Promise<RemoteShell>;
  /** the upstream server (address:port) of a controller VM */
  backendOf: (vm: VMSpec) => string;
  drainTimeoutMs: number;
  pollMs?: number;
  /** told about each applied change (for Events/logs; no secrets in there) */
  onChange?: (what: string) => void;
}

/**
 * Sets or clears the `down` flag of `backend` in upstream `upstream`. Pure; throws when the upstream or the
 * server line is missing. Only the one server line changes; comments, order and other parameters stay.
 */
export function setBackendDown(conf: string, upstream: string, backend: string, down: boolean): string {
  const head = new RegExp(`(^|[\\s;{}])upstream\\s+${upstream}\\s*\\{`, 'm').exec(conf);
  if (!head) throw new Error(`no upstream ${upstream} in the NGINX configuration`);
  const start = head.index + head[0].length;
  const end = conf.indexOf('}', start);
  if (end < 0) throw new Error(`upstream ${upstream} is not closed`);
  const block = conf.slice(start, end);
  const esc = backend.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const line = new RegExp(`(^|[\\s;])(server\\s+${esc})((?:\\s+[^;\\s]+)*)\\s*;`, 'g');
  let found = 0;
  const next = block.replace(line, (_m, pre: string, server: string, params: string) => {
    found++;
    const kept = params.split(/\s+/).filter((p) => p && p !== 'down');
    if (down) kept.push('down');
    return `${pre}${server}${kept.map((p) => ` ${p}`).join('')};`;
  });
  if (found === 0) throw new Error(`upstream ${upstream} has no server ${backend}`);
  return conf.slice(0, start) + next + conf.slice(end);
}

/** Whether `backend` is currently marked down (undefined if not in the upstream). */
export function isBackendDown(conf: string, upstream: string, backend: string): boolean {
  return setBackendDown(conf, upstream, backend, true) === conf;
}


export class NginxLoadBalancer implements LoadBalancerControl {
  constructor(private readonly o: NginxLoadBalancerOptions) {}

  private nginx(...args: string[]): string[] {
    // -e stderr: an unprivileged user cannot open the packaged error log; messages come back to us instead
    return [this.o.nginxBinary, '-e', 'stderr', ...(this.o.prefix ? ['-p', this.o.prefix] : []), ...(this.o.mainConfig ? ['-c', this.o.mainConfig] : []), ...args];
  }

  private async run(sh: RemoteShell, argv: string[], stdin?: string): Promise<string> {
    const r = await sh.exec(argv, { stdin, timeoutMs: 30_000 });
    if (r.code !== 0) throw new Error(`${argv[0]} ${argv.slice(1).filter((a) => !a.startsWith('/')).join(' ')} exited with ${r.code}: ${r.stderr.trim().slice(0, 1000)}`);
    return r.stdout.toString('utf8');
  }

  /** Atomic replace: the file is either the old or the new content, never half-written. */
  private async writeConfig(sh: RemoteShell, content: string): Promise<void> {
    const tmp = `${this.o.configPath}.vmops-tmp`;
    await this.run(sh, ['sh', '-c', 'cat > "$1" && mv -f -- "$1" "$2"', 'write-config', tmp, this.o.configPath], content);
  }

  private async apply(vm: VMSpec, down: boolean): Promise<boolean> {
    const sh = await this.o.connect();
    const backend = this.o.backendOf(vm);
    const before = await this.run(sh, ['cat', '--', this.o.configPath]);
    const after = setBackendDown(before, this.o.upstream, backend, down);
    if (after === before) return false;
    await this.writeConfig(sh, after);
    try {
      await this.run(sh, this.nginx('-t', '-q'));
      await this.run(sh, this.nginx('-s', 'reload'));
    } catch (err) {
      await this.writeConfig(sh, before);
      await this.run(sh, this.nginx('-s', 'reload')).catch(() => undefined);
      throw new Error(`load balancer: ${down ? 'taking' : 'putting'} ${vm.name} (${backend}) ${down ? 'out of' : 'back into'} upstream ${this.o.upstream} failed, configuration restored: ${(err as Error).message}`);
    }
    this.o.onChange?.(`${vm.name} (${backend}) ${down ? 'taken out of' : 'put back into'} upstream ${this.o.upstream}`);
    return true;
  }

  /** Established TCP connections from the load balancer to `backend`, as `ss` on its machine sees them. */
  async connectionsTo(vm: VMSpec): Promise<number> {
    const sh = await this.o.connect();
    const backend = this.o.backendOf(vm);
    const filter = ['dst', backend, ...(this.o.sourceAddress ? ['src', this.o.sourceAddress] : [])];
    const out = await this.run(sh, ['ss', '-Htn', 'state', 'established', ...filter]);
    return out.split('\n').filter((l) => l.trim()).length;
  }

  async removeBackend(vm: VMSpec, signal: AbortSignal): Promise<void> {
    await this.apply(vm, true);
    const deadline = Date.now() + this.o.drainTimeoutMs;
    for (;;) {
      const n = await this.connectionsTo(vm);
      if (n === 0) return;
      if (Date.now() > deadline) throw new Error(`load balancer: ${n} connection(s) to ${vm.name} (${this.o.backendOf(vm)}) still open ${Math.round(this.o.drainTimeoutMs / 1000)} s after it was taken out`);
      await sleep(this.o.pollMs ?? 250, signal);
    }
  }

  async addBackend(vm: VMSpec): Promise<void> {
    await this.apply(vm, false);
  }
}
