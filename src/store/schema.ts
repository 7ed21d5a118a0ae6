import type { ColumnDataType, Generated, Kysely, Migration } from 'kysely';
import { sql } from 'kysely';

/** The two supported databases: SQLite embedded (default), PostgreSQL for operators that must not depend on one node's disk. */
export type Backend = 'sqlite' | 'postgres';

export interface HostsTable {
  name: string;
  address: string;
  port: number;
  user: string;
  host_key: string;
  vm_dir: string;
  /** HostSpec.qemu as JSON (null: defaults) */
  qemu_json: string | null;
  authorized_keys_file: string | null;
}

export interface EnvironmentsTable {
  name: string;
  secret_namespace: string;
  secret_name: string;
  secret_key: string;
}

export interface VmsTable {
  environment: string;
  name: string;
  role: string;
  node_name: string;
  /** where the VM lives now: the only placement truth once the VM has been moved */
  host: string;
  memory_mib: number;
  cpus: number;
  files_json: string;
  updated_at: string;
  /** VMSpec.boot as JSON (null: BIOS boot from the first disk) */
  boot_json: string | null;
  address: string | null;
  devices_json: string | null;
}

export interface MoveRow {
  id: Generated<number>;
  migration_uid: string;
  environment: string;
  vm: string;
  from_host: string;
  to_host: string;
  phase: string;
  step: string | null;
  attempts: number;
  /** the operator's stop→start (before 0005: downtime_ms) */
  stop_to_start_ms: number | null;
  /** the student's outage (src/migrate/outage.ts); null when none was measured */
  outage_ms: number | null;
  bytes: number;
  started_at: string | null;
  finished_at: string | null;
  message: string | null;
}

export interface JournalTable {
  id: Generated<number>;
  migration_uid: string;
  environment: string;
  vm: string;
  step: string;
  event: 'begin' | 'end' | 'fail';
  detail_json: string | null;
  at: string;
  /** which operator replica wrote the entry (Lease identity); proves two replicas never act on one VM at once */
  actor: string | null;
}

export interface Database {
  hosts: HostsTable;
  environments: EnvironmentsTable;
  vms: VmsTable;
  vm_moves: MoveRow;
  journal: JournalTable;
}

/**
 * Schema migrations live in code so the binary and its database can never disagree.
 * The SQL differs per backend only where the dialects do: identity columns, 64-bit
 * counters (SQLite's INTEGER is already 64-bit) and the journal's time default.
 */
export function migrations(backend: Backend): Record<string, Migration> {
  const pg = backend === 'postgres';
  const int64: ColumnDataType = pg ? 'bigint' : 'integer';
  const nowText = pg
    ? sql`(to_char(now() at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))`
    : sql`(strftime('%Y-%m-%dT%H:%M:%fZ','now'))`;
  return {
    '0001_initial': {
      async up(db: Kysely<unknown>) {
        await db.schema.createTable('hosts')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('address', 'text', (c) => c.notNull())
          .addColumn('port', 'integer', (c) => c.notNull())
          .addColumn('user', 'text', (c) => c.notNull())
          .addColumn('host_key', 'text', (c) => c.notNull())
          .addColumn('vm_dir', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createTable('environments')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('secret_namespace', 'text', (c) => c.notNull())
          .addColumn('secret_name', 'text', (c) => c.notNull())
          .addColumn('secret_key', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createTable('vms')
          .addColumn('environment', 'text', (c) => c.notNull().references('environments.name').onDelete('cascade'))
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('role', 'text', (c) => c.notNull())
          .addColumn('node_name', 'text', (c) => c.notNull())
          .addColumn('host', 'text', (c) => c.notNull().references('hosts.name'))
          .addColumn('memory_mib', 'integer', (c) => c.notNull())
          .addColumn('cpus', 'integer', (c) => c.notNull())
          .addColumn('files_json', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'text', (c) => c.notNull())
          .addPrimaryKeyConstraint('vms_pk', ['environment', 'name'])
          .execute();
        await db.schema.createTable('vm_moves')
          .addColumn('id', 'integer', (c) => (pg ? c.primaryKey().generatedByDefaultAsIdentity() : c.primaryKey().autoIncrement()))
          .addColumn('migration_uid', 'text', (c) => c.notNull())
          .addColumn('environment', 'text', (c) => c.notNull())
          .addColumn('vm', 'text', (c) => c.notNull())
          .addColumn('from_host', 'text', (c) => c.notNull())
          .addColumn('to_host', 'text', (c) => c.notNull())
          .addColumn('phase', 'text', (c) => c.notNull())
          .addColumn('step', 'text')
          .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('downtime_ms', int64)
          .addColumn('bytes', int64, (c) => c.notNull().defaultTo(0))
          .addColumn('started_at', 'text')
          .addColumn('finished_at', 'text')
          .addColumn('message', 'text')
          .addUniqueConstraint('vm_moves_once', ['migration_uid', 'environment', 'vm'])
          .execute();
        await db.schema.createTable('journal')
          .addColumn('id', 'integer', (c) => (pg ? c.primaryKey().generatedByDefaultAsIdentity() : c.primaryKey().autoIncrement()))
          .addColumn('migration_uid', 'text', (c) => c.notNull())
          .addColumn('environment', 'text', (c) => c.notNull())
          .addColumn('vm', 'text', (c) => c.notNull())
          .addColumn('step', 'text', (c) => c.notNull())
          .addColumn('event', 'text', (c) => c.notNull())
          .addColumn('detail_json', 'text')
          .addColumn('at', 'text', (c) => c.notNull().defaultTo(nowText))
          .execute();
        await db.schema.createIndex('journal_by_vm').on('journal').columns(['migration_uid', 'environment', 'vm', 'id']).execute();
      },
    },
    '0002_journal_actor': {
      async up(db: Kysely<unknown>) {
        await db.schema.alterTable('journal').addColumn('actor', 'text').execute();
      },
    },
    // Descriptions the inventory file carries beyond the first schema: without them the operator
    // started VMs on the target with the default accelerator and without their direct kernel boot.
    '0003_host_and_vm_details': {
      async up(db: Kysely<unknown>) {
        await db.schema.alterTable('hosts').addColumn('qemu_json', 'text').execute();
        await db.schema.alterTable('hosts').addColumn('authorized_keys_file', 'text').execute();
        await db.schema.alterTable('vms').addColumn('boot_json', 'text').execute();
        await db.schema.alterTable('vms').addColumn('address', 'text').execute();
      },
    },
    '0004_vm_devices': {
      async up(db: Kysely<unknown>) {
        // the VM's CPU model and NICs (bridge, MAC, model): its definition moves with it
        await db.schema.alterTable('vms').addColumn('devices_json', 'text').execute();
      },
    },
    '0005_outage': {
      async up(db: Kysely<unknown>) {
        // "downtime" meant the operator's stop→start; the student's outage is a figure of its own
        await db.schema.alterTable('vm_moves').renameColumn('downtime_ms', 'stop_to_start_ms').execute();
        await db.schema.alterTable('vm_moves').addColumn('outage_ms', int64).execute();
      },
    },
  };
}
