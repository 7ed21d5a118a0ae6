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
# The type check compiles into dist/ (what the container image ships): the tests start the operator
# and its CLI from there (test/world/cli.ts), ~1.5 CPU-s less per start than through tsx.
rm -rf dist
npx tsc -p tsconfig.json || tsc_status=$?
wait "$lint"
[ "$tsc_status" -eq 0 ] || exit "$tsc_status"
export VMOPS_TEST_CLI=dist
mkdir -p .sandbox
rm -f .sandbox/test-results*.json .sandbox/test-lane-exits
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
  # Three lanes, not four: a fresh-clone run with the control-plane-only files in a lane of their own
  # beside two VM lanes and the unit tests took longer (the second VM lane 1305 s instead of ~1090 s)
  # and starved the unit tests' CLI spawns past their 60 s timeouts. The suite is CPU-bound on two cores.
  # The second lane: first the files that need a control plane (or PostgreSQL, Prometheus) but no
  # VM and no test host — each has its own data directory and free ports, together about a third of a
  # core, mostly waiting on timeouts — at nice 5; then the lighter VM files. Every VM file has its own
  # loopback addresses and environment names (test/world/loopback.ts), so the two VM lanes never
  # share an sshd, a QEMU name or a blackhole rule.
  control_plane_only=(
    test/integration/controlplane.test.ts test/integration/drain.test.ts test/integration/fleet.crd.test.ts
    test/integration/guest.test.ts test/integration/inCluster.test.ts test/integration/runtime.test.ts
    test/integration/store.test.ts test/integration/startupFaults.test.ts test/e2e/validation.test.ts
  )
  second_vm_lane=(
    test/e2e/failover.test.ts test/e2e/finalizer.test.ts test/e2e/hardening.test.ts test/e2e/fleet.test.ts
    test/integration/drain-operator.test.ts test/integration/rollforward.test.ts test/integration/fencing.test.ts
    test/integration/fencing-probe.test.ts test/integration/fleet.capacity.test.ts test/integration/direct.test.ts
    test/integration/guestHa.test.ts
  )
  echo "[test] vitest: second lane — ${#control_plane_only[@]} control-plane-only files, then ${#second_vm_lane[@]} VM files (one at a time, beside the first VM lane; report below when both are done)"
  (
    lane_status=0
    nice -n 5 npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results-cp.json \
      "${control_plane_only[@]}" || lane_status=$?
    npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results-vm2.json \
      "${second_vm_lane[@]}" || lane_status=$?
    exit "$lane_status"
  ) > .sandbox/test-lane2.log 2>&1 &
  lane2=$!
  # The other files with VMs, one at a time (vitest.config.ts); this lane is the run's critical path.
  echo "[test] vitest: first VM lane — the other integration and end-to-end files with VMs (one at a time)"
  exclude=()
  for f in "${control_plane_only[@]}" "${second_vm_lane[@]}"; do exclude+=(--exclude "$f"); done
  set +e
  npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results.json \
    test/integration test/e2e "${exclude[@]}" 2>&1 | tee .sandbox/test-vm1.log
  vm1_status=${PIPESTATUS[0]}
  set -e
  [ "$vm1_status" -eq 0 ] || status=$vm1_status
  lane2_status=0
  wait "$lane2" || lane2_status=$?
  [ "$lane2_status" -eq 0 ] || status=$lane2_status
  echo "[test] second lane (control-plane-only files, then the second VM lane; its report):"
  cat .sandbox/test-lane2.log
  unit_status=0
  wait "$unit" || unit_status=$?
  [ "$unit_status" -eq 0 ] || status=$unit_status
  echo "[test] unit tests (report of the run beside the integration tests):"
  cat .sandbox/test-unit.log
  # vitest exits 1 for an error outside any test (an unhandled rejection after a test passed) that
  # no JSON report counts: name the lane and its log so the closing lines do not say "0 failed" alone.
  for lane in "vm1:$vm1_status:.sandbox/test-vm1.log" "lane2:$lane2_status:.sandbox/test-lane2.log" "unit:$unit_status:.sandbox/test-unit.log"; do
    IFS=: read -r name code log <<<"$lane"
    [ "$code" -eq 0 ] || echo "$name $code $log" >> .sandbox/test-lane-exits
  done
fi
# One plain closing line with the counts, whatever the reporters printed above.
node -e '
  const fs = require("fs");
  const files = [".sandbox/test-results-unit.json", ".sandbox/test-results-cp.json", ".sandbox/test-results-vm2.json", ".sandbox/test-results.json"].filter((f) => fs.existsSync(f));
  const t = { passed: 0, failed: 0, pending: 0, files: 0 };
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
      if (file.status === "failed" && !file.assertionResults.some((a) => a.status === "failed")) {
        t.files++;
        failures.push(`FAILED ${file.name.replace(process.cwd() + "/", "")}: ${(file.message ?? "").split("\n")[0] || "outside its tests (a hook?): its lane log says why"}`);
      }
    }
  }
  const exits = fs.existsSync(".sandbox/test-lane-exits") ? fs.readFileSync(".sandbox/test-lane-exits", "utf8").trim().split("\n") : [];
  for (const line of exits) {
    const [lane, code, log] = line.split(" ");
    const text = fs.readFileSync(log, "utf8").replace(/\x1b\[[0-9;]*m/g, "");
    // vitest prints such errors under a "Unhandled Error(s)" rule: its first lines say which and where
    const at = text.search(/Unhandled (Errors?|Rejection)/);
    const unhandled = at < 0 ? "" : text.slice(at).split("\n").filter((l) => l.trim()).slice(0, 8).join("\n    ");
    // a hook that failed (a timed-out afterAll, say) is listed under "Failed Suites", not as a test
    const suitesAt = text.search(/Failed Suites \d+/);
    const suites = suitesAt < 0 ? "" : text.slice(suitesAt).split("\n").filter((l) => l.trim()).slice(1, 4).join("\n    ");
    if (!unhandled && !suites && t.failed > 0) continue; // its failed tests are named above
    const why = unhandled || suites;
    failures.push(`FAILED lane ${lane}: vitest exited ${code}` + (why ? ` — from ${log}:\n    ${why}` : ` (see ${log})`));
  }
  // Repeated at the very end so that a log cut to its last lines still names what failed.
  for (const f of failures) console.log(f);
  console.log(`${t.passed} passed, ${t.failed} failed` + (t.files ? `, ${t.files} file(s) failed outside their tests` : "") + (t.pending ? `, ${t.pending} skipped` : ""));
' || true
exit $status
