"""Runtime directory records: slots, CID auto-assignment and validation
(docs/nitro-cli.md#validation-rules), and reclaiming what dead owners left
(docs/nitro-cli.md#stale-enclaves)."""

import json
import os
import subprocess
import sys
import time

import pytest

from harness import processes
from harness.cli import main
from harness.ended_enclaves import find_ended
from harness.errors import ErrorCode, NitroError
from harness.registry import EnclaveRecord, Registry


def record(slot, cid, pid=None, cpus=(1,)):
    return EnclaveRecord(
        slot=slot, enclave_id=f"i-0123456789abcdef0-enc{slot:016x}", name=f"e{slot}", cid=cid,
        cpu_ids=list(cpus), memory_mib=128, pid=pid or os.getpid(), state_dir="/nonexistent",
    )


def test_cids_auto_assigned_from_16_skipping_used(tmp_path):
    reg = Registry(tmp_path)
    assert reg.allocate_cid(None) == 16
    reg.put(record(0, 16))
    reg.put(record(1, 17))
    assert reg.allocate_cid(0) == 18
    assert reg.allocate_slot() == 2


@pytest.mark.parametrize("cid", [1, 2, 3, 2**32 - 1])
def test_reserved_cids_are_e03(tmp_path, cid):
    with pytest.raises(NitroError) as err:
        Registry(tmp_path).allocate_cid(cid)
    assert err.value.code == ErrorCode.InvalidArgument


def test_cid_in_use_is_rejected(tmp_path):
    reg = Registry(tmp_path)
    reg.put(record(0, 20))
    with pytest.raises(NitroError):
        reg.allocate_cid(20)


def _dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_stale_records_of_dead_processes_are_reclaimed(tmp_path):
    reg = Registry(tmp_path)
    reg.put(record(0, 16, pid=_dead_pid()))
    assert reg.records() == []
    assert reg.allocate_cid(None) == 16
    reg.reclaim()
    assert not (tmp_path / "enclaves" / "0.json").exists()


def test_records_read_without_the_lock_change_nothing(tmp_path):
    # A start holding the lock may be reusing the slot right now: only the lock holder reclaims.
    reg = Registry(tmp_path)
    reg.put(record(0, 16, pid=_dead_pid()))
    assert reg.records() == []
    assert (tmp_path / "enclaves" / "0.json").exists()
    with reg.locked():
        assert reg.records() == []
    assert not (tmp_path / "enclaves" / "0.json").exists()


def test_a_zombie_owner_is_dead(tmp_path):
    # A supervisor killed with SIGKILL stays a zombie until its parent (often init) reaps it;
    # its enclave must not stay listed, nor keep its CID and CPU, meanwhile.
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while processes.running(owner.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{owner.pid}")  # the zombie is there
        reg = Registry(tmp_path)
        reg.put(record(0, 16, pid=owner.pid))
        assert reg.records() == []
        assert reg.allocate_cid(None) == 16
    finally:
        owner.wait()


def test_an_owner_pid_now_used_by_another_process_is_dead(tmp_path):
    reg = Registry(tmp_path)
    mine = record(0, 16)
    mine.pid_start = processes.start_time(os.getpid())
    reg.put(mine)
    assert [r.slot for r in reg.records()] == [0]
    reused = record(1, 17)
    reused.pid_start = mine.pid_start - 1  # the PID's earlier owner, long gone
    reg.put(reused)
    assert [r.slot for r in reg.records()] == [0]


@pytest.fixture
def fake_qemu(tmp_path):
    """A process standing in for the QEMU of a dead supervisor: its command line names the
    enclave's state folder, as QEMU's does (socket paths)."""
    root = tmp_path / "run"
    state = root / "enc0"
    state.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"path={state}/vsock.sock"])
    yield root, state, child
    if child.poll() is None:
        child.kill()
    child.wait()


def _orphaned(root, state, qemu_pid, qemu_start, *, control=True):
    """The record and files a supervisor killed with SIGKILL leaves behind."""
    dead = _dead_pid()
    reg = Registry(root)
    (state / "console.log").write_text("nitro-init: heartbeat sent\nHello from the enclave side!\n")
    (root / f"control-{dead}.sock").write_text("")
    (root / f"supervisor-{dead}.log").write_text("")
    rec = record(0, 16, pid=dead)
    rec.state_dir, rec.qemu_pid, rec.qemu_start = str(state), qemu_pid, qemu_start
    rec.debug_mode = True
    rec.control_socket = str(root / f"control-{dead}.sock") if control else None
    reg.put(rec)
    return reg, dead


def test_reclaim_kills_the_dead_supervisors_qemu_and_removes_its_files(fake_qemu):
    root, state, qemu = fake_qemu
    reg, dead = _orphaned(root, state, qemu.pid, processes.start_time(qemu.pid))
    reg.reclaim()
    assert qemu.wait(5) == -9
    assert sorted(p.name for p in root.iterdir()) == ["enclaves", "ended", "lock"]
    assert list((root / "enclaves").iterdir()) == []
    ended = find_ended(reg, name="e0")
    assert f"enclave process (PID {dead}) ended without releasing it" in ended.reason
    assert f"killed QEMU (PID {qemu.pid})" in ended.reason
    assert "Hello from the enclave side!" in open(ended.console_log).read()


@pytest.mark.parametrize("why", ["start time differs", "command line differs"])
def test_reclaim_never_kills_a_process_that_is_not_the_recorded_qemu(fake_qemu, tmp_path, why):
    root, state, qemu = fake_qemu
    start = processes.start_time(qemu.pid)
    if why == "start time differs":
        start += 1  # the QEMU died and its PID went to this process
    else:
        state = root / "enc1"  # the record names a folder the process's command line does not
        state.mkdir()
    reg, _ = _orphaned(root, state, qemu.pid, start)
    reg.reclaim()
    time.sleep(0.2)
    assert qemu.poll() is None
    assert list((root / "enclaves").iterdir()) == []  # the record is reclaimed all the same
    assert "killed QEMU" not in find_ended(reg, name="e0").reason


def test_reclaim_removes_state_folders_and_files_nobody_owns(tmp_path):
    reg = Registry(tmp_path)
    dead = _dead_pid()
    live = record(1, 17)
    reg.put(live)
    for name in ("enc1", "enc3"):
        (tmp_path / name).mkdir()
    for name in (f"control-{dead}.sock", f"supervisor-{dead}.log", f"supervisor-{os.getpid()}.log",
                 "notes.txt"):
        (tmp_path / name).write_text("")
    reg.reclaim()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "enc1", "enclaves", "lock", "notes.txt", f"supervisor-{os.getpid()}.log"]


def test_describe_enclaves_reclaims_an_enclave_whose_process_was_killed(fake_qemu, monkeypatch, capfd):
    root, state, qemu = fake_qemu
    monkeypatch.setenv("NITRO_HARNESS_RUNTIME_DIR", str(root))
    _orphaned(root, state, qemu.pid, processes.start_time(qemu.pid))
    assert main(["describe-enclaves"]) == 0
    assert json.loads(capfd.readouterr().out) == []
    assert qemu.wait(5) == -9
    assert not state.exists()
    # console on it says how it ended rather than "no running enclave".
    assert main(["console", "--enclave-name", "e0"]) == 0
    out, err = capfd.readouterr()
    assert "Hello from the enclave side!" in out and "ended without releasing it" in err


def test_describe_has_nitro_cli_fields_in_order(tmp_path):
    entry = record(3, 21).describe()
    assert list(entry)[:10] == [
        "EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
        "MemoryMiB", "State", "Flags", "Measurements",
    ]
    assert entry["Flags"] == "NONE"
    assert entry["EnclaveCID"] == 21
