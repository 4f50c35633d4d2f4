#!/usr/bin/env bash
# Build the QEMU nitro-harness runs enclaves on, once, and cache it.
#
# What: Debian's qemu 10.0 source (bookworm-backports deb-src), x86_64-softmmu and
# aarch64-softmmu (x86_64 and Graviton enclaves: docs/architecture.md#architectures), with
# vhost-user, libcbor and gnutls (so QEMU's own `nitro-enclave` machine exists as a reference),
# plus the patches in ../qemu-patches/ (harness/data/qemu-patches: vhost-user-device made
# user-creatable: docs/vhost-user.md#generic-device). `nitro-harness setup --only qemu` runs it.
# Where: ~/.cache/nitro-harness/qemu-<version>-<patch hash>/bin/qemu-system-{x86_64,aarch64}
#        (the cache root is $NITRO_HARNESS_CACHE when set, as for the image cache).
# Idempotent: a finished build (its .complete stamp) is reused and "cached" is printed.
# Facts followed: docs/architecture.md#qemu-build (packages, configure flags, edk2/bzip2 caveat).
#
# Usage: bash build-qemu.sh [--print-dir] [--force]
#   --print-dir  print the install directory this source tree maps to, build nothing
#   --force      rebuild even if the cache is complete
# Env: QEMU_VERSION (default 10.0.2), JOBS (default 2: the cores are shared), PYTHON (python3),
#      NITRO_HARNESS_QEMU_PATCHES (the patch folder; default ../qemu-patches beside this script).
set -euo pipefail

QEMU_VERSION="${QEMU_VERSION:-10.0.2}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH_DIR="${NITRO_HARNESS_QEMU_PATCHES:-$HERE/../qemu-patches}"
CACHE="${NITRO_HARNESS_CACHE:-$HOME/.cache/nitro-harness}"
APT_WAIT=(-o DPkg::Lock::Timeout=600)

STEP="start"
log() { printf 'build-qemu: %s\n' "$*" >&2; }
step() { STEP="$1"; log "step: $1"; }
die() { DIED=1; printf 'build-qemu: FAILED at step "%s": %s\n' "$STEP" "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || [ "${DIED:-0}" = 1 ] || printf "build-qemu: FAILED at step \"%s\" (exit %s)\n" "$STEP" "$rc" >&2' EXIT

# The cache key: every patch's bytes, in name order (sha256, first 12 hex digits).
patch_hash() {
    local f
    for f in "$PATCH_DIR"/*.patch; do
        printf '%s\n' "$(basename "$f")"
        cat "$f"
    done | sha256sum | cut -c1-12
}

FORCE=0
PRINT_DIR=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --print-dir) PRINT_DIR=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (expected --force or --print-dir)" ;;
    esac
done

compgen -G "$PATCH_DIR/*.patch" >/dev/null || die "no patches in $PATCH_DIR"
PHASH="$(patch_hash)"
PREFIX="$CACHE/qemu-$QEMU_VERSION-$PHASH"
if [ "$PRINT_DIR" = 1 ]; then
    echo "$PREFIX"
    exit 0
fi

# Every binary the build installs; a cached build without one of them (made before aarch64 was
# added) is rebuilt.
BINARIES=(qemu-system-x86_64 qemu-system-aarch64)
complete() {
    local b
    [ -f "$PREFIX/.complete" ] || return 1
    for b in "${BINARIES[@]}"; do [ -x "$PREFIX/bin/$b" ] || return 1; done
}
if [ "$FORCE" = 0 ] && complete; then
    log "cached: $PREFIX/bin/${BINARIES[*]}"
    exit 0
fi

mkdir -p "$CACHE"
# Never two builds at once (the 2 cores are shared): wait for the other one, then re-check.
exec 9>"$CACHE/.build-qemu.lock"
if ! flock -n 9; then
    log "another QEMU build holds $CACHE/.build-qemu.lock; waiting for it"
    flock 9
    if [ "$FORCE" = 0 ] && complete; then
        log "cached: $PREFIX/bin/${BINARIES[*]} (built by the other run)"
        exit 0
    fi
fi

step "build dependencies (apt)"
BUILD_DEPS=(build-essential ninja-build pkg-config libglib2.0-dev libpixman-1-dev libcbor-dev
            libgnutls28-dev libfdt-dev flex bison python3-venv qemu-system-data xz-utils patch)
missing=()
for p in "${BUILD_DEPS[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run 'sudo apt-get install ${missing[*]}' or 'nitro-harness setup --only packages' as root"
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_WAIT[@]}" install -y --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
fi

step "QEMU $QEMU_VERSION source (apt deb-src)"
SRC_DIR="$CACHE/src"
mkdir -p "$SRC_DIR"
TARBALL="qemu_${QEMU_VERSION}+ds.orig.tar.xz"
# The expected checksum comes from the signed Sources index (apt-cache showsrc), which is what
# the .dsc would repeat; the .dsc itself answered 404 here
# (docs/architecture.md#qemu-build).
expected="$(apt-cache showsrc qemu 2>/dev/null | awk -v t="$TARBALL" '
    /^Checksums-Sha256:/ {inside=1; next}
    /^[^ ]/ {inside=0}
    inside && $3 == t && !found {print $1; found=1}')"
[ -n "$expected" ] || die "no deb-src entry lists $TARBALL: add a deb-src line for bookworm-backports ('nitro-harness setup --only sources' does) and run 'apt-get update'"
if [ ! -f "$SRC_DIR/$TARBALL" ] || [ "$(sha256sum "$SRC_DIR/$TARBALL" | cut -d' ' -f1)" != "$expected" ]; then
    rm -f "$SRC_DIR/$TARBALL"
    dl_version="$(apt-cache showsrc qemu | awk -v v="$QEMU_VERSION" '
        /^Version:/ && index($2, v "+ds") && !found {print $2; found=1}')"
    log "fetching qemu=$dl_version source with apt-get source --download-only"
    # Exits non-zero when the Debian diff/.dsc answer 404; the tarball is all the build needs.
    (cd "$SRC_DIR" && apt-get source --download-only "qemu=$dl_version" >&2) \
        || log "apt-get source exited non-zero (known: stale .dsc/.debian.tar.xz); checking the tarball"
    [ -f "$SRC_DIR/$TARBALL" ] || die "apt-get source did not fetch $TARBALL"
fi
actual="$(sha256sum "$SRC_DIR/$TARBALL" | cut -d' ' -f1)"
[ "$actual" = "$expected" ] || die "$TARBALL sha256 $actual != $expected from the Sources index"
log "verified $TARBALL sha256 $actual"

step "unpack and patch"
WORK="$(mktemp -d "$CACHE/build-qemu.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap 'rc=$?; cleanup; [ $rc -eq 0 ] || [ "${DIED:-0}" = 1 ] || printf "build-qemu: FAILED at step \"%s\" (exit %s)\n" "$STEP" "$rc" >&2' EXIT
tar -C "$WORK" -xf "$SRC_DIR/$TARBALL"
SRC="$WORK/qemu-$QEMU_VERSION"
[ -d "$SRC" ] || die "$TARBALL did not unpack to qemu-$QEMU_VERSION/"
for p in "$PATCH_DIR"/*.patch; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --quiet < "$p" || die "patch $(basename "$p") does not apply to qemu $QEMU_VERSION"
done
# Debian's +ds tarball has no firmware blobs; the edk2 unpack step still runs whenever bzip2 is on
# PATH and then fails, so switch it off (docs/architecture.md#qemu-build).
sed -i 's/^\( *\)unpack_edk2_blobs = bzip2.found()$/\1unpack_edk2_blobs = false/' "$SRC/meson.build"
grep -q 'unpack_edk2_blobs = bzip2.found()' "$SRC/meson.build" && die "could not disable the edk2 blob unpack in meson.build"

step "meson venv (meson>=1.5,<1.8, pycotap)"
VENV="$CACHE/meson-venv"
if ! "$VENV/bin/python" -c 'import mesonbuild, pycotap' 2>/dev/null; then
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    "$VENV/bin/pip" install --quiet 'meson>=1.5,<1.8' pycotap >&2 || die "pip install meson pycotap failed"
fi

step "configure"
CONFIGURE_FLAGS=(--target-list=x86_64-softmmu,aarch64-softmmu --without-default-features --enable-kvm --enable-tcg
                 --enable-libcbor --enable-gnutls --enable-vhost-user --enable-vhost-kernel
                 --enable-fdt=system --disable-install-blobs --disable-docs --disable-werror)
mkdir -p "$SRC/build"
(cd "$SRC/build" && ../configure --prefix="$PREFIX" --python="$VENV/bin/python" "${CONFIGURE_FLAGS[@]}" >&2) \
    || die "configure failed (see the output above)"

step "compile (ninja -j$JOBS)"
t0=$(date +%s)
# Only what gets installed: the default target would also build ~900 test objects.
ninja -C "$SRC/build" -j"$JOBS" "${BINARIES[@]}" trace/trace-events-all >&2 || die "compile failed"
t1=$(date +%s)
log "compiled in $((t1 - t0)) s"

step "install into $PREFIX"
STAGE="$WORK/stage"
"$SRC/build/pyvenv/bin/meson" install -C "$SRC/build" --no-rebuild --quiet --destdir "$STAGE" >&2 \
    || die "meson install failed"
built="$STAGE$PREFIX"
for b in "${BINARIES[@]}"; do
    [ -x "$built/bin/$b" ] || die "install produced no bin/$b"
done
# --disable-install-blobs leaves out the firmware and option ROMs. Take the x86 ones from Debian's
# qemu-system-data so the build is self-contained: qboot.rom (microvm's firmware; SeaBIOS hung
# on microvm with this QEMU) and linuxboot_dma.bin (microvm's -kernel loader needs it).
X86_BLOBS=(qboot.rom linuxboot_dma.bin linuxboot.bin multiboot_dma.bin multiboot.bin pvh.bin
           kvmvapic.bin bios-microvm.bin)
mkdir -p "$built/share/qemu"
for blob in "${X86_BLOBS[@]}"; do
    if [ -f "/usr/share/qemu/$blob" ]; then
        cp "/usr/share/qemu/$blob" "$built/share/qemu/$blob"
    else
        log "warning: /usr/share/qemu/$blob missing (apt-get install qemu-system-data)"
    fi
done
[ -f "$built/share/qemu/qboot.rom" ] && [ -f "$built/share/qemu/linuxboot_dma.bin" ] \
    || die "qboot.rom/linuxboot_dma.bin not found in /usr/share/qemu: apt-get install qemu-system-data"
for b in "${BINARIES[@]}"; do
    "$built/bin/$b" --version >/dev/null || die "the built $b does not run"
done
# A record of what was built, for the doctor and for bug reports.
"$PYTHON" - "$built/build-info.json" <<EOF
import json, sys
json.dump({
    "qemu_version": "$QEMU_VERSION",
    "source": "$TARBALL",
    "source_sha256": "$actual",
    "patch_hash": "$PHASH",
    "patches": sorted(p for p in """$(cd "$PATCH_DIR" && ls ./*.patch | xargs -n1 basename)""".split()),
    "configure": "${CONFIGURE_FLAGS[*]}",
    "compile_seconds": $((t1 - t0)),
    "blobs_from": "/usr/share/qemu (qemu-system-data $(dpkg-query -W -f='${Version}' qemu-system-data 2>/dev/null))",
    "blobs": sorted("""${X86_BLOBS[*]}""".split()),
}, open(sys.argv[1], "w"), indent=2)
EOF
date -u +%Y-%m-%dT%H:%M:%SZ > "$built/.complete"
# Swap into place in one rename so a reader never sees a half-installed tree.
rm -rf "$PREFIX.old"
[ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
mv "$built" "$PREFIX"
rm -rf "$PREFIX.old"
STEP="done"
log "built: $PREFIX/bin/{$(IFS=,; echo "${BINARIES[*]}")}"
