"""Processes told apart from later users of their PIDs (harness/processes.py): a zombie has
exited, a PID with another start time is another process, and only a verified process is
killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from harness import processes


def _zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped yet (a zombie until the caller waits)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


@pytest.fixture
def sleeper(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "enc0")])
    yield child
    child.kill()
    child.wait()


def test_a_zombie_is_not_running():
    child = _zombie()
    try:
        assert os.path.exists(f"/proc/{child.pid}")  # still a process entry...
        assert processes.start_time(child.pid) is not None
        assert not processes.running(child.pid)  # ...but it has exited
    finally:
        child.wait()
    assert processes.start_time(child.pid) is None and not processes.running(child.pid)


def test_a_pid_with_another_start_time_is_another_process():
    me = os.getpid()
    start = processes.start_time(me)
    assert start is not None and start > 0
    assert processes.running(me) and processes.running(me, start)
    assert not processes.running(me, start + 1)
    assert not processes.running(None) and not processes.running(0) and processes.start_time(None) is None


def test_kill_verified_kills_the_recorded_process(sleeper, tmp_path):
    start = processes.start_time(sleeper.pid)
    assert processes.kill_verified(sleeper.pid, start, marker=str(tmp_path / "enc0"))
    assert sleeper.wait(5) == -9


@pytest.mark.parametrize("why", ["other start time", "no start time", "marker not in its command line"])
def test_kill_verified_spares_a_process_it_cannot_verify(sleeper, tmp_path, why):
    start = processes.start_time(sleeper.pid)
    marker = str(tmp_path / "enc0")
    if why == "other start time":
        start += 1
    elif why == "no start time":
        start = None
    else:
        marker = str(tmp_path / "enc1")
    assert not processes.kill_verified(sleeper.pid, start, marker=marker, timeout=0.1)
    assert sleeper.poll() is None


def test_kill_verified_of_a_zombie_or_a_gone_process_does_nothing():
    child = _zombie()
    start = processes.start_time(child.pid)
    assert not processes.kill_verified(child.pid, start, timeout=0.1)
    child.wait()
    assert not processes.kill_verified(child.pid, start, timeout=0.1)
