"""Fake host trees for harness.host and harness.doctor: /sys, /proc and /dev files written under
a root folder with the kernel's own layout and formats."""

from __future__ import annotations

from pathlib import Path

from harness import host
from harness.qemu import BootProbe

#: /proc/cpuinfo of a CPU without hardware virtualisation (a cloud VM: no vmx, no svm).
INTEL_NO_VMX = "vendor_id\t: GenuineIntel\nmodel name\t: Fake\nflags\t\t: fpu lm hypervisor\n"
#: /proc/cpuinfo of an Intel CPU with VT-x.
INTEL_VMX = "vendor_id\t: GenuineIntel\nmodel name\t: Fake\nflags\t\t: fpu vmx lm\n"
#: /proc/cpuinfo of an AMD CPU with AMD-V.
AMD_SVM = "vendor_id\t: AuthenticAMD\nmodel name\t: Fake\nflags\t\t: fpu svm lm\n"


def write(root: Path, rel: str, text: str) -> Path:
    """Write ``text`` to ``root/rel`` (parents created); returns the path."""
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_cpus(root: Path, siblings_of: dict[int, list[int]], *, online: str | None = None,
              packages: dict[int, int] | None = None) -> None:
    """Write /sys/devices/system/cpu for CPUs whose thread siblings are given explicitly.

    core_id is the index of the sibling group (as the kernel numbers cores per package).
    """
    groups: list[tuple[int, ...]] = []
    for sibs in siblings_of.values():
        key = tuple(sorted(sibs))
        if key not in groups:
            groups.append(key)
    cpus = sorted(siblings_of)
    write(root, "sys/devices/system/cpu/online",
          (online if online is not None else host.format_cpu_list(cpus)) + "\n")
    for cpu in cpus:
        topo = f"sys/devices/system/cpu/cpu{cpu}/topology"
        core = groups.index(tuple(sorted(siblings_of[cpu])))
        write(root, f"{topo}/core_id", f"{core}\n")
        write(root, f"{topo}/physical_package_id", f"{(packages or {}).get(cpu, 0)}\n")
        write(root, f"{topo}/thread_siblings_list", host.format_cpu_list(siblings_of[cpu]) + "\n")
        (root / f"sys/devices/system/cpu/cpu{cpu}/node0").mkdir(parents=True, exist_ok=True)


def interleaved(cores: int, threads: int) -> dict[int, list[int]]:
    """Intel-style numbering: thread t of core c is CPU c + t * cores."""
    return {c + t * cores: [c + u * cores for u in range(threads)]
            for c in range(cores) for t in range(threads)}


def adjacent(cores: int, threads: int) -> dict[int, list[int]]:
    """AMD/ARM-style numbering: core c owns CPUs c*threads .. c*threads + threads - 1."""
    return {c * threads + t: [c * threads + u for u in range(threads)]
            for c in range(cores) for t in range(threads)}


def fake_hugepages(root: Path, size_kib: int, nr: int, free: int, resv: int, surplus: int = 0) -> None:
    """Write /sys/kernel/mm/hugepages/hugepages-<size_kib>kB's four counters."""
    base = f"sys/kernel/mm/hugepages/hugepages-{size_kib}kB"
    write(root, f"{base}/nr_hugepages", f"{nr}\n")
    write(root, f"{base}/free_hugepages", f"{free}\n")
    write(root, f"{base}/resv_hugepages", f"{resv}\n")
    write(root, f"{base}/surplus_hugepages", f"{surplus}\n")


def fake_host(root: Path, cpuinfo: str, *, kvm: str | None = "file") -> Path:
    """A 2 cores x 1 thread host; /dev/kvm a plain file ("file"), a directory ("dir": exists
    but does not open) or absent (None)."""
    fake_cpus(root, interleaved(2, 1))
    write(root, "proc/cpuinfo", cpuinfo)
    if kvm == "file":
        write(root, "dev/kvm", "")
    elif kvm == "dir":
        (root / "dev/kvm").mkdir(parents=True)
    return root


def no_probe(path: Path, accel: str) -> BootProbe:
    """A ``probe`` for harness.doctor that fails the test: where the rule has already ruled KVM
    out, no probe boot may run."""
    raise AssertionError("the probe boot must not run when KVM is already ruled out")
