/**
 * The operator's finalizer on VMMigrations it works on: a deletion then waits
 * until the move in flight is rolled back (also when the operator was down at
 * the time of the delete), instead of orphaning it. JSON patches with a `test`
 * op, so a concurrent change of the list makes the patch fail rather than
 * remove someone else's finalizer; RBAC needs only `patch` on vmmigrations.
 */
import { CustomObjectsApi, PatchStrategy, setHeaderOptions, type KubeConfig } from '@kubernetes/client-node';
import { GROUP, PLURAL, VERSION, type VMMigration } from '../api/types.js';

export const FINALIZER = 'vmops.dev/migration-protection';

export function hasFinalizer(obj: VMMigration): boolean {
  return obj.metadata.finalizers?.includes(FINALIZER) ?? false;
}

export class Finalizers {
  private readonly api: CustomObjectsApi;

  constructor(kc: KubeConfig) {
    this.api = kc.makeApiClient(CustomObjectsApi);
  }

  async add(obj: VMMigration): Promise<void> {
    if (hasFinalizer(obj)) return;
    const list = obj.metadata.finalizers;
    const body = list && list.length > 0
      ? [{ op: 'add', path: '/metadata/finalizers/-', value: FINALIZER }]
      : [{ op: 'add', path: '/metadata/finalizers', value: [FINALIZER] }];
    await this.patch(obj, body);
  }

  async remove(obj: VMMigration): Promise<void> {
    const i = obj.metadata.finalizers?.indexOf(FINALIZER) ?? -1;
    if (i < 0) return;
    await this.patch(obj, [
      { op: 'test', path: `/metadata/finalizers/${i}`, value: FINALIZER },
      { op: 'remove', path: `/metadata/finalizers/${i}` },
    ]).catch((err: { code?: number }) => {
      if (err.code !== 404) throw err; // already gone
    });
  }

  private async patch(obj: VMMigration, body: object[]): Promise<void> {
    const { name, namespace } = obj.metadata;
    await this.api.patchNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: PLURAL, name, body }, setHeaderOptions('Content-Type', PatchStrategy.JsonPatch));
  }
}
