#!/usr/bin/env bash
# Build the Nitro-style enclave kernel (docs/boot.md#enclave-kernels) from Debian's
# linux-source-6.12 (bookworm-backports): `make tinyconfig` + ../kernel/nitro.config
# (harness/data/kernel/nitro.config, or $NITRO_HARNESS_KERNEL_CONFIG), bzImage and nsm.ko.
# `nitro-harness setup --only kernel` runs it.
#
# Cached by source version and config hash:
#   ~/.cache/nitro-harness/kernel-<version>-<config hash>/{bzImage,nsm.ko,config,build-info.json}
# A second run with the same inputs prints "cached" and does nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${NITRO_HARNESS_CACHE:-$HOME/.cache/nitro-harness}"
FRAGMENT="${NITRO_HARNESS_KERNEL_CONFIG:-$HERE/../kernel/nitro.config}"
PACKAGE="${NITRO_HARNESS_KERNEL_SOURCE:-linux-source-6.12}"
JOBS="${JOBS:-$(nproc)}"

say() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
VERSION="$(apt-cache policy "$PACKAGE" 2>/dev/null | awk '/Candidate:/ {print $2}')"
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "apt knows no $PACKAGE: add bookworm-backports and run apt-get update ('nitro-harness setup --only sources,packages' does)"
CHASH="$( (cat "$FRAGMENT"; printf '%s\n' "$VERSION") | sha256sum | cut -c1-12)"
OUT="$CACHE/kernel-${VERSION%%-*}-$CHASH"
# The recipes name {cache}/kernel-current: point it at the build of the current config.
current() { ln -sfn "$(basename "$OUT")" "$CACHE/kernel-current"; }
if [ -f "$OUT/.complete" ]; then
    current
    say "cached: $OUT"
    exit 0
fi

for tool in make gcc flex bison bc; do
    command -v "$tool" >/dev/null || die "$tool is missing ('nitro-harness setup --only packages' installs it)"
done

mkdir -p "$CACHE/debs"
exec 9>"$CACHE/.build-kernel.lock"
flock 9
[ -f "$OUT/.complete" ] && { current; say "cached: $OUT"; exit 0; }

DEB="$(ls "$CACHE/debs/${PACKAGE}_${VERSION//:/%3a}_all.deb" 2>/dev/null || true)"
if [ -z "$DEB" ]; then
    say "fetching $PACKAGE $VERSION"
    (cd "$CACHE/debs" && apt-get download -q "$PACKAGE=$VERSION" >/dev/null) || die "apt-get download $PACKAGE=$VERSION failed"
    DEB="$(ls "$CACHE/debs/${PACKAGE}"_*_all.deb | head -1)"
fi

WORK="$(mktemp -d "$CACHE/build-kernel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "unpacking $(basename "$DEB")"
dpkg -x "$DEB" "$WORK/pkg"
tar -xf "$WORK"/pkg/usr/src/linux-source-*.tar.xz -C "$WORK"
rm -rf "$WORK/pkg"
SRC="$(ls -d "$WORK"/linux-source-*)"

say "configuring: tinyconfig + $(basename "$FRAGMENT")"
make -C "$SRC" -s tinyconfig >/dev/null
"$SRC/scripts/kconfig/merge_config.sh" -m -O "$SRC" "$SRC/.config" "$FRAGMENT" >/dev/null
make -C "$SRC" -s olddefconfig >/dev/null
# Every option the fragment sets must survive olddefconfig (a dependency missing would drop it).
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$SRC/.config" || die "option lost after olddefconfig: $line" ;;
    esac
done < "$FRAGMENT"

start=$(date +%s)
say "building bzImage and modules with -j$JOBS"
make -C "$SRC" -j"$JOBS" -s bzImage modules >/dev/null || die "kernel build failed (see output above)"
took=$(( $(date +%s) - start ))

mkdir -p "$OUT.tmp"
cp "$SRC/arch/x86/boot/bzImage" "$OUT.tmp/bzImage"
cp "$SRC/drivers/misc/nsm.ko" "$OUT.tmp/nsm.ko"
strip --strip-debug "$OUT.tmp/nsm.ko"
cp "$SRC/.config" "$OUT.tmp/config"
KREL="$(make -C "$SRC" -s kernelrelease)"
cat > "$OUT.tmp/build-info.json" <<JSON
{"package": "$PACKAGE", "version": "$VERSION", "kernelrelease": "$KREL", "config_hash": "$CHASH", "build_seconds": $took}
JSON
date -u +%FT%TZ > "$OUT.tmp/.complete"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
current
say "built $KREL in ${took}s: $OUT"
