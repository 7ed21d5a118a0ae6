#!/usr/bin/env bash
# Builds the test world's guest once and caches it: the Debian kernel (linux-image-amd64) and an
# initramfs of busybox-static, the modules the guest needs and guestd (scripts/guest/guestd.c, static).
#   scripts/build-guest.sh              build if missing; prints the directory (vmlinuz, initrd.img)
#   scripts/build-guest.sh --print-dir  only print it
# The cache key is a hash of this script and the guest sources; the packages come from apt
# (apt-get download + dpkg-deb -x: nothing is installed on this machine).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$here/build-guest.sh" "$here/guest/init" "$here/guest/guestd.c" | sha256sum | cut -c1-16)
root=${VMOPS_CACHE_DIR:-$HOME/.cache/vm-migration-operator}/guest
out=$root/$key
if [ "${1:-}" = --print-dir ] || [ -e "$out/.complete" ]; then echo "$out"; exit 0; fi

mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [ -e "$out/.complete" ]; then echo "$out"; exit 0; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
kpkg=$(resolve)
if [ -z "$kpkg" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  kpkg=$(resolve)
fi
[ -n "$kpkg" ] || { echo "build-guest: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
echo "[build-guest] downloading $kpkg busybox-static" >&2
# _apt cannot write into a root-owned mktemp dir; downloading as the caller is fine
apt-get download -o APT::Sandbox::User="$(id -un)" "$kpkg" busybox-static >/dev/null
mkdir pkg
for deb in ./*.deb; do dpkg-deb -x "$deb" pkg; done
kver=$(ls pkg/lib/modules | head -n1)
moddir=pkg/lib/modules/$kver/kernel

mkdir -p rootfs/bin rootfs/sbin rootfs/lib/modules
cp pkg/bin/busybox rootfs/bin/busybox
gcc -static -O2 -Wall -Wextra -Werror -o rootfs/sbin/guestd "$here/guest/guestd.c"
strip rootfs/sbin/guestd
install -m 0755 "$here/guest/init" rootfs/init

# modules + their dependencies (from each module's own .modinfo "depends="), dependencies first
declare -A done_mod=()
: >rootfs/modules.list
add_module() {
  local name=$1 f dep
  [ -n "${done_mod[$name]:-}" ] && return
  done_mod[$name]=1
  f=$(find "$moddir" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \
        -o -name "${name//_/-}.ko" -o -name "${name//_/-}.ko.xz" -o -name "${name//_/-}.ko.zst" \) | head -n1)
  if [ -z "$f" ]; then
    # built into this kernel: nothing to load
    return
  fi
  case $f in
    *.xz) xz -dc "$f" >"$work/m.ko" ;;
    *.zst) zstd -qdc "$f" >"$work/m.ko" ;;
    *) cp "$f" "$work/m.ko" ;;
  esac
  for dep in $(grep -a -o 'depends=[a-z0-9_,-]*' "$work/m.ko" | head -n1 | cut -d= -f2 | tr ',' ' '); do
    add_module "$dep"
  done
  case $f in
    *.xz) xz -dc "$f" ;;
    *.zst) zstd -qdc "$f" ;;
    *) cat "$f" ;;
  esac >"rootfs/lib/modules/$name.ko"
  echo "$name.ko" >>rootfs/modules.list
}
for m in virtio_pci virtio_blk virtio_net button evdev; do add_module "$m"; done

mkdir -p "$out.tmp"
(cd rootfs && find . -print0 | sort -z | ../pkg/bin/busybox cpio -o -H newc -0 2>/dev/null) | gzip -9 >"$out.tmp/initrd.img"
cp "pkg/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
# the package's vmlinuz is root-only (0600): the hosts' unprivileged user must read its copy
chmod 0644 "$out.tmp/vmlinuz" "$out.tmp/initrd.img"
{
  echo "kernel $kpkg $(dpkg-deb -f ./"$kpkg"_*.deb Version)"
  echo "busybox-static $(dpkg-deb -f ./busybox-static_*.deb Version)"
  echo "modules $(tr '\n' ' ' <rootfs/modules.list)"
} >"$out.tmp/VERSIONS"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/.complete"
echo "[build-guest] built $(tr '\n' ';' <"$out/VERSIONS")" >&2
echo "$out"
