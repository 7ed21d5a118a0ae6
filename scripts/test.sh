#!/usr/bin/env bash
# The whole suite: lint, type check, unit, integration and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] eslint"; npx eslint .
echo "[test] tsc"; npx tsc -p tsconfig.json --noEmit
echo "[test] vitest"; npx vitest run "$@"
