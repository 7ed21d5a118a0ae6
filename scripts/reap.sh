#!/usr/bin/env bash
# Ends every process a test run left behind and removes its nftables tables, so that one file's or
# tier's leftovers (a QEMU kept alive keeps another file's node Ready; an operator holds a Lease; an
# etcd holds a port) never reach the next.
#   scripts/reap.sh [--list] RUN_ID TMPDIR
# A process is the run's when its environment carries VMOPS_RUN_ID=RUN_ID (what the test process
# started itself: control planes, sshds, NGINX, PostgreSQL, Prometheus, operators) or its command
# line names a path below TMPDIR (what the hosts started for it over SSH: QEMU, qemu-nbd — their VM
# directories are there). Nothing of another run, even in the same checkout, matches. The test
# runner itself (vitest, its workers, this script's ancestors) never does. Sends TERM, then KILL to
# what is left after 5 s; prints what it ended. --list only prints the pids. Exits 0.
set -uo pipefail
list=false
if [ "${1:-}" = --list ]; then list=true; shift; fi
[ $# -ge 2 ] && [ -n "$1" ] && [ -n "$2" ] || exit 0
run_id=$1
tmp=${2%/}/
self=$$
# this script's ancestors (the test runner's shell, vitest) are never the run's leftovers
ancestors=" "
p=$self
while [ "$p" -gt 1 ] 2>/dev/null; do
  ancestors+="$p "
  p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || break
done
mine() {
  local pid=$1 cmd
  case "$ancestors" in *" $pid "*) return 1 ;; esac
  cmd=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [ -n "$cmd" ] || return 1
  case "$cmd" in *vitest* | *esbuild* | *scripts/reap.sh* | *torture-stall*) return 1 ;; esac
  case "$cmd" in *"$tmp"*) return 0 ;; esac
  { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qx "VMOPS_RUN_ID=$run_id"
}
found() {
  local out=()
  for d in /proc/[0-9]*; do
    local pid=${d#/proc/}
    [ "$pid" = 1 ] && continue
    mine "$pid" && out+=("$pid")
  done
  echo "${out[@]:-}"
}
pids=$(found)
if $list; then
  echo "$pids"
  exit 0
fi
if [ -n "$pids" ]; then
  for pid in $pids; do
    echo "[reap] $pid $({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-160)"
  done
  # a stopped process (a torture stall) cannot act on TERM
  kill -CONT $pids 2>/dev/null
  kill -TERM $pids 2>/dev/null
  left=""
  for _ in $(seq 1 50); do
    left=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && left+="$pid "; done
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ -n "$left" ] && kill -KILL $left 2>/dev/null
fi
# the HA worlds' blackholes (test/world/haGuest.ts: vmops_ha_<environment>), when the run made them
if command -v nft >/dev/null && [ -n "${VMOPS_REAP_NFT:-}" ]; then
  nft list tables 2>/dev/null | awk '$3 ~ /^vmops_/ {print $2, $3}' | while read -r family table; do
    echo "[reap] nft table $family $table"
    nft delete table "$family" "$table" 2>/dev/null
  done
fi
exit 0
