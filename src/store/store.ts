import BetterSqlite3 from 'better-sqlite3';
import { Kysely, Migrator, SqliteDialect, type MigrationProvider } from 'kysely';
import type { EnvironmentSpec, HostSpec, Inventory, VMFile, VMRole, VMSpec } from '../api/inventory.js';
import { migrations, type Database, type MoveRow } from './schema.js';

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
  downtimeMs: number | null;
  bytes: number;
  startedAt: string | null;
  finishedAt: string | null;
  message: string | null;
}

const provider: MigrationProvider = { getMigrations: async () => migrations };

/**
 * The operator's memory: inventory, placement and a journal of every step.
 * SQLite (WAL) by default; every method is a small transaction so a crash
 * leaves either the before or the after state, never half of it.
 */
export class Store {
  private constructor(readonly db: Kysely<Database>, private readonly sqlite: BetterSqlite3.Database) {}

  static async open(path: string): Promise<Store> {
    const sqlite = new BetterSqlite3(path);
    sqlite.pragma('journal_mode = WAL');
    sqlite.pragma('foreign_keys = ON');
    sqlite.pragma('busy_timeout = 5000');
    const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: sqlite }) });
    const { error, results } = await new Migrator({ db, provider }).migrateToLatest();
    const failed = results?.find((r) => r.status === 'Error');
    if (error || failed) throw new Error(`store schema migration failed${failed ? ` at ${failed.migrationName}` : ''}: ${String(error)}`);
    return new Store(db, sqlite);
  }

  async close(): Promise<void> {
    await this.db.destroy();
  }

  /**
   * Loads the inventory file. Hosts and environments are upserted; a VM's
   * placement is taken from the file only the first time the VM is seen,
   * because after a move the database, not the file, knows where it runs.
   */
  async loadInventory(inv: Inventory): Promise<void> {
    const now = new Date().toISOString();
    await this.db.transaction().execute(async (tx) => {
      for (const h of inv.hosts) {
        const row = { name: h.name, address: h.address, port: h.port, user: h.user, host_key: h.hostKey, vm_dir: h.vmDir };
        await tx.insertInto('hosts').values(row).onConflict((oc) => oc.column('name').doUpdateSet(row)).execute();
      }
      for (const e of inv.environments) {
        const row = { name: e.name, secret_namespace: e.kubeconfigSecret.namespace, secret_name: e.kubeconfigSecret.name, secret_key: e.kubeconfigSecret.key };
        await tx.insertInto('environments').values(row).onConflict((oc) => oc.column('name').doUpdateSet(row)).execute();
        for (const vm of e.vms) {
          const desc = { role: vm.role, node_name: vm.nodeName, memory_mib: vm.memoryMiB, cpus: vm.cpus, files_json: JSON.stringify(vm.files), updated_at: now };
          await tx.insertInto('vms').values({ environment: e.name, name: vm.name, host: vm.host, ...desc })
            .onConflict((oc) => oc.columns(['environment', 'name']).doUpdateSet(desc)).execute();
        }
      }
    });
  }

  async hosts(): Promise<HostSpec[]> {
    const rows = await this.db.selectFrom('hosts').selectAll().orderBy('name').execute();
    return rows.map((r) => ({ name: r.name, address: r.address, port: r.port, user: r.user, hostKey: r.host_key, vmDir: r.vm_dir }));
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
      detail_json: detail === undefined ? null : JSON.stringify(detail),
      at: new Date().toISOString(),
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
      phase: 'Pending', step: null, attempts: 0, downtime_ms: null, bytes: 0, started_at: null, finished_at: null, message: null,
    }).onConflict((oc) => oc.columns(['migration_uid', 'environment', 'vm']).doNothing()).execute();
    return (await this.move(m.migrationUid, m.environment, m.vm))!;
  }

  async move(migrationUid: string, environment: string, vm: string): Promise<MoveRecord | undefined> {
    const row = await this.db.selectFrom('vm_moves').selectAll()
      .where('migration_uid', '=', migrationUid).where('environment', '=', environment).where('vm', '=', vm).executeTakeFirst();
    return row ? toMove(row) : undefined;
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
    if (patch.downtimeMs !== undefined) set.downtime_ms = patch.downtimeMs;
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

function toVmSpec(v: Database['vms']): VMSpec {
  return { name: v.name, role: v.role as VMRole, nodeName: v.node_name, host: v.host, memoryMiB: v.memory_mib, cpus: v.cpus, files: JSON.parse(v.files_json) as VMFile[] };
}

function toMove(r: { migration_uid: string; environment: string; vm: string; from_host: string; to_host: string; phase: string; step: string | null; attempts: number; downtime_ms: number | null; bytes: number; started_at: string | null; finished_at: string | null; message: string | null }): MoveRecord {
  return {
    migrationUid: r.migration_uid, environment: r.environment, vm: r.vm, fromHost: r.from_host, toHost: r.to_host, phase: r.phase,
    step: r.step, attempts: r.attempts, downtimeMs: r.downtime_ms, bytes: r.bytes, startedAt: r.started_at, finishedAt: r.finished_at, message: r.message,
  };
}
