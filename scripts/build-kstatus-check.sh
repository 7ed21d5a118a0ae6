#!/usr/bin/env bash
# Builds test/tools/kstatus (kstatus-check: judges objects with sigs.k8s.io/cli-utils kstatus and
# Flux's CEL healthCheckExprs evaluator) once and caches the binary.
#   scripts/build-kstatus-check.sh    build if missing; prints the binary's path (nothing else on stdout)
# The cache key is a hash of go.mod, go.sum and main.go; the modules come from the Go module proxy.
# Concurrent builders are serialized with flock on a lock file beside the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$here/../test/tools/kstatus
key=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
root=${XDG_CACHE_HOME:-$HOME/.cache}/vm-migration-operator/tools
out=$root/kstatus-check-$key
if [ -x "$out" ]; then echo "$out"; exit 0; fi

mkdir -p "$root"
exec 9>"$out.lock"
flock 9
if [ -x "$out" ]; then echo "$out"; exit 0; fi

tmp=$(mktemp "$root/.kstatus-check-$key.XXXXXX")
trap 'rm -f "$tmp"' EXIT
echo "build-kstatus-check: building $out (a first build takes minutes)" >&2
start=$SECONDS
(cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$tmp" .) >&2
chmod 755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "build-kstatus-check: built in $((SECONDS - start)) s" >&2
echo "$out"
