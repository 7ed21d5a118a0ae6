/**
 * The administrator's decision after a move ended `stuck-on-target` (Degraded, rule 2): the VM ran
 * on the target and stays there; its source image was kept, never started. `release-source`
 * deletes that image once the target is confirmed as the VM's home: only for a Degraded move, only
 * while the target holds a live QEMU of the VM and the source holds none. The placement is set to
 * the target and the decision is journaled.
 */
import type { VMSpec } from '../api/inventory.js';
import type { MoveHost, MoveStore } from './vmMove.js';

export interface ReleaseStore extends Pick<MoveStore, 'journal' | 'setPlacement'> {
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
  if (!live(dst.state)) throw new Error(`${environment}/${vm.name} has no live QEMU on ${target.host.name} (${dst.state}): start it there first; the source image stays`);
  if (live(src.state)) throw new Error(`${environment}/${vm.name} has a live QEMU on ${source.host.name}: refusing to delete its image`);
  await store.journal(migrationUid, environment, vm.name, 'cleanup', 'begin', { by: 'release-source' });
  if (src.state !== 'absent') await source.removeVmDir(environment, vm);
  await store.setPlacement(environment, vm.name, target.host.name);
  await store.journal(migrationUid, environment, vm.name, 'cleanup', 'end', { by: 'release-source' });
  const message = `source image on ${source.host.name} released by an administrator; ${vm.name} lives on ${target.host.name}`;
  await store.updateMove(migrationUid, environment, vm.name, { message });
  return message;
}
