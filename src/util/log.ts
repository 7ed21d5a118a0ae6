import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { destination as fileDestination, multistream, pino, type DestinationStream, type Logger } from 'pino';

const level = process.env.LOG_LEVEL ?? 'info';
const file = process.env.VMOPS_LOG_FILE;

/**
 * Where lines go: stdout (JSON for log pipelines), or — with VMOPS_LOG_FILE, as the tests set it —
 * every line to that file and only warnings and errors to stderr, so a terminal stays readable.
 */
function destination(): DestinationStream | undefined {
  if (!file) return undefined;
  mkdirSync(dirname(file), { recursive: true });
  return multistream([
    { level: 'warn', stream: process.stderr },
    { level: 'trace', stream: fileDestination({ dest: file, append: true, sync: true }) },
  ]);
}

/** One structured logger for the process; children carry component/migration/vm fields. */
export const log: Logger = pino(
  {
    level,
    base: { app: 'vm-migration-operator' },
    // Secrets (kubeconfigs, private keys, tokens) must never reach logs even if passed by mistake.
    redact: { paths: ['*.kubeconfig', '*.privateKey', '*.token', '*.password', 'kubeconfig', 'privateKey', 'token'], censor: '[redacted]' },
  },
  destination() as DestinationStream,
);

export type { Logger };
