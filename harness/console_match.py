"""Matching regexes against an enclave's console stream with pexpect, in bounded memory and time.

Each expectation reads the console through a :class:`StreamTap`, a pexpect spawn whose "child"
is the console text from an absolute position on (:mod:`harness.console_window`). pexpect's
own expect loop (``Expecter``) then searches only the newly read characters plus the
``overlap`` characters before them (``searchwindowsize`` = ``chunk`` + ``overlap``, reads of at
most ``chunk`` = ``maxread`` characters), so waiting costs time linear in the text read and
memory bounded by the window, however much the guest prints. A match up to ``overlap``
characters long is found wherever the reads split it.

What pexpect does not serve here, and why. ``fdspawn`` over the console socket reads only
while one ``expect`` call waits, but the console must be drained and logged all the time (a
guest whose output is not read stalls on its serial port) and read by several expectations at
once, each from its own position: so the console's reader thread reads the socket through
``fdspawn.read_nonblocking`` (its ``logfile_read`` writes the log, :mod:`harness.console`), and
each expectation runs pexpect's expect loop over a tap on the decoded text instead. pexpect keeps
every character read since the last match for ``before``, which a flood without a match would
grow without bound: a tap discards it (nothing reads ``before``). pexpect searches only the last
``searchwindowsize`` characters of a read longer than that: a tap never reads more than
``chunk``.

A tap whose position falls out of the kept window (a ``start`` long past, or a guest printing
faster than the matcher reads) continues from the console log file, which holds every byte;
without a usable log it skips the dropped text and counts it in ``skipped``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pexpect import EOF, TIMEOUT
from pexpect.expect import Expecter, searcher_re
from pexpect.spawnbase import SpawnBase

from harness.console_window import ConsoleDecoder, TextWindow

__all__ = ["ConsoleMatch", "StreamTap", "excerpt"]


def excerpt(text: str, position: int, lines: int = 25) -> str:
    """The ``lines`` lines of ``text`` before ``position`` and the three from it on."""
    head = text[:position].splitlines()[-lines:]
    rest = text[position:].splitlines()[:3]
    return "\n".join(head[:-1] + rest) if head else "\n".join(rest)


@dataclass(frozen=True)
class ConsoleMatch:
    """A regex match in the console stream. ``start()``/``end()``/``span()`` are absolute
    positions (characters since the console started, carriage returns not counted: see
    :mod:`harness.console_window`), valid as ``start`` of a later expectation; groups read as on
    ``re.Match``. ``re_match`` is the match over ``re_match.string``, the piece of the stream
    the matcher searched, which begins at absolute position ``offset``."""

    re_match: re.Match[str]
    offset: int

    def group(self, *groups: int | str) -> Any:
        """As :meth:`re.Match.group`."""
        return self.re_match.group(*groups)

    def __getitem__(self, group: int | str) -> Any:
        return self.re_match[group]

    def groups(self, default: Any = None) -> tuple[Any, ...]:
        """As :meth:`re.Match.groups`."""
        return self.re_match.groups(default)

    def groupdict(self, default: Any = None) -> dict[str, Any]:
        """As :meth:`re.Match.groupdict`."""
        return self.re_match.groupdict(default)

    def start(self, group: int | str = 0) -> int:
        """Absolute position where ``group`` begins."""
        return self.offset + self.re_match.start(group)

    def end(self, group: int | str = 0) -> int:
        """Absolute position after ``group``."""
        return self.offset + self.re_match.end(group)

    def span(self, group: int | str = 0) -> tuple[int, int]:
        """``(start(group), end(group))``."""
        return self.start(group), self.end(group)

    def excerpt(self, lines: int = 25) -> str:
        """The lines before the match (up to ``lines``) and three from it on, as far as the
        searched piece holds them."""
        return excerpt(self.re_match.string, self.re_match.start(), lines)


class _Searcher(searcher_re):
    """pexpect's regex searcher, except that a window pexpect cut from a longer text keeps its
    first character as context only: ``^``, ``\\b`` and look-behinds then see the character
    before the window instead of a string start (``Pattern.search(string, pos)``)."""

    def search(self, buffer: str, freshlen: int, searchwindowsize: int | None = None) -> int:
        pos = 1 if searchwindowsize and len(buffer) >= searchwindowsize else 0
        best = -1
        for index, regex in self._searches:
            found = regex.search(buffer, pos)
            if found is not None and (best < 0 or found.start() < self.start):
                best, self.start, self.end, self.match = index, found.start(), found.end(), found
        return best


class _Discard:
    """Stands in for pexpect's ``before`` buffer (see :class:`StreamTap`)."""

    def write(self, data: str) -> int:
        return len(data)

    def getvalue(self) -> str:
        return ""

    def tell(self) -> int:
        return 0

    def seek(self, *args: int) -> int:
        return 0

    def read(self, *args: int) -> str:
        return ""


_DISCARD = _Discard()


class _LogReader:
    """The console log file decoded like the capture, from its first byte of this console."""

    def __init__(self, path: Path, origin: int):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._file.seek(origin)
        self._decoder = ConsoleDecoder()
        self.position = 0
        self._pending = ""

    def read(self, size: int) -> str:
        """Up to about ``size`` characters ("" at the end of what the file holds now)."""
        while not self._pending:
            data = self._file.read(size)
            if not data:
                return ""
            self._pending = self._decoder.decode(data)
        text, self._pending = self._pending[:size], self._pending[size:]
        self.position += len(text)
        return text

    def skip_to(self, position: int, size: int) -> None:
        """Read and drop the characters before ``position`` (or all the file holds now)."""
        while self.position < position:
            if not self.read(min(size, position - self.position)):
                return

    def close(self) -> None:
        self._file.close()


class StreamTap(SpawnBase):
    """One expectation's view of the console: the text from absolute position ``start`` on,
    read by pexpect's expect loop as a spawn's output.

    ``window`` is the console's :class:`TextWindow`; ``log`` is ``(path, origin byte)`` of its
    log file when the log holds every byte, else None. ``position`` is where the next read
    starts; ``skipped`` counts characters dropped from the window that could not be read back
    from the log. Use from one thread; :meth:`close` releases the log file if one was opened.
    """

    def __init__(self, window: TextWindow, start: int, *, chunk: int, overlap: int,
                 log: tuple[Path, int] | None):
        super().__init__(timeout=None, maxread=chunk, searchwindowsize=chunk + overlap,
                         encoding="utf-8")
        self.delayafterread = None  # pexpect's default naps after each read; reads here wait
        self.position = start
        self.skipped = 0
        self._window = window
        self._log = log
        self._log_reader: _LogReader | None = None
        self._on_log = False  # reading the log (the window dropped the text at ``position``)

    # pexpect keeps every character read since the last match for ``before``: a console that
    # floods without a match would grow it without bound. Nothing here reads ``before``.
    _before = property(lambda self: _DISCARD, lambda self, value: None)

    def read_nonblocking(self, size: int = 1, timeout: float | None = None) -> str:
        """The next characters (at most ``size``), waiting up to ``timeout`` seconds; raises
        pexpect's TIMEOUT or EOF (the console closed and everything was read)."""
        log_ended = 0
        while True:
            if self._on_log:
                assert self._log_reader is not None
                text = self._log_reader.read(size)
                if text:
                    self.position = self._log_reader.position
                    return text
                log_ended += 1
            start, text = self._window.read(self.position, size, timeout)
            if start == self.position:
                self._on_log = False  # caught up: the window holds the rest
                self.position += len(text)
                return text
            # The window dropped the text at our position: read it back from the log, which is
            # written before the window. A log that ends twice short of the window is missing
            # bytes (a failed write): then skip the gap.
            if log_ended < 2 and self._seek_log(size):
                self._on_log = True
                continue
            self.close()
            self._log = None
            self.skipped += start - self.position
            self.buffer = ""  # a match must not join the text on either side of the gap
            self.position = start + len(text)
            return text

    def _seek_log(self, size: int) -> bool:
        """Bring the log reader to ``position`` (opened at the first need, then kept: a tap that
        falls behind again reads on from there, so the log is read once at most)."""
        if self._log is None:
            return False
        if self._log_reader is None:
            try:
                self._log_reader = _LogReader(*self._log)
            except OSError:
                self._log = None
                return False
        self._log_reader.skip_to(self.position, size)
        if self._log_reader.position < self.position:  # the file is shorter than the capture says
            self.close()
            self._log = None
            return False
        return True

    def close(self) -> None:  # type: ignore[override]
        """Release the log file if one was opened (idempotent)."""
        if self._log_reader is not None:
            self._log_reader.close()
            self._log_reader = None
        self._on_log = False

    def next_match(self, patterns: list[re.Pattern[str]], timeout: float | None
                   ) -> tuple[int, ConsoleMatch | None]:
        """Read until one of ``patterns`` matches (the earliest in the stream; the first listed
        on a tie), the console ends, or ``timeout`` seconds pass (0: only what is there now).

        Returns ``(index, match)``: the pattern's index and its match, ``(-1, None)`` at the
        end of the console, ``(-2, None)`` on the timeout. The next call continues after the
        match."""
        searcher = _Searcher([*patterns, EOF, TIMEOUT])
        index = Expecter(self, searcher, self.searchwindowsize).expect_loop(timeout)
        if index == len(patterns):
            return -1, None
        if index == len(patterns) + 1:
            return -2, None
        # pexpect searched a window ending where the last read ended.
        return index, ConsoleMatch(self.match, self.position - len(self.match.string))
