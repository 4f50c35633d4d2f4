"""The control socket during a boot (harness/boot_control.py): terminate interrupts the boot
at once and is confirmed after the release; other requests wait for the running enclave."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness.boot_control import BootControl
from harness.cli.enclave_commands import _wait_gone


@pytest.fixture
def control(tmp_path):
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    boot = BootControl(listener)
    boot.start()
    yield path, boot
    boot.stop()
    listener.close()


def _send(path: str, payload: bytes) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(path)
    client.sendall(payload)
    return client


def test_terminate_interrupts_the_boot_and_is_confirmed_after_the_release(control):
    path, boot = control

    def on_signal(signum, frame):  # as the enclave process's handler
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    # Connected before the request is sent: on a loaded machine the interruption can come while
    # sendall still runs, and the client must be in hand then.
    client = _send(path, b"")
    try:
        with pytest.raises(KeyboardInterrupt):
            client.sendall(json.dumps({"op": "terminate"}).encode() + b"\n")
            time.sleep(30)  # the boot: interrupted long before it ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert boot.terminator is not None
    with client:
        boot.answer_terminate({"Terminated": True})
        assert json.loads(client.makefile("r").readline()) == {"Terminated": True}
    assert boot.terminator is None


def test_other_requests_wait_for_the_running_enclave_and_garbage_is_dropped(control):
    path, boot = control
    garbage = _send(path, b"not json\n")
    assert garbage.recv(10) == b""  # closed, not queued
    describe = _send(path, b'{"op": "describe"}\n')
    deadline = time.monotonic() + 10
    while not boot._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    pending = boot.stop()
    assert [request for _, request in pending] == [{"op": "describe"}]
    assert boot.terminator is None
    for conn, _ in pending:
        conn.close()
    describe.close()
    garbage.close()


def test_waiting_for_an_enclave_process_ends_when_it_is_a_zombie():
    # The enclave process is reparented to init when run-enclave returns; where init does not
    # reap at once, terminate-enclave must not wait on the zombie.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert _wait_gone(child.pid, 10) is True
    finally:
        child.wait()
