/**
 * The beachhead's NGINX `stream` load balancer, driven over SSH: a controller's API server is taken out of
 * the upstream by marking its `server` line `down` (and put back by removing the flag), with the config file
 * replaced atomically (temp file + rename), `nginx -T` (test), a graceful reload, and the previous file restored
 * when the test or the reload fails. `nginx -s reload` only signals the master: until the master has
 * started new workers and told the old ones to stop accepting, the old workers keep routing new sessions
 * with the old configuration. So taking a backend out first waits until every worker from before the
 * reload is gone or shutting down (its process title says so), then until no connection to the backend
 * is left: old workers finish their sessions and exit (bounded by the config's `worker_shutdown_timeout`).
 */
import type { LoadBalancerSpec, VMSpec } from '../api/inventory.js';
import type { LoadBalancerControl } from '../migrate/guestSafety.js';
import { sleep } from '../util/sleep.js';

/** What the load balancer needs of an SSH connection (HostConnection provides it). */
export interface RemoteShell {
  exec(argv: string[], opts?: { stdin?: Buffer | string; timeoutMs?: number; maxOutputBytes?: number; signal?: AbortSignal }): Promise<{ stdout: Buffer; stderr: string; code: number }>;
}

/** The inventory's description of the NGINX (LoadBalancerSpec), plus how to reach it and its backends. */
export interface NginxLoadBalancerOptions extends Pick<LoadBalancerSpec, 'configPath' | 'upstream' | 'nginxBinary' | 'mainConfig' | 'prefix' | 'sourceAddress'> {
  /** an SSH connection to the load balancer's machine (opened or reused by the caller) */
  connect: () => Promise<RemoteShell>;
  /** the upstream server (address:port) of a controller VM */
  backendOf: (vm: VMSpec) => string;
  drainTimeoutMs: number;
  /** how long NGINX may take to run the new configuration after the reload signal (default 30 s) */
  reloadTimeoutMs?: number;
  pollMs?: number;
  /** told about each applied change (for Events/logs; no secrets in there) */
  onChange?: (what: string) => void;
}

/** A load balancer's configuration is the student's: larger than this is refused, never parsed (or held). */
export const MAX_CONFIG_BYTES = 1 << 20;
/** `nginx -T` prints every included file too */
const MAX_DUMP_BYTES = 4 << 20;

interface Token {
  /** the word (quotes removed) or one of { } ; */
  text: string;
  start: number;
  end: number;
}

const isSpace = (c: number) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d || c === 0x0b || c === 0x0c;

/**
 * NGINX configuration text as tokens, the way nginx's own reader splits it: words (quoted or not),
 * `{`, `}` and `;`, with `#` comments and whitespace skipped. One pass over the text, no backtracking:
 * the config belongs to a student, and a regular expression with nested quantifiers over it blocked
 * the event loop for seconds (Lease lapsed, the standby hit the same file).
 */
export function nginxTokens(conf: string, maxBytes = MAX_CONFIG_BYTES): Token[] {
  if (conf.length > maxBytes) throw new Error(`the NGINX configuration is ${conf.length} bytes, more than the ${maxBytes} the operator reads`);
  const out: Token[] = [];
  const n = conf.length;
  let i = 0;
  while (i < n) {
    const c = conf.charCodeAt(i);
    if (isSpace(c)) {
      i++;
    } else if (c === 0x23 /* # */) {
      const nl = conf.indexOf('\n', i);
      i = nl < 0 ? n : nl + 1;
    } else if (c === 0x7b || c === 0x7d || c === 0x3b /* { } ; */) {
      out.push({ text: conf[i] as string, start: i, end: i + 1 });
      i++;
    } else if (c === 0x22 || c === 0x27 /* " ' */) {
      let j = i + 1;
      while (j < n && conf.charCodeAt(j) !== c) j += conf.charCodeAt(j) === 0x5c /* \ */ ? 2 : 1;
      out.push({ text: conf.slice(i + 1, Math.min(j, n)), start: i, end: Math.min(j + 1, n) });
      i = j + 1;
    } else {
      let j = i;
      while (j < n) {
        const d = conf.charCodeAt(j);
        if (isSpace(d) || d === 0x7b || d === 0x7d || d === 0x3b) break;
        j++;
      }
      out.push({ text: conf.slice(i, j), start: i, end: j });
      i = j;
    }
  }
  return out;
}

/**
 * Sets or clears the `down` flag of `backend` in upstream `upstream`. Pure, linear in the text; throws
 * when the upstream or the server line is missing. Only the server statement changes (its parameters
 * re-joined by single spaces); comments, order and other statements stay as they are.
 */
export function setBackendDown(conf: string, upstream: string, backend: string, down: boolean): string {
  const t = nginxTokens(conf);
  /** { } ; as punctuation (a quoted "{" is a word) */
  const is = (x: Token | undefined, p: string) => x !== undefined && x.text === p && x.end - x.start === 1;
  const statementStart = (k: number) => k === 0 || is(t[k - 1], '{') || is(t[k - 1], '}') || is(t[k - 1], ';');
  let k = t.findIndex((x, i) => x.text === 'upstream' && statementStart(i) && t[i + 1]?.text === upstream && is(t[i + 2], '{'));
  if (k < 0) throw new Error(`no upstream ${upstream} in the NGINX configuration`);
  k += 3;
  const edits: { start: number; end: number; text: string }[] = [];
  let depth = 1;
  let statement: Token[] = [];
  for (; k < t.length && depth > 0; k++) {
    const x = t[k] as Token;
    if (is(x, '{')) depth++;
    else if (is(x, '}')) depth--;
    else if (is(x, ';')) {
      if (depth === 1 && statement[0]?.text === 'server' && statement[1]?.text === backend) {
        const params = statement.slice(2).filter((p) => p.text !== 'down').map((p) => conf.slice(p.start, p.end));
        if (down) params.push('down');
        const first = statement[0] as Token;
        edits.push({ start: first.start, end: x.end, text: `${conf.slice(first.start, (statement[1] as Token).end)}${params.map((p) => ` ${p}`).join('')};` });
      }
      statement = [];
      continue;
    } else if (depth === 1) {
      statement.push(x);
    }
    if (is(x, '{') || is(x, '}')) statement = [];
  }
  if (depth > 0) throw new Error(`upstream ${upstream} is not closed`);
  if (edits.length === 0) throw new Error(`upstream ${upstream} has no server ${backend}`);
  let out = '';
  let at = 0;
  for (const e of edits) {
    out += conf.slice(at, e.start) + e.text;
    at = e.end;
  }
  return out + conf.slice(at);
}

/** Whether `backend` is currently marked down (undefined if not in the upstream). */
export function isBackendDown(conf: string, upstream: string, backend: string): boolean {
  return setBackendDown(conf, upstream, backend, true) === conf;
}

/**
 * Where NGINX keeps its master's PID, as `nginx -s` finds it: the `pid` directive of the configuration
 * `nginx -T` printed, else the compiled-in `--pid-path` of `nginx -V`; a relative path is below the prefix
 * (`-p`, else the compiled-in `--prefix`). Pure.
 */
export function nginxPidFile(dumpedConfig: string, versionInfo: string, prefix?: string): string {
  // the statement `pid PATH;` at the top level, found by the tokenizer (no regular expression over the student's text)
  const t = nginxTokens(dumpedConfig, MAX_DUMP_BYTES);
  let depth = 0;
  let configured: string | undefined;
  for (let i = 0; i < t.length && configured === undefined; i++) {
    const x = t[i] as Token;
    const punct = x.end - x.start === 1 ? x.text : '';
    if (punct === '{') depth++;
    else if (punct === '}') depth--;
    else if (depth === 0 && x.text === 'pid' && (i === 0 || ['{', '}', ';'].includes((t[i - 1] as Token).text)) && t[i + 2]?.text === ';') configured = t[i + 1]?.text;
  }
  const path = configured ?? /--pid-path=(\S+)/.exec(versionInfo)?.[1];
  if (!path) throw new Error('load balancer: NGINX names no pid file (no pid directive, no --pid-path): its reload cannot be followed');
  if (path.startsWith('/')) return path;
  const base = prefix ?? /--prefix=(\S+)/.exec(versionInfo)?.[1] ?? '/usr/share/nginx';
  return `${base.replace(/\/+$/, '')}/${path}`;
}

/** Children of NGINX's master from `ps -o pid=,args=`: which still accept connections (not shutting down). */
export function nginxWorkers(psOutput: string): { pid: number; accepting: boolean }[] {
  return psOutput.split('\n').flatMap((line) => {
    const m = /^\s*(\d+)\s+(.*)$/.exec(line);
    return m ? [{ pid: Number(m[1]), accepting: !/is shutting down/.test(m[2] ?? '') }] : [];
  });
}


export class NginxLoadBalancer implements LoadBalancerControl {
  constructor(private readonly o: NginxLoadBalancerOptions) {}

  private nginx(...args: string[]): string[] {
    // -e stderr: an unprivileged user cannot open the packaged error log; messages come back to us instead
    return [this.o.nginxBinary, '-e', 'stderr', ...(this.o.prefix ? ['-p', this.o.prefix] : []), ...(this.o.mainConfig ? ['-c', this.o.mainConfig] : []), ...args];
  }

  private async run(sh: RemoteShell, argv: string[], stdin?: string): Promise<string> {
    // every answer here comes from the student's machine: bounded in time and in bytes
    const r = await sh.exec(argv, { stdin, timeoutMs: 30_000, maxOutputBytes: MAX_DUMP_BYTES });
    if (r.code !== 0) throw new Error(`${argv[0]} ${argv.slice(1).filter((a) => !a.startsWith('/')).join(' ')} exited with ${r.code}: ${r.stderr.trim().slice(0, 1000)}`);
    return r.stdout.toString('utf8');
  }

  /** Atomic replace: the file is either the old or the new content, never half-written. */
  private async writeConfig(sh: RemoteShell, content: string): Promise<void> {
    const tmp = `${this.o.configPath}.vmops-tmp`;
    await this.run(sh, ['sh', '-c', 'cat > "$1" && mv -f -- "$1" "$2"', 'write-config', tmp, this.o.configPath], content);
  }

  /** The PID of NGINX's master, through its pid file (as `nginx -s` finds it). */
  private async masterPid(sh: RemoteShell, dumpedConfig: string): Promise<string> {
    const version = await sh.exec(this.nginx('-V'), { timeoutMs: 30_000, maxOutputBytes: 64 << 10 });
    const pidFile = nginxPidFile(dumpedConfig, `${version.stdout.toString('utf8')}\n${version.stderr}`, this.o.prefix);
    const master = (await this.run(sh, ['cat', '--', pidFile])).trim();
    if (!/^\d+$/.test(master)) throw new Error(`load balancer: NGINX's pid file ${pidFile} holds no PID`);
    return master;
  }

  /** Worker processes of the master. */
  private async workers(sh: RemoteShell, master: string): Promise<{ pid: number; accepting: boolean }[]> {
    // ps exits 1 when the master has no children (it is restarting them): that is an empty list
    const r = await sh.exec(['ps', '-o', 'pid=,args=', '--ppid', master], { timeoutMs: 30_000, maxOutputBytes: 1 << 20 });
    return nginxWorkers(r.stdout.toString('utf8'));
  }

  /**
   * Sends the reload and returns once NGINX runs the new configuration: a new worker accepts, and every
   * worker from before is gone or shutting down (it has closed its listening sockets then).
   */
  private async reload(sh: RemoteShell, dumpedConfig: string): Promise<void> {
    const master = await this.masterPid(sh, dumpedConfig);
    const old = new Set((await this.workers(sh, master)).filter((w) => w.accepting).map((w) => w.pid));
    await this.run(sh, this.nginx('-s', 'reload'));
    const timeoutMs = this.o.reloadTimeoutMs ?? 30_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const now = await this.workers(sh, master);
      const stale = now.filter((w) => w.accepting && old.has(w.pid));
      if (!stale.length && now.some((w) => w.accepting && !old.has(w.pid))) return;
      if (Date.now() > deadline) {
        throw new Error(`NGINX did not run the new configuration within ${Math.round(timeoutMs / 1000)} s of the reload: ${stale.length ? `worker(s) ${stale.map((w) => w.pid).join(', ')} from before still accept connections` : 'no new worker accepts'}`);
      }
      await sleep(this.o.pollMs ?? 250);
    }
  }

  private async apply(vm: VMSpec, down: boolean): Promise<boolean> {
    const sh = await this.o.connect();
    const backend = this.o.backendOf(vm);
    const before = await this.run(sh, ['cat', '--', this.o.configPath]);
    const after = setBackendDown(before, this.o.upstream, backend, down);
    if (after === before) return false;
    await this.writeConfig(sh, after);
    try {
      // -T: tests the configuration and prints it (the pid directive is in there)
      const dumped = await this.run(sh, this.nginx('-T', '-q'));
      await this.reload(sh, dumped);
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
