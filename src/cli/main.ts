#!/usr/bin/env node
/**
 * vm-migration-operator run        – the controller (out of cluster with --kubeconfig, in cluster otherwise)
 * vm-migration-operator plan -f X  – dry run: the ordered plan for a VMMigration manifest
 * vm-migration-operator inventory  – hosts, environments and where each VM runs now
 * vm-migration-operator history X  – each VM's journaled steps with timings for migration X (uid or name)
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { parseArgs } from 'node:util';
import { KubeConfig } from '@kubernetes/client-node';
import { parse } from 'yaml';
import { loadInventoryFile } from '../api/inventoryFile.js';
import { settingsFrom, type VMMigration } from '../api/types.js';
import { MigrationController } from '../controller/operator.js';
import { HostPool } from '../hosts/pool.js';
import { startMetricsServer } from '../metrics/server.js';
import { planMigration } from '../planner/plan.js';
import { Store } from '../store/store.js';
import { history } from './history.js';
import { log } from '../util/log.js';

const USAGE = `usage:
  vm-migration-operator run [--kubeconfig F] --inventory F --db F --ssh-key F [--namespace NS] [--metrics-port 8080] [--leader-elect] [--lease-namespace NS]
  vm-migration-operator plan -f migration.yaml --inventory F [--db F]
  vm-migration-operator inventory --db F
  vm-migration-operator history <migration-uid-or-name> --db F
Every flag can also be given as an environment variable: VMOPS_KUBECONFIG, VMOPS_INVENTORY, VMOPS_DB, VMOPS_SSH_KEY, VMOPS_NAMESPACE, VMOPS_METRICS_PORT, VMOPS_LEADER_ELECT, VMOPS_LEASE_NAMESPACE.`;

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
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
    help: { type: 'boolean', short: 'h' },
  },
});

function need(name: keyof typeof values): string {
  const v = values[name];
  if (typeof v !== 'string' || v === '') {
    console.error(`missing --${name}\n\n${USAGE}`);
    process.exit(2);
  }
  return v;
}

async function run(): Promise<void> {
  const kc = new KubeConfig();
  if (values.kubeconfig) kc.loadFromFile(values.kubeconfig);
  else kc.loadFromCluster();
  const store = await Store.open(need('db'));
  if (values.inventory) await store.loadInventory(loadInventoryFile(values.inventory));
  const pool = new HostPool({ privateKey: readFileSync(need('ssh-key')) });
  const identity = `${hostname()}-${process.pid}`;
  const controller = new MigrationController({
    kc, store, pool, log, namespace: values.namespace || undefined,
    leaderElection: values['leader-elect'] ? { namespace: values['lease-namespace']!, name: 'vm-migration-operator', identity } : undefined,
  });
  const server = await startMetricsServer({ port: Number(values['metrics-port']), host: values['metrics-host'], readiness: () => controller.readiness() });
  log.info({ metricsPort: server.port, namespace: values.namespace ?? '(all)', identity }, 'operator started');
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
  const doc = parse(readFileSync(need('file'), 'utf8')) as VMMigration;
  const store = await Store.open(values.db ?? ':memory:');
  if (values.inventory) await store.loadInventory(loadInventoryFile(values.inventory));
  const result = planMigration(await store.hosts(), await store.environments(), settingsFrom(doc.spec));
  await store.close();
  if (result.problems.length > 0) {
    for (const p of result.problems) console.error(`error: ${p}`);
    process.exit(1);
  }
  console.log('ORDER  ENVIRONMENT           VM              ROLE        FROM      TO');
  for (const e of result.entries) {
    console.log(`${String(e.order).padEnd(7)}${e.environment.padEnd(22)}${e.vm.padEnd(16)}${e.role.padEnd(12)}${e.from.padEnd(10)}${e.to}`);
  }
  // Offline: capacity is not measured here (the operator measures it over SSH before it plans).
  console.log('\nENVIRONMENT           TARGET    WHY');
  for (const c of result.environments) console.log(`${c.environment.padEnd(22)}${c.target.padEnd(10)}${c.reason}`);
}

async function inventory(): Promise<void> {
  const store = await Store.open(need('db'));
  if (values.inventory) await store.loadInventory(loadInventoryFile(values.inventory));
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
    console.error(`missing migration uid or name\n\n${USAGE}`);
    process.exit(2);
  }
  const store = await Store.open(need('db'));
  const found = await history(store, ref);
  await store.close();
  if (!found) {
    console.error(`no journal entries for migration ${ref}`);
    process.exit(1);
  }
}

const commands: Record<string, () => Promise<void>> = { run, plan, inventory, history: showHistory };
const cmd = positionals[0];
if (values.help || !cmd || !commands[cmd]) {
  console.log(USAGE);
  process.exit(values.help ? 0 : 2);
}
commands[cmd]!().catch((err: Error) => {
  log.fatal({ err: err.message }, `${cmd} failed`);
  process.exit(1);
});
