"""An exclusive lock between processes on one cache entry (parallel builds, pytest-xdist workers).

Two processes building the same image or unpacking the same kernel package wait for each other
here, so the work is done once and the second finds the finished result.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


def exclusive_lock(path: Path) -> IO[str]:
    """Take an exclusive ``flock`` on ``path`` (created if missing) and return the open file;
    the lock is held until that file is closed (use it with ``with``). Blocks while another
    process holds it; OSError when ``path`` cannot be opened.

    Lock files are left in place: unlinking one while another process waits on it would let
    a third process lock a new file and enter the critical section too."""
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f
