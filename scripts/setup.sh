#!/usr/bin/env bash
# nitro-harness set-up: the ONE idempotent entry point (README and CI both run it).
#
#   scripts/setup.sh                 # from a fresh clone: everything, ends with the hello EIF
#   scripts/setup.sh --dry-run       # say what each step would do; change nothing
#   scripts/setup.sh --only sources,packages
#   PYTHON=/path/to/python scripts/setup.sh
#
# Steps (each logged to stderr; a failure names its step and exits non-zero):
#   sources   on Debian bookworm add bookworm-backports (deb + deb-src) if missing; never
#             another release's binary (deb) lines (docs/architecture.md#qemu-and-kernels:
#             they pull in a new libc)
#   packages  host tools + QEMU build dependencies via apt (only the missing ones)
#   qemu      scripts/build-qemu.sh (cached under ~/.cache/nitro-harness/qemu-<ver>-<patch hash>/)
#   python    pip install -e '.[test]' with $PYTHON (skipped while pyproject.toml is unchanged);
#             a PEP 668 "externally managed" Python gets ./.venv instead
#   kernel    scripts/build-kernel.sh: the Nitro-style kernel the shipped images boot (cached
#             under ~/.cache/nitro-harness/kernel-<version>-<config hash>/; SKIP_KERNEL=1 skips)
#   doctor    nitro-harness doctor (must report ready)
#   images    nitro-harness images build hello (when that command exists)
# A second run does no work beyond checks and prints "cached" for each step it skips.
# Env: PYTHON (python3), JOBS (2), NITRO_HARNESS_QEMU (use that QEMU: no build), SKIP_IMAGES=1,
#      SKIP_KERNEL=1, NITRO_HARNESS_CACHE (cache root), NITRO_HARNESS_APT_ETC (/etc/apt) and
#      NITRO_HARNESS_OS_RELEASE (/etc/os-release) to run the sources step against other files.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${NITRO_HARNESS_CACHE:-$HOME/.cache/nitro-harness}"
APT_ETC="${NITRO_HARNESS_APT_ETC:-/etc/apt}"
OS_RELEASE="${NITRO_HARNESS_OS_RELEASE:-/etc/os-release}"
APT_WAIT=(-o DPkg::Lock::Timeout=600)
ALL_STEPS=(sources packages qemu python kernel doctor images)
export DEBIAN_FRONTEND=noninteractive

STEP="start"
T_START=$(date +%s)
log() { printf 'setup: %s\n' "$*" >&2; }
die() { DIED=1; printf 'setup: FAILED at step "%s": %s\n' "$STEP" "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || [ "${DIED:-0}" = 1 ] || printf "setup: FAILED at step \"%s\" (exit %s)\n" "$STEP" "$rc" >&2' EXIT

DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs a list: ${ALL_STEPS[*]}"; ONLY="$2"; shift ;;
        --only=*) ONLY="${1#--only=}" ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (expected --dry-run, --only STEP[,STEP])" ;;
    esac
    shift
done
STEPS=("${ALL_STEPS[@]}")
if [ -n "$ONLY" ]; then
    IFS=, read -r -a STEPS <<< "$ONLY"
    for s in "${STEPS[@]}"; do
        [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || die "--only: unknown step '$s' (steps: ${ALL_STEPS[*]})"
    done
fi
wants() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }
N=0
step() {
    local tag=""
    [ $DRY_RUN = 1 ] && tag=" (dry run)"
    N=$((N + 1)); STEP="$1"; log "== $N/${#STEPS[@]} $1$tag"
}

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
# QEMU build dependencies (docs/architecture.md#qemu-build, checked in a clean bookworm).
QEMU_BUILD_PACKAGES=(ninja-build pkg-config libglib2.0-dev libpixman-1-dev libcbor-dev
                     libgnutls28-dev libfdt-dev flex bison patch)
# What scripts/build-kernel.sh needs beyond those (bc for the build, libelf for objtool, OpenSSL
# headers for the certificate tools); cheap, so installed whether or not the kernel is built.
KERNEL_BUILD_PACKAGES=(bc libelf-dev libssl-dev)
APT_UPDATE=0

# --- sources ----------------------------------------------------------------------------------
# Print "D S": whether bookworm-backports binary (D) and source (S) lines are configured, in
# one-line (.list) or deb822 (.sources) form, skipping deb822 stanzas marked Enabled: no.
backports_types() {
    local have_deb=0 have_src=0 f d s
    for f in "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        grep -Eq '^[[:space:]]*deb[[:space:]].*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && have_deb=1
        grep -Eq '^[[:space:]]*deb-src[[:space:]].*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && have_src=1
    done
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
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
    echo "$have_deb $have_src"
}

step_sources() {
    local codename="" have_deb have_src types target
    [ -r "$OS_RELEASE" ] && codename="$(. "$OS_RELEASE" && echo "${VERSION_CODENAME:-}")"
    if [ "$codename" != bookworm ]; then
        log "not bookworm (VERSION_CODENAME='$codename'): adding no apt sources; the QEMU build" \
            "needs a deb-src line offering qemu ${QEMU_VERSION:-10.0.2} (or set QEMU_VERSION)"
        return 0
    fi
    read -r have_deb have_src < <(backports_types)
    if [ "$have_deb" = 1 ] && [ "$have_src" = 1 ]; then
        log "cached: bookworm-backports (deb + deb-src) already configured"
        return 0
    fi
    types=""
    [ "$have_deb" = 1 ] || types="deb"
    [ "$have_src" = 1 ] || types="${types:+$types }deb-src"
    target="$APT_ETC/sources.list.d/nitro-harness-bookworm-backports.sources"
    if [ $DRY_RUN = 1 ]; then
        log "would add bookworm-backports ($types) in $target"
        return 0
    fi
    log "adding bookworm-backports ($types) in $target"
    # bookworm-backports only: its packages are built for bookworm's libc (unlike trixie's).
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
}

# --- packages ---------------------------------------------------------------------------------
step_packages() {
    local missing=() p status
    for p in "${HOST_PACKAGES[@]}" "${QEMU_BUILD_PACKAGES[@]}" "${KERNEL_BUILD_PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
        [ "$status" = "install ok installed" ] || missing+=("$p")
    done
    # The QEMU source index must be known too (read when QEMU is built). No `grep -q` on a
    # pipe here: under pipefail, apt-cache's SIGPIPE would read as "missing".
    if [ -z "${NITRO_HARNESS_QEMU:-}" ] && \
       [[ "$(apt-cache showsrc qemu 2>/dev/null || true)" != *"qemu_${QEMU_VERSION:-10.0.2}+ds.orig.tar.xz"* ]]; then
        APT_UPDATE=1
    fi
    if [ ${#missing[@]} -eq 0 ] && [ $APT_UPDATE = 0 ]; then
        log "cached: all $(( ${#HOST_PACKAGES[@]} + ${#QEMU_BUILD_PACKAGES[@]} + ${#KERNEL_BUILD_PACKAGES[@]} )) packages installed"
        return 0
    fi
    if [ $DRY_RUN = 1 ]; then
        log "would run apt-get update${missing[*]:+ and apt-get install ${missing[*]}}"
        return 0
    fi
    # Fresh package lists before installing (and after a source was added).
    log "apt-get update"
    as_root apt-get "${APT_WAIT[@]}" update >&2 || die "apt-get update failed"
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        as_root apt-get "${APT_WAIT[@]}" install -y --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# --- qemu -------------------------------------------------------------------------------------
step_qemu() {
    local dir
    if [ -n "${NITRO_HARNESS_QEMU:-}" ]; then
        [ -x "$NITRO_HARNESS_QEMU" ] || die "NITRO_HARNESS_QEMU=$NITRO_HARNESS_QEMU is not an executable file"
        log "cached: NITRO_HARNESS_QEMU=$NITRO_HARNESS_QEMU (no build)"
        return 0
    fi
    if [ $DRY_RUN = 1 ]; then
        dir="$("$REPO/scripts/build-qemu.sh" --print-dir)"
        if [ -f "$dir/.complete" ]; then
            log "cached: $dir/bin/qemu-system-x86_64"
        else
            log "would build QEMU into $dir (scripts/build-qemu.sh, 5-15 min on 2 cores)"
        fi
        return 0
    fi
    JOBS="${JOBS:-2}" PYTHON="$PYTHON" "$REPO/scripts/build-qemu.sh" || die "scripts/build-qemu.sh failed"
}

# --- python -----------------------------------------------------------------------------------
step_python() {
    local stamp want installed_here
    command -v "$PYTHON" >/dev/null || [ -x "$PYTHON" ] || die "PYTHON=$PYTHON not found"
    # A Debian-managed Python refuses pip (PEP 668): use a venv in the repository instead.
    if "$PYTHON" - <<'EOF'
import sys, sysconfig, pathlib
managed = pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists()
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)
EOF
    then
        log "$PYTHON is externally managed (PEP 668): using $REPO/.venv"
        if [ ! -x "$REPO/.venv/bin/python" ]; then
            [ $DRY_RUN = 1 ] && { log "would create $REPO/.venv and pip install -e '.[test]' there"; return 0; }
            "$PYTHON" -m venv "$REPO/.venv" || die "python3 -m venv $REPO/.venv failed"
        fi
        PYTHON="$REPO/.venv/bin/python"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
    stamp="$CACHE/pip-$(printf '%s' "$("$PYTHON" -c 'import sys; print(sys.prefix)')|$REPO" | sha256sum | cut -c1-12).stamp"
    want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    installed_here="$(cd / && "$PYTHON" -c 'import harness, pathlib; print(pathlib.Path(harness.__file__).resolve().parent.parent)' 2>/dev/null || true)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$installed_here" = "$REPO" ]; then
        log "cached: harness installed editable from $REPO, pyproject.toml unchanged"
        return 0
    fi
    if [ $DRY_RUN = 1 ]; then
        log "would run $PYTHON -m pip install -e '$REPO[test]'"
        return 0
    fi
    log "$PYTHON -m pip install -e '$REPO[test]'"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$REPO[test]" >&2 \
        || die "pip install -e '.[test]' failed"
    mkdir -p "$CACHE"
    printf '%s\n' "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
}

# The harness's CLI with the Python the python step settled on.
nh() { "$PYTHON" -m harness.cli "$@"; }

# --- kernel -----------------------------------------------------------------------------------
step_kernel() {
    if [ ! -x "$REPO/scripts/build-kernel.sh" ]; then
        log "skipped: scripts/build-kernel.sh is not in this checkout"
    elif [ "${SKIP_KERNEL:-0}" = 1 ]; then
        log "skipped (SKIP_KERNEL=1; the hello and python images need it, the *-debian ones do not)"
    elif [ $DRY_RUN = 1 ]; then
        log "would run scripts/build-kernel.sh"
    else
        JOBS="${JOBS:-2}" "$REPO/scripts/build-kernel.sh" || die "scripts/build-kernel.sh failed"
    fi
}

# --- doctor -----------------------------------------------------------------------------------
step_doctor() {
    if [ $DRY_RUN = 1 ]; then
        log "would run nitro-harness doctor"
        return 0
    fi
    nh doctor >&2 || die "nitro-harness doctor reports a missing piece (see its fix lines above)"
}

# --- images -----------------------------------------------------------------------------------
step_images() {
    if [ "${SKIP_IMAGES:-0}" = 1 ]; then
        log "skipped (SKIP_IMAGES=1)"
    elif ! nh images build --help >/dev/null 2>&1; then
        log "skipped: 'nitro-harness images build' is not available in this checkout yet"
    elif [ $DRY_RUN = 1 ]; then
        log "would run nitro-harness images build hello"
    else
        nh images build hello || die "nitro-harness images build hello failed"
    fi
}

command -v apt-get >/dev/null || die "apt-get not found: nitro-harness set-up supports Debian (bookworm) hosts"
# Without the python step (--only), still use the .venv an earlier run made, if that is where
# the harness is installed.
if ! wants python && [ -x "$REPO/.venv/bin/python" ] && ! "$PYTHON" -c 'import harness' 2>/dev/null; then
    PYTHON="$REPO/.venv/bin/python"
fi
TIMES=()
for s in "${ALL_STEPS[@]}"; do
    if wants "$s"; then
        step "$s"
        t0=$(date +%s)
        "step_$s"
        TIMES+=("$s $(( $(date +%s) - t0 ))s")
    fi
done

STEP="done"
log "done in $(( $(date +%s) - T_START )) s ($(IFS=,; echo "${TIMES[*]}" | sed 's/,/, /g'))"
