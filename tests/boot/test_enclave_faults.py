"""Faults end the enclave with a clear error and clean up; none hangs a test.

Killing QEMU, a guest kernel panic, an init that never sends the heartbeat, and a vhost-user
back end that crashes, each on a real TCG boot.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from harness.enclave import Enclave, EnclaveConfig
from harness.errors import ErrorCode, NitroError
from harness.registry import Registry
from helpers.boot_images import panicking_eif, recipe_eif, silent_init_eif


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "run")


def _no_leftovers(registry: Registry, enclave: Enclave | None = None) -> None:
    assert registry.records() == []
    if enclave is not None:
        assert enclave.state == "EMPTY"
        assert enclave.state_dir is None or not enclave.state_dir.exists()
        if enclave.qemu_pid:
            assert not os.path.exists(f"/proc/{enclave.qemu_pid}/cmdline") or enclave.machine.poll() is not None


def test_killed_qemu_ends_the_enclave(registry, tmp_path):
    enclave = Enclave.start(
        EnclaveConfig(eif_path=recipe_eif("hello"), memory_mib=256, cpu_count=1, debug_mode=True),
        registry=registry, artifacts_dir=tmp_path / "art",
    )
    try:
        os.kill(enclave.qemu_pid, signal.SIGKILL)
        assert enclave.wait(30)
        enclave._monitor.join(30)
        assert "QEMU ended with status -9" in enclave.end_reason
        _no_leftovers(registry, enclave)
        assert "nitro-init:" in (tmp_path / "art" / "console.log").read_text()
    finally:
        enclave.terminate()


def test_kernel_panic_is_e36_with_the_console(registry, tmp_path):
    eif = panicking_eif(tmp_path / "panic.eif")
    with pytest.raises(NitroError) as err:
        Enclave.start(EnclaveConfig(eif_path=eif, memory_mib=256, cpu_count=1), registry=registry)
    assert err.value.code == ErrorCode.EnclaveBootFailure
    assert "Kernel panic" in err.value.message
    assert "Kernel panic" in err.value.details
    _no_leftovers(registry)


def test_init_without_heartbeat_times_out_with_e36(registry, tmp_path):
    eif = silent_init_eif(tmp_path / "silent.eif")
    with pytest.raises(NitroError) as err:
        Enclave.start(
            EnclaveConfig(eif_path=eif, memory_mib=256, cpu_count=1, heartbeat_timeout=25),
            registry=registry, artifacts_dir=tmp_path / "art",
        )
    assert err.value.code == ErrorCode.EnclaveBootFailure
    assert "no heartbeat on vsock port 9000 within 25 s" in err.value.message
    assert str(tmp_path / "art" / "console.log") in err.value.message
    assert "silent-init: not sending the heartbeat" in err.value.details
    # The boot timeline: its last phases after the console lines, all of them in the artifacts.
    kept = tmp_path / "art" / "boot-timeline.json"
    details = err.value.details.splitlines()
    at = details.index(f"boot timeline, last phases (all of them: {kept}):")
    assert details[-1].endswith("host  boot failed") and len(details) - at - 1 == 12
    timeline = json.loads(kept.read_text())
    assert timeline["outcome"] == "failed" and timeline["error"].startswith(
        "no heartbeat on vsock port 9000 within 25 s")
    names = [p["name"] for p in timeline["phases"]]
    assert names.index("resumed") < names.index("run_init") < names.index("failed") == len(names) - 1
    assert "heartbeat" not in names and "init_heartbeat" not in names
    _no_leftovers(registry)


def test_device_back_end_crash_ends_the_enclave(registry):
    enclave = Enclave.start(
        EnclaveConfig(eif_path=recipe_eif("hello"), memory_mib=256, cpu_count=1, debug_mode=True),
        registry=registry,
    )
    try:
        def crash(queue_index):
            raise RuntimeError("injected back end crash")

        enclave.vsock.on_kick = crash
        # The guest answers this connection attempt (RST: nobody listens), which kicks the
        # crashed device.
        with pytest.raises(OSError):
            enclave.vsock_connect(5000, timeout=20)
        assert enclave.wait(30)
        enclave._monitor.join(30)
        assert "injected back end crash" in enclave.end_reason
        _no_leftovers(registry, enclave)
    finally:
        enclave.terminate()


def test_failed_start_reports_its_own_error_not_the_shutdown(registry, monkeypatch):
    # QEMU runs but never opens QMP: the start fails with E36 naming that, and the shutdown
    # that follows (no QMP, so no quit could be sent) kills QEMU without raising over it.
    from harness.machine import MachineError, QemuMachine

    def no_qmp(self, *args):
        raise MachineError("QEMU did not open QMP within 0.1 s: injected")

    monkeypatch.setattr(QemuMachine, "_accept_qmp", no_qmp)
    with pytest.raises(NitroError) as err:
        Enclave.start(EnclaveConfig(eif_path=recipe_eif("hello"), memory_mib=256, cpu_count=1),
                      registry=registry)
    assert err.value.code == ErrorCode.EnclaveBootFailure
    assert "QEMU did not open QMP within 0.1 s: injected" in err.value.message
    _no_leftovers(registry)
