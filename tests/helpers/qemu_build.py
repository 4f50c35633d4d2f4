"""Where build-qemu.sh (``nitro-harness setup --only qemu``) puts the patched QEMU, recomputed independently of harness.qemu,
and fake builds of it for tests that need no real QEMU."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from helpers import REPO

PATCHES = REPO / "harness" / "data" / "qemu-patches"
#: The build script the set-up runs (package data).
BUILD_QEMU = REPO / "harness" / "data" / "build" / "build-qemu.sh"


def expected_build_dir() -> Path:
    """``~/.cache/nitro-harness/qemu-10.0.2-<sha256(name\\n + bytes per patch)[:12]>``."""
    digest = hashlib.sha256()
    for patch in sorted(PATCHES.glob("*.patch")):
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    cache = os.environ.get("NITRO_HARNESS_CACHE") or str(Path.home() / ".cache" / "nitro-harness")
    return Path(cache) / f"qemu-10.0.2-{digest.hexdigest()[:12]}"


def fake_build(cache: Path, name: str, mtime: float,
               binaries: tuple[str, ...] = ("qemu-system-x86_64", "qemu-system-aarch64")) -> Path:
    """A finished-looking build ``cache/name`` (shell scripts as the ``binaries``, ``.complete``
    stamped at ``mtime``); returns the first binary's path."""
    (cache / name / "bin").mkdir(parents=True)
    for binary_name in binaries:
        binary = cache / name / "bin" / binary_name
        binary.write_text("#!/bin/sh\n")
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    binary = cache / name / "bin" / binaries[0]
    stamp = cache / name / ".complete"
    stamp.write_text("done\n")
    os.utime(stamp, (mtime, mtime))
    return binary
