/**
 * The administrator's decision after a move ended `stuck-on-target` (Degraded, rule 2): the VM ran
 * on the target and stays there; its source image was kept, never started. `release-source`
 * deletes that image once the target is confirmed as the VM's home: only for a Degraded move, only
 * while the target's QEMU runs the guest (QMP `running`: an incoming QEMU of a partial live migration
 * is alive too, but holds no complete guest) after a start this migration journaled, and only while
 * the source holds no QEMU of it. The placement is set to the target and the decision is journaled.
 */
import type { VMSpec } from '../api/inventory.js';
import { journalFacts } from './journal.js';
import type { MoveHost, MoveStore } from './vmMove.js';

export interface ReleaseStore extends Pick<MoveStore, 'journal' | 'setPlacement' | 'journalEntries'> {
  move(migrationUid: string, environment: string, vm: string): Promise<{ fromHost: string; toHost: string; phase: string } | undefined>;
  updateMove(migrationUid: string, environment: string, vm: string, patch: { message?: string }): Promise<void>;
}

const live = (s: string) => s === 'running' || s === 'paused' || s === 'other';

export async function releaseSource(o: { store: ReleaseStore; migrationUid: string; environment: string; vm: VMSpec; source: MoveHost; target: MoveHost }): Promise<string> {
  const { store, migrationUid, environment, vm, source, target } = o;
  const rec = await store.move(migrationUid, environment, vm.name);
  if (!rec) throw new Error(`migration ${migrationUid} has no move of ${environment}/${vm.name}`);
  if (rec.phase !== 'Degraded') throw new Error(`the move of ${environment}/${vm.name} is ${rec.phase}, not Degraded: only the kept source image of a move that stayed on its target is released`);
  if (rec.fromHost !== source.host.name || rec.toHost !== target.host.name) throw new Error(`the move went ${rec.fromHost} → ${rec.toHost}, not ${source.host.name} → ${target.host.name}`);
  const [src, dst] = await Promise.all([source.vmStatus(environment, vm), target.vmStatus(environment, vm)]);
  if (dst.qmpStatus !== 'running') throw new Error(`${environment}/${vm.name} does not run on ${target.host.name} (${dst.qmpStatus ?? dst.state}): the source image stays until the VM runs there`);
  if (!journalFacts(await store.journalEntries(migrationUid, environment, vm.name)).targetStarted) {
    throw new Error(`the journal of migration ${migrationUid} shows no completed start of ${environment}/${vm.name} on ${target.host.name}: the operator never saw that copy start, so it is not known to be the VM's whole disk; the source image stays`);
  }
  if (live(src.state)) throw new Error(`${environment}/${vm.name} has a live QEMU on ${source.host.name}: refusing to delete its image`);
  await store.journal(migrationUid, environment, vm.name, 'cleanup', 'begin', { by: 'release-source' });
  if (src.state !== 'absent') await source.removeVmDir(environment, vm);
  await store.setPlacement(environment, vm.name, target.host.name);
  await store.journal(migrationUid, environment, vm.name, 'cleanup', 'end', { by: 'release-source' });
  const message = `source image on ${source.host.name} released by an administrator; ${vm.name} lives on ${target.host.name}`;
  await store.updateMove(migrationUid, environment, vm.name, { message });
  return message;
}

/** A host whose source lock an administrator can read and clear. */
export interface LockedHost extends Pick<MoveHost, 'host' | 'unlockSource'> {
  sourceLock(environment: string, vm: VMSpec): Promise<{ uid: string; target: string; since: string } | undefined>;
}

/**
 * The administrator's decision after a move ended with its source lock in place but the VM not on
 * the target (Failed: rollback failed, or the source host was unreachable): clears the lock so the
 * source copy can be started again. Refused while the move may still act (Pending/Running), while
 * the target holds a live QEMU of the VM, and whenever the journal shows the VM may have run on the
 * target (rule 2: its disk holds the newest writes; the source copy is stale). Journaled.
 */
export async function unlockSource(o: { store: ReleaseStore; migrationUid: string; environment: string; vm: VMSpec; source: LockedHost; target: Pick<MoveHost, 'host' | 'vmStatus'> }): Promise<string> {
  const { store, migrationUid, environment, vm, source, target } = o;
  const rec = await store.move(migrationUid, environment, vm.name);
  if (!rec) throw new Error(`migration ${migrationUid} has no move of ${environment}/${vm.name}`);
  if (rec.phase === 'Pending' || rec.phase === 'Running') throw new Error(`the move of ${environment}/${vm.name} is ${rec.phase}: the migration may still act on it; let it finish or delete the VMMigration first`);
  if (rec.fromHost !== source.host.name || rec.toHost !== target.host.name) throw new Error(`the move went ${rec.fromHost} → ${rec.toHost}, not ${source.host.name} → ${target.host.name}`);
  if (journalFacts(await store.journalEntries(migrationUid, environment, vm.name)).targetRan) {
    throw new Error(`the journal shows ${environment}/${vm.name} may have run on ${target.host.name}: its disk there holds the guest's newest writes and the source copy on ${source.host.name} is stale; start it on ${target.host.name} and use release-source`);
  }
  const dst = await target.vmStatus(environment, vm);
  if (live(dst.state)) throw new Error(`${environment}/${vm.name} has a live QEMU on ${target.host.name}: the source copy stays locked`);
  const lock = await source.sourceLock(environment, vm);
  if (!lock) return `no source lock on ${source.host.name} for ${environment}/${vm.name}`;
  if (lock.uid !== migrationUid) throw new Error(`the source lock of ${environment}/${vm.name} on ${source.host.name} belongs to migration ${lock.uid}, not ${migrationUid}`);
  await store.journal(migrationUid, environment, vm.name, 'unlock', 'begin', { by: 'unlock-source' });
  await source.unlockSource(environment, vm, migrationUid);
  await store.journal(migrationUid, environment, vm.name, 'unlock', 'end', { by: 'unlock-source' });
  const message = `source lock of migration ${migrationUid} removed from ${source.host.name} by an administrator; ${vm.name} may be started there again`;
  await store.updateMove(migrationUid, environment, vm.name, { message });
  return message;
}
