#!/usr/bin/env bash
# Build the Nitro-style enclave kernel (docs/boot.md#enclave-kernels) from Debian's
# linux-source-6.12 (bookworm-backports): `make tinyconfig` + a fragment, the kernel blob and nsm.ko.
# `nitro-harness setup --only kernel` runs it once per architecture.
#
# KERNEL_ARCH (environment) picks the architecture, as nitro-cli names it:
#   x86_64 (the default): ../kernel/nitro.config, bzImage, with the host's gcc;
#   aarch64: ../kernel/nitro-arm64.config, Image (uncompressed, as in AWS's aarch64 blobs),
#            cross-built with `make ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-`
#            (gcc-aarch64-linux-gnu; native on an aarch64 host; CROSS_COMPILE overrides the prefix).
# $NITRO_HARNESS_KERNEL_CONFIG replaces the fragment for either.
#
# Cached by source version and config hash:
#   ~/.cache/nitro-harness/kernel-<version>-<config hash>/{bzImage,nsm.ko,config,build-info.json}
#   ~/.cache/nitro-harness/kernel-arm64-<version>-<config hash>/{Image,nsm.ko,config,build-info.json}
# with kernel-current (kernel-arm64-current) pointing at the build of the current configuration.
# A second run with the same inputs prints "cached" and does nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${NITRO_HARNESS_CACHE:-$HOME/.cache/nitro-harness}"
PACKAGE="${NITRO_HARNESS_KERNEL_SOURCE:-linux-source-6.12}"
JOBS="${JOBS:-$(nproc)}"

say() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

case "${KERNEL_ARCH:-x86_64}" in
    x86_64|amd64)
        ARCH_NAME=x86_64 NAME=kernel BLOB=bzImage BLOB_PATH=arch/x86/boot/bzImage
        DEFAULT_FRAGMENT=nitro.config KMAKE=() STRIP=strip ;;
    aarch64|arm64)
        ARCH_NAME=aarch64 NAME=kernel-arm64 BLOB=Image BLOB_PATH=arch/arm64/boot/Image
        DEFAULT_FRAGMENT=nitro-arm64.config
        if [ "$(uname -m)" = aarch64 ]; then CROSS="${CROSS_COMPILE-}"; else CROSS="${CROSS_COMPILE-aarch64-linux-gnu-}"; fi
        KMAKE=(ARCH=arm64 "CROSS_COMPILE=$CROSS") STRIP="${CROSS}strip" ;;
    *) die "KERNEL_ARCH=$KERNEL_ARCH: unknown (x86_64 or aarch64)" ;;
esac
FRAGMENT="${NITRO_HARNESS_KERNEL_CONFIG:-$HERE/../kernel/$DEFAULT_FRAGMENT}"

[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
VERSION="$(apt-cache policy "$PACKAGE" 2>/dev/null | awk '/Candidate:/ {print $2}')"
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "apt knows no $PACKAGE: add bookworm-backports and run apt-get update ('nitro-harness setup --only sources,packages' does)"
CHASH="$( (cat "$FRAGMENT"; printf '%s\n' "$VERSION") | sha256sum | cut -c1-12)"
OUT="$CACHE/$NAME-${VERSION%%-*}-$CHASH"
# The recipes name {cache}/kernel-current (kernel-arm64-current): point it at the build of the
# current config.
current() { ln -sfn "$(basename "$OUT")" "$CACHE/$NAME-current"; }
if [ -f "$OUT/.complete" ]; then
    current
    say "cached: $OUT"
    exit 0
fi

for tool in make gcc flex bison bc; do
    command -v "$tool" >/dev/null || die "$tool is missing ('nitro-harness setup --only packages' installs it)"
done
if [ "$ARCH_NAME" = aarch64 ]; then
    command -v "${CROSS}gcc" >/dev/null || die "${CROSS}gcc is missing: apt-get install gcc-aarch64-linux-gnu ('nitro-harness setup --only packages' installs it)"
fi

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

say "configuring ($ARCH_NAME): tinyconfig + $(basename "$FRAGMENT")"
make -C "$SRC" "${KMAKE[@]}" -s tinyconfig >/dev/null
"$SRC/scripts/kconfig/merge_config.sh" -m -O "$SRC" "$SRC/.config" "$FRAGMENT" >/dev/null
make -C "$SRC" "${KMAKE[@]}" -s olddefconfig >/dev/null
# Every option the fragment sets must survive olddefconfig (a dependency missing would drop it).
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$SRC/.config" || die "option lost after olddefconfig: $line" ;;
    esac
done < "$FRAGMENT"

start=$(date +%s)
say "building $BLOB and modules with -j$JOBS"
make -C "$SRC" "${KMAKE[@]}" -j"$JOBS" -s "$BLOB" modules >/dev/null || die "kernel build failed (see output above)"
took=$(( $(date +%s) - start ))

mkdir -p "$OUT.tmp"
cp "$SRC/$BLOB_PATH" "$OUT.tmp/$BLOB"
cp "$SRC/drivers/misc/nsm.ko" "$OUT.tmp/nsm.ko"
"$STRIP" --strip-debug "$OUT.tmp/nsm.ko"
cp "$SRC/.config" "$OUT.tmp/config"
KREL="$(make -C "$SRC" "${KMAKE[@]}" -s kernelrelease)"
cat > "$OUT.tmp/build-info.json" <<JSON
{"package": "$PACKAGE", "version": "$VERSION", "arch": "$ARCH_NAME", "kernelrelease": "$KREL", "config_hash": "$CHASH", "build_seconds": $took}
JSON
date -u +%FT%TZ > "$OUT.tmp/.complete"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
current
say "built $KREL in ${took}s: $OUT"
