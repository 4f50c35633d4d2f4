"""Keeping an enclave's diagnostic files after it ends.

The state folder is removed at terminate; what a failing test needs to be understood (the
console log, QEMU's command line and stderr, the vsock and NSM traces, the preflight's findings,
the boot timeline) is copied first into the artifacts folder the caller named (the pytest plugin
keeps it for failed tests).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

__all__ = ["KEPT_FILES", "keep", "kept_console_log"]

KEPT_FILES = ("console.log", "qemu.cmdline", "qemu.stderr", "vsock.trace", "nsm.trace",
              "vring.journal", "preflight.txt", "boot-timeline.json")


def keep(state_dir: Path | None, artifacts_dir: Path | None) -> None:
    """Copy each of :data:`KEPT_FILES` present in ``state_dir`` into ``artifacts_dir`` (created
    if missing). Does nothing when either is None or ``state_dir`` is gone. A file that cannot be
    copied is skipped; raises OSError only when ``artifacts_dir`` cannot be created."""
    if not artifacts_dir or not state_dir or not state_dir.exists():
        return
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        src = state_dir / name
        if src.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(src, artifacts_dir / name)


def kept_console_log(artifacts_dir: Path | None) -> Path | None:
    """Where the console log will be kept (``artifacts_dir/console.log``), or None without an
    artifacts folder."""
    return artifacts_dir / "console.log" if artifacts_dir else None
