"""Writing a file so that readers see the old content or the new, never a part of either.

Used for everything the harness persists (PKI keys, KMS state, runtime records, EIF files): a
crash or a full disk mid-write must not lose what was there (docs/architecture.md, "nothing
is lost").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def open_atomically(path: Path | str, mode: int = 0o644, *, fsync: bool = True
                    ) -> Iterator[BinaryIO]:
    """Yield a new file (``w+b``: it can be written, sought and read back) that replaces
    ``path`` (permissions ``mode``) when the block ends without an error: a temporary file in
    the same folder, fsync, rename over ``path``, fsync of the folder. ``fsync=False`` skips
    both fsyncs, for scratch copies that are rebuilt anyway (the rename stays atomic).

    On any error, in the block or while finishing, the temporary file is removed, ``path`` is
    untouched and the error propagates (OSError for I/O failures, including failing to
    create the temporary file).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomically(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (permissions ``mode``) as :func:`open_atomically` does:
    a temporary file in the same folder, fsync, rename over ``path``, fsync of the folder. On
    any error the temporary file is removed, ``path`` is untouched and the error propagates
    (OSError for I/O failures)."""
    with open_atomically(path, mode) as handle:
        handle.write(data)
