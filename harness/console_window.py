"""The part of an enclave's console text kept in memory: the newest characters, at absolute positions.

The guest is untrusted and may print without end, so the supervising process keeps only a
bounded window of the decoded console text (docs/boot.md#console); the complete byte stream is
in the console log file. A position is the number of characters the console has produced
before it (UTF-8 decoded with replacement characters, carriage returns not counted), so it stays
valid while the window moves on: ``base`` is the position of the oldest character kept, ``end``
the position after the newest.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import deque

from pexpect import EOF, TIMEOUT

__all__ = ["TextWindow", "ConsoleDecoder"]

# Text arrives in reads of any size (one byte at a time when the guest prints slowly); small
# reads are merged into pieces of up to this size (or an eighth of a smaller window) so the
# window holds few string objects whatever the read sizes.
_PIECE = 4096


class ConsoleDecoder:
    """Bytes to console text: incremental UTF-8 with replacement characters (a sequence split
    across reads decodes whole), carriage returns dropped (the tty's ``\\r\\n`` reads as ``\\n``).

    The same bytes give the same text however they are split, so a reader of the log file
    finds the same positions as the capture that wrote it."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(self, data: bytes, final: bool = False) -> str:
        """The text of ``data`` (plus bytes held back from the previous call); ``final`` flushes
        an incomplete sequence at the end as a replacement character."""
        return self._decoder.decode(data, final).replace("\r", "")


class TextWindow:
    """The last ``size`` characters (and at most a piece and a read more) of a growing text, with
    the condition its readers wait on. Thread-safe: one writer (:meth:`append`, :meth:`close`),
    any number of readers."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"window size must be positive, got {size}")
        self.size = size
        self._piece = max(1, min(_PIECE, size // 8))
        self._pieces: deque[str] = deque()
        self._base = 0
        self._end = 0
        self._closed = False
        self.cond = threading.Condition()

    @property
    def base(self) -> int:
        """Absolute position of the oldest character kept."""
        return self._base

    @property
    def end(self) -> int:
        """Absolute position after the newest character (the text's total length so far)."""
        return self._end

    @property
    def closed(self) -> bool:
        """True once the writer said no more text comes."""
        return self._closed

    def append(self, text: str) -> None:
        """Add ``text`` at the end, drop whole pieces from the start while ``size`` characters
        remain without them, and wake the readers."""
        if not text:
            return
        with self.cond:
            if self._pieces and len(self._pieces[-1]) + len(text) <= self._piece:
                self._pieces[-1] += text
            else:
                self._pieces.append(text)
            self._end += len(text)
            while len(self._pieces) > 1 and self._end - self._base - len(self._pieces[0]) >= self.size:
                self._base += len(self._pieces.popleft())
            self.cond.notify_all()

    def close(self) -> None:
        """No more text: readers waiting at the end get EOF."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()

    def text(self) -> str:
        """Every character kept, oldest first."""
        with self.cond:
            return "".join(self._pieces)

    def slice(self, start: int, stop: int | None = None) -> str:
        """The kept characters between absolute positions ``start`` and ``stop`` (default: the
        end); the part before :attr:`base` is no longer here and is left out."""
        with self.cond:
            return self._slice(max(start, self._base), self._end if stop is None else min(stop, self._end))

    def _slice(self, start: int, stop: int) -> str:
        out: list[str] = []
        at = self._base
        for piece in self._pieces:
            if at >= stop:
                break
            following = at + len(piece)
            if following > start:
                out.append(piece[max(0, start - at):stop - at])
            at = following
        return "".join(out)

    def read(self, position: int, size: int, timeout: float | None) -> tuple[int, str]:
        """Up to ``size`` characters from ``position`` on, waiting up to ``timeout`` seconds
        (None: no limit) for some to arrive. Returns ``(start, text)``: ``start`` is
        ``position``, or :attr:`base` when the characters from ``position`` were dropped already.

        Raises pexpect's EOF when the window is closed and nothing is left after ``position``,
        pexpect's TIMEOUT when nothing arrived in time (the exceptions pexpect's expect loop
        reads as the end of the stream and the end of the wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                start = max(position, self._base)
                if start < self._end:
                    return start, self._slice(start, min(self._end, start + size))
                if self._closed:
                    raise EOF("the console closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TIMEOUT("no console text")
                self.cond.wait(left)
