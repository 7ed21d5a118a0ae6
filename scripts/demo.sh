#!/usr/bin/env bash
# The main job: a local sandbox migration with the bundled defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the demo process's own logs below warn (the sandbox's VM starts) go to a file, not the terminal
export VMOPS_LOG_FILE="${VMOPS_LOG_FILE:-$PWD/.sandbox/demo-world.log}"
exec node --import tsx test/world/demo.ts "$@"
