/**
 * Text that comes from a student's guest (pod names, API error bodies, etcd member names, NGINX's
 * messages) or from a host, bounded before it reaches status, Events, the journal or a terminal: a
 * status patch over the API server's size limit fails every write (and each retry drains again), and
 * escape sequences in `history` or `status` would drive an administrator's terminal.
 */

/** Control characters (C0 but newline and tab, DEL, C1) shown as \xNN; longer than `max`, cut with a note. */
export function boundedText(s: string, max = 1024): string {
  // eslint-disable-next-line no-control-regex
  const clean = s.replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
  return clean.length <= max ? clean : `${clean.slice(0, max)}… (${clean.length - max} more characters)`;
}

/** Every string inside `v` (objects and arrays, recursively) bounded with boundedText; other values as they are. */
export function boundedStrings<T>(v: T, max = 1024): T {
  if (typeof v === 'string') return boundedText(v, max) as T;
  if (Array.isArray(v)) return v.map((x) => boundedStrings(x, max)) as T;
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, boundedStrings(x, max)])) as T;
  return v;
}
