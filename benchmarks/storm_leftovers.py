"""What a fault-storm round may leave on the host, read from /proc and the runtime directory.

Used by ``benchmarks/fault_storm.py``: processes (with start times, so a PID is never taken for
a later process), Unix sockets, memfds, the files in the runtime directory; and the two tools
the storm's faults need, a copy of another process's fd (``pidfd_getfd``) and the child
subreaper flag. Nothing here signals a process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36
_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER)."""
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


# processes, read from /proc


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent PID, start time in clock ticks) of ``pid``, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def live(pid: int, start: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, with ``start``, is still that process."""
    st = proc_stat(pid)
    return st is not None and st[0] not in "ZX" and (start is None or st[2] == start)


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``, b"" when it cannot be read (a process that is gone)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def processes_of(runtime: Path, cli_pids: set[int]) -> list[int]:
    """Live processes of the storm's rounds: descendants of the storm (the run-enclave and
    terminate-enclave CLIs in ``cli_pids`` excepted) and any process whose command line or
    environment names ``runtime``."""
    mark = str(runtime).encode()
    found = {p for p in descendants(os.getpid()) if p not in cli_pids}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            if mark in read_bytes(f"/proc/{pid}/cmdline") or mark in read_bytes(f"/proc/{pid}/environ"):
                found.add(pid)
    return sorted(p for p in found if live(p))


def reap_orphans(keep: set[int]) -> None:
    """Reap zombies reparented to the storm (it is their subreaper), ``keep`` excepted (the
    subprocess objects reap their own)."""
    for pid in children(os.getpid()):
        st = proc_stat(pid)
        if pid not in keep and st is not None and st[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def describe(pid: int) -> str:
    argv = read_bytes(f"/proc/{pid}/cmdline").split(b"\0")
    text = " ".join(a.decode(errors="replace") for a in argv[:4] if a)
    return f"{pid} ({text[:80]})"


# sockets and memfds


@dataclass
class UnixSocket:
    inode: int
    path: str
    listening: bool


def unix_sockets() -> list[UnixSocket]:
    """Every Unix socket on the host with a path (from /proc/net/unix)."""
    out = []
    for line in read_bytes("/proc/net/unix").decode(errors="replace").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8:
            out.append(UnixSocket(int(parts[6]), parts[7], bool(int(parts[3], 16) & 0x10000)))
    return out


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def count_sockets(runtime: Path, pids: list[int]) -> set[int]:
    """Inodes of open Unix sockets bound under ``runtime`` and of socket fds of ``pids``."""
    found = {s.inode for s in unix_sockets() if s.path.startswith(str(runtime) + "/")}
    for pid in pids:
        for target in fd_targets(pid).values():
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


def count_memfds(pids: list[int]) -> set[tuple[int, str]]:
    """(pid, name) of every memfd ``pids`` hold as an fd or a mapping."""
    found = set()
    for pid in pids:
        for target in fd_targets(pid).values():
            if target.startswith("/memfd:"):
                found.add((pid, target))
        for line in read_bytes(f"/proc/{pid}/maps").decode(errors="replace").splitlines():
            if "/memfd:" in line:
                found.add((pid, line.split(None, 5)[-1]))
    return found


def pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of process ``pid``'s file descriptor ``fd`` (Linux 5.6+, needs ptrace rights)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return new
    finally:
        os.close(pidfd)


def connection_fds(pid: int, socket_path: str) -> list[int]:
    """fds of ``pid`` that are accepted connections on the listening socket ``socket_path``."""
    inodes = {s.inode for s in unix_sockets() if s.path == socket_path and not s.listening}
    return [fd for fd, t in fd_targets(pid).items()
            if t.startswith("socket:[") and int(t[8:-1]) in inodes]


# runtime directory


def runtime_entries(runtime: Path) -> tuple[list[str], int]:
    """(leftover entries, ended records kept) under ``runtime`` (see the module doc)."""
    left, ended = [], 0
    for path in sorted(runtime.rglob("*")):
        rel = path.relative_to(runtime)
        if str(rel) in ("lock", "enclaves", "ended"):
            continue
        if rel.parts[0] == "ended" and len(rel.parts) == 2 and path.is_file():
            ended += path.name.endswith(".json")
            continue
        if rel.parts[0].startswith("enc") and len(rel.parts) > 1 and rel.parts[0] != "enclaves":
            continue  # inside a leftover state folder: the folder itself is counted
        left.append(str(rel))
    return left, ended
