/**
 * Validates a VMMigration manifest the way the API server does, from the one schema the API server
 * uses: the CRD's openAPIV3Schema (JSON-schema part by ajv, defaults applied first as the API server
 * does) and its x-kubernetes-validations CEL rules (evaluated with cel-js). Transition rules (those
 * that read oldSelf) need a stored object and are left to the API server.
 *
 * Used by `vm-migration-operator plan`, so a dry run refuses what `kubectl apply` would refuse.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { evaluate } from '@marcbachmann/cel-js';
import { Ajv, type ErrorObject } from 'ajv';
import { parse } from 'yaml';
import { quoted } from './inventory.js';
import { GROUP, KIND, VERSION, type VMMigration } from './types.js';

const CRD_FILE = 'crds/vmops.dev_vmmigrations.yaml';

interface Schema {
  type?: string;
  properties?: Record<string, Schema>;
  items?: Schema;
  'x-kubernetes-validations'?: Array<{ rule: string; message?: string; fieldPath?: string }>;
  [k: string]: unknown;
}

export type ValidationResult = { ok: true; migration: VMMigration } | { ok: false; problems: string[] };

/** The CRD is looked up from this module upwards, so it works from src/ (tsx) and from dist/src/ alike. */
function findCrd(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, CRD_FILE);
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  throw new Error(`cannot find ${CRD_FILE} above ${dirname(fileURLToPath(import.meta.url))}`);
}

let cached: { schema: Schema; validate: ReturnType<Ajv['compile']> } | undefined;

export function crdSchema(): Schema {
  return compiled().schema;
}

function compiled(): NonNullable<typeof cached> {
  if (cached) return cached;
  const crd = parse(readFileSync(findCrd(), 'utf8')) as { spec: { versions: Array<{ name: string; schema: { openAPIV3Schema: Schema } }> } };
  const version = crd.spec.versions.find((v) => v.name === VERSION);
  if (!version) throw new Error(`${CRD_FILE} has no version ${VERSION}`);
  const schema = version.schema.openAPIV3Schema;
  // The CRD dialect is OpenAPI v3's subset of JSON schema plus Kubernetes' x- extensions, which ajv
  // only needs to know by name; formats (date-time, int64) concern status, which is not validated here.
  const ajv = new Ajv({ allErrors: true, useDefaults: true, strict: false, validateFormats: false, verbose: true });
  ajv.addVocabulary(['x-kubernetes-validations', 'x-kubernetes-list-type', 'x-kubernetes-list-map-keys', 'x-kubernetes-preserve-unknown-fields', 'x-kubernetes-int-or-string', 'x-kubernetes-embedded-resource']);
  cached = { schema, validate: ajv.compile(schema) };
  return cached;
}

/** ajv's instancePath (/spec/environments/0) as the API server writes it (spec.environments[0]). */
function fieldPath(instancePath: string, extra?: string): string {
  const parts = instancePath.split('/').filter(Boolean);
  if (extra) parts.push(extra);
  return parts.map((p, i) => (/^\d+$/.test(p) ? `[${p}]` : i === 0 ? p : `.${p}`)).join('');
}

function describe(e: ErrorObject): string {
  const p = (extra?: string) => fieldPath(e.instancePath, extra);
  const value = typeof e.data === 'string' ? quoted(e.data, 64) : JSON.stringify(e.data)?.slice(0, 64);
  switch (e.keyword) {
    case 'required':
      return `${p((e.params as { missingProperty: string }).missingProperty)}: Required value`;
    case 'enum':
      return `${p()}: Unsupported value: ${value}: supported values: ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}`;
    case 'pattern':
      return `${p()}: Invalid value: ${value}: should match '${(e.params as { pattern: string }).pattern}'`;
    case 'type':
      return `${p()}: Invalid value: ${value}: must be of type ${(e.params as { type: string }).type}`;
    default:
      return `${p()}: Invalid value: ${value}: ${e.message ?? e.keyword}`;
  }
}

/** CEL works with int (BigInt in cel-js) where the API server sees integers. */
function toCel(v: unknown): unknown {
  if (typeof v === 'number' && Number.isInteger(v)) return BigInt(v);
  if (Array.isArray(v)) return v.map(toCel);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toCel(x)]));
  return v;
}

/** Evaluates every non-transition CEL rule of the schema on the value it applies to. */
function celProblems(schema: Schema, value: unknown, path: string, out: string[]): void {
  if (value === undefined || value === null) return;
  for (const r of schema['x-kubernetes-validations'] ?? []) {
    if (/\boldSelf\b/.test(r.rule)) continue;
    let ok: unknown;
    try {
      ok = evaluate(r.rule, { self: toCel(value) });
    } catch (err) {
      out.push(`${path}: rule ${JSON.stringify(r.rule)} could not be evaluated: ${(err as Error).message}`);
      continue;
    }
    if (ok !== true) out.push(`${r.fieldPath ? `${path}${r.fieldPath}` : path}: Invalid value: ${r.message ?? `failed rule: ${r.rule}`}`);
  }
  if (schema.properties && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, sub] of Object.entries(schema.properties)) celProblems(sub, (value as Record<string, unknown>)[k], path ? `${path}.${k}` : k, out);
  }
  if (schema.items && Array.isArray(value)) value.forEach((v, i) => celProblems(schema.items!, v, `${path}[${i}]`, out));
}

/**
 * Checks a manifest (already parsed from YAML/JSON) as `kubectl apply` of a new object would be
 * checked: kind, schema, defaults, CEL rules. Returns the defaulted object or every problem found.
 */
export function validateMigrationManifest(doc: unknown): ValidationResult {
  const problems: string[] = [];
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return { ok: false, problems: ['the manifest is not a mapping'] };
  const obj = structuredClone(doc) as Record<string, unknown>;
  if (obj.apiVersion !== `${GROUP}/${VERSION}`) problems.push(`apiVersion must be ${GROUP}/${VERSION}`);
  if (obj.kind !== KIND) problems.push(`kind must be ${KIND}`);
  // status is owned by the operator and ignored on create, as the API server does.
  delete obj.status;
  const { schema, validate } = compiled();
  if (!validate(obj)) problems.push(...(validate.errors ?? []).map(describe));
  // CEL runs on what passed the schema; a rule on a value of the wrong type would only repeat the schema's complaint.
  if (problems.length === 0) celProblems(schema, obj, '', problems);
  const unique = [...new Set(problems.map((p) => p.replace(/^\./, '')))];
  return unique.length > 0 ? { ok: false, problems: unique } : { ok: true, migration: obj as unknown as VMMigration };
}
