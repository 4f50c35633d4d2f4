"""An enclave's serial console: capture, log file, expectations and a command shell.

QEMU's only serial port is a Unix-socket chardev the harness listens on (docs/boot.md#isolation:
console only in debug mode on Nitro; the harness always keeps the log for diagnostics and
artifacts, and only the CLI's ``console`` command enforces debug mode). A reader thread appends
every byte to ``console.log`` and to memory; :meth:`Console.expect` matches a success pattern and
fails at once on a failure pattern (QEMU functional tests' pairing), instead of waiting for a
timeout.
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

from harness.console_timestamps import LineClock

# Console text that means the boot or the application failed, whatever the test expects.
DEFAULT_FAIL_PATTERN = r"Kernel panic|nitro-init: fatal"


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


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class Console:
    """Serial console of one VM, served on a listening Unix socket that QEMU connects to.

    Create it before QEMU starts (``listen()``), then :meth:`attach` accepts QEMU's connection
    and starts the reader thread. :meth:`close` is idempotent and joins the thread.
    """

    def __init__(self, socket_path: Path, log_path: Path):
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path)
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._log = None
        self._write_lock = threading.Lock()
        self.boot_clock = LineClock()  # the boot's part of the console, timed (boot timeline)

    def listen(self) -> None:
        """Bind the console socket (before QEMU starts, which connects as a client)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        self._listener.listen(1)
        self._log = open(self.log_path, "ab", buffering=0)

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
        self._thread = threading.Thread(target=self._read, name="console-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                data = self._conn.recv(65536)
            except OSError:
                data = b""
            self.boot_clock.feed(data, time.monotonic())
            # Log first: whoever sees the text in memory may read the log file next.
            if data and self._log:
                with contextlib.suppress(OSError, ValueError):
                    self._log.write(data)
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def native_id(self) -> int | None:
        """Thread id of the reader (for CPU placement), or None before :meth:`attach`."""
        return self._thread.native_id if self._thread else None

    @property
    def ended(self) -> bool:
        """True once QEMU closed the console (the VM is gone)."""
        return self._closed

    def text(self) -> str:
        """Everything printed so far, decoded leniently; carriage returns dropped."""
        with self._cond:
            raw = bytes(self._buf)
        return raw.decode("utf-8", "replace").replace("\r", "")

    def expect(
        self,
        pattern: str,
        *,
        timeout: float,
        fail_pattern: str | None = DEFAULT_FAIL_PATTERN,
        count: int = 1,
        start: int = 0,
    ) -> re.Match:
        """Wait until ``pattern`` (a regex) has matched ``count`` times in the text after ``start``.

        Returns the last match. Raises :class:`ConsoleFailure` as soon as ``fail_pattern``
        matches or the console closes, :class:`ConsoleTimeout` after ``timeout`` seconds; both
        carry the console's last lines.
        """
        regex = re.compile(pattern, re.MULTILINE)
        fail = re.compile(fail_pattern, re.MULTILINE) if fail_pattern else None
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()[start:]
            matches = list(regex.finditer(text))
            if len(matches) >= count:
                return matches[count - 1]
            if fail and (bad := fail.search(text)):
                raise ConsoleFailure(
                    f"console printed {bad.group(0)!r} while waiting for {pattern!r}", tail(text)
                )
            with self._cond:
                if self._closed:
                    raise ConsoleFailure(
                        f"the console closed (the enclave ended) before {pattern!r} appeared"
                        + (f" {count} times (seen {len(matches)})" if count > 1 else ""),
                        tail(text),
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(
                        f"{pattern!r} did not appear"
                        + (f" {count} times (seen {len(matches)})" if count > 1 else "")
                        + f" within {timeout:g} s",
                        tail(text),
                    )
                self._cond.wait(min(remaining, 0.5))

    def write(self, data: bytes) -> None:
        """Send bytes to the guest's serial input."""
        if self._conn is None or self._closed:
            raise ConsoleFailure("the console is not connected", tail(self.text()))
        with self._write_lock:
            self._conn.sendall(data)

    def exec(self, command: str, *, timeout: float) -> ExecResult:
        """Run ``command`` in the shell reading the console and return its status and output.

        The guest's application must be a shell on the console (debug-mode images such as
        ``python``). Output is delimited by unique markers so kernel messages printed meanwhile
        do not confuse the result. Raises ConsoleTimeout/ConsoleFailure like :meth:`expect`.
        """
        tag = uuid.uuid4().hex[:12]
        start = len(self.text())
        # The markers are built by the shell (printf) so the echoed command line never matches.
        # One line: the tty echoes input as it arrives, so a second line's echo could land
        # inside the command's output.
        # eval of the quoted command: any command line works, even one ending in '&'.
        line = (
            f"printf '\\n@@%s-begin@@\\n' {tag}; eval {shlex.quote(command)}; "
            f"printf '\\n@@%s-end %d@@\\n' {tag} $?\n"
        )
        self.write(line.encode())
        done = self.expect(
            rf"@@{tag}-end (\d+)@@", timeout=timeout, fail_pattern=DEFAULT_FAIL_PATTERN, start=start
        )
        text = self.text()[start:]
        begin = text.find(f"@@{tag}-begin@@\n")
        end_at = text.find(f"@@{tag}-end ")
        output = text[begin + len(f"@@{tag}-begin@@\n") : end_at] if begin >= 0 else ""
        # Drop the end marker's leading newline, then the command's own final one (like $(...)).
        for _ in range(2):
            if output.endswith("\n"):
                output = output[:-1]
        return ExecResult(status=int(done.group(1)), output=output)

    def close(self) -> None:
        """Stop capturing and release the sockets and the log file (idempotent)."""
        for sock in (self._conn, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._conn = self._listener = None
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._log:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
