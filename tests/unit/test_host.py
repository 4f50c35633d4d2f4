"""harness.host: CPU topology, the enclave CPU pool, hugepages, KVM and vhost-vsock facts.

Fake /sys, /proc and /dev trees (helpers.fake_host) are built under tmp_path with the kernel's
own file layout; the real host is checked against independent sources (os.cpu_count, os.sched_getaffinity).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import host
from harness.errors import ErrorCode, NitroError
from helpers.fake_host import adjacent, fake_cpus, fake_hugepages, interleaved, write


# --- CPU lists ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cpus", [
    ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
    ("5", [5]),
    ("", []),
    (" 1 , 3-4\n", [1, 3, 4]),
    ("2,2,1-2", [1, 2]),
])
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert host.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("bad", ["a", "3-1", "1-", "-2", "1,x-3"])
def test_parse_cpu_list_rejects_garbage_with_e23(bad: str) -> None:
    with pytest.raises(NitroError) as info:
        host.parse_cpu_list(bad, source="cpu_pool")
    assert info.value.code == ErrorCode.MalformedCpuId
    assert "cpu_pool" in info.value.message


def test_format_cpu_list_compacts_ranges() -> None:
    assert host.format_cpu_list([5, 1, 2, 3, 7, 8]) == "1-3,5,7-8"
    assert host.format_cpu_list([]) == ""
    assert host.parse_cpu_list(host.format_cpu_list([0, 2, 3, 4, 9])) == [0, 2, 3, 4, 9]


# --- topology and the enclave pool -------------------------------------------------------------

def test_two_cores_one_thread_pool_is_cpu1(tmp_path: Path) -> None:
    fake_cpus(tmp_path, interleaved(2, 1))
    cpus = host.cpu_topology(tmp_path)
    assert [(c.id, c.core_id, c.siblings) for c in cpus] == [(0, 0, (0,)), (1, 1, (1,))]
    assert cpus[0].numa_node == 0
    assert host.default_enclave_pool(tmp_path) == [1]


def test_four_cores_two_threads_excludes_cpu0_siblings(tmp_path: Path) -> None:
    fake_cpus(tmp_path, interleaved(4, 2))
    cpus = {c.id: c for c in host.cpu_topology(tmp_path)}
    assert cpus[0].siblings == (0, 4) and cpus[5].siblings == (1, 5)
    pool = host.default_enclave_pool(tmp_path)
    assert pool == [1, 2, 3, 5, 6, 7]
    assert 4 not in pool  # CPU 0's hyper-thread sibling stays with the parent


def test_adjacent_numbering_pool(tmp_path: Path) -> None:
    fake_cpus(tmp_path, adjacent(4, 2))
    assert host.default_enclave_pool(tmp_path) == [2, 3, 4, 5, 6, 7]


def test_single_core_gives_empty_pool(tmp_path: Path) -> None:
    fake_cpus(tmp_path, interleaved(1, 2))
    assert host.default_enclave_pool(tmp_path) == []


def test_pool_is_whole_cores(tmp_path: Path) -> None:
    """Every CPU in the pool brings all its online siblings (full cores:
    docs/nitro-cli.md#cpu-pool)."""
    fake_cpus(tmp_path, interleaved(8, 2))
    pool = set(host.default_enclave_pool(tmp_path))
    for cpu in host.cpu_topology(tmp_path):
        if cpu.id in pool:
            assert set(cpu.siblings) <= pool
    assert pool == set(range(16)) - {0, 8}


def test_offline_cpus_are_left_out(tmp_path: Path) -> None:
    # 4 cores x 2 threads with CPU 3 offline: core 3 is CPU 7 alone now.
    fake_cpus(tmp_path, interleaved(4, 2), online="0-2,4-7")
    cpus = {c.id: c for c in host.cpu_topology(tmp_path)}
    assert 3 not in cpus
    assert cpus[7].siblings == (7,)
    assert host.default_enclave_pool(tmp_path) == [1, 2, 5, 6, 7]


def test_two_packages(tmp_path: Path) -> None:
    sibs = interleaved(4, 1)
    fake_cpus(tmp_path, sibs, packages={0: 0, 1: 0, 2: 1, 3: 1})
    assert [c.package_id for c in host.cpu_topology(tmp_path)] == [0, 0, 1, 1]
    assert host.default_enclave_pool(tmp_path) == [1, 2, 3]


CPUINFO_2X2 = "".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nmodel name\t: Fake CPU\n"
    f"physical id\t: 0\ncore id\t\t: {cpu % 2}\nflags\t\t: fpu vmx lm\n\n"
    for cpu in range(4)
)


def test_cpuinfo_fallback_without_sysfs(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", CPUINFO_2X2)
    cpus = host.cpu_topology(tmp_path)
    assert [c.siblings for c in cpus] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert host.default_enclave_pool(tmp_path) == [1, 3]


def test_no_cpu_information_is_e24(tmp_path: Path) -> None:
    with pytest.raises(NitroError) as info:
        host.cpu_topology(tmp_path)
    assert info.value.code == ErrorCode.CpuError
    assert "proc/cpuinfo" in info.value.message


def test_real_host_topology_matches_os() -> None:
    cpus = host.cpu_topology()
    assert len(cpus) == os.cpu_count()
    assert {c.id for c in cpus} >= os.sched_getaffinity(0)
    pool = host.default_enclave_pool()
    reserved = set(next(c.siblings for c in cpus if c.id == 0))
    assert 0 in reserved and not reserved & set(pool)


# --- hugepages ---------------------------------------------------------------------------------

def test_hugepages_sizes_and_counters(tmp_path: Path) -> None:
    fake_hugepages(tmp_path, 1048576, nr=2, free=1, resv=0)
    fake_hugepages(tmp_path, 2048, nr=512, free=300, resv=100)
    pools = host.hugepages(tmp_path)
    assert [p.label for p in pools] == ["2M", "1G"]
    two_m, one_g = pools
    assert (two_m.total, two_m.free, two_m.reserved, two_m.available) == (512, 300, 100, 200)
    assert two_m.available_mib == 400
    assert one_g.available_mib == 1024


def test_no_hugetlb_support(tmp_path: Path) -> None:
    assert host.hugepages(tmp_path) == []


def test_real_hugepages_match_meminfo() -> None:
    """The default-size pool agrees with /proc/meminfo's HugePages_Total/Free."""
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
    )
    size_kib = int(meminfo["Hugepagesize"].split()[0])
    pools = {p.size_kib: p for p in host.hugepages()}
    assert pools[size_kib].total == int(meminfo["HugePages_Total"])
    assert pools[size_kib].free == int(meminfo["HugePages_Free"])


# --- KVM and vhost-vsock -----------------------------------------------------------------------

def test_kvm_node_opens_but_no_vmx(tmp_path: Path) -> None:
    write(tmp_path, "dev/kvm", "")
    write(tmp_path, "proc/cpuinfo", "vendor_id\t: GenuineIntel\nflags\t\t: fpu lm hypervisor\n")
    kvm = host.kvm_status(tmp_path)
    assert kvm.device.exists and kvm.device.opens and not kvm.device.char_device
    assert kvm.api_version is None  # a plain file is not asked KVM_GET_API_VERSION
    assert kvm.cpu_virt_flag is None and kvm.hypervisor and kvm.vendor == "intel"
    assert not kvm.usable


def test_kvm_svm_flag_and_missing_node(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", "vendor_id\t: AuthenticAMD\nflags\t\t: fpu svm lm\n")
    kvm = host.kvm_status(tmp_path)
    assert kvm.cpu_virt_flag == "svm" and kvm.vendor == "amd"
    assert not kvm.device.exists and kvm.device.error == "No such file or directory"
    assert not kvm.usable


def test_kvm_node_that_does_not_open(tmp_path: Path) -> None:
    (tmp_path / "dev/kvm").mkdir(parents=True)  # open(O_RDWR) on a directory fails: EISDIR
    write(tmp_path, "proc/cpuinfo", "flags\t\t: vmx\n")
    kvm = host.kvm_status(tmp_path)
    assert kvm.device.exists and not kvm.device.opens
    assert kvm.device.error == "Is a directory"
    assert kvm.cpu_virt_flag == "vmx" and not kvm.usable


def test_real_kvm_status_matches_proc() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    kvm = host.kvm_status()
    assert (kvm.cpu_virt_flag is not None) == bool(flags & {"vmx", "svm"})
    assert kvm.device.exists == os.path.exists("/dev/kvm")
    if kvm.device.opens and kvm.device.char_device:
        assert kvm.api_version == 12  # KVM_API_VERSION, fixed since Linux 2.6.22


def test_vhost_vsock_node(tmp_path: Path) -> None:
    assert not host.vhost_vsock_status(tmp_path).exists
    write(tmp_path, "dev/vhost-vsock", "")
    assert host.vhost_vsock_status(tmp_path).opens


def test_host_facts_json_shape(tmp_path: Path) -> None:
    fake_cpus(tmp_path, interleaved(2, 2))
    fake_hugepages(tmp_path, 2048, nr=4, free=4, resv=0)
    write(tmp_path, "proc/meminfo", "MemTotal:       24684096 kB\nMemAvailable:   23949940 kB\n")
    data = host.host_facts(tmp_path).to_json()
    assert data["enclave_pool"] == [1, 3] and data["enclave_pool_list"] == "1,3"
    assert data["cpus"][0] == {"id": 0, "core_id": 0, "package_id": 0, "siblings": [0, 2],
                               "numa_node": 0}
    assert data["hugepages"][0]["label"] == "2M" and data["hugepages"][0]["available"] == 4
    assert data["memory_kib"] == {"MemTotal": 24684096, "MemAvailable": 23949940}
    assert data["kvm"]["device"]["exists"] is False
