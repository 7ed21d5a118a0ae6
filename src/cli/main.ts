#!/usr/bin/env node
/**
 * vm-migration-operator run        – the controller (out of cluster with --kubeconfig, in cluster otherwise)
 * vm-migration-operator plan -f X  – dry run: the ordered plan for a VMMigration manifest
 * vm-migration-operator inventory  – hosts, environments and where each VM runs now
 * vm-migration-operator history X  – each VM's journaled steps with timings for migration X (uid or name)
 * vm-migration-operator status N   – a VMMigration's progress from its status
 * vm-migration-operator release-source X ENV/VM – delete the kept source image of a move that stayed on its target (Degraded)
 * vm-migration-operator unlock-source X ENV/VM  – clear the source lock a failed move left on a source that is still the VM's copy
 */
import { accessSync, constants, readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { parseArgs } from 'node:util';
import { KubeConfig } from '@kubernetes/client-node';
import { parse } from 'yaml';
import type { VMSpec } from '../api/inventory.js';
import { loadInventoryFile } from '../api/inventoryFile.js';
import { settingsFrom } from '../api/types.js';
import { validateMigrationManifest } from '../api/validate.js';
import { MigrationController } from '../controller/operator.js';
import type { Hypervisor } from '../hosts/hypervisor.js';
import { HostPool } from '../hosts/pool.js';
import { initLabelledCounters, reportInformerSynced } from '../metrics/metrics.js';
import { guestSafetyHook } from '../controller/guestSafetyWiring.js';
import { startMetricsServer } from '../metrics/server.js';
import { planMigration } from '../planner/plan.js';
import { Store } from '../store/store.js';
import { releaseSource, unlockSource } from '../migrate/releaseSource.js';
import { log } from '../util/log.js';
import { history } from './history.js';
import { moveHistory, planTable } from './planTable.js';
import { statusCommand } from './status.js';

const HELP: Record<string, string> = {
  run: `vm-migration-operator run [--kubeconfig F] --inventory F --db F|postgres://… --ssh-key F [--namespace NS] [--metrics-port 8080] [--leader-elect] [--lease-namespace NS]
  Runs the controller: watches VMMigrations and moves VMs.
  --kubeconfig F        out of cluster; without it the in-cluster ServiceAccount is used (VMOPS_KUBECONFIG)
  --inventory F         inventory YAML, upserted into the store at start (VMOPS_INVENTORY)
  --db F|URL            the store and journal: a SQLite file, or a postgres://user:password@host/db URL (VMOPS_DB)
  --ssh-key F           the operator's private SSH key, authorized on the hypervisors (VMOPS_SSH_KEY)
  --namespace NS        watch VMMigrations in NS only; default all namespaces (VMOPS_NAMESPACE)
  --metrics-port P      /metrics, /healthz, /readyz; default 8080 (VMOPS_METRICS_PORT)
  --metrics-host A      listen address; default 0.0.0.0 (VMOPS_METRICS_HOST)
  --leader-elect        hold the Lease vm-migration-operator before acting (VMOPS_LEADER_ELECT=true)
  --lease-namespace NS  where the Lease lives; default vm-migration-system (VMOPS_LEASE_NAMESPACE)`,
  plan: `vm-migration-operator plan -f migration.yaml --inventory F [--db F]
  Dry run: prints the ordered plan of a VMMigration manifest, with copy time and outage
  estimated from the moves recorded in --db. Touches nothing.
  -f, --file F          the VMMigration manifest
  --inventory F         inventory YAML (VMOPS_INVENTORY)
  --db F                store to read placement and measured moves from (VMOPS_DB); default none`,
  inventory: `vm-migration-operator inventory --db F [--inventory F]
  Prints hosts, environments and where each VM runs now according to the store.
  --db F                the store (VMOPS_DB)
  --inventory F         load this inventory into the store first (VMOPS_INVENTORY)`,
  history: `vm-migration-operator history MIGRATION --db F
  Each VM's journaled steps with timings for a migration (its uid or name), from the store.
  --db F                the store (VMOPS_DB)`,
  status: `vm-migration-operator status NAME [--namespace NS] [--kubeconfig F] [--watch]
  A VMMigration's progress per environment and per VM (bars, rate, ETA, outage), read from
  its status; needs only read access to VMMigrations.
  --namespace NS        default vm-migration-system (VMOPS_NAMESPACE)
  --kubeconfig F        default: $KUBECONFIG, ~/.kube/config, or the in-cluster ServiceAccount
  -w, --watch           follow it until it finishes; exit 0 Succeeded, 1 Failed`,
  'release-source': `vm-migration-operator release-source MIGRATION ENVIRONMENT/VM --db F --ssh-key F [--inventory F]
  Deletes the source image a move kept because it ended Degraded on its target (it ran there and
  stays there). Refused unless the move is Degraded, the target holds a live QEMU of the VM and the
  source holds none. Journaled; the VM's placement becomes the target.
  --db F                the store (VMOPS_DB)
  --ssh-key F           the operator's private SSH key (VMOPS_SSH_KEY)
  --inventory F         load this inventory into the store first (VMOPS_INVENTORY)`,
  'unlock-source': `vm-migration-operator unlock-source MIGRATION ENVIRONMENT/VM --db F --ssh-key F [--inventory F]
  Clears the source lock (migration.lock in the VM directory) that a move left on its source host
  because it failed without rolling back (e.g. the rollback could not start the VM, or the source
  host was unreachable). Refused while the move is Pending or Running, while the target holds a live
  QEMU of the VM, and whenever the journal shows the VM may have run on the target (its disk there
  is the truth: use release-source). Journaled.
  --db F                the store (VMOPS_DB)
  --ssh-key F           the operator's private SSH key (VMOPS_SSH_KEY)
  --inventory F         load this inventory into the store first (VMOPS_INVENTORY)`,
};
const USAGE = `usage:\n${Object.values(HELP).map((h) => `  ${h.split('\n')[0]}`).join('\n')}
Run "vm-migration-operator COMMAND --help" for a command's flags. Every flag of run can also be given
as an environment variable (named after each flag).`;

const OPTIONS = {
  kubeconfig: { type: 'string', default: process.env.VMOPS_KUBECONFIG },
  inventory: { type: 'string', default: process.env.VMOPS_INVENTORY },
  db: { type: 'string', default: process.env.VMOPS_DB },
  'ssh-key': { type: 'string', default: process.env.VMOPS_SSH_KEY },
  namespace: { type: 'string', default: process.env.VMOPS_NAMESPACE },
  'metrics-port': { type: 'string', default: process.env.VMOPS_METRICS_PORT ?? '8080' },
  'metrics-host': { type: 'string', default: process.env.VMOPS_METRICS_HOST ?? '0.0.0.0' },
  'leader-elect': { type: 'boolean', default: process.env.VMOPS_LEADER_ELECT === 'true' },
  'lease-namespace': { type: 'string', default: process.env.VMOPS_LEASE_NAMESPACE ?? 'vm-migration-system' },
  file: { type: 'string', short: 'f' },
  watch: { type: 'boolean', short: 'w' },
  help: { type: 'boolean', short: 'h' },
} as const;

function parseCli() {
  try {
    return parseArgs({ allowPositionals: true, options: OPTIONS });
  } catch (err) {
    // e.g. "Unknown option '--inventroy'": name the flag, then the usage
    console.error(`error: ${(err as Error).message}\n\n${USAGE}`);
    process.exit(2);
  }
}
const { positionals, values } = parseCli();

function need(name: keyof typeof values): string {
  const v = values[name];
  if (typeof v !== 'string' || v === '') {
    console.error(`error: missing --${name}\n\n${HELP[positionals[0] ?? ''] ?? USAGE}`);
    process.exit(2);
  }
  return v;
}

/** A flag naming a file that must exist and be readable; the error names the flag and the path. */
function needFile(name: keyof typeof values): string {
  const path = need(name);
  try {
    if (!statSync(path).isFile()) throw new Error('not a regular file');
    accessSync(path, constants.R_OK);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    console.error(`error: --${name} ${path}: ${e.code === 'ENOENT' ? 'no such file' : e.code === 'EACCES' ? 'permission denied' : e.message}`);
    process.exit(2);
  }
  return path;
}

/** Runs `fn`, prefixing a failure with the flag and file it came from. */
function fromFile<T>(name: string, path: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new Error(`--${name} ${path}: ${(err as Error).message}`);
  }
}

async function run(): Promise<void> {
  const kc = new KubeConfig();
  if (values.kubeconfig) {
    const file = needFile('kubeconfig');
    fromFile('kubeconfig', file, () => kc.loadFromFile(file));
  } else kc.loadFromCluster();
  const sshKey = needFile('ssh-key');
  const inventoryPath = values.inventory ? needFile('inventory') : undefined;
  const identity = `${hostname()}-${process.pid}`;
  const store = await Store.open(need('db'), { actor: identity, onIdleError: (err) => log.warn({ err }, 'store connection lost; reconnecting') });
  const inventoryFile = inventoryPath ? fromFile('inventory', inventoryPath, () => loadInventoryFile(inventoryPath)) : undefined;
  if (inventoryFile) await store.loadInventory(inventoryFile, `inventory ${inventoryPath}`);
  const pool = new HostPool({ privateKey: readFileSync(sshKey) });
  const controller = new MigrationController({
    kc, store, pool, log, namespace: values.namespace || undefined,
    guestSafety: guestSafetyHook({ inventory: inventoryFile, kc, store, pool }),
    leaderElection: values['leader-elect'] ? { namespace: values['lease-namespace']!, name: 'vm-migration-operator', identity } : undefined,
  });
  initLabelledCounters();
  reportInformerSynced(() => controller.readiness().ready);
  const server = await startMetricsServer({ port: Number(values['metrics-port']), host: values['metrics-host'], readiness: () => controller.readiness() });
  log.info({ metricsPort: server.port, namespace: values.namespace ?? '(all)', identity, store: store.describe() }, 'operator started');
  await controller.start();
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    await controller.stop().catch((err: Error) => log.error({ err: err.message }, 'stop failed'));
    pool.closeAll();
    await server.close();
    await store.close();
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}

async function plan(): Promise<void> {
  const file = needFile('file');
  const doc = fromFile('file', file, () => parse(readFileSync(file, 'utf8')) as unknown);
  // The CRD's own schema and CEL rules: the dry run refuses what the API server would refuse.
  const checked = validateMigrationManifest(doc);
  if (!checked.ok) {
    for (const p of checked.problems) console.error(`error: ${p}`);
    process.exit(1);
  }
  const store = await Store.open(values.db ?? ':memory:');
  const inventoryPath = values.inventory ? needFile('inventory') : undefined;
  if (inventoryPath) await store.loadInventory(fromFile('inventory', inventoryPath, () => loadInventoryFile(inventoryPath)), `inventory ${inventoryPath}`);
  const result = planMigration(await store.hosts(), await store.environments(), settingsFrom(checked.migration.spec));
  const history = await moveHistory(store);
  await store.close();
  if (result.problems.length > 0) {
    for (const p of result.problems) console.error(`error: ${p}`);
    process.exit(1);
  }
  for (const line of planTable(result.entries, history)) console.log(line);
  // Offline: capacity is not measured here (the operator measures it over SSH before it plans).
  console.log('\nENVIRONMENT           TARGET    WHY');
  for (const c of result.environments) console.log(`${c.environment.padEnd(22)}${c.target.padEnd(10)}${c.reason}`);
}

async function status(): Promise<void> {
  const name = positionals[1];
  if (!name || positionals.length > 2) {
    console.error(`error: status takes exactly one NAME\n\n${HELP.status}`);
    process.exit(2);
  }
  const kc = new KubeConfig();
  if (values.kubeconfig) {
    const file = needFile('kubeconfig');
    fromFile('kubeconfig', file, () => kc.loadFromFile(file));
  } else kc.loadFromDefault();
  process.exitCode = await statusCommand({ kc, name, namespace: values.namespace || 'vm-migration-system', watch: values.watch === true });
}

async function inventory(): Promise<void> {
  const store = await Store.open(need('db'));
  const inventoryPath = values.inventory ? needFile('inventory') : undefined;
  if (inventoryPath) await store.loadInventory(fromFile('inventory', inventoryPath, () => loadInventoryFile(inventoryPath)), `inventory ${inventoryPath}`);
  for (const h of await store.hosts()) console.log(`host ${h.name}  ${h.user}@${h.address}:${h.port}  ${h.vmDir}`);
  for (const e of await store.environments()) {
    console.log(`environment ${e.name}`);
    for (const v of e.vms) console.log(`  ${v.name.padEnd(14)} ${v.role.padEnd(10)} node=${v.nodeName.padEnd(22)} host=${v.host}`);
  }
  await store.close();
}

async function showHistory(): Promise<void> {
  const ref = positionals[1];
  if (!ref) {
    console.error(`error: missing migration uid or name\n\n${HELP.history}`);
    process.exit(2);
  }
  const store = await Store.open(need('db'));
  const found = await history(store, ref);
  await store.close();
  if (!found) {
    console.error(`error: no journal entries for migration ${ref}`);
    process.exit(1);
  }
}

/** release-source and unlock-source: one VM of one migration, both of its hosts over SSH. */
function adminDecision(name: 'release-source' | 'unlock-source', decide: (o: { store: Store; migrationUid: string; environment: string; vm: VMSpec; source: Hypervisor; target: Hypervisor }) => Promise<string>): () => Promise<void> {
  return async () => {
    const [ref, target] = [positionals[1], positionals[2]];
    const [env, vmName] = target?.split('/') ?? [];
    if (!ref || !env || !vmName) {
      console.error(`error: ${name} needs MIGRATION and ENVIRONMENT/VM\n\n${HELP[name]}`);
      process.exit(2);
    }
    const store = await Store.open(need('db'));
    if (values.inventory) await store.loadInventory(loadInventoryFile(values.inventory));
    const pool = new HostPool({ privateKey: readFileSync(need('ssh-key')) });
    try {
      const uids = (await store.moves(ref)).length > 0 ? [ref] : await store.migrationUidsNamed(ref);
      if (uids.length !== 1) throw new Error(uids.length === 0 ? `no migration ${ref} in the database` : `${ref} names ${uids.length} migrations; give the uid`);
      const uid = uids[0]!;
      const rec = await store.move(uid, env, vmName);
      const vm = (await store.environment(env))?.vms.find((v) => v.name === vmName);
      if (!rec || !vm) throw new Error(`migration ${ref} has no move of ${env}/${vmName}`);
      const [from, to] = await Promise.all([store.host(rec.fromHost), store.host(rec.toHost)]);
      if (!from || !to) throw new Error(`host ${!from ? rec.fromHost : rec.toHost} is not in the inventory`);
      const [source, target] = await Promise.all([pool.hypervisor(from), pool.hypervisor(to)]);
      console.log(await decide({ store, migrationUid: uid, environment: env, vm, source, target }));
    } finally {
      pool.closeAll();
      await store.close();
    }
  };
}

const commands: Record<string, () => Promise<void>> = { run, plan, inventory, history: showHistory, status, 'release-source': adminDecision('release-source', releaseSource), 'unlock-source': adminDecision('unlock-source', unlockSource) };
const cmd = positionals[0];
if (values.help) {
  console.log(cmd && HELP[cmd] ? HELP[cmd] : USAGE);
  process.exit(0);
}
if (!cmd || !commands[cmd]) {
  console.error(`${cmd ? `error: unknown command "${cmd}"\n\n` : ''}${USAGE}`);
  process.exit(2);
}
commands[cmd]!().catch((err: Error) => {
  if (cmd === 'run') {
    // the controller logs as JSON for log pipelines; start-up faults (store, inventory) must also be readable plainly
    log.fatal({ err: err.message }, `${cmd} failed`);
    console.error(`vm-migration-operator ${cmd}: ${err.message}`);
  } else console.error(`error: ${err.message}`);
  process.exit(1);
});
