"""What is left of an enclave that ended by itself (docs/nitro-cli.md#console): its end reason,
time and kept console log; ``console`` prints them instead of E03; at most 16 records are kept;
``terminate-enclave --all`` removes them. No QEMU: records are made as the supervisor makes them."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest

from harness import allocator, enclave_boot, enclave_monitor
from harness.cli import main
from harness.ended_enclaves import (MAX_ENDED, clear_ended, ended_after, ended_enclaves, find_ended,
                                    record_end)
from harness.enclave import Enclave, EnclaveConfig
from harness.errors import ErrorCode, NitroError
from harness.registry import EnclaveRecord, Registry

T0 = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Registry:
    monkeypatch.setenv("NITRO_HARNESS_RUNTIME_DIR", str(tmp_path / "run"))
    return Registry()


def _record(slot: int, name: str = "app", debug: bool = True) -> EnclaveRecord:
    return EnclaveRecord(slot=slot, enclave_id=f"i-00000000000000001-enc{slot:016x}", name=name, cid=16 + slot,
                         cpu_ids=[1], memory_mib=256, pid=1, state_dir="/nowhere", debug_mode=debug,
                         eif_path="/images/app.eif")


def _end(registry, tmp_path, slot=0, name="app", debug=True, text="hello from the app\n",
         reason="the application exited with status 3, and init rebooted the VM"):
    log = tmp_path / f"console-{slot}.log"
    log.write_text(text)
    return record_end(registry, _record(slot, name, debug), reason, log, now=T0)


def test_a_record_keeps_the_reason_time_and_a_copy_of_the_console_log(registry, tmp_path):
    ended = _end(registry, tmp_path)
    (tmp_path / "console-0.log").unlink()  # the state folder goes away; the copy stays
    assert ended.ended_at == "2025-01-02T03:04:05+00:00"
    assert ended.console_log.startswith(str(registry.root / "ended"))
    assert open(ended.console_log).read() == "hello from the app\n"
    assert ended.line() == ("Enclave i-00000000000000001-enc0000000000000000 (app) ended at "
                            "2025-01-02T03:04:05+00:00: the application exited with status 3, and init "
                            "rebooted the VM")
    assert find_ended(registry, enclave_id=ended.enclave_id) == ended
    assert find_ended(registry, name="app") == ended and find_ended(registry, name="other") is None
    assert ended_after(ended, T0.timestamp()) and not ended_after(ended, T0.timestamp() + 1)


def test_records_are_bounded_oldest_dropped_and_the_newest_wins_for_a_reused_id(registry, tmp_path):
    for i in range(MAX_ENDED + 2):
        _end(registry, tmp_path, slot=i % 3, name=f"app{i}", text=f"run {i}\n")
    kept = ended_enclaves(registry)
    assert MAX_ENDED == 16 and len(kept) == 16
    assert [e.name for e in kept] == [f"app{i}" for i in range(2, 18)]
    assert len(list((registry.root / "ended").glob("*.console.log"))) == 16
    # Slots (and so IDs) are reused: the newest record of an ID is the one found.
    newest = find_ended(registry, enclave_id=_record(0).enclave_id)
    assert newest.name == "app15" and open(newest.console_log).read() == "run 15\n"
    assert clear_ended(registry) == 16
    assert ended_enclaves(registry) == [] and list((registry.root / "ended").iterdir()) == []


def test_console_prints_the_kept_log_and_why_the_enclave_ended(registry, tmp_path, capfd):
    ended = _end(registry, tmp_path)
    assert main(["console", "--enclave-id", ended.enclave_id]) == 0
    out, err = capfd.readouterr()
    assert out == "hello from the app\n"
    assert err.strip().splitlines()[-1] == ended.line()
    # By name, and with neither when nothing runs: the newest ended enclave.
    assert main(["console", "--enclave-name", "app"]) == 0
    assert main(["console"]) == 0
    assert capfd.readouterr().out == "hello from the app\n" * 2


def test_console_on_an_ended_enclave_without_debug_mode_is_e44_with_the_reason(registry, tmp_path, capfd):
    ended = _end(registry, tmp_path, debug=False)
    assert main(["console", "--enclave-id", ended.enclave_id]) == ErrorCode.EnclaveConsoleConnectionFailure.value
    out, err = capfd.readouterr()
    assert out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("[ E44 ]") and "exited with status 3" in line and "--debug-mode" in line


def test_terminate_all_removes_the_records_and_describe_lists_only_running_ones(registry, tmp_path, capfd):
    ended = _end(registry, tmp_path)
    assert main(["describe-enclaves"]) == 0
    assert json.loads(capfd.readouterr().out) == []
    # An unknown ID that ended says so in its E03.
    assert main(["terminate-enclave", "--enclave-id", ended.enclave_id]) == ErrorCode.InvalidArgument.value
    assert "no running enclave has it (Enclave " in capfd.readouterr().err
    assert main(["terminate-enclave", "--all"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == [] and "Removed the records of 1 enclave(s)" in err
    assert find_ended(registry) is None
    assert main(["console", "--enclave-id", ended.enclave_id]) == ErrorCode.InvalidArgument.value


def test_an_enclave_that_ended_by_itself_leaves_a_record_when_released(registry, tmp_path, monkeypatch):
    from harness.eif import write_eif

    monkeypatch.setattr(allocator, "load_config", lambda *a, **k: allocator.AllocatorConfig(
        memory_mib=1024, pool=(1,), source="test-allocator.yaml"))
    eif = tmp_path / "tiny.eif"
    write_eif(eif, b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap" * 50, b"customer" * 70], None)

    def no_qemu(*args):
        raise NitroError(ErrorCode.EnclaveBootFailure, "no QEMU here")

    monkeypatch.setattr(enclave_boot, "choose_qemu", no_qemu)
    config = EnclaveConfig(eif_path=eif, memory_mib=256, cpu_count=1, nsm="none", layout="nitro",
                           debug_mode=True, name="ends")
    for control_socket, kept in ((None, 0), ("/run/x/control.sock", 1)):
        enclave = Enclave(config, registry=registry, control_socket=control_socket)
        with pytest.raises(NitroError):
            enclave._start()  # leaves the slot and state folder taken, as a running enclave has them
        (enclave.state_dir / "console.log").write_text("nitro-init: application exited with status 0\n")
        # What the monitor thread does when the VM exits by itself.
        enclave.end_reason = enclave_monitor.end_reason(SimpleNamespace(), 0, [],
                                                        (enclave.state_dir / "console.log").read_text())
        enclave._ended_by_itself = True
        enclave.terminate()
        # Only run-enclave's enclaves (a control socket) leave one: tests keep their artifacts.
        assert len(ended_enclaves(registry)) == kept
    ended = find_ended(registry, name="ends")
    assert ended.reason == "the application exited with status 0, and init rebooted the VM"
    assert open(ended.console_log).read() == "nitro-init: application exited with status 0\n"
    assert registry.records() == []


@pytest.mark.parametrize("console, reason", [
    ("[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
     "the kernel panicked: Attempted to kill init! exitcode=0x00000100"),
    ("nitro-init: fatal: exec ./app (searched in /sbin:/usr/sbin:/bin:/usr/bin): No such file or directory "
     "(t=0.512s)\r\nnitro-init: application exited with status 127; rebooting (t=0.513s)\r\n",
     "init failed: exec ./app (searched in /sbin:/usr/sbin:/bin:/usr/bin): No such file or directory"),
    ("nitro-init: application killed by signal 9; rebooting (t=5.0s)\n",
     "the application was killed by signal 9, and init rebooted the VM"),
    ("execvpe: ./app: No such file or directory\nchild exited with error\n",
     "the application ended (child exited with error), and init rebooted the VM"),
    ("nothing telling\n", "the enclave's VM exited (the application ended and init rebooted)"),
])
def test_the_end_reason_comes_from_the_console_when_it_says_why(console, reason):
    assert enclave_monitor.end_reason(SimpleNamespace(), 0, [], console) == reason


def test_the_supervisor_lets_the_monitor_record_an_end_before_it_returns(tmp_path):
    # run-enclave's process: QEMU gone by itself ends the serve loop at its next look, and the
    # process's own terminate follows. The monitor thread must have recorded the end (reason,
    # kept console) first, or that terminate takes the end for the parent's doing and
    # `console` then finds nothing (a CI run saw E03 "no running enclave has it").
    import socket
    import threading
    import time

    from harness.enclave_process import Supervisor

    released = threading.Event()
    enclave = SimpleNamespace(running=False, wait_released=released.wait)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "control.sock"))
        listener.listen()
        threading.Timer(0.3, released.set).start()  # the monitor, a little later
        start = time.monotonic()
        Supervisor(enclave, listener).serve()
        assert released.is_set() and time.monotonic() - start >= 0.25
