"""An enclave's serial console: capture, log file, expectations and a command shell.

QEMU's only serial port is a Unix-socket chardev the harness listens on (docs/boot.md#isolation:
console only in debug mode on Nitro; the harness always keeps the log for diagnostics and
artifacts, and only the CLI's ``console`` command enforces debug mode). The guest is untrusted
and may print without end (docs/boot.md#console): a reader thread reads the socket through
``pexpect.fdpexpect.fdspawn``, which writes every byte to ``console.log`` as it arrives; memory
keeps only the newest :data:`WINDOW` characters (:mod:`harness.console_window`). Positions
(``start``, :attr:`Console.position`, a match's ``start()``/``end()``) are absolute: characters
since the console started, carriage returns not counted. :meth:`Console.expect` matches a
success pattern and fails at once on a failure pattern (QEMU functional tests' pairing),
instead of waiting for a timeout; it scans only new text plus :data:`OVERLAP` characters before
it (:mod:`harness.console_match`).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pexpect
from pexpect.fdpexpect import fdspawn

from harness.console_match import ConsoleMatch, StreamTap
from harness.console_timestamps import LineClock
from harness.console_window import ConsoleDecoder, TextWindow

__all__ = ["Console", "ConsoleError", "ConsoleFailure", "ConsoleMatch", "ConsoleTimeout",
           "ConsoleWatch", "DEFAULT_FAIL_PATTERN", "ExecResult", "OVERLAP", "WINDOW", "tail"]

# Console text that means the boot or the application failed, whatever the test expects.
DEFAULT_FAIL_PATTERN = r"Kernel panic|nitro-init: fatal"

#: Characters of console text kept in memory (the newest; the log file has everything).
WINDOW = 262_144
#: Characters before new text that an expectation searches again: a match up to this long is
#: found however the reads split it.
OVERLAP = 4_096
#: Characters an expectation reads at a time (pexpect's ``maxread``; ``searchwindowsize`` is
#: this plus :data:`OVERLAP`).
CHUNK = 4_096
#: Bytes the reader thread takes from the socket at a time.
READ_SIZE = 65_536
# QEMU's serial port writes the socket a byte at a time; after a read that emptied it the reader
# naps this long so that a flood arrives in larger reads, not one wake-up (and GIL hold) per
# byte that would slow the supervisor's other threads. Short: QEMU's socket buffer holds a few
# hundred one-byte writes, and a guest whose output finds it full waits for it (10 ms capped a
# flood at about 20 kB/s and would slow a chatty boot; 1 ms did not lower a TCG guest's rate).
_COALESCE_S = 0.001


class ConsoleError(Exception):
    """Base for console expectation failures; ``excerpt`` holds the console's last lines."""

    def __init__(self, message: str, excerpt: str):
        super().__init__(message)
        self.excerpt = excerpt


class ConsoleTimeout(ConsoleError):
    """The expected pattern did not appear within the timeout."""


class ConsoleFailure(ConsoleError):
    """The failure pattern appeared, or the console closed (the VM ended) first."""


@dataclass
class ExecResult:
    """Result of :meth:`Console.exec`: the shell's exit ``status`` and the command's ``output``."""

    status: int
    output: str


#: One kernel message as the console prints it (``CONFIG_PRINTK_TIME``), with its newline.
_KERNEL_MESSAGE = re.compile(r"\[ *\d+\.\d{6}\] [^\n]*\n")


def without_kernel_messages(text: str) -> str:
    """``text`` (a command's output from :meth:`Console.exec`) without the kernel messages the
    serial console printed in the middle of it: the kernel writes to the same console at any
    moment, even inside a line (``vsock-result 3:ok[    3.06] hrtimer: interrupt took ...``
    was seen under TCG), so output parsed by the harness itself goes through this first.
    Not applied by ``exec`` itself: a command such as ``dmesg`` prints such lines on purpose."""
    return _KERNEL_MESSAGE.sub("", text)


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class _LogSink:
    """The console log file as pexpect's ``logfile_read``: each read written whole as it arrives.

    A failed write (a full disk) must not end the capture: the log is then marked incomplete,
    and expectations stop reading it back (:mod:`harness.console_match`)."""

    def __init__(self, path: Path):
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self.origin = os.fstat(self._file.fileno()).st_size  # where this console's bytes begin
        self.complete = True

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]
        except (OSError, ValueError):
            self.complete = False

    def flush(self) -> None:
        """Nothing to do: the file is unbuffered (pexpect calls it after each write)."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


class ConsoleWatch:
    """A pattern watched on the console from an absolute position on (see :meth:`Console.watch`)."""

    def __init__(self, tap: StreamTap, pattern: str):
        self._tap = tap
        self._regex = re.compile(pattern, re.MULTILINE)

    def poll(self) -> ConsoleMatch | None:
        """The next match in the text printed since the previous poll (plus the overlap), or
        None; never waits. Text read once is not searched again."""
        index, found = self._tap.next_match([self._regex], 0)
        return found if index == 0 else None

    def close(self) -> None:
        """Release what the watch holds (a log file it was reading; idempotent)."""
        self._tap.close()


class Console:
    """Serial console of one VM, served on a listening Unix socket that QEMU connects to.

    Create it before QEMU starts (``listen()``), then :meth:`attach` accepts QEMU's connection
    and starts the reader thread. :meth:`close` is idempotent and joins the thread. ``window``,
    ``overlap`` and ``chunk`` (characters) default to :data:`WINDOW`, :data:`OVERLAP` and
    :data:`CHUNK`.
    """

    def __init__(self, socket_path: Path, log_path: Path, *, window: int = WINDOW,
                 overlap: int = OVERLAP, chunk: int = CHUNK):
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path)
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._window = TextWindow(window)
        self._overlap, self._chunk = overlap, chunk
        self._decoder = ConsoleDecoder()
        self._log: _LogSink | None = None
        self._log_origin: int | None = None
        self._write_lock = threading.Lock()
        self.boot_clock = LineClock()  # the boot's part of the console, timed (boot timeline)

    def listen(self) -> None:
        """Bind the console socket (before QEMU starts, which connects as a client)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        self._listener.listen(1)
        self._log = _LogSink(self.log_path)
        self._log_origin = self._log.origin

    def attach(self, timeout: float, *, gone_fd: int | None = None) -> None:
        """Accept QEMU's connection and start capturing. Raises TimeoutError if QEMU does not
        connect within ``timeout`` seconds, ChildProcessError when ``gone_fd`` (a pidfd of
        QEMU) becomes readable first: QEMU exited."""
        assert self._listener is not None
        waited = [self._listener] + ([gone_fd] if gone_fd is not None else [])
        ready, _, _ = select.select(waited, [], [], timeout)
        if self._listener not in ready:
            if ready:
                raise ChildProcessError("QEMU exited before it connected the console")
            raise TimeoutError(f"QEMU did not connect the console within {timeout:g} s")
        conn, _ = self._listener.accept()
        conn.settimeout(None)
        self._conn = conn
        # poll, not select: the supervisor may hold more than 1024 descriptors.
        spawn = fdspawn(conn.fileno(), maxread=READ_SIZE, use_poll=True)
        spawn.logfile_read = self._log
        self._thread = threading.Thread(target=self._read, args=(spawn,), name="console-reader",
                                        daemon=True)
        self._thread.start()

    def _read(self, spawn: fdspawn) -> None:
        while True:
            try:
                # pexpect logs the bytes (logfile_read) before they reach memory: whoever sees
                # the text may read the log file next.
                data = spawn.read_nonblocking(READ_SIZE, timeout=None)
            except (pexpect.EOF, OSError, ValueError):
                break
            self.boot_clock.feed(data, time.monotonic())
            self._window.append(self._decoder.decode(data))
            if len(data) < READ_SIZE:
                time.sleep(_COALESCE_S)
        self._window.append(self._decoder.decode(b"", final=True))
        self._window.close()

    @property
    def native_id(self) -> int | None:
        """Thread id of the reader (for CPU placement), or None before :meth:`attach`."""
        return self._thread.native_id if self._thread else None

    @property
    def ended(self) -> bool:
        """True once QEMU closed the console (the VM is gone)."""
        return self._window.closed

    @property
    def position(self) -> int:
        """Absolute position after the newest character: the length of the whole text so far."""
        return self._window.end

    @property
    def window_start(self) -> int:
        """Absolute position of the first character :meth:`text` returns."""
        return self._window.base

    def text(self) -> str:
        """The text kept in memory: the newest :data:`WINDOW` characters or more (all of it
        while the console printed less), decoded leniently, carriage returns dropped. It begins
        at :attr:`window_start`; the complete stream is in ``log_path``."""
        return self._window.text()

    def text_between(self, start: int, stop: int | None = None) -> str:
        """The kept text between absolute positions ``start`` and ``stop`` (default: the end);
        what scrolled out of the window is left out."""
        return self._window.slice(start, stop)

    def _tap(self, start: int) -> StreamTap:
        log = (self.log_path, self._log_origin) \
            if self._log is not None and self._log.complete and self._log_origin is not None else None
        return StreamTap(self._window, max(0, start), chunk=self._chunk, overlap=self._overlap, log=log)

    def watch(self, pattern: str, start: int = 0) -> ConsoleWatch:
        """Watch for ``pattern`` (a regex, multi-line) in the text from absolute position
        ``start`` on; :meth:`ConsoleWatch.poll` checks what arrived since. Text older than the
        window is read back from the log file, so ``start=0`` covers the whole console."""
        return ConsoleWatch(self._tap(start), pattern)

    def expect(
        self,
        pattern: str,
        *,
        timeout: float,
        fail_pattern: str | None = DEFAULT_FAIL_PATTERN,
        count: int = 1,
        start: int = 0,
    ) -> ConsoleMatch:
        """Wait until ``pattern`` (a regex) has matched ``count`` times in the text from absolute
        position ``start`` on (0: the console's start; :attr:`position`: what comes next).

        Returns the last match (absolute positions: ``match.end()`` is where a following
        expectation starts). The text is scanned once, in order: ``fail_pattern`` matching
        before the ``count``-th match raises :class:`ConsoleFailure` at once, as does the
        console closing first; :class:`ConsoleTimeout` after ``timeout`` seconds. Both carry the
        console's last lines. Text older than the window is read back from the log file.
        """
        patterns = [re.compile(pattern, re.MULTILINE)]
        if fail_pattern:
            patterns.append(re.compile(fail_pattern, re.MULTILINE))
        deadline = time.monotonic() + timeout
        tap = self._tap(start)
        seen = 0
        try:
            while True:
                index, found = tap.next_match(patterns, max(0.0, deadline - time.monotonic()))
                if index == 0:
                    seen += 1
                    if seen >= count:
                        assert found is not None
                        return found
                    continue
                if index == 1:
                    assert found is not None
                    raise ConsoleFailure(
                        f"console printed {found.group(0)!r} while waiting for {pattern!r}",
                        found.excerpt())
                counted = f" {count} times (seen {seen})" if count > 1 else ""
                lost = (f"; {tap.skipped} characters scrolled out of the console window before "
                        f"they were read (see {self.log_path})") if tap.skipped else ""
                if index == -1:
                    raise ConsoleFailure(f"the console closed (the enclave ended) before {pattern!r} "
                                         f"appeared{counted}{lost}", tail(self.text()))
                raise ConsoleTimeout(f"{pattern!r} did not appear{counted} within {timeout:g} s{lost}",
                                     tail(self.text()))
        finally:
            tap.close()

    def write(self, data: bytes) -> None:
        """Send bytes to the guest's serial input."""
        if self._conn is None or self.ended:
            raise ConsoleFailure("the console is not connected", tail(self.text()))
        # The socket's sendall, not the spawn's send: pexpect writes once and may write part.
        with self._write_lock:
            self._conn.sendall(data)

    def exec(self, command: str, *, timeout: float) -> ExecResult:
        """Run ``command`` in the shell reading the console and return its status and output.

        The guest's application must be a shell on the console (debug-mode images such as
        ``python``). Output is delimited by unique markers so kernel messages printed meanwhile
        do not confuse the result; an output longer than the window is returned as its last
        :data:`WINDOW` characters (the log file has all of it). Raises
        ConsoleTimeout/ConsoleFailure like :meth:`expect`.
        """
        tag = uuid.uuid4().hex[:12]
        start = self.position
        deadline = time.monotonic() + timeout
        # The markers are built by the shell (printf) so the echoed command line never matches.
        # One line: the tty echoes input as it arrives, so a second line's echo could land
        # inside the command's output.
        # eval of the quoted command: any command line works, even one ending in '&'.
        line = (
            f"printf '\\n@@%s-begin@@\\n' {tag}; eval {shlex.quote(command)}; "
            f"printf '\\n@@%s-end %d@@\\n' {tag} $?\n"
        )
        self.write(line.encode())
        begin = self.expect(rf"@@{tag}-begin@@\n", timeout=timeout, start=start)
        done = self.expect(rf"@@{tag}-end (\d+)@@", timeout=max(0.0, deadline - time.monotonic()),
                           start=begin.end())
        output = self.text_between(begin.end(), done.start())
        # Drop the end marker's leading newline, then the command's own final one (like $(...)).
        for _ in range(2):
            if output.endswith("\n"):
                output = output[:-1]
        return ExecResult(status=int(done.group(1)), output=output)

    def follow_log(self, poll_s: float = 0.1) -> Iterator[bytes]:
        """The console's raw bytes as the log file holds them, from the first, then live ones as
        they are logged, until the console closed and everything was read. Yields reads of at
        most :data:`READ_SIZE` bytes; ends at once when there is no log file."""
        if self._log_origin is None:
            return
        try:
            log = open(self.log_path, "rb")  # noqa: SIM115 - closed below, also on close()
        except OSError:
            return
        with log:
            log.seek(self._log_origin)
            while True:
                data = log.read(READ_SIZE)
                if data:
                    yield data
                    continue
                if self._window.closed:  # the reader logs before it closes: all is read
                    return
                with self._window.cond:
                    if not self._window.closed:
                        self._window.cond.wait(poll_s)

    def close(self) -> None:
        """Stop capturing and release the sockets and the log file (idempotent)."""
        conn, listener, self._conn, self._listener = self._conn, self._listener, None, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # the reader sees the end and returns
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        # Closed only after the reader returned: its poll must never see a reused descriptor.
        for sock in (conn, listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._window.close()
        if self._log is not None:
            self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
