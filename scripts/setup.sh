#!/usr/bin/env bash
# Installs what the sandbox and the tests need, only what is missing:
# (the test guest, scripts/build-guest.sh, is cached like the control plane)
# Debian packages, node_modules, and the control-plane binaries (built once
# from the Go module proxy and cached by version in ~/.cache/vm-migration-operator).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh-keygen >/dev/null || need_pkgs+=(openssh-client)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v openssl >/dev/null || need_pkgs+=(openssl)   # the relay hashes segments on the target with it
command -v perl >/dev/null || need_pkgs+=(perl-base)    # the relay's extent reader/writer on the hosts
command -v useradd >/dev/null || need_pkgs+=(passwd)    # the test hosts' unprivileged login user
command -v gcc >/dev/null || need_pkgs+=(gcc)           # the test guest's guestd (static)
[ -e "/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)/libc.a" ] || need_pkgs+=(libc6-dev)
command -v xz >/dev/null || need_pkgs+=(xz-utils)       # kernel modules may be .ko.xz
# The store's PostgreSQL backend is tested against a private server (test/world/postgres.ts) run from these binaries.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_pkgs+=(postgresql)
command -v promtool >/dev/null || need_pkgs+=(prometheus) # promtool (rule tests, metric names) and the e2e's real Prometheus
command -v lua5.4 >/dev/null || need_pkgs+=(lua5.4)      # runs the Argo CD health check (manifests/argocd) in the tests,
command -v lua5.1 >/dev/null || need_pkgs+=(lua5.1)      # and under 5.1 too: Argo CD embeds gopher-lua (Lua 5.1)
[ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)            # the HA guest's beachhead load balancer (its own instance)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need_pkgs+=(libnginx-mod-stream)   # NGINX's TCP stream proxy
command -v nft >/dev/null || need_pkgs+=(nftables)      # the HA guest: a stopped VM's address drops packets like a powered-off machine
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
command -v kubectl >/dev/null || { echo "[setup] kubectl is required on PATH" >&2; exit 1; }
command -v go >/dev/null || { echo "[setup] Go is required to build the test control plane" >&2; exit 1; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # npm ci compiles three native modules (better-sqlite3, ssh2, cpu-features: no prebuilt binaries
  # reach this machine), ~70 s. The result is cached per lock file, Node ABI and platform, like the
  # control plane, and copied into a fresh clone.
  key="$(cat package-lock.json <(node -p 'process.versions.modules + process.platform + process.arch') | sha256sum | cut -c1-16)"
  cached="${XDG_CACHE_HOME:-$HOME/.cache}/vm-migration-operator/node_modules/$key"
  if [ -f "$cached/.complete" ]; then
    echo "[setup] node_modules from the cache ($cached)"
    rm -rf node_modules
    cp -a "$cached/node_modules" node_modules
  else
    echo "[setup] npm ci"
    npm ci --no-audit --no-fund
    rm -rf "$cached.tmp" && mkdir -p "$cached.tmp"
    cp -a node_modules "$cached.tmp/node_modules" && touch "$cached.tmp/.complete"
    rm -rf "$cached" && mv "$cached.tmp" "$cached"
  fi
  touch node_modules/.package-lock.json
fi

# the test VMs' guest: Debian kernel + busybox-static (downloaded, not installed) + guestd
echo "[setup] test guest: $(bash scripts/build-guest.sh)"

# The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) validate manifests/monitoring in the
# tests; they come from its Go module (test/world/monitoringCrds.ts), cached in the module cache.
go mod download "github.com/prometheus-operator/prometheus-operator@${VMOPS_PROMETHEUS_OPERATOR_VERSION:-v0.80.1}"

echo "[setup] control plane binaries: $(node scripts/build-control-plane.mjs --print-dir)"
node scripts/build-control-plane.mjs

# kstatus (sigs.k8s.io/cli-utils) and Flux's healthCheckExprs evaluator, as a small Go tool the GitOps
# tests judge VMMigrations with (test/tools/kstatus); cached by its sources' hash
echo "[setup] kstatus checker: $(bash scripts/build-kstatus-check.sh)"

