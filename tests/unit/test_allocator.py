"""CPU pool and memory rules of run-enclave, with nitro-cli's error codes
(docs/nitro-cli.md#validation-rules)."""

import pytest

from harness import allocator
from harness.errors import ErrorCode, NitroError


def code_of(excinfo) -> ErrorCode:
    return excinfo.value.code


def test_cpu_count_strict_takes_free_pool_cpus():
    alloc = allocator.allocate_cpus(cpu_count=2, cpu_ids=None, pool=(2, 3, 4, 5), busy={2}, all_cpus=list(range(6)))
    assert alloc.vcpu_cpus == (3, 4)
    assert alloc.mode == "strict"
    assert alloc.others == (0, 1)


def test_cpu_count_beyond_pool_is_e22_in_strict_mode():
    with pytest.raises(NitroError) as err:
        allocator.allocate_cpus(cpu_count=2, cpu_ids=None, pool=(1,), busy=set(), mode="strict", all_cpus=[0, 1])
    assert code_of(err) == ErrorCode.InsufficientCpus
    assert "strict" in err.value.message


def test_cpu_count_beyond_pool_is_shared_in_auto_mode():
    alloc = allocator.allocate_cpus(cpu_count=2, cpu_ids=None, pool=(1,), busy=set(), all_cpus=[0, 1])
    assert alloc.vcpu_cpus == (1, 1)
    assert alloc.mode == "shared"
    assert alloc.others == (0,)


def test_duplicate_cpu_ids_is_e20():
    with pytest.raises(NitroError) as err:
        allocator.allocate_cpus(cpu_count=None, cpu_ids=[1, 1], pool=(1,), busy=set())
    assert code_of(err) == ErrorCode.InvalidCpuConfiguration


def test_cpu_zero_is_never_in_the_pool_e21():
    with pytest.raises(NitroError) as err:
        allocator.allocate_cpus(cpu_count=None, cpu_ids=[0], pool=(1,), busy=set())
    assert code_of(err) == ErrorCode.NoSuchCpuAvailableInPool
    assert "CPU 0" in err.value.message


def test_both_or_neither_cpu_arguments():
    with pytest.raises(NitroError) as err:
        allocator.allocate_cpus(cpu_count=1, cpu_ids=[1], pool=(1,), busy=set())
    assert code_of(err) == ErrorCode.ConflictingArgument
    with pytest.raises(NitroError) as err:
        allocator.allocate_cpus(cpu_count=None, cpu_ids=None, pool=(1,), busy=set())
    assert code_of(err) == ErrorCode.MissingArgument


@pytest.mark.parametrize(
    "memory, eif_size, code",
    [
        (63, 1 << 20, ErrorCode.InsufficientMemoryRequested),  # below 64 MiB
        (100, 30 << 20, ErrorCode.InsufficientMemoryRequested),  # < 4 x 30 MiB
    ],
)
def test_memory_rules(memory, eif_size, code):
    with pytest.raises(NitroError) as err:
        allocator.check_memory(memory, eif_size=eif_size, budget_mib=None, used_mib=0)
    assert err.value.code == code


def test_memory_minimum_is_four_times_eif_rounded_up():
    allocator.check_memory(120, eif_size=30 << 20, budget_mib=None, used_mib=0)
    with pytest.raises(NitroError) as err:
        allocator.check_memory(120, eif_size=(30 << 20) + 1, budget_mib=None, used_mib=0)
    assert "minimum is 121 MiB" in err.value.message


def test_memory_budget_is_e27():
    with pytest.raises(NitroError) as err:
        allocator.check_memory(512, eif_size=1 << 20, budget_mib=1024, used_mib=600)
    assert err.value.code == ErrorCode.InsufficientMemoryAvailable


@pytest.mark.parametrize("text, mib", [("512", 512), ("512M", 512), ("2G", 2048), ("1T", 1 << 20)])
def test_parse_memory_suffixes(text, mib):
    assert allocator.parse_memory(text) == mib


def test_parse_memory_rejects_garbage():
    with pytest.raises(NitroError) as err:
        allocator.parse_memory("12X")
    assert err.value.code == ErrorCode.InvalidArgument


def test_malformed_cpu_pool_names_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "allocator.yaml"
    monkeypatch.setenv("NITRO_HARNESS_ALLOCATOR_CONFIG", str(cfg))
    cfg.write_text("memory_mib: 512\ncpu_pool: '0-3-7'\n")
    with pytest.raises(NitroError) as err:
        allocator.load_config()
    assert err.value.code == ErrorCode.MalformedCpuId
    assert f"{cfg}: cpu_pool" in err.value.message


def test_allocator_file_rules(tmp_path, monkeypatch):
    cfg = tmp_path / "allocator.yaml"
    monkeypatch.setenv("NITRO_HARNESS_ALLOCATOR_CONFIG", str(cfg))
    cfg.write_text("memory_mib: 512\ncpu_count: 1\ncpu_pool: '1'\n")
    with pytest.raises(NitroError) as err:
        allocator.load_config()
    assert "exactly one of cpu_count or cpu_pool" in err.value.message
    assert str(cfg) in err.value.message
    cfg.write_text("memory_mib: 512\ncpu_pool: '0'\n")
    with pytest.raises(NitroError) as err:
        allocator.load_config()
    assert "CPU 0" in err.value.message
