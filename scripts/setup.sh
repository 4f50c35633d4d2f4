#!/usr/bin/env bash
# nitro-harness set-up: the ONE idempotent entry point (README and CI both run it).
#
#   scripts/setup.sh            # from a fresh clone: everything, ends with the hello EIF built
#   PYTHON=/path/to/python scripts/setup.sh
#
# Steps (each logged to stderr; a failure names its step and exits non-zero):
#   1. apt sources: on Debian bookworm add bookworm-backports (deb + deb-src) if missing; never
#      another release's binary (deb) lines (DESIGN.md Environment: they pull in a new libc)
#   2. system packages: host tools + QEMU build dependencies (only the missing ones)
#   3. QEMU: scripts/build-qemu.sh (cached under ~/.cache/nitro-harness/qemu-<ver>-<patch hash>/)
#   4. Python package: pip install -e '.[test]' with $PYTHON (skipped when pyproject.toml is
#      unchanged since the last run); a PEP 668 "externally managed" Python gets ./.venv
#   5. doctor: nitro-harness doctor (must report ready)
#   6. images: nitro-harness images build hello (when that command exists)
# A second run does no work beyond checks: it prints "cached" for each step it skips.
# Env: PYTHON (python3), JOBS (2), NITRO_HARNESS_QEMU (use that QEMU; no build), SKIP_IMAGES=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${NITRO_HARNESS_CACHE:-$HOME/.cache/nitro-harness}"
APT_WAIT=(-o DPkg::Lock::Timeout=600)
export DEBIAN_FRONTEND=noninteractive

STEP="start"
T_START=$(date +%s)
log() { printf 'setup: %s\n' "$*" >&2; }
step() { STEP="$1"; log "== $1"; }
die() { printf 'setup: FAILED at step "%s": %s\n' "$STEP" "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "setup: FAILED at step \"%s\" (exit %s)\n" "$STEP" "$rc" >&2' EXIT

if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    SUDO=(__no_root__)
fi
as_root() {
    [ "${SUDO[0]-}" = __no_root__ ] && die "'$*' needs root and sudo is not installed: run scripts/setup.sh as root"
    "${SUDO[@]}" "$@"
}

# Host tools the harness itself needs (images build init with `gcc -static`, cpio/xz/zstd for
# ramdisks and kernel modules, openssl for the PKI tests, qboot from qemu-system-data). Debian's
# qemu-system-x86 is deliberately NOT installed: the harness runs its own patched build.
HOST_PACKAGES=(build-essential cpio openssl qemu-system-data xz-utils zstd kmod file python3-venv)
# QEMU build dependencies (DESIGN.md Environment, checked in a clean bookworm).
QEMU_BUILD_PACKAGES=(ninja-build pkg-config libglib2.0-dev libpixman-1-dev libcbor-dev
                     libgnutls28-dev libfdt-dev flex bison patch)

# --- 1. apt sources ---------------------------------------------------------------------------
step "1/6 apt sources"
command -v apt-get >/dev/null || die "apt-get not found: nitro-harness set-up supports Debian (bookworm) hosts"
CODENAME=""
[ -r /etc/os-release ] && CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
APT_UPDATE=0
if [ "$CODENAME" = bookworm ]; then
    # Which types of bookworm-backports lines are configured already (one-line or deb822 form)?
    have_deb=0; have_src=0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        grep -Eq '^[[:space:]]*deb[[:space:]].*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && have_deb=1
        grep -Eq '^[[:space:]]*deb-src[[:space:]].*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && have_src=1
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822: check each stanza (blank-line separated) for the suite and its types.
        read -r d s < <(awk '
            BEGIN {RS=""; d=0; s=0}
            /(^|\n)Suites:[^\n]*bookworm-backports/ && !/(^|\n)Enabled:[[:space:]]*no/ {
                if (match($0, /(^|\n)Types:[^\n]*/)) {
                    t = substr($0, RSTART, RLENGTH)
                    if (t ~ /[[:space:]]deb([[:space:]]|$)/) d=1
                    if (t ~ /deb-src/) s=1
                }
            }
            END {print d, s}' "$f")
        [ "$d" = 1 ] && have_deb=1
        [ "$s" = 1 ] && have_src=1
    done
    if [ $have_deb = 1 ] && [ $have_src = 1 ]; then
        log "cached: bookworm-backports (deb + deb-src) already configured"
    else
        types=""
        [ $have_deb = 1 ] || types="deb"
        [ $have_src = 1 ] || types="${types:+$types }deb-src"
        target=/etc/apt/sources.list.d/nitro-harness-bookworm-backports.sources
        log "adding bookworm-backports ($types) in $target"
        printf '%s\n' \
            "# Added by nitro-harness scripts/setup.sh: QEMU 10 source and the 6.12 kernel." \
            "Types: $types" \
            "URIs: http://deb.debian.org/debian" \
            "Suites: bookworm-backports" \
            "Components: main" \
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            | as_root tee "$target.tmp" >/dev/null
        as_root mv "$target.tmp" "$target"
        APT_UPDATE=1
    fi
else
    log "not bookworm (VERSION_CODENAME='$CODENAME'): adding no apt sources; the QEMU build needs" \
        "a deb-src line offering qemu 10.0 (set QEMU_VERSION to the version your release has)"
fi

# --- 2. system packages -----------------------------------------------------------------------
step "2/6 system packages"
missing=()
for p in "${HOST_PACKAGES[@]}" "${QEMU_BUILD_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
# The QEMU source index must be present too (it is only read when QEMU is built).
# (No `grep -q` on a pipe: under pipefail apt-cache's SIGPIPE would read as "missing".)
if [ -z "${NITRO_HARNESS_QEMU:-}" ] && \
   [[ "$(apt-cache showsrc qemu 2>/dev/null || true)" != *"qemu_${QEMU_VERSION:-10.0.2}+ds.orig.tar.xz"* ]]; then
    APT_UPDATE=1
fi
if [ ${#missing[@]} -gt 0 ] || [ $APT_UPDATE = 1 ]; then
    # Fresh package lists before installing (and after a source was added).
    log "apt-get update"
    as_root apt-get "${APT_WAIT[@]}" update >&2 || die "apt-get update failed"
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        as_root apt-get "${APT_WAIT[@]}" install -y --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
else
    log "cached: all ${#HOST_PACKAGES[@]} host and ${#QEMU_BUILD_PACKAGES[@]} build packages installed"
fi

# --- 3. QEMU ----------------------------------------------------------------------------------
step "3/6 QEMU"
if [ -n "${NITRO_HARNESS_QEMU:-}" ]; then
    [ -x "$NITRO_HARNESS_QEMU" ] || die "NITRO_HARNESS_QEMU=$NITRO_HARNESS_QEMU is not an executable file"
    log "cached: NITRO_HARNESS_QEMU=$NITRO_HARNESS_QEMU (no build)"
else
    JOBS="${JOBS:-2}" PYTHON="$PYTHON" "$REPO/scripts/build-qemu.sh" || die "scripts/build-qemu.sh failed"
fi

# --- 4. Python package ------------------------------------------------------------------------
step "4/6 Python package"
command -v "$PYTHON" >/dev/null || [ -x "$PYTHON" ] || die "PYTHON=$PYTHON not found"
# A Debian-managed Python refuses pip (PEP 668): use a venv in the repository instead.
if "$PYTHON" - <<'EOF'
import sys, sysconfig, pathlib
managed = pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists()
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)
EOF
then
    log "$PYTHON is externally managed (PEP 668): using $REPO/.venv"
    [ -x "$REPO/.venv/bin/python" ] || "$PYTHON" -m venv "$REPO/.venv" || die "python3 -m venv $REPO/.venv failed"
    PYTHON="$REPO/.venv/bin/python"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
stamp="$CACHE/pip-$(printf '%s' "$("$PYTHON" -c 'import sys; print(sys.prefix)')|$REPO" | sha256sum | cut -c1-12).stamp"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
installed_here="$(cd / && "$PYTHON" -c 'import harness, pathlib; print(pathlib.Path(harness.__file__).resolve().parent.parent)' 2>/dev/null || true)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$installed_here" = "$REPO" ]; then
    log "cached: harness installed editable from $REPO, pyproject.toml unchanged"
else
    log "$PYTHON -m pip install -e '$REPO[test]'"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$REPO[test]" >&2 \
        || die "pip install -e '.[test]' failed"
    mkdir -p "$CACHE"
    printf '%s\n' "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
fi
NH=("$PYTHON" -m harness.cli)

# --- 5. doctor --------------------------------------------------------------------------------
step "5/6 doctor"
"${NH[@]}" doctor >&2 || die "nitro-harness doctor reports a missing piece (see its fix lines above)"

# --- 6. images --------------------------------------------------------------------------------
step "6/6 hello image"
if [ "${SKIP_IMAGES:-0}" = 1 ]; then
    log "skipped (SKIP_IMAGES=1)"
elif "${NH[@]}" images build --help >/dev/null 2>&1; then
    "${NH[@]}" images build hello || die "nitro-harness images build hello failed"
else
    log "skipped: 'nitro-harness images build' is not available in this checkout yet"
fi

STEP="done"
log "done in $(( $(date +%s) - T_START )) s"
