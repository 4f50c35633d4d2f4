"""Where a section's bytes come from when an EIF is written or re-read: bytes in memory, a
file named by path (streamed), or a byte range of an open file (copying between EIFs).

Everything is read in :data:`~harness.eif.format.CHUNK_SIZE` pieces so memory stays flat
whatever the section size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from harness.errors import ErrorCode, NitroError
from harness.eif.format import CHUNK_SIZE


@dataclass
class FileRange:
    """A byte range of an open file, used as a section source when copying between EIFs."""

    f: BinaryIO
    offset: int
    size: int


def source_size(src: Any, what: str, code: ErrorCode) -> int:
    """Size in bytes of a source (bytes, :class:`FileRange` or path).

    Raises ``NitroError(code, "<src>: <what>: <reason>")`` when a path cannot be stat'ed."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    if isinstance(src, FileRange):
        return src.size
    try:
        return Path(src).stat().st_size
    except OSError as e:
        raise NitroError(code, f"{src}: {what}: {e.strerror or e}") from None


def chunks(src: Any, size: int, code: ErrorCode, what: str) -> Iterable[bytes]:
    """Yield a source's bytes in chunks of at most ``CHUNK_SIZE``: exactly ``size`` bytes in all.

    Raises ``NitroError(code, "<src>: <what>: ...")`` when a path cannot be opened or the
    source ends early (it shrank while being read)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        yield bytes(src)
        return
    if isinstance(src, FileRange):
        f, close = src.f, False
        f.seek(src.offset)
    else:
        try:
            f, close = open(src, "rb"), True
        except OSError as e:
            raise NitroError(code, f"{src}: {what}: {e.strerror or e}") from None
    try:
        left = size
        while left:
            b = f.read(min(CHUNK_SIZE, left))
            if not b:
                raise NitroError(code, f"{src}: {what}: shrank while being read")
            left -= len(b)
            yield b
    finally:
        if close:
            f.close()
