#!/usr/bin/env bash
# Ends every process a test run left behind and removes its nftables tables, so that one file's or
# tier's leftovers (a QEMU kept alive keeps another file's node Ready; an operator holds a Lease; an
# etcd holds a port) never reach the next.
#   scripts/reap.sh MARKER...
# A process is the run's when its command line contains one of the MARKERs (the tier's TMPDIR, the
# repository's .sandbox/ — every test world puts its VMs, sshd configs, data directories and sockets
# below one of them), except the demo's and the benchmarks' sandboxes. Sends TERM, then KILL to what
# is left after 5 s. Prints what it ended; exits 0.
set -uo pipefail
[ $# -gt 0 ] || exit 0
self=$$
mine() {
  local pid=$1 cmd
  shift
  [ "$pid" = "$self" ] || [ "$pid" = 1 ] && return 1
  cmd=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [ -n "$cmd" ] || return 1
  case "$cmd" in *"/.sandbox/demo"* | *"/.sandbox/bench-"* | *scripts/reap.sh*) return 1 ;; esac
  for m in "$@"; do
    case "$cmd" in *"$m"*) return 0 ;; esac
  done
  return 1
}
# this script's ancestors (the test runner's shell) are never the run's leftovers
ancestors=" "
p=$self
while [ "$p" -gt 1 ] 2>/dev/null; do
  ancestors+="$p "
  p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || break
done
found() {
  local out=()
  for d in /proc/[0-9]*; do
    local pid=${d#/proc/}
    case "$ancestors" in *" $pid "*) continue ;; esac
    mine "$pid" "$@" && out+=("$pid")
  done
  echo "${out[@]:-}"
}
pids=$(found "$@")
if [ -n "$pids" ]; then
  for pid in $pids; do
    echo "[reap] $pid $({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-160)"
  done
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 50); do
    left=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && left+="$pid "; done
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ -n "$left" ] && kill -KILL $left 2>/dev/null
fi
# the HA worlds' blackholes (test/world/haGuest.ts: vmops_ha_<environment>)
if command -v nft >/dev/null; then
  nft list tables 2>/dev/null | awk '$3 ~ /^vmops_/ {print $2, $3}' | while read -r family table; do
    echo "[reap] nft table $family $table"
    nft delete table "$family" "$table" 2>/dev/null
  done
fi
exit 0
