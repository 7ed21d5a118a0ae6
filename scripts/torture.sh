#!/usr/bin/env bash
# Runs test files on a machine made worse on purpose, before you hand them over:
#   scripts/torture.sh FILE... [--slow N] [--stress M] [--stall] [--repeat K]
#     --slow N     the run (every process it starts: QEMU, control planes, operators) in a CPU cgroup
#                  with 2/N of the machine's two cores — a uniform ×N slowdown; liveness budgets
#                  scale with it (VMOPS_TIME_SCALE=N, test/world/budget.ts), property bounds do not
#     --stress M   M stress-ng CPU workers beside the run, outside its cgroup
#     --stall      every 2–6 s one of the run's processes (etcd, kube-apiserver, KWOK, the operator,
#                  QEMU, NGINX, sshd) is SIGSTOPped for 0.5–3 s, then continued
#     --repeat K   K runs; stops at the first red one
# Ends with the budget report: every liveness wait that used more than half its budget. Needs root
# (cgroups v1 or v2); compiles dist/ first (the operator and CLI the tests start).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
slow=1 stress=0 stall=false repeat=1 files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --slow) slow=$2; shift 2 ;;
    --stress) stress=$2; shift 2 ;;
    --stall) stall=true; shift ;;
    --repeat) repeat=$2; shift 2 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) files+=("$1"); shift ;;
  esac
done
[ ${#files[@]} -gt 0 ] || { echo "usage: scripts/torture.sh FILE... [--slow N] [--stress M] [--stall] [--repeat K]" >&2; exit 2; }
command -v stress-ng >/dev/null || [ "$stress" = 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng >/dev/null; }
# the operator and CLI the tests start are the build (as in npm test): compile it from these sources
# first — a dist/ left from older sources would run old operator code under new tests
echo "[torture] building dist/ (tsc)"
rm -rf dist && npx tsc -p tsconfig.json || exit 1
export VMOPS_TEST_CLI=dist

tag="vmops-torture-$$"
cgroup=""
helpers=()
cleanup() {
  for p in "${helpers[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null; done
  # continue whatever a stall left stopped, then end what the run left behind
  [ -n "${tmp:-}" ] && bash scripts/reap.sh "${run_id:-none}" "$tmp" >/dev/null
  if [ -n "$cgroup" ] && [ -d "$cgroup" ]; then
    while read -r p; do echo "$p" > "$(dirname "$cgroup")/cgroup.procs" 2>/dev/null; done < "$cgroup/cgroup.procs"
    rmdir "$cgroup" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$slow" != 1 ]; then
  cores=$(nproc)
  if [ -d /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cpu.cfs_period_us ]; then   # cgroups v1
    cgroup=/sys/fs/cgroup/cpu/$tag
    mkdir "$cgroup"
    echo 100000 > "$cgroup/cpu.cfs_period_us"
    awk -v c="$cores" -v s="$slow" 'BEGIN { printf "%d\n", 100000 * c / s }' > "$cgroup/cpu.cfs_quota_us"
  else                                                                                # cgroups v2
    cgroup=/sys/fs/cgroup/$tag
    mkdir "$cgroup"
    echo "$(awk -v c="$cores" -v s="$slow" 'BEGIN { printf "%d", 100000 * c / s }') 100000" > "$cgroup/cpu.max"
  fi
  export VMOPS_TIME_SCALE=$slow
  echo "[torture] cgroup $cgroup: $(awk -v c="$cores" -v s="$slow" 'BEGIN { printf "%.2f", c / s }') of $cores cores (×$slow slower); liveness budgets ×$slow"
fi
if [ "$stress" != 0 ]; then
  setsid stress-ng --cpu "$stress" --timeout 0 --quiet >/dev/null 2>&1 &
  helpers+=($!)
  echo "[torture] stress-ng: $stress CPU worker(s) beside the run"
fi

# stall_loop RUN_ID TMPDIR: SIGSTOP one of the run's world processes for 0.5–3 s, every 2–6 s (the
# run's processes as scripts/reap.sh finds them: never another run's, never the test runner)
stall_loop() {
  local pattern='qemu-system|etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kwok|cli/main\.(js|ts)|nginx|sshd'
  while true; do
    sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.1f", 2 + 4 * r / 32767 }')"
    local pids=()
    for pid in $(bash scripts/reap.sh --list "$1" "$2"); do
      local cmd
      cmd=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue
      [[ "$cmd" =~ $pattern ]] && pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] || continue
    local victim=${pids[$((RANDOM % ${#pids[@]}))]}
    local ms=$((500 + RANDOM % 2500))
    echo "[torture] stall $victim for $ms ms: $({ tr '\0' ' ' <"/proc/$victim/cmdline"; } 2>/dev/null | cut -c1-100)" >> "$stall_log"
    kill -STOP "$victim" 2>/dev/null || continue
    sleep "$(awk -v m=$ms 'BEGIN { printf "%.3f", m / 1000 }')"
    kill -CONT "$victim" 2>/dev/null
  done
}

status=0
for run in $(seq 1 "$repeat"); do
  tmp=$(mktemp -d /tmp/vmt.XXXXXX)
  chmod 1777 "$tmp"
  run_id="torture-$$-$run"
  report=$repo/.sandbox/torture-budget-$run.jsonl
  stall_log=$repo/.sandbox/torture-stalls-$run.log
  mkdir -p .sandbox
  rm -f "$report" "$stall_log"
  if $stall; then
    # its name (torture-stall) keeps scripts/reap.sh from ever counting the loop as the run's
    setsid bash -c "$(declare -f stall_loop); stall_log=$stall_log; stall_loop '$run_id' '$tmp'" torture-stall &
    helpers+=($!)
  fi
  echo "[torture] run $run/$repeat: ${files[*]}"
  start=$(date +%s)
  (
    [ -n "$cgroup" ] && echo $BASHPID > "$cgroup/cgroup.procs"
    TMPDIR=$tmp VMOPS_RUN_ID=$run_id VMOPS_REAP=1 VMOPS_BUDGET_REPORT=$report exec npx vitest run "${files[@]}" </dev/null
  )
  code=$?
  if $stall; then kill -- "-${helpers[-1]}" 2>/dev/null; unset 'helpers[-1]'; fi
  bash scripts/reap.sh "$run_id" "$tmp" >/dev/null
  rm -rf "$tmp"
  echo "[torture] run $run: exit $code after $(($(date +%s) - start)) s$( $stall && echo "; $(grep -c '^\[torture\] stall' "$stall_log" 2>/dev/null || echo 0) stalls ($stall_log)")"
  if [ -s "$report" ]; then
    echo "[torture] liveness waits that used more than half their budget:"
    node -e '
      const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => JSON.parse(l));
      rows.sort((a, b) => b.share - a.share);
      for (const r of rows) console.log(`  ${(r.share * 100).toFixed(0).padStart(3)} %  ${String(r.usedMs).padStart(7)} of ${r.budgetMs} ms  ${r.what}  ${r.where}`);
    ' "$report"
  else
    echo "[torture] no liveness wait used more than half its budget"
  fi
  [ "$code" -eq 0 ] || { status=$code; break; }
done
exit $status
