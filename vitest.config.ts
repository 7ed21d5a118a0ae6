import { relative } from 'node:path';
import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';
import { TIME_SCALE } from './test/world/budget.js';
import { orderOf } from './test/tiers.js';

/** One file order everywhere (test/tiers.ts), whatever vitest's results cache holds. */
class CommittedOrder extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const key = (f: TestSpecification) => relative(process.cwd(), f.moduleId);
    return [...files].sort((a, b) => orderOf(key(a)) - orderOf(key(b)) || key(a).localeCompare(key(b)));
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests share one machine's loopback hosts, QEMU and control plane: run files one at a time.
    fileParallelism: false,
    // liveness budgets, scaled on a slowed machine (scripts/torture.sh --slow N); a test's own timeout
    // argument is its budget on an unloaded machine and is not scaled
    testTimeout: 120_000 * TIME_SCALE,
    hookTimeout: 600_000 * TIME_SCALE,
    reporters: ['default'],
    sequence: { sequencer: CommittedOrder },
    // the load and event-loop delay around a failed test, for the closing summary (scripts/test.sh)
    setupFiles: ['test/world/failureContext.ts'],
    // Operator logs below warn go to this file, not the terminal (src/util/log.ts).
    env: { VMOPS_LOG_FILE: `${process.cwd()}/.sandbox/test-logs/operator.log` },
  },
});
