"""Processes the harness started, told apart from whatever later reuses their PIDs.

A PID alone does not name a process: once it exits, the kernel gives the number to the next
process. The harness therefore records each process it owns (the enclave process, QEMU) with its
start time (``/proc/<pid>/stat`` field 22, clock ticks since boot), and ends a process only when
that PID still has that start time, is not a zombie, and (when given) still holds ``marker`` in
its command line (docs/architecture.md#errors). A zombie has exited already: it holds no memory,
fds or sockets, only its exit status for a parent to read, so it counts as gone.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["start_time", "running", "kill_verified"]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, None when there is no such PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # Field 2, the command name in parentheses, may hold spaces and parentheses itself.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int | None) -> int | None:
    """When ``pid`` started, in clock ticks since boot, or None when it does not exist (or
    ``pid`` is None)."""
    if not pid or pid <= 0:
        return None
    st = _stat(pid)
    return st[1] if st else None


def running(pid: int | None, start: int | None = None) -> bool:
    """True when ``pid`` exists, has not exited (a zombie or a dying task has) and, when
    ``start`` is given, is still the process that started at that time."""
    if not pid or pid <= 0:
        return False
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    return start is None or st[1] == start


def kill_verified(pid: int | None, start: int | None, *, marker: str | None = None,
                  timeout: float = 5.0) -> bool:
    """SIGKILL ``pid`` if it is still the process recorded with ``start`` (see the module doc)
    and, when ``marker`` is given, its command line contains it; wait up to ``timeout`` s for it
    to exit. Returns True when it was killed. Never raises for a process that is gone or not
    ours; raises PermissionError when the process is ours but may not be signalled."""
    if start is None or not running(pid, start):
        return False
    try:
        # A pidfd names this very process: checked after it is opened, the start time and the
        # command line cannot belong to a process that took the PID since.
        pidfd = os.pidfd_open(pid)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    try:
        if not running(pid, start):
            return False
        if marker is not None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return False
            if marker not in cmdline:
                return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + timeout
    while running(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True
