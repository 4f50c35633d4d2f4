"""Enclave start/terminate rules without booting: a failed start reports its first error and
releases everything; terminate releases on every path, from any number of threads; the heartbeat
wait and the end watch name their reasons (docs/boot.md#heartbeat-wait, docs/boot.md#enclave-end,
docs/architecture.md#errors).

QEMU never runs here: the start is made to fail at a chosen step (after the registry record, or
after the vsock back end started), with the real registry, allocator rules and back ends.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import allocator, enclave_boot, enclave_devices, enclave_monitor
from harness.enclave import Enclave, EnclaveConfig
from harness.errors import ErrorCode, NitroError
from harness.heartbeat_wait import heartbeat_timeout, wait_for_heartbeat
from harness.registry import Registry


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    from harness.eif import write_eif

    path = tmp_path / "tiny.eif"
    write_eif(path, b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap" * 50, b"customer" * 70], None)
    return path


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    # One pool CPU and 1 GiB, whatever this host has: the rules, not the host, are under test.
    monkeypatch.setattr(allocator, "load_config", lambda *a, **k: allocator.AllocatorConfig(
        memory_mib=1024, pool=(1,), source="test-allocator.yaml"))
    return Registry(tmp_path / "run")


def _config(eif: Path) -> EnclaveConfig:
    return EnclaveConfig(eif_path=eif, memory_mib=256, cpu_count=1, nsm="none", layout="nitro")


def _no_qemu_nsm() -> SimpleNamespace:
    return SimpleNamespace(vhost_user_device_creatable=False, has_virtio_nsm_device=False)


def _fail(message: str):
    def fail(*args, **kwargs):
        raise NitroError(ErrorCode.EnclaveBootFailure, message)
    return fail


def _state_dirs(registry: Registry) -> list[Path]:
    return sorted(registry.root.glob("enc[0-9]*"))


def test_the_record_is_written_while_starting_and_removed_on_failure(eif, registry, monkeypatch):
    seen = {}

    def no_qemu(qemu, accel, arch=None):
        seen["records"] = registry.records()
        seen["state_dirs"] = _state_dirs(registry)
        raise NitroError(ErrorCode.EnclaveBootFailure, "no QEMU here")

    monkeypatch.setattr(enclave_boot, "choose_qemu", no_qemu)
    with pytest.raises(NitroError) as err:
        Enclave.start(_config(eif), registry=registry)
    assert err.value.message == "no QEMU here"
    (record,) = seen["records"]
    assert (record.state, record.slot, record.cpu_ids, record.memory_mib) == ("STARTING", 0, [1], 256)
    assert record.enclave_id.endswith("-enc0000000000000000") and record.cid >= 16
    assert seen["state_dirs"] == [registry.root / "enc0"]
    assert registry.records() == [] and _state_dirs(registry) == []


def test_a_failure_after_the_back_ends_started_keeps_its_own_error(eif, registry, tmp_path, monkeypatch):
    # The first error is the one raised; a back end that would not stop is only appended to
    # its details, and everything is released anyway (docs/architecture.md#errors).
    stopped = []
    real_stop = enclave_devices.EnclaveDevices.stop

    def stuck_stop(self):
        stopped.append([type(b).__name__ for b in self.backends])
        real_stop(self)
        return ["vsock back end did not stop in 10 s (injected)"]

    monkeypatch.setattr(enclave_boot, "choose_qemu", lambda qemu, accel, arch=None: enclave_boot.QemuChoice(
        Path("/nonexistent/qemu"), _no_qemu_nsm(), "tcg", "test"))
    monkeypatch.setattr(enclave_boot, "machine_spec", _fail("machine spec refused (injected)"))
    monkeypatch.setattr(enclave_devices.EnclaveDevices, "stop", stuck_stop)
    with pytest.raises(NitroError) as err:
        Enclave.start(_config(eif), registry=registry, artifacts_dir=tmp_path / "art")
    assert err.value.code == ErrorCode.EnclaveBootFailure
    assert err.value.message == "machine spec refused (injected)"
    # The boot timeline comes first (a failed boot lists its last phases), the release after.
    first, *timeline, releasing = err.value.details.splitlines()
    assert first == f"boot timeline, last phases (all of them: {tmp_path / 'art' / 'boot-timeline.json'}):"
    assert timeline[-1].endswith("host  boot failed") and timeline[-2].endswith("NSM back end listening")
    assert releasing.startswith("while releasing: [ E00 ] UnspecifiedError: enclave i-")
    assert err.value.details.endswith("-enc0000000000000000: released, but vsock back end did "
                                      "not stop in 10 s (injected)")
    assert stopped == [["VhostUserBackend"]]
    assert registry.records() == [] and _state_dirs(registry) == []
    assert (tmp_path / "art" / "vsock.trace").exists()  # kept before the state folder went


def test_an_interrupt_while_stopping_the_back_ends_still_releases_the_slot(eif, registry, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(enclave_boot, "choose_qemu", _fail("no QEMU here"))
    monkeypatch.setattr(enclave_devices.EnclaveDevices, "stop", interrupted)
    enclave = Enclave(_config(eif), registry=registry)
    with pytest.raises(NitroError):
        enclave._start()
    with pytest.raises(KeyboardInterrupt):
        enclave.terminate()
    assert enclave.state == "EMPTY"
    assert registry.records() == [] and _state_dirs(registry) == []
    enclave.terminate()  # idempotent: the second call returns at once


def test_terminate_from_several_threads_releases_once(eif, registry, monkeypatch):
    calls = []
    real_stop = enclave_devices.EnclaveDevices.stop

    def counted_stop(self):
        calls.append(threading.get_ident())
        time.sleep(0.2)  # the others arrive while the first is releasing
        return real_stop(self)

    monkeypatch.setattr(enclave_boot, "choose_qemu", _fail("no QEMU here"))
    monkeypatch.setattr(enclave_devices.EnclaveDevices, "stop", counted_stop)
    enclave = Enclave(_config(eif), registry=registry)
    with pytest.raises(NitroError):
        enclave._start()
    threads = [threading.Thread(target=enclave.terminate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert enclave.state == "EMPTY" and registry.records() == [] and _state_dirs(registry) == []


class _Machine:
    def __init__(self, status=None, console="", stderr="qemu: boom"):
        self.status, self._console, self._stderr = status, console, stderr
        # Console.text and Console.watch over a fixed text.
        self.console = SimpleNamespace(
            text=lambda: self._console,
            watch=lambda pattern: SimpleNamespace(poll=lambda: re.search(pattern, self._console, re.M),
                                                  close=lambda: None))

    def poll(self):
        return self.status

    def wait(self, timeout):
        time.sleep(min(timeout or 0, 0.01))
        return self.status

    def stderr_excerpt(self):
        return self._stderr


class _Heartbeat:
    def __init__(self, after: float | None):
        self.at = None if after is None else time.monotonic() + after

    def wait(self, timeout):
        time.sleep(0.01)
        return self.at is not None and time.monotonic() >= self.at


def test_heartbeat_timeout_is_nitro_clis_formula():
    assert heartbeat_timeout(1, 256) == 180.0
    assert heartbeat_timeout(6 << 30, 100 * 1024) == 180.0
    assert heartbeat_timeout((6 << 30) + 1, 100 * 1024 + 1) == 360.0


def test_heartbeat_wait_returns_the_seconds_it_took():
    took = wait_for_heartbeat(_Heartbeat(0.05), _Machine(), [], 5, Path("/x/console.log"))
    assert 0.04 <= took < 2


@pytest.mark.parametrize("machine, backends, timeout, reason", [
    (_Machine(status=1), [], 5,
     "the enclave's VM exited (QEMU status 1) before the heartbeat; qemu: boom"),
    (_Machine(status=0), [], 5, "the enclave's VM exited (QEMU status 0) before the heartbeat"),
    (_Machine(console="a\nKernel panic - not syncing: x\n"), [], 5,
     "the console printed 'Kernel panic' before the heartbeat"),
    (_Machine(), [SimpleNamespace(error=None), SimpleNamespace(error="queue 0: bad head")], 5,
     "a device back end failed: queue 0: bad head"),
    (_Machine(), [], 0.1, "no heartbeat on vsock port 9000 within 0.1 s"),
])
def test_heartbeat_wait_fails_with_e36_naming_why(machine, backends, timeout, reason):
    machine._console = machine._console or "line 1\nline 2\n"
    with pytest.raises(NitroError) as err:
        wait_for_heartbeat(_Heartbeat(None), machine, backends, timeout, Path("/x/console.log"))
    assert err.value.code == ErrorCode.EnclaveBootFailure
    assert err.value.message == f"{reason} (full console log: /x/console.log)"
    assert err.value.details.startswith("last console lines:\n")
    assert machine._console.splitlines()[-1] in err.value.details


def test_the_end_watch_names_why_the_enclave_ended():
    assert enclave_monitor.wait_for_end(_Machine(), [], lambda: True) is None
    ended = enclave_monitor.wait_for_end(_Machine(status=-9), [], lambda: False)
    assert ended == (-9, [])
    assert enclave_monitor.end_reason(_Machine(), *ended) == "QEMU ended with status -9; qemu: boom"
    assert enclave_monitor.end_reason(_Machine(), 0, []) == (
        "the enclave's VM exited (the application ended and init rebooted)")
    failed = enclave_monitor.wait_for_end(_Machine(), [SimpleNamespace(error="stuck")], lambda: False)
    assert failed == (None, ["stuck"])
    assert enclave_monitor.end_reason(_Machine(), *failed) == "a device back end failed: stuck"
