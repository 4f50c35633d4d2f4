"""Runtime directory records: slots, CID auto-assignment and validation
(docs/nitro-cli.md#validation-rules)."""

import os
import subprocess
import sys

import pytest

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


def test_stale_records_of_dead_processes_are_reclaimed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    reg = Registry(tmp_path)
    reg.put(record(0, 16, pid=int(dead.stdout)))
    assert reg.records() == []
    assert reg.allocate_cid(None) == 16
    assert not (tmp_path / "enclaves" / "0.json").exists()


def test_describe_has_nitro_cli_fields_in_order(tmp_path):
    entry = record(3, 21).describe()
    assert list(entry)[:10] == [
        "EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
        "MemoryMiB", "State", "Flags", "Measurements",
    ]
    assert entry["Flags"] == "NONE"
    assert entry["EnclaveCID"] == 21
