#!/usr/bin/env bash
# The main job: a local sandbox migration with the bundled defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node --import tsx test/world/demo.ts "$@"
