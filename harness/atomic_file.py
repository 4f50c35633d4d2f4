"""Writing a file so that readers see the old content or the new, never a part of either.

Used for everything the harness persists (PKI keys, KMS state, runtime records): a crash or a
full disk mid-write must not lose what was there (DESIGN "nothing is lost").
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (permissions ``mode``): a temporary file in the same folder,
    fsync, rename over ``path``, fsync of the folder. On any error the temporary file is removed,
    ``path`` is untouched and the error propagates (OSError for I/O failures)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
