#!/usr/bin/env bash
# The whole suite: lint and the build, then the test tiers of test/tiers.ts one at a time.
#   npm test                            everything
#   npm test -- test/e2e/ha.test.ts     those files (any vitest filter), after lint and the build
#   VMOPS_TIERS="unit hosts" npm test   only those tiers
# Tiers run one after the other, never side by side: on two cores the lanes that once ran together
# starved each other's control planes and guests, and a local green run stopped predicting CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bash scripts/setup.sh
suite_start=$(date +%s)
mkdir -p .sandbox
rm -f .sandbox/test-results*.json .sandbox/test-tier-status .sandbox/test-failure-context.jsonl .sandbox/test-*.log

echo "[test] eslint and tsc"
npx eslint . &
lint=$!
tsc_status=0
# The type check compiles into dist/ (what the container image ships): the tests start the operator
# and its CLI from there (test/world/cli.ts), ~1.5 CPU-s less per start than through tsx.
rm -rf dist
npx tsc -p tsconfig.json || tsc_status=$?
lint_status=0
wait "$lint" || lint_status=$?
[ "$tsc_status" -eq 0 ] || exit "$tsc_status"
[ "$lint_status" -eq 0 ] || exit "$lint_status"
export VMOPS_TEST_CLI=dist
echo "[test] lint and build: $(($(date +%s) - suite_start)) s"

status=0
# run_tier NAME PARALLEL FILE...: one vitest run with its own TMPDIR and run id; after it, and after
# each of its files (test/world/failureContext.ts), whatever it started is ended (scripts/reap.sh).
run_tier() {
  local name=$1 parallel=$2
  shift 2
  local tmp start code run_id
  tmp=$(mktemp -d /tmp/vmt.XXXXXX)
  chmod 1777 "$tmp"
  run_id="${name}-$$-${RANDOM}"
  VMOPS_REAP_NFT=1 bash scripts/reap.sh "$run_id" "$tmp"
  local args=(--reporter=default --reporter=json "--outputFile.json=.sandbox/test-results-$name.json")
  local reap=1
  if [ "$parallel" = true ]; then
    args+=(--fileParallelism=true --maxWorkers=2)
    reap=0
  fi
  echo "[test] tier $name: $*"
  start=$(date +%s)
  set +e
  TMPDIR=$tmp VMOPS_RUN_ID=$run_id VMOPS_REAP=$reap npx vitest run "${args[@]}" "$@" </dev/null 2>&1 | tee ".sandbox/test-$name.log"
  code=${PIPESTATUS[0]}
  set -e
  VMOPS_REAP_NFT=1 bash scripts/reap.sh "$run_id" "$tmp"
  rm -rf "$tmp"
  echo "$name $code $(($(date +%s) - start))" >> .sandbox/test-tier-status
  echo "[test] tier $name: exit $code after $(($(date +%s) - start)) s"
  [ "$code" -eq 0 ] || status=$code
}

if [ $# -gt 0 ]; then
  run_tier selected false "$@"
else
  want=" ${VMOPS_TIERS:-} "
  mapfile -t tier_lines < <(node --input-type=module -e '
    const { TIERS } = await import("./dist/test/tiers.js");
    for (const t of TIERS) console.log([t.name, t.parallel === true, t.files.join(" ")].join("\t"));
  ')
  for line in "${tier_lines[@]}"; do
    IFS=$'\t' read -r name parallel files <<<"$line"
    [ "$want" = "  " ] || [[ "$want" == *" $name "* ]] || continue
    # shellcheck disable=SC2086 # the file list is one word per file
    run_tier "$name" "$parallel" $files
  done
fi

# The closing lines: per tier its time, then every failure with its first error lines and the machine's
# load around it, then the counts — repeated at the very end so that a log cut to its last lines still
# names what failed.
node -e '
  const fs = require("fs");
  const strip = (s) => s.replace(/\x1b\[[0-9;]*m/g, "");
  const tiers = fs.existsSync(".sandbox/test-tier-status") ? fs.readFileSync(".sandbox/test-tier-status", "utf8").trim().split("\n").map((l) => l.split(" ")) : [];
  const context = fs.existsSync(".sandbox/test-failure-context.jsonl") ? fs.readFileSync(".sandbox/test-failure-context.jsonl", "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l)) : [];
  const t = { passed: 0, failed: 0, pending: 0, files: 0 };
  const failures = [];
  const slowest = [];
  for (const [name, code] of tiers) {
    const report = `.sandbox/test-results-${name}.json`;
    if (!fs.existsSync(report)) { failures.push(`FAILED tier ${name}: vitest exited ${code} without a report (see .sandbox/test-${name}.log)`); continue; }
    const r = JSON.parse(fs.readFileSync(report, "utf8"));
    t.passed += r.numPassedTests; t.failed += r.numFailedTests; t.pending += r.numPendingTests;
    for (const file of r.testResults) {
      const rel = file.name.replace(process.cwd() + "/", "");
      slowest.push([rel, (file.endTime - file.startTime) / 1000]);
      for (const a of file.assertionResults) {
        if (a.status !== "failed") continue;
        const why = strip(a.failureMessages[0] ?? "").split("\n").slice(0, 6).join("\n    ");
        const c = context.find((x) => x.file === rel && a.fullName.endsWith(x.test.split(" > ").at(-1)));
        const load = c ? `\n    machine: load average ${c.load1.start.toFixed(1)} → ${c.load1.end.toFixed(1)} (max ${c.load1.max.toFixed(1)}) over ${c.seconds} s; test-process event-loop delay p99 ${c.eventLoopDelayMs.p99} ms, max ${c.eventLoopDelayMs.max} ms` : "";
        failures.push(`FAILED ${rel} > ${a.fullName}\n    ${why}${load}`);
      }
      // A file that failed outside any test (import error, hook) has no failed assertion to name.
      if (file.status === "failed" && !file.assertionResults.some((a) => a.status === "failed")) {
        t.files++;
        failures.push(`FAILED ${rel}: ${strip(file.message ?? "").split("\n")[0] || "outside its tests (a hook?): its tier log says why"}`);
      }
    }
    if (code !== "0" && !r.testResults.some((f) => f.status === "failed")) {
      // vitest exits 1 for an error outside any test (an unhandled rejection after a test passed) that
      // no JSON report counts: quote what the tier log says under "Unhandled Errors" or "Failed Suites".
      const text = strip(fs.readFileSync(`.sandbox/test-${name}.log`, "utf8"));
      const at = text.search(/Unhandled (Errors?|Rejection)|Failed Suites \d+/);
      const why = at < 0 ? "" : text.slice(at).split("\n").filter((l) => l.trim()).slice(0, 8).join("\n    ");
      failures.push(`FAILED tier ${name}: vitest exited ${code}` + (why ? `:\n    ${why}` : ` (see .sandbox/test-${name}.log)`));
    }
  }
  console.log("[test] tiers: " + tiers.map(([n, c, s]) => `${n} ${s} s${c === "0" ? "" : ` (exit ${c})`}`).join(", "));
  console.log("[test] slowest files: " + slowest.sort((a, b) => b[1] - a[1]).slice(0, 6).map(([f, s]) => `${f.replace(/^test\//, "")} ${s.toFixed(0)} s`).join(", "));
  for (const f of failures) console.log(f);
  console.log(`${t.passed} passed, ${t.failed} failed` + (t.files ? `, ${t.files} file(s) failed outside their tests` : "") + (t.pending ? `, ${t.pending} skipped` : ""));
' || true
echo "[test] suite: $(($(date +%s) - suite_start)) s"
exit $status
