/**
 * Downtime per strategy, guest-observed: the test world's real guest (Debian kernel + busybox +
 * guestd) moved host01 → host02 by every strategy on two real sshd test hosts, at two disk sizes,
 * idle (writer off) and while the guest appends fsync'd records to its disk.
 *
 *   cold      Hypervisor.stopVm (ACPI power-down, the guest shuts down cleanly) + relayVmFiles + Hypervisor.startVm
 *   pre-copy  startPrecopy → ready → precopyCutover (ACPI power-down with shutdown action pause; verify on
 *             = what the operator runs, verify off for comparison)
 *   live      liveMigrate
 *   live-dirty / live-dirty-ac   liveMigrate (verify on) of a guest rewriting BENCH_DIRTY_MIB (48) MiB of RAM as fast
 *             as it can, auto-converge off / on (convergence timeout BENCH_DIRTY_TIMEOUT_S, 60 s)
 *   live-multifd / live-dirty-multifd   live / live-dirty-ac with QEMU's multifd, BENCH_MULTIFD_CHANNELS (2) channels
 *
 * Guest-observed downtime = the gap between the guest's last heartbeat on the source and its first on
 * the target (every 10 ms on its serial port, timestamped on arrival by test/world/guestObserver.ts). Split for cold and pre-copy:
 *   guest shutdown  power-down issued → the guest's "POWEROFF clean" line
 *   operator        that line → the target QEMU start issued (copy/converge, quit, files, verification)
 *   guest boot      target QEMU start issued → first heartbeat on the target
 * Every move is checked from inside the guest: after cold/pre-copy the target's boot-time log
 * verification must end exactly at the last acknowledged write; after live the guest verifies on
 * request and must hold every write acknowledged on the source.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { vmDirectory, type HostSpec, type VMSpec } from '../src/api/inventory.js';
import { Hypervisor } from '../src/hosts/hypervisor.js';
import { HostConnection } from '../src/hosts/ssh.js';
import { liveMigrate, precopyCutover } from '../src/migrate/strategies.js';
import { startPrecopy } from '../src/transfer/mirror.js';
import { relayVmFiles } from '../src/transfer/relay.js';
import { installGuest, realGuestVm } from '../test/world/guestImage.js';
import { GuestObserver } from '../test/world/guestObserver.js';
import { adoptHostFile, startHosts, testAccel } from '../test/world/hosts.js';
import { createSparseFile } from '../test/world/images.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const ENV = 'bench-downtime';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface DowntimeRow {
  strategy: string;
  workload: 'idle' | 'writes' | 'RAM dirtier';
  disk: string;
  /** guest-observed; -1 = failed */
  downtimeMs: number;
  shutdownMs?: number;
  operatorMs?: number;
  bootMs?: number;
  /** the operator's own figure (precopyCutover.downtimeMs, liveMigrate.measuredDowntimeMs, stop→start returned) */
  operatorFigureMs: number;
  totalMs: number;
  bytes: number;
  note: string;
}

const WRITES_PER_SECOND = Number(process.env.BENCH_GUEST_WRITES ?? '200');
const DIRTY_MIB = Number(process.env.BENCH_DIRTY_MIB ?? '48');
const MULTIFD_CHANNELS = Number(process.env.BENCH_MULTIFD_CHANNELS ?? '2');

export async function runDowntime(opts: { baseDir: string; scale: number; strategies?: string[] }): Promise<DowntimeRow[]> {
  const scale = opts.scale;
  const memoryMiB = Number(process.env.BENCH_VM_MEMORY_MIB ?? '128');
  const wanted = opts.strategies ?? ['cold', 'precopy', 'precopy-verify', 'live', 'live-verify'];
  const baseDir = path.join(opts.baseDir, 'downtime');
  await mkdir(baseDir, { recursive: true });
  const world = await startHosts({ count: 2, baseDir, firstAddress: 64 });
  const [h1, h2] = world.hosts as [HostSpec, HostSpec];
  const accel = await testAccel();
  const rows: DowntimeRow[] = [];
  const conns: HostConnection[] = [];
  try {
    const c1 = await HostConnection.connect(h1, world.identity);
    const c2 = await HostConnection.connect(h2, world.identity);
    conns.push(c1, c2);
    const hv1 = new Hypervisor(h1, c1);
    const hv2 = new Hypervisor(h2, c2);

    // Two disk sizes: 1 GiB × scale (256 MiB × scale allocated) and 4× that. The guest's log ring
    // (8 MiB) is at the start of the disk; data chunks are random or log-like text.
    // BENCH_DOWNTIME_ALLOCATED_MIB=1024,8192 picks the allocated sizes instead (virtual size 4× that).
    const allocated = process.env.BENCH_DOWNTIME_ALLOCATED_MIB?.split(',').map(Number).filter((n) => n > 0);
    const sizes = allocated?.length
      ? allocated.map((a) => ({ sizeBytes: 4 * a * MiB, dataBytes: a * MiB }))
      : [1, 4].map((k) => ({ sizeBytes: Math.max(64, Math.round(1024 * scale * k)) * MiB, dataBytes: Math.round(256 * scale * k) * MiB }));
    const templates: Array<{ file: string; label: string }> = [];
    for (const [i, sz] of sizes.entries()) {
      const raw = path.join(baseDir, `template${i}.raw`);
      const file = path.join(baseDir, `template${i}.qcow2`);
      console.error(`downtime: creating template disk ${i} (scale ${scale})…`);
      await createSparseFile(raw, { sizeBytes: sz.sizeBytes, dataBytes: sz.dataBytes, seed: 21 + i });
      await execFileP('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, file]);
      await rm(raw, { force: true });
      const map = JSON.parse((await execFileP('qemu-img', ['map', '--output=json', '-f', 'qcow2', file])).stdout) as Array<{ length: number; data: boolean }>;
      const data = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
      templates.push({ file, label: `qcow2 ${(sz.sizeBytes / MiB).toFixed(0)} MiB, ${(data / MiB).toFixed(0)} MiB allocated` });
    }

    let n = 0;
    const sock = (host: HostSpec, vm: VMSpec): string => path.join(vmDirectory(host, ENV, vm.name), 'heartbeat.sock');
    const freshVm = async (template: string, busy: boolean, dirtyMiB = 0): Promise<{ vm: VMSpec; obs: GuestObserver }> => {
      const vm = realGuestVm(`vm${++n}`, { memoryMiB, writesPerSecond: busy ? WRITES_PER_SECOND : 0, dirtyMiB });
      const dir = vmDirectory(h1, ENV, vm.name);
      await installGuest(dir, { diskMiB: 16 });
      const file = path.join(dir, 'disk0.qcow2');
      await execFileP('cp', ['--sparse=always', template, file]);
      await adoptHostFile(file);
      const obs = new GuestObserver([sock(h1, vm), sock(h2, vm)]);
      const t0 = performance.now();
      await hv1.startVm(ENV, vm);
      const v = await obs.verdict({ since: t0, timeoutMs: 120_000 });
      if (!v.ok) throw new Error(`guest log not intact at first boot: ${v.reason}`);
      await obs.waitFor(/^GUESTD ACPI power button ready$/, { since: t0 });
      // let the guest settle (and write) a moment
      await sleep(1000);
      return { vm, obs };
    };
    const cleanup = async (vm: VMSpec, obs: GuestObserver): Promise<void> => {
      obs.stop();
      for (const hv of [hv1, hv2]) {
        await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
        await hv.removeVmDir(ENV, vm).catch(() => undefined);
      }
    };
    const acked = (line: { text: string }): number => Number(/acked=(\d+)/.exec(line.text)?.[1]);

    type Measured = Omit<DowntimeRow, 'strategy' | 'workload' | 'disk'>;
    type Run = (vm: VMSpec, obs: GuestObserver) => Promise<Measured>;

    /** Waits for the target's first heartbeat; guest-observed gap since t0; checks the boot-time verdict. */
    const afterColdStart = async (vm: VMSpec, obs: GuestObserver, t0: number, tOff: number, ackedAtOff: number, tStart: number): Promise<{ gap: number; boot: number; check: string }> => {
      const first = await obs.waitBeat({ since: tStart, from: sock(h2, vm), timeoutMs: 120_000 });
      const v = await obs.verdict({ since: tOff, timeoutMs: 60_000 });
      const check = v.ok && v.last === ackedAtOff ? `guest log verified on target: ${v.records} records, last = last acked ${ackedAtOff}` : `CHECK FAILED: ${JSON.stringify(v)} vs acked ${ackedAtOff}`;
      return { gap: obs.handover(sock(h1, vm), sock(h2, vm)).ms, boot: first.t - tStart, check };
    };

    const cold: Run = async (vm, obs) => {
      const t0 = performance.now();
      const how = await hv1.stopVm(ENV, vm, { powerdownTimeoutMs: 60_000 });
      const off = await obs.waitFor(/^POWEROFF clean/, { since: t0, timeoutMs: 5000 });
      const t1 = performance.now();
      const files = await relayVmFiles({ source: hv1, target: hv2, environment: ENV, vm });
      const tStart = performance.now();
      await hv2.startVm(ENV, vm);
      const t3 = performance.now();
      const r = await afterColdStart(vm, obs, t0, off.t, acked(off), tStart);
      return {
        downtimeMs: r.gap,
        shutdownMs: off.t - t0,
        operatorMs: tStart - off.t,
        bootMs: r.boot,
        operatorFigureMs: t3 - t0,
        totalMs: t3 - t0,
        bytes: files.reduce((s, f) => s + (f.wireBytes ?? f.bytes), 0),
        note: `stop: ${how} after ${((t1 - t0) / 1000).toFixed(2)} s; relay ${((tStart - t1) / 1000).toFixed(2)} s; ${r.check}`,
      };
    };

    const precopy =
      (verify: boolean): Run =>
      async (vm, obs) => {
        const tBegin = performance.now();
        // verify off: no pre-pass either (nothing would use its hashes)
        const pc = await startPrecopy({ source: hv1, target: hv2, environment: ENV, vm, prepass: verify });
        try {
          await pc.ready;
          const tReady = performance.now();
          await pc.prepared;
          const tPrepared = performance.now();
          // writes into the READY mirror (dirty blocks the cutover must carry), as during a node drain
          await sleep(2000);
          const t0 = performance.now();
          const res = await precopyCutover(pc, { source: hv1, target: hv2, environment: ENV, vm, powerdownTimeoutMs: 60_000, verify });
          const off = await obs.waitFor(/^POWEROFF clean/, { since: t0, timeoutMs: 5000 });
          const p = res.phases;
          const tStart = t0 + p.pauseMs + p.convergeMs + p.quitSourceMs + p.filesMs + p.verifyMs;
          const r = await afterColdStart(vm, obs, t0, off.t, acked(off), tStart);
          return {
            downtimeMs: r.gap,
            shutdownMs: off.t - t0,
            operatorMs: tStart - off.t,
            bootMs: r.boot,
            operatorFigureMs: res.downtimeMs,
            totalMs: performance.now() - tBegin,
            bytes: res.bytes,
            note: `mirror ready ${((tReady - tBegin) / 1000).toFixed(2)} s, pre-pass and files ahead ${((tPrepared - tReady) / 1000).toFixed(2)} s; cutover (${res.how}): pause ${p.pauseMs} ms, converge ${p.convergeMs} ms, quit ${p.quitSourceMs} ms, files ${p.filesMs} ms, verify ${p.verifyMs} ms${res.verification ? ` (${res.verification.how}${res.verification.how === 'incremental' ? `: ${res.verification.ranges} ranges, ${((res.verification.bytes ?? 0) / MiB).toFixed(1)} MiB` : `: ${res.verification.why ?? ''}`})` : ''}, start ${p.startMs} ms; ${r.check}`,
          };
        } catch (err) {
          await pc.abort().catch(() => undefined);
          throw err;
        }
      };

    const live = (verify: boolean, autoConverge?: boolean, multifdChannels?: number): Run => async (vm, obs) => {
      const t0 = performance.now();
      let throttle = 0;
      const res = await liveMigrate({
        source: hv1, target: hv2, environment: ENV, vm, downtimeLimitMs: 300, verify, multifdChannels,
        ...(autoConverge === undefined ? {} : { autoConverge, convergenceTimeoutMs: Number(process.env.BENCH_DIRTY_TIMEOUT_S ?? '60') * 1000 }),
        onProgress: (p) => { throttle = Math.max(throttle, p.cpuThrottlePercent ?? 0); },
      });
      const t1 = performance.now();
      await obs.waitBeat({ since: t1, from: sock(h2, vm), timeoutMs: 60_000 });
      const gap = obs.handover(sock(h1, vm), sock(h2, vm));
      const longest = obs.longestGap(t0);
      const v = await obs.verify();
      const ackedBefore = gap.before?.acked ?? 0;
      const check =
        v.ok && v.last >= ackedBefore && gap.after?.boot === gap.before?.boot ? `same boot; guest log verified on target: last ${v.last} ≥ acked on source ${ackedBefore}` : `CHECK FAILED: ${JSON.stringify(v)}, acked ${ackedBefore}`;
      const p = res.phases;
      return {
        downtimeMs: gap.ms,
        operatorFigureMs: res.measuredDowntimeMs,
        totalMs: t1 - t0,
        bytes: res.bytes.total,
        note: `${autoConverge === undefined ? '' : `auto-converge ${autoConverge ? `on, vCPU throttle up to ${throttle}%` : 'off'}; `}${res.verification ? `verified (${'ranges' in res.verification ? `${res.verification.ranges} changed ranges, ${(res.verification.bytes / MiB).toFixed(1)} MiB` : `in full: ${res.verification.why}`}); ` : ''}longest heartbeat gap during the whole move ${longest.ms.toFixed(0)} ms; QEMU downtime ${res.qemuDowntimeMs} ms; bitmap at the pre-switchover pause ${res.handoverSplit.bitmapMs} ms${res.bitmapRead ? ` (${res.bitmapRead === 'count' ? 'QEMU counted no write' : 'read over NBD'})` : ''}, completion seen ${res.handoverSplit.detectMs} ms (bitmap excluded), target paused ${res.handoverSplit.targetPausedMs} ms, mirror cancel ${res.handoverSplit.mirrorCancelMs} ms, target NBD stop ${res.handoverSplit.nbdStopMs} ms, fence ${res.afterHandover.quitMs} ms, verify ${res.afterHandover.verifyMs} ms, cont ${res.afterHandover.resumeMs} ms; disks ${(res.bytes.disks / MiB).toFixed(1)} MiB + RAM stream ${(res.bytes.migration / MiB).toFixed(1)} MiB; mirror ${p.mirrorMs} ms, pre-pass ${p.prepassMs} ms, RAM migration ${p.migrateMs} ms; ${check}`,
      };
    };

    const strategies: Array<{ key: string; label: string; run: Run; dirty?: boolean }> = [
      { key: 'cold', label: 'cold (stop, relay, start)', run: cold },
      { key: 'precopy', label: 'pre-copy, verify off', run: precopy(false) },
      { key: 'precopy-verify', label: 'pre-copy, verify on', run: precopy(true) },
      { key: 'live', label: 'live, verify off', run: live(false) },
      { key: 'live-verify', label: 'live, verify on', run: live(true) },
      { key: 'live-dirty', label: 'live, verify on, auto-converge off', run: live(true, false), dirty: true },
      { key: 'live-dirty-ac', label: 'live, verify on, auto-converge on', run: live(true, true), dirty: true },
      { key: 'live-multifd', label: `live, verify on, multifd ${MULTIFD_CHANNELS} channels`, run: live(true, undefined, MULTIFD_CHANNELS) },
      { key: 'live-dirty-multifd', label: `live, verify on, auto-converge on, multifd ${MULTIFD_CHANNELS} channels`, run: live(true, true, MULTIFD_CHANNELS), dirty: true },
    ];
    for (const t of templates) {
      for (const s of strategies.filter((x) => wanted.includes(x.key))) {
        for (const busy of s.dirty ? [true] : [false, true]) {
          const workload = s.dirty ? 'RAM dirtier' : busy ? 'writes' : 'idle';
          console.error(`downtime: ${t.label}: ${s.label}, ${workload}…`);
          let vm: VMSpec | undefined;
          let obs: GuestObserver | undefined;
          try {
            ({ vm, obs } = await freshVm(t.file, busy, s.dirty ? DIRTY_MIB : 0));
            const r = await s.run(vm, obs);
            rows.push({ strategy: s.label, workload, disk: t.label, ...r, note: `${accel}; ${r.note}` });
          } catch (err) {
            console.error(`downtime: ${s.label}, ${workload}: FAILED: ${(err as Error).message}`);
            rows.push({ strategy: s.label, workload, disk: t.label, downtimeMs: -1, operatorFigureMs: -1, totalMs: -1, bytes: 0, note: `FAILED: ${(err as Error).message}` });
          } finally {
            if (vm && obs) await cleanup(vm, obs);
          }
        }
      }
    }
  } finally {
    for (const c of conns) c.close();
    await world.stop();
  }
  return rows;
}

const fmtS = (ms: number | undefined): string => (ms === undefined ? '–' : ms < 0 || !Number.isFinite(ms) ? 'failed' : (ms / 1000).toFixed(ms < 10_000 ? 3 : 2));

export function downtimeTable(rows: DowntimeRow[], scale: number): string {
  const lines = [
    `Guest-observed downtime per strategy, BENCH_SCALE=${scale}, guest writes ${WRITES_PER_SECOND}/s when busy, ${new Date().toISOString()}, node ${process.version}`,
    '',
    '| disk | strategy | workload | guest-observed downtime s | × cold (same disk, idle) | guest shutdown s | operator while down s | guest boot s | operator\'s own figure s | total move s | bytes through the operator | note |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ];
  for (const r of rows) {
    const base = rows.find((b) => b.disk === r.disk && b.strategy.startsWith('cold') && b.workload === 'idle' && b.downtimeMs >= 0);
    const ratio = base && r.downtimeMs >= 0 ? `${(r.downtimeMs / base.downtimeMs).toFixed(3)}×` : '–';
    lines.push(
      `| ${r.disk} | ${r.strategy} | ${r.workload} | ${fmtS(r.downtimeMs)} | ${ratio} | ${fmtS(r.shutdownMs)} | ${fmtS(r.operatorMs)} | ${fmtS(r.bootMs)} | ${fmtS(r.operatorFigureMs)} | ${fmtS(r.totalMs)} | ${r.downtimeMs < 0 ? '–' : `${(r.bytes / MiB).toFixed(1)} MiB`} | ${r.note.replace(/\|/g, '\\|')} |`,
    );
  }
  const verdict = (label: string, xs: DowntimeRow[], pick: (r: DowntimeRow) => number | undefined, limitMs: number): string => {
    if (xs.length === 0) return `${label}: not measured`;
    const worst = Math.max(...xs.map((r) => (r.downtimeMs < 0 ? Infinity : (pick(r) ?? Infinity))));
    return `${label}: **${worst <= limitMs ? 'met' : 'not met'}** (worst ${fmtS(worst)} s)`;
  };
  lines.push(
    '',
    `Goals: ${[
      verdict('pre-copy (verify on) operator share ≤ 0.5 s', rows.filter((r) => r.strategy === 'pre-copy, verify on'), (r) => r.operatorMs, 500),
      verdict('live (verify on) guest-observed ≤ 0.3 s on an idle guest', rows.filter((r) => r.strategy === 'live, verify on' && r.workload === 'idle'), (r) => r.downtimeMs, 300),
    ].join('; ')}.`,
  );
  return lines.join('\n');
}
