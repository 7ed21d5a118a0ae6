import { pino, type Logger } from 'pino';

/** One structured logger for the process; children carry component/migration/vm fields. */
export const log: Logger = pino({
  level: process.env.LOG_LEVEL ?? 'info',
  base: { app: 'vm-migration-operator' },
  // Secrets (kubeconfigs, private keys, tokens) must never reach logs even if passed by mistake.
  redact: { paths: ['*.kubeconfig', '*.privateKey', '*.token', '*.password', 'kubeconfig', 'privateKey', 'token'], censor: '[redacted]' },
});

export type { Logger };
