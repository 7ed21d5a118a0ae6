/** Spec defaults are defined once (SPEC_DEFAULTS); the CRD schema repeats them and must agree. */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { SPEC_DEFAULTS, settingsFrom } from '../../src/api/types.js';

interface Schema { default?: unknown; properties?: Record<string, Schema> }
const crd = parse(readFileSync(new URL('../../crds/vmops.dev_vmmigrations.yaml', import.meta.url), 'utf8')) as { spec: { versions: { schema: { openAPIV3Schema: Schema } }[] } };
const spec = crd.spec.versions[0]!.schema.openAPIV3Schema.properties!.spec!;
const at = (...path: string[]): unknown => path.reduce<Schema | undefined>((s, p) => s?.properties?.[p], spec)?.default;

describe('spec defaults', () => {
  it('the CRD schema applies the same defaults as SPEC_DEFAULTS', () => {
    const d = SPEC_DEFAULTS;
    expect({
      strategy: at('strategy'), precopy: at('transfer', 'precopy'), mirrorAhead: at('transfer', 'mirrorAhead'), compression: at('transfer', 'compression'), transferMode: at('transfer', 'mode'), stallTimeoutSeconds: at('transfer', 'stallTimeoutSeconds'),
      live: { downtimeLimit: at('live', 'downtimeLimit'), convergenceTimeout: at('live', 'convergenceTimeout'), autoConverge: at('live', 'autoConverge'), fallback: at('live', 'fallback') },
      drain: {
        timeout: at('drain', 'timeout'), gracePeriodSeconds: at('drain', 'gracePeriodSeconds'), deleteEmptyDirData: at('drain', 'deleteEmptyDirData'),
        force: at('drain', 'force'), ignoreDaemonSets: at('drain', 'ignoreDaemonSets'), skipWaitForDeleteTimeoutSeconds: at('drain', 'skipWaitForDeleteTimeoutSeconds'),
      },
      powerdownTimeout: at('shutdown', 'powerdownTimeout'), nodeReadyTimeout: at('nodeReadyTimeout'), safetyWaitTimeout: at('safetyWaitTimeout'),
    }).toEqual(d);
  });

  it('settingsFrom of an empty spec is SPEC_DEFAULTS, one mirror-ready timeout for pre-copy and live', () => {
    const s = settingsFrom({ targetHost: 'h2' });
    expect(s).toMatchObject({ strategy: 'Rolling', precopy: false, compression: 'none', transferMode: 'relay', stallTimeoutMs: 60_000, drainTimeoutMs: 600_000, powerdownTimeoutMs: 60_000, nodeReadyTimeoutMs: 300_000, safetyWaitTimeoutMs: 1_800_000, mirrorReadyTimeoutMs: 3_600_000 });
    expect(s.live).toMatchObject({ downtimeLimitMs: 300, convergenceTimeoutMs: 600_000, fallback: 'PreCopy' });
  });
});
