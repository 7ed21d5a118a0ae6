import { Kysely, Migrator } from 'kysely';
import type { EnvironmentSpec, HostQemu, HostSpec, Inventory, VMBoot, VMFile, VMRole, VMSpec } from '../api/inventory.js';
import { connect, redactLocation, StoreOpenError, type ConnectOptions } from './connect.js';
import { migrations, type Backend, type Database, type MoveRow } from './schema.js';
import { boundedStrings } from '../util/text.js';
import { journalFacts } from '../migrate/journal.js';

export { isPostgresUrl, redactLocation, StoreOpenError } from './connect.js';

export type JournalEvent = 'begin' | 'end' | 'fail';

export interface MoveRecord {
  migrationUid: string;
  environment: string;
  vm: string;
  fromHost: string;
  toHost: string;
  phase: string;
  step: string | null;
  attempts: number;
  /** the operator's stop→start */
  stopToStartMs: number | null;
  /** the student's outage */
  outageMs: number | null;
  bytes: number;
  startedAt: string | null;
  finishedAt: string | null;
  message: string | null;
}


/** Where a VM move in flight has, by this inventory, lost its footing; see `loadInventory`. */
export class InventoryConflictError extends Error {
  constructor(readonly problems: string[], origin: string) {
    super(`${origin} contradicts the store: ${problems.join('; ')}. Nothing was changed`);
    this.name = 'InventoryConflictError';
  }
}

export interface OpenOptions extends ConnectOptions {
  /** written into every journal entry: which replica acted (the Lease identity) */
  actor?: string;
}

/**
 * The operator's memory: inventory, placement and a journal of every step.
 * SQLite (WAL) by default, PostgreSQL when the location is a `postgres://` URL;
 * every method is a small transaction so a crash leaves either the before or
 * the after state, never half of it.
 */
export class Store {
  private constructor(readonly db: Kysely<Database>, readonly backend: Backend, private readonly location: string, private readonly actor: string | null) {}

  /** Opens (and migrates) the store; fails with a StoreOpenError naming the redacted location before touching anything else. */
  static async open(location: string, opts: OpenOptions = {}): Promise<Store> {
    const conn = connect(location, opts);
    try {
      await conn.probe();
    } catch (err) {
      await conn.dispose().catch(() => undefined);
      throw err;
    }
    const db = new Kysely<Database>({ dialect: conn.dialect });
    const { error, results } = await new Migrator({ db, provider: { getMigrations: async () => migrations(conn.backend) } }).migrateToLatest();
    const failed = results?.find((r) => r.status === 'Error');
    if (error || failed) {
      await db.destroy().catch(() => undefined);
      throw new StoreOpenError(location, `schema migration failed${failed ? ` at ${failed.migrationName}` : ''}: ${error instanceof Error ? error.message : String(error)}`);
    }
    return new Store(db, conn.backend, location, opts.actor ?? null);
  }

  /** The location for logs: a PostgreSQL password never appears. */
  describe(): string {
    return `${this.backend} ${redactLocation(this.location)}`;
  }

  async close(): Promise<void> {
    await this.db.destroy();
  }

  /**
   * Loads the inventory file. Hosts and environments are upserted; a VM's
   * placement is taken from the file only the first time the VM is seen,
   * because after a move the database, not the file, knows where it runs.
   *
   * The file contradicts the store — and nothing is written — when
   *  - a VM of the file runs, by the store, on a host the file no longer lists
   *    (its placement would point nowhere);
   *  - a move in flight (phase Running: interrupted, to be resumed from the
   *    journal) names a host the file no longer lists, or whose address, port,
   *    user or VM directory the file changes: resuming would look for the VM
   *    on another machine or directory and could take "not found" for "gone".
   * A changed host key is no contradiction: connecting fails closed on it.
   */
  async loadInventory(inv: Inventory, origin = 'the inventory'): Promise<void> {
    const now = new Date().toISOString();
    await this.db.transaction().execute(async (tx) => {
      const problems = await contradictions(tx, inv);
      if (problems.length > 0) throw new InventoryConflictError(problems, origin);
      for (const h of inv.hosts) {
        const row = { name: h.name, address: h.address, port: h.port, user: h.user, host_key: h.hostKey, vm_dir: h.vmDir, qemu_json: h.qemu ? JSON.stringify(h.qemu) : null, authorized_keys_file: h.authorizedKeysFile ?? null };
        await tx.insertInto('hosts').values(row).onConflict((oc) => oc.column('name').doUpdateSet(row)).execute();
      }
      for (const e of inv.environments) {
        const row = { name: e.name, secret_namespace: e.kubeconfigSecret.namespace, secret_name: e.kubeconfigSecret.name, secret_key: e.kubeconfigSecret.key };
        await tx.insertInto('environments').values(row).onConflict((oc) => oc.column('name').doUpdateSet(row)).execute();
        for (const vm of e.vms) {
          const desc = { role: vm.role, node_name: vm.nodeName, memory_mib: vm.memoryMiB, cpus: vm.cpus, files_json: JSON.stringify(vm.files), boot_json: vm.boot ? JSON.stringify(vm.boot) : null, address: vm.address ?? null, devices_json: vm.cpu || vm.nics ? JSON.stringify({ cpu: vm.cpu, nics: vm.nics }) : null, updated_at: now };
          await tx.insertInto('vms').values({ environment: e.name, name: vm.name, host: vm.host, ...desc })
            .onConflict((oc) => oc.columns(['environment', 'name']).doUpdateSet(desc)).execute();
        }
      }
    });
  }

  async hosts(): Promise<HostSpec[]> {
    const rows = await this.db.selectFrom('hosts').selectAll().orderBy('name').execute();
    return rows.map((r) => ({
      name: r.name, address: r.address, port: r.port, user: r.user, hostKey: r.host_key, vmDir: r.vm_dir,
      ...(r.qemu_json ? { qemu: JSON.parse(r.qemu_json) as HostQemu } : {}),
      ...(r.authorized_keys_file ? { authorizedKeysFile: r.authorized_keys_file } : {}),
    }));
  }

  async host(name: string): Promise<HostSpec | undefined> {
    return (await this.hosts()).find((h) => h.name === name);
  }

  async environments(): Promise<EnvironmentSpec[]> {
    const envs = await this.db.selectFrom('environments').selectAll().orderBy('name').execute();
    const vms = await this.db.selectFrom('vms').selectAll().orderBy('environment').orderBy('name').execute();
    return envs.map((e) => ({
      name: e.name,
      kubeconfigSecret: { namespace: e.secret_namespace, name: e.secret_name, key: e.secret_key },
      vms: vms.filter((v) => v.environment === e.name).map(toVmSpec),
    }));
  }

  async environment(name: string): Promise<EnvironmentSpec | undefined> {
    return (await this.environments()).find((e) => e.name === name);
  }

  async setPlacement(environment: string, vm: string, host: string): Promise<void> {
    await this.db.updateTable('vms').set({ host, updated_at: new Date().toISOString() })
      .where('environment', '=', environment).where('name', '=', vm).execute();
  }

  async journal(migrationUid: string, environment: string, vm: string, step: string, event: JournalEvent, detail?: unknown): Promise<void> {
    await this.db.insertInto('journal').values({
      migration_uid: migrationUid, environment, vm, step, event,
      detail_json: detail === undefined ? null : JSON.stringify(boundedStrings(detail, 2048)),
      at: new Date().toISOString(),
      actor: this.actor,
    }).execute();
  }

  async journalEntries(migrationUid: string, environment?: string, vm?: string) {
    let q = this.db.selectFrom('journal').selectAll().where('migration_uid', '=', migrationUid);
    if (environment) q = q.where('environment', '=', environment);
    if (vm) q = q.where('vm', '=', vm);
    return q.orderBy('id').execute();
  }

  /** Uids of the migrations whose journal names them `name` (namespace/name or name), newest first. */
  async migrationUidsNamed(name: string): Promise<string[]> {
    const rows = await this.db.selectFrom('journal').select(['migration_uid', 'detail_json']).where('step', '=', 'precheck').where('event', '=', 'begin').orderBy('id', 'desc').execute();
    const uids = rows.filter((r) => {
      const m = r.detail_json ? (JSON.parse(r.detail_json) as { migration?: string }).migration : undefined;
      return m === name || m?.split('/')[1] === name;
    }).map((r) => r.migration_uid);
    return [...new Set(uids)];
  }

  /** Creates the move row if missing; returns the current record either way (idempotent). */
  async ensureMove(m: { migrationUid: string; environment: string; vm: string; fromHost: string; toHost: string }): Promise<MoveRecord> {
    await this.db.insertInto('vm_moves').values({
      migration_uid: m.migrationUid, environment: m.environment, vm: m.vm, from_host: m.fromHost, to_host: m.toHost,
      phase: 'Pending', step: null, attempts: 0, stop_to_start_ms: null, outage_ms: null, bytes: 0, started_at: null, finished_at: null, message: null,
    }).onConflict((oc) => oc.columns(['migration_uid', 'environment', 'vm']).doNothing()).execute();
    return (await this.move(m.migrationUid, m.environment, m.vm))!;
  }

  async move(migrationUid: string, environment: string, vm: string): Promise<MoveRecord | undefined> {
    const row = await this.db.selectFrom('vm_moves').selectAll()
      .where('migration_uid', '=', migrationUid).where('environment', '=', environment).where('vm', '=', vm).executeTakeFirst();
    return row ? toMove(row) : undefined;
  }

  /** Moves left Running (interrupted: the operator stopped or was killed mid-move); they resume from the journal. */
  async unfinishedMoves(migrationUid: string): Promise<MoveRecord[]> {
    return (await this.moves(migrationUid)).filter((m) => m.phase === 'Running');
  }

  /**
   * What the deletion of a VMMigration must wait for. A move is resolved when
   * the runner recorded it Succeeded or RolledBack, when it never got past its
   * checks (nothing touched), or when its journal ends in `cleanup:end` /
   * `rollback:end`. Otherwise it is in flight (Running, or Pending while a
   * safety wait interrupted it: it gets rolled back) or stuck (a human must
   * look at the VM before the object may go).
   */
  async unresolvedMoves(migrationUid: string): Promise<{ inFlight: MoveRecord[]; stuck: MoveRecord[] }> {
    const inFlight: MoveRecord[] = [];
    const stuck: MoveRecord[] = [];
    for (const m of await this.moves(migrationUid)) {
      if (m.phase === 'Succeeded' || m.phase === 'RolledBack') continue;
      const facts = journalFacts(await this.journalEntries(migrationUid, m.environment, m.vm));
      // nothing touched (only checks and waits), or over (cleaned up, rolled back)
      if (!facts.touched || facts.settled) continue;
      (m.phase === 'Running' || m.phase === 'Pending' ? inFlight : stuck).push(m);
    }
    return { inFlight, stuck };
  }

  async moves(migrationUid: string): Promise<MoveRecord[]> {
    const rows = await this.db.selectFrom('vm_moves').selectAll().where('migration_uid', '=', migrationUid).orderBy('id').execute();
    return rows.map(toMove);
  }

  async updateMove(migrationUid: string, environment: string, vm: string, patch: Partial<Omit<MoveRecord, 'migrationUid' | 'environment' | 'vm'>>): Promise<void> {
    const set: Partial<Record<keyof MoveRow, unknown>> = {};
    if (patch.phase !== undefined) set.phase = patch.phase;
    if (patch.step !== undefined) set.step = patch.step;
    if (patch.attempts !== undefined) set.attempts = patch.attempts;
    if (patch.stopToStartMs !== undefined) set.stop_to_start_ms = patch.stopToStartMs;
    if (patch.outageMs !== undefined) set.outage_ms = patch.outageMs;
    if (patch.bytes !== undefined) set.bytes = patch.bytes;
    if (patch.startedAt !== undefined) set.started_at = patch.startedAt;
    if (patch.finishedAt !== undefined) set.finished_at = patch.finishedAt;
    if (patch.message !== undefined) set.message = patch.message;
    if (patch.fromHost !== undefined) set.from_host = patch.fromHost;
    if (patch.toHost !== undefined) set.to_host = patch.toHost;
    if (Object.keys(set).length === 0) return;
    await this.db.updateTable('vm_moves').set(set as never)
      .where('migration_uid', '=', migrationUid).where('environment', '=', environment).where('vm', '=', vm).execute();
  }
}

async function contradictions(tx: Kysely<Database>, inv: Inventory): Promise<string[]> {
  const problems: string[] = [];
  const fileHosts = new Map(inv.hosts.map((h) => [h.name, h]));
  const dbHosts = new Map((await tx.selectFrom('hosts').selectAll().execute()).map((h) => [h.name, h]));
  const dbVms = await tx.selectFrom('vms').select(['environment', 'name', 'host']).execute();
  const inFile = new Set(inv.environments.flatMap((e) => e.vms.map((v) => `${e.name}/${v.name}`)));
  for (const v of dbVms) {
    if (inFile.has(`${v.environment}/${v.name}`) && !fileHosts.has(v.host)) {
      problems.push(`VM ${v.environment}/${v.name} runs on host ${v.host} according to the store, but the inventory has no host ${v.host}`);
    }
  }
  const inFlight = await tx.selectFrom('vm_moves').select(['migration_uid', 'environment', 'vm', 'from_host', 'to_host']).where('phase', '=', 'Running').execute();
  for (const m of inFlight) {
    const what = `the move of ${m.environment}/${m.vm} from ${m.from_host} to ${m.to_host} (VMMigration uid ${m.migration_uid}) is in flight`;
    for (const name of new Set([m.from_host, m.to_host])) {
      const now = fileHosts.get(name);
      const before = dbHosts.get(name);
      if (!now) {
        problems.push(`${what}, but the inventory has no host ${name}`);
        continue;
      }
      if (!before) continue;
      const changed = [
        before.address !== now.address && `address ${before.address} → ${now.address}`,
        before.port !== now.port && `port ${before.port} → ${now.port}`,
        before.user !== now.user && `user ${before.user} → ${now.user}`,
        before.vm_dir !== now.vmDir && `vmDir ${before.vm_dir} → ${now.vmDir}`,
      ].filter(Boolean);
      if (changed.length > 0) problems.push(`host ${name} changes ${changed.join(', ')} while ${what}; finish or cancel the move first`);
    }
  }
  return problems;
}

function toVmSpec(v: Database['vms']): VMSpec {
  return {
    name: v.name, role: v.role as VMRole, nodeName: v.node_name, host: v.host, memoryMiB: v.memory_mib, cpus: v.cpus, files: JSON.parse(v.files_json) as VMFile[],
    ...(v.boot_json ? { boot: JSON.parse(v.boot_json) as VMBoot } : {}),
    ...(v.address ? { address: v.address } : {}),
    ...(v.devices_json ? devicesOf(v.devices_json) : {}),
  };
}

function devicesOf(json: string): Pick<VMSpec, 'cpu' | 'nics'> {
  const d = JSON.parse(json) as Pick<VMSpec, 'cpu' | 'nics'>;
  return { ...(d.cpu ? { cpu: d.cpu } : {}), ...(d.nics ? { nics: d.nics } : {}) };
}

function toMove(r: { migration_uid: string; environment: string; vm: string; from_host: string; to_host: string; phase: string; step: string | null; attempts: number; stop_to_start_ms: number | null; outage_ms: number | null; bytes: number; started_at: string | null; finished_at: string | null; message: string | null }): MoveRecord {
  return {
    migrationUid: r.migration_uid, environment: r.environment, vm: r.vm, fromHost: r.from_host, toHost: r.to_host, phase: r.phase,
    step: r.step, attempts: r.attempts, stopToStartMs: r.stop_to_start_ms, outageMs: r.outage_ms, bytes: r.bytes, startedAt: r.started_at, finishedAt: r.finished_at, message: r.message,
  };
}
