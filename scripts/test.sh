#!/usr/bin/env bash
# The whole suite: lint, type check, unit, integration and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] eslint"; npx eslint .
echo "[test] tsc"; npx tsc -p tsconfig.json --noEmit
echo "[test] vitest"
mkdir -p .sandbox
status=0
npx vitest run --reporter=default --reporter=json --outputFile.json=.sandbox/test-results.json "$@" || status=$?
# One plain closing line with the counts, whatever the reporter printed above.
node -e '
  const r = JSON.parse(require("fs").readFileSync(".sandbox/test-results.json", "utf8"));
  console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
' || true
exit $status
