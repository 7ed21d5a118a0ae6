/**
 * Runs the shipped Argo CD health check (manifests/argocd/vmmigration-health.lua) with a real Lua
 * interpreter the way Argo CD does: the object as the global `obj`, the script's return value as
 * the health status. Argo CD embeds gopher-lua, which implements Lua 5.1, so the checks run under
 * Debian's lua5.1 and lua5.4 both: the script must mean the same in either.
 */
import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);
export const HEALTH_LUA = resolve(import.meta.dirname, '../../manifests/argocd/vmmigration-health.lua');

/** JSON value → Lua constructor (null members dropped, as Argo CD's conversion leaves them nil). */
export function toLua(v: unknown): string {
  if (v === null || v === undefined) return 'nil';
  if (typeof v === 'boolean') return String(v);
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : v.toPrecision(17);
  if (typeof v === 'string') return `"${[...Buffer.from(v, 'utf8')].map((b) => (b >= 0x20 && b < 0x7f && b !== 0x22 && b !== 0x5c ? String.fromCharCode(b) : `\\${String(b).padStart(3, '0')}`)).join('')}"`;
  if (Array.isArray(v)) return `{${v.map(toLua).join(', ')}}`;
  return `{${Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== null && x !== undefined).map(([k, x]) => `[${toLua(k)}] = ${toLua(x)}`).join(', ')}}`;
}

export const LUA_INTERPRETERS = ['lua5.1', 'lua5.4'] as const;

async function runWith(lua: string, obj: unknown): Promise<{ status: string; message: string }> {
  const program = `obj = ${toLua(obj)}\nlocal hs = dofile(${toLua(HEALTH_LUA)})\nio.write(hs.status, "\\n", hs.message or "")`;
  const { stdout } = await execFileP(lua, ['-e', program]);
  const [status = '', ...rest] = stdout.split('\n');
  return { status, message: rest.join('\n') };
}

/** The health under every interpreter; throws if they disagree. */
export async function argoHealth(obj: unknown): Promise<{ status: string; message: string }> {
  const [first, ...others] = await Promise.all(LUA_INTERPRETERS.map((lua) => runWith(lua, obj)));
  for (const [i, o] of others.entries()) {
    if (o.status !== first!.status || o.message !== first!.message) {
      throw new Error(`${LUA_INTERPRETERS[0]} and ${LUA_INTERPRETERS[i + 1]} disagree: ${JSON.stringify(first)} vs ${JSON.stringify(o)}`);
    }
  }
  return first!;
}
