#!/usr/bin/env bash
# nitro-harness set-up from a clone: `nitro-harness setup` (harness/setup/) run from this
# checkout, before the package is installed; it installs it (`pip install -e '.[test]'`).
#
#   python3 -m venv .venv && . .venv/bin/activate && scripts/setup.sh   # the README's way
#   scripts/setup.sh --dry-run                 # say what each step would do; change nothing
#   scripts/setup.sh --only sources,packages   # steps: sources packages qemu python kernel doctor images
#   PYTHON=/path/to/python scripts/setup.sh
#
# Every option is `nitro-harness setup`'s (see `scripts/setup.sh --help`). The set-up runs with
# $PYTHON (default python3: the activated venv's); a Debian-managed Python (PEP 668) gets
# ./.venv instead. Caches live in ~/.cache/nitro-harness ($NITRO_HARNESS_CACHE).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null; then
    printf 'setup: FAILED at step "start": PYTHON=%s not found\n' "$PYTHON" >&2
    exit 1
fi
# The checkout's harness, importable before it is installed (the set-up needs only the
# standard library until its python step has installed the dependencies).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m harness.cli setup "$@"
