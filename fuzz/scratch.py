"""A file path holding one fuzz input, for parsers that read files (EIF, image tarballs,
scenarios): an anonymous memory file reached through /proc/self/fd, rewritten per input, so a
run leaves nothing on disk whatever way it ends."""

from __future__ import annotations

import os
from pathlib import Path


class MemFile:
    """An anonymous in-memory file (memfd) named ``name``; :meth:`holding` rewrites it."""

    def __init__(self, name: str):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.path = Path(f"/proc/self/fd/{self.fd}")

    def holding(self, data: bytes) -> Path:
        """Make the file hold exactly ``data``; returns a path that opens it."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        return self.path
