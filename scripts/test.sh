#!/usr/bin/env bash
# The whole suite: lint, type check, unit, integration and end-to-end tests.
#   npm test                       everything
#   npm test -- test/e2e/ha.test.ts   one file (or any vitest filter), after lint and type check
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] eslint and tsc"
npx eslint . &
lint=$!
tsc_status=0
npx tsc -p tsconfig.json --noEmit || tsc_status=$?
wait "$lint"
[ "$tsc_status" -eq 0 ] || exit "$tsc_status"
mkdir -p .sandbox
rm -f .sandbox/test-results*.json
status=0
vitest() {
  local out="$1"
  shift
  npx vitest run --reporter=default --reporter=json --outputFile.json="$out" "$@" || status=$?
}
if [ $# -gt 0 ]; then
  echo "[test] vitest $*"
  vitest .sandbox/test-results.json "$@"
else
  # Unit tests touch no shared machine state: their files run in parallel, at a lower CPU priority
  # beside the integration run (which mostly waits on VMs, timeouts and control planes), their
  # report printed once both are done.
  echo "[test] vitest: unit tests (files in parallel, beside the integration run; report below when both are done)"
  nice -n 10 npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results-unit.json \
    test/unit --fileParallelism=true --maxWorkers=2 > .sandbox/test-unit.log 2>&1 &
  unit=$!
  # Files that need a control plane (or PostgreSQL, Prometheus) but no VM and no test host: each
  # has its own data directory and free ports, and together they use about a third of a core,
  # mostly waiting on timeouts. They run one at a time in a second lane beside the VM files.
  control_plane_only=(
    test/integration/controlplane.test.ts test/integration/drain.test.ts test/integration/fleet.crd.test.ts
    test/integration/guest.test.ts test/integration/inCluster.test.ts test/integration/runtime.test.ts
    test/integration/store.test.ts test/integration/startupFaults.test.ts test/e2e/validation.test.ts
  )
  echo "[test] vitest: ${#control_plane_only[@]} control-plane-only files (one at a time, beside the VM files; report below when both are done)"
  nice -n 5 npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results-cp.json \
    "${control_plane_only[@]}" > .sandbox/test-cp.log 2>&1 &
  cp_lane=$!
  # The files with VMs share the loopback hosts and QEMU: one file at a time (vitest.config.ts).
  echo "[test] vitest: integration and end-to-end files with VMs (one at a time)"
  exclude=()
  for f in "${control_plane_only[@]}"; do exclude+=(--exclude "$f"); done
  vitest .sandbox/test-results.json test/integration test/e2e "${exclude[@]}"
  wait "$cp_lane" || status=$?
  echo "[test] control-plane-only files (report of the lane beside the VM files):"
  cat .sandbox/test-cp.log
  wait "$unit" || status=$?
  echo "[test] unit tests (report of the run beside the integration tests):"
  cat .sandbox/test-unit.log
fi
# One plain closing line with the counts, whatever the reporters printed above.
node -e '
  const fs = require("fs");
  const files = [".sandbox/test-results-unit.json", ".sandbox/test-results-cp.json", ".sandbox/test-results.json"].filter((f) => fs.existsSync(f));
  const t = { passed: 0, failed: 0, pending: 0 };
  const failures = [];
  for (const f of files) {
    const r = JSON.parse(fs.readFileSync(f, "utf8"));
    t.passed += r.numPassedTests; t.failed += r.numFailedTests; t.pending += r.numPendingTests;
    for (const file of r.testResults) {
      for (const a of file.assertionResults) {
        if (a.status !== "failed") continue;
        const why = (a.failureMessages[0] ?? "").split("\n").slice(0, 6).join("\n    ");
        failures.push(`FAILED ${file.name.replace(process.cwd() + "/", "")} > ${a.fullName}\n    ${why}`);
      }
      // A file that failed outside any test (import error, hook) has no failed assertion to name.
      if (file.status === "failed" && !file.assertionResults.some((a) => a.status === "failed"))
        failures.push(`FAILED ${file.name.replace(process.cwd() + "/", "")}: ${(file.message ?? "").split("\n")[0]}`);
    }
  }
  // Repeated at the very end so that a log cut to its last lines still names what failed.
  for (const f of failures) console.log(f);
  console.log(`${t.passed} passed, ${t.failed} failed` + (t.pending ? `, ${t.pending} skipped` : ""));
' || true
exit $status
