/** Byte counts for people: MiB with one decimal, GiB with two from 1 GiB up. */
export function mib(bytes: number): string {
  if (bytes >= 1 << 30) return `${(bytes / (1 << 30)).toFixed(2)} GiB`;
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}
