/**
 * Finding credentials in what the operator shows (its log, status, Events, metrics, CLI output).
 * A leak of part of a secret is a leak: each line of a secret (a PEM body line, a token) is cut
 * into 20-character windows every 10 characters, so any piece of 29 characters or more is found;
 * the start of the base64 text a dumped Secret would show is searched for too.
 */
import { parse } from 'yaml';

const FRAGMENT = 20;

export function secretFragments(secrets: readonly string[]): string[] {
  const out = new Set<string>();
  for (const secret of secrets) {
    const text = secret.trim();
    for (const l of text.split('\n').map((x) => x.trim())) {
      if (l.length < FRAGMENT || l.startsWith('-----')) continue;
      for (let i = 0; i + FRAGMENT <= l.length; i += FRAGMENT / 2) out.add(l.slice(i, i + FRAGMENT));
      out.add(l.slice(-FRAGMENT));
    }
    const b64 = Buffer.from(text).toString('base64');
    if (b64.length >= FRAGMENT) out.add(b64.slice(0, FRAGMENT));
  }
  return [...out];
}

/** Fragments of `secrets` found in `visible`, each shown by its first 6 characters only. */
export function leakedFragments(visible: string, secrets: readonly string[]): string[] {
  return secretFragments(secrets).filter((f) => visible.includes(f)).map((f) => `${f.slice(0, 6)}…`);
}

/** The credentials in a kubeconfig: tokens, passwords, client keys (decoded too). */
export function kubeconfigCredentials(yaml: string): string[] {
  const kc = parse(yaml) as { users?: { user?: Record<string, unknown> }[] };
  const out: string[] = [];
  for (const u of kc.users ?? []) {
    for (const k of ['token', 'password', 'client-key-data']) {
      const v = u.user?.[k];
      if (typeof v !== 'string') continue;
      out.push(v);
      if (k === 'client-key-data') out.push(Buffer.from(v, 'base64').toString('utf8'));
    }
  }
  return out;
}
