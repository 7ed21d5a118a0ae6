import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests share one machine's loopback hosts, QEMU and control plane: run files one at a time.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 600_000,
    reporters: ['default'],
    // Operator logs below warn go to this file, not the terminal (src/util/log.ts).
    env: { VMOPS_LOG_FILE: `${process.cwd()}/.sandbox/test-logs/operator.log` },
  },
});
