/**
 * Downtime per strategy (issue #3): the same VM moved host01 → host02 by every strategy, on two real
 * sshd test hosts with real QEMU (TCG, no guest OS), idle and while its disk is being written.
 *
 *   cold      Hypervisor.stopVm (powerdownTimeoutMs 0: no guest OS answers ACPI) + relayVmFiles + Hypervisor.startVm
 *   pre-copy  startPrecopy → ready → precopyCutover (verify on / off)
 *   live      liveMigrate
 *
 * Downtime: stop/power-down issued on the source → QMP status `running` on the target.
 *   cold: measured here, stopVm called → startVm returned (startVm returns once query-status says running)
 *   pre-copy: precopyCutover's own downtimeMs (pause issued → startVm returned)
 *   live: liveMigrate's own measuredDowntimeMs (source STOP event → target `cont` answered); QEMU's own
 *         query-migrate downtime is given in the note
 * Busy workload: HMP `qemu-io write` of 64 KiB blocks in a loop on the source QEMU's QMP connection,
 * from the start of the move until right before the cutover (cold: until stopVm; pre-copy: until
 * precopyCutover, with 2 s of writes into the READY mirror; live: until the mirror is READY, i.e.
 * right before `migrate` — a qemu-io write after the source inactivated its images would crash QEMU).
 * After every move the target is stopped and the guest data compared on both hosts (verifyGuestData).
 */
import { execFile } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { vmDirectory, type HostSpec, type VMSpec } from '../src/api/inventory.js';
import { Hypervisor } from '../src/hosts/hypervisor.js';
import { openQmpAt, queryDisks, verifyGuestData } from '../src/hosts/qemuIncoming.js';
import type { QmpClient } from '../src/hosts/qmp.js';
import { HostConnection } from '../src/hosts/ssh.js';
import { liveMigrate, precopyCutover } from '../src/migrate/strategies.js';
import { startPrecopy } from '../src/transfer/mirror.js';
import { relayVmFiles } from '../src/transfer/relay.js';
import { adoptHostFile, startHosts } from '../test/world/hosts.js';
import { allocatedBytes, createSparseFile } from '../test/world/images.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const ENV = 'bench-downtime';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface DowntimeRow {
  strategy: string;
  workload: 'idle' | 'writes';
  disk: string;
  /** -1 = failed */
  downtimeMs: number;
  totalMs: number;
  bytes: number;
  /** how downtime was measured */
  source: string;
  note: string;
}

interface WriteLoop {
  stop(): Promise<{ writes: number; error?: string }>;
}

/** Guest-like writes through the source QEMU's block layer (HMP qemu-io), until stopped. */
function writeLoop(qmp: QmpClient, device: string, sizeBytes: number): WriteLoop {
  let running = true;
  let writes = 0;
  let error: string | undefined;
  const len = 64 * 1024;
  const loop = (async () => {
    let i = 0;
    while (running) {
      const off = ((i * 7919) % Math.floor(sizeBytes / len)) * len;
      const pattern = 0x10 + (i % 0xe0);
      const out = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io ${device} "write -P ${pattern} ${off} ${len}"` });
      if (/error|fail/i.test(out)) throw new Error(`qemu-io write failed: ${out}`);
      writes++;
      i++;
      await sleep(5);
    }
  })().catch((err: unknown) => {
    error = (err as Error).message;
  });
  return {
    stop: async () => {
      running = false;
      await loop;
      return { writes, error };
    },
  };
}

function vmSpec(name: string, memoryMiB: number): VMSpec {
  return { name, role: 'worker', nodeName: name, host: 'host01', memoryMiB, cpus: 1, files: [{ name: 'disk0.qcow2', kind: 'disk', format: 'qcow2' }] };
}

export async function runDowntime(opts: { baseDir: string; scale: number; strategies?: string[] }): Promise<DowntimeRow[]> {
  const scale = opts.scale;
  const memoryMiB = Number(process.env.BENCH_VM_MEMORY_MIB ?? '128');
  const wanted = opts.strategies ?? ['cold', 'precopy', 'precopy-verify', 'live'];
  const baseDir = path.join(opts.baseDir, 'downtime');
  await mkdir(baseDir, { recursive: true });
  const world = await startHosts({ count: 2, baseDir, firstAddress: 64 });
  const [h1, h2] = world.hosts as [HostSpec, HostSpec];
  const rows: DowntimeRow[] = [];
  const conns: HostConnection[] = [];
  try {
    const c1 = await HostConnection.connect(h1, world.identity);
    const c2 = await HostConnection.connect(h2, world.identity);
    conns.push(c1, c2);
    const hv1 = new Hypervisor(h1, c1);
    const hv2 = new Hypervisor(h2, c2);

    // Template disk: 1 GiB × scale qcow2, 256 MiB × scale allocated (4 MiB chunks of random or log-like
    // text data at seeded offsets; the rest unallocated). Copied for every run.
    const sizeBytes = Math.max(16, Math.round(1024 * scale)) * MiB;
    const raw = path.join(baseDir, 'template.raw');
    const template = path.join(baseDir, 'template.qcow2');
    console.error(`downtime: creating template disk (scale ${scale})…`);
    await createSparseFile(raw, { sizeBytes, dataBytes: 256 * MiB * scale, seed: 21 });
    await execFileP('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, template]);
    await rm(raw, { force: true });
    const map = JSON.parse((await execFileP('qemu-img', ['map', '--output=json', '-f', 'qcow2', template])).stdout) as Array<{ length: number; data: boolean }>;
    const dataBytes = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
    const disk = `qcow2 ${(sizeBytes / MiB).toFixed(0)} MiB (${(dataBytes / MiB).toFixed(0)} MiB allocated, file ${((await allocatedBytes(template)) / MiB).toFixed(0)} MiB)`;

    let n = 0;
    const freshVm = async (): Promise<VMSpec> => {
      const vm = vmSpec(`vm${++n}`, memoryMiB);
      const dir = vmDirectory(h1, ENV, vm.name);
      await mkdir(dir, { recursive: true });
      const file = path.join(dir, 'disk0.qcow2');
      await execFileP('cp', ['--sparse=always', template, file]);
      await adoptHostFile(file);
      await execFileP('sync');
      await hv1.startVm(ENV, vm);
      return vm;
    };
    const cleanup = async (vm: VMSpec): Promise<void> => {
      for (const hv of [hv1, hv2]) {
        await hv.stopVm(ENV, vm, { powerdownTimeoutMs: 0 }).catch(() => undefined);
        await hv.removeVmDir(ENV, vm).catch(() => undefined);
      }
    };
    /** after the move: source gone, target running; then both stopped and guest data compared */
    const check = async (vm: VMSpec): Promise<string> => {
      const s = await hv1.vmStatus(ENV, vm);
      const t = await hv2.vmStatus(ENV, vm);
      if (s.state !== 'stopped' || t.qmpStatus !== 'running') return `CHECK FAILED: source ${s.state}, target ${t.qmpStatus ?? t.state}`;
      await hv2.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
      await verifyGuestData(hv1, hv2, ENV, vm);
      return 'data identical';
    };
    const startWrites = async (qmp: QmpClient, vm: VMSpec): Promise<WriteLoop> => {
      const d = await queryDisks(qmp, vmDirectory(h1, ENV, vm.name), vm);
      return writeLoop(qmp, d[0]?.device ?? 'virtio0', sizeBytes);
    };
    const wrote = (w: { writes: number; error?: string } | undefined): string =>
      w ? `${w.writes} writes of 64 KiB${w.error ? ` (write loop error: ${w.error})` : ''}; ` : '';

    type Run = (vm: VMSpec, busy: boolean) => Promise<Omit<DowntimeRow, 'strategy' | 'workload' | 'disk' | 'note'> & { note: string }>;

    const cold: Run = async (vm, busy) => {
      let w: { writes: number; error?: string } | undefined;
      if (busy) {
        const qmp = await openQmpAt(hv1, vmDirectory(h1, ENV, vm.name));
        const loop = await startWrites(qmp, vm);
        await sleep(2000);
        w = await loop.stop();
        // QEMU serves one QMP client at a time: stopVm opens its own
        qmp.close();
      }
      const t0 = performance.now();
      const how = await hv1.stopVm(ENV, vm, { powerdownTimeoutMs: 0 });
      const t1 = performance.now();
      const files = await relayVmFiles({ source: hv1, target: hv2, environment: ENV, vm });
      const t2 = performance.now();
      await hv2.startVm(ENV, vm);
      const t3 = performance.now();
      return {
        downtimeMs: t3 - t0,
        totalMs: t3 - t0,
        bytes: files.reduce((s, f) => s + (f.wireBytes ?? f.bytes), 0),
        source: 'bench: stopVm issued → startVm returned',
        note: `${wrote(w)}stop (${how}) ${((t1 - t0) / 1000).toFixed(2)} s, relay ${((t2 - t1) / 1000).toFixed(2)} s, start ${((t3 - t2) / 1000).toFixed(2)} s`,
      };
    };

    const precopy =
      (verify: boolean): Run =>
      async (vm, busy) => {
        const t0 = performance.now();
        const pc = await startPrecopy({ source: hv1, target: hv2, environment: ENV, vm });
        const loop = busy ? await startWrites(pc.sourceQmp, vm) : undefined;
        let w: { writes: number; error?: string } | undefined;
        try {
          await pc.ready;
          const tReady = performance.now();
          if (loop) {
            // writes into the READY mirror (dirty blocks the cutover must carry), as during a node drain
            await sleep(2000);
            w = await loop.stop();
          }
          const res = await precopyCutover(pc, { source: hv1, target: hv2, environment: ENV, vm, powerdownTimeoutMs: 0, verify });
          const t1 = performance.now();
          const p = res.phases;
          return {
            downtimeMs: res.downtimeMs,
            totalMs: t1 - t0,
            bytes: res.bytes,
            source: 'precopyCutover.downtimeMs',
            note: `${wrote(w)}mirror ready ${((tReady - t0) / 1000).toFixed(2)} s; cutover: pause ${p.pauseMs} ms, converge ${p.convergeMs} ms, quit ${p.quitSourceMs} ms, files+verify ${p.filesMs} ms, start ${p.startMs} ms`,
          };
        } catch (err) {
          if (loop) await loop.stop();
          await pc.abort().catch(() => undefined);
          throw err;
        }
      };

    const live: Run = async (vm, busy) => {
      const qmp = await openQmpAt(hv1, vmDirectory(h1, ENV, vm.name));
      const loop = busy ? await startWrites(qmp, vm) : undefined;
      let stopping: Promise<{ writes: number; error?: string }> | undefined;
      const t0 = performance.now();
      try {
        const res = await liveMigrate({
          source: hv1,
          target: hv2,
          environment: ENV,
          vm,
          sourceQmp: qmp,
          downtimeLimitMs: 300,
          onProgress: (p) => {
            // last write before `migrate`: writes still queued on the QMP client run before it
            if (loop && p.phase === 'mirror' && p.mirror?.ready) stopping ??= loop.stop();
          },
        });
        const t1 = performance.now();
        const w = loop ? await (stopping ?? loop.stop()) : undefined;
        const p = res.phases;
        return {
          downtimeMs: res.measuredDowntimeMs,
          totalMs: t1 - t0,
          bytes: res.bytes.total,
          source: 'liveMigrate.measuredDowntimeMs',
          note: `${wrote(w)}QEMU downtime ${res.qemuDowntimeMs} ms; disks ${(res.bytes.disks / MiB).toFixed(1)} MiB + RAM stream ${(res.bytes.migration / MiB).toFixed(1)} MiB; prepare ${p.prepareMs} ms, mirror ${p.mirrorMs} ms, migrate ${p.migrateMs} ms, handover ${p.handoverMs} ms`,
        };
      } catch (err) {
        if (loop) await (stopping ?? loop.stop());
        throw err;
      }
    };

    const strategies: Array<{ key: string; label: string; run: Run }> = [
      { key: 'cold', label: 'cold (stop, relay, start)', run: cold },
      { key: 'precopy', label: 'pre-copy, verify off', run: precopy(false) },
      { key: 'precopy-verify', label: 'pre-copy, verify on', run: precopy(true) },
      { key: 'live', label: 'live', run: live },
    ];
    for (const s of strategies.filter((x) => wanted.includes(x.key))) {
      for (const busy of [false, true]) {
        const workload = busy ? 'writes' : 'idle';
        console.error(`downtime: ${s.label}, ${workload}…`);
        const vm = await freshVm();
        try {
          const r = await s.run(vm, busy);
          const ok = await check(vm).catch((err: unknown) => `CHECK FAILED: ${(err as Error).message}`);
          rows.push({ strategy: s.label, workload, disk, ...r, note: `${r.note}; ${ok}` });
        } catch (err) {
          rows.push({ strategy: s.label, workload, disk, downtimeMs: -1, totalMs: -1, bytes: 0, source: '', note: `FAILED: ${(err as Error).message}` });
        } finally {
          await cleanup(vm);
        }
      }
    }
  } finally {
    for (const c of conns) c.close();
    await world.stop();
  }
  return rows;
}

const fmtS = (ms: number): string => (ms < 0 || !Number.isFinite(ms) ? 'failed' : (ms / 1000).toFixed(ms < 10_000 ? 3 : 2));

export function downtimeTable(rows: DowntimeRow[], scale: number): string {
  const base = rows.find((r) => r.strategy.startsWith('cold') && r.workload === 'idle' && r.downtimeMs >= 0);
  const lines = [
    `Downtime per strategy, BENCH_SCALE=${scale}, ${new Date().toISOString()}, node ${process.version}`,
    '',
    '| strategy | workload | disk | downtime s | × baseline (cold, idle) | total move s | bytes through the operator | downtime measured by | note |',
    '|---|---|---|---:|---:|---:|---:|---|---|',
  ];
  for (const r of rows) {
    const ratio = base && r.downtimeMs >= 0 ? `${(r.downtimeMs / base.downtimeMs).toFixed(3)}×` : '–';
    lines.push(`| ${r.strategy} | ${r.workload} | ${r.disk} | ${fmtS(r.downtimeMs)} | ${ratio} | ${fmtS(r.totalMs)} | ${r.downtimeMs < 0 ? '–' : `${(r.bytes / MiB).toFixed(1)} MiB`} | ${r.source} | ${r.note.replace(/\|/g, '\\|')} |`);
  }
  const verdict = (label: string, xs: DowntimeRow[], limitMs: number): string => {
    if (xs.length === 0) return `${label}: not measured`;
    const worst = Math.max(...xs.map((r) => (r.downtimeMs < 0 ? Infinity : r.downtimeMs)));
    return `${label}: **${worst <= limitMs ? 'met' : 'not met'}** (worst ${fmtS(worst)} s)`;
  };
  lines.push(
    '',
    `Goals: ${[
      verdict('pre-copy (verify off) downtime ≤ 5 s per VM', rows.filter((r) => r.strategy === 'pre-copy, verify off'), 5000),
      verdict('pre-copy (verify on) ≤ 5 s', rows.filter((r) => r.strategy === 'pre-copy, verify on'), 5000),
      verdict('live downtime ≤ 0.5 s on an idle VM', rows.filter((r) => r.strategy === 'live' && r.workload === 'idle'), 500),
    ].join('; ')}.`,
  );
  return lines.join('\n');
}
