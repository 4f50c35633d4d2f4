"""Host facts the harness needs before it can shape an enclave: CPUs, hugepages, KVM, vsock.

Everything here only reads files (``/sys``, ``/proc``, ``/dev``) and never changes the host.
Each function takes ``root`` (default ``"/"``) and reads ``<root>/sys/...``, ``<root>/proc/...``
and ``<root>/dev/...`` so tests can build a fake tree under a temporary directory.

Rules followed:

- nitro-cli's allocator (docs/nitro-cli.md#cpu-pool): enclave CPUs are whole cores (every
  hyper-thread sibling of a chosen CPU goes with it) and never CPU 0 or its siblings;
  :func:`default_enclave_pool` computes the CPUs that satisfy that on this host.
- docs/architecture.md#accelerator: KVM only where ``/dev/kvm`` opens *and* the CPU exposes ``vmx``
  or ``svm`` (a paravirtual ``/dev/kvm`` without them cannot run a stock kernel);
  :func:`kvm_status` collects the facts, ``harness.doctor.choose_accelerator`` decides.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ErrorCode, NitroError

__all__ = [
    "Cpu",
    "HugepagePool",
    "KvmStatus",
    "DeviceNode",
    "HostFacts",
    "parse_cpu_list",
    "format_cpu_list",
    "cpu_topology",
    "default_enclave_pool",
    "hugepages",
    "kvm_status",
    "vhost_vsock_status",
    "memory_kib",
    "host_facts",
]

# _IO(KVMIO=0xAE, 0x00): returns KVM_API_VERSION, 12 on every kernel since 2.6.22.
_KVM_GET_API_VERSION = 0xAE00


def _path(root: str | os.PathLike[str], absolute: str) -> Path:
    """``absolute`` (e.g. ``/sys/devices``) re-rooted under ``root``."""
    return Path(root) / absolute.lstrip("/")


def _read(path: Path) -> str | None:
    """The stripped text of ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_cpu_list(text: str, *, source: str = "CPU list") -> list[int]:
    """Parse the kernel's CPU-list format (``"0-3,8,10-11"``) into sorted unique ints.

    Used for ``/sys/devices/system/cpu/online``, ``thread_siblings_list`` and user input
    such as nitro-cli's ``cpu_pool``. Whitespace is ignored; an empty string is ``[]``.
    Raises ``NitroError(E23 MalformedCpuId)`` naming ``source`` for anything else.
    """
    cpus: set[int] = set()
    for part in text.replace(" ", "").replace("\n", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if lo < 0 or hi < lo:
                    raise ValueError(part)
                cpus.update(range(lo, hi + 1))
            else:
                value = int(part)
                if value < 0:
                    raise ValueError(part)
                cpus.add(value)
        except ValueError:
            raise NitroError(
                ErrorCode.MalformedCpuId,
                f"{source}: '{part}' is not a CPU id or range (expected e.g. '1-3,5')",
            ) from None
    return sorted(cpus)


def format_cpu_list(cpus: list[int] | tuple[int, ...] | set[int]) -> str:
    """The kernel's compact CPU-list form of ``cpus``: ``[1, 2, 3, 5] -> "1-3,5"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Cpu:
    """One online logical CPU.

    ``id``: the kernel's CPU number; ``core_id`` and ``package_id``: from
    ``topology/core_id`` and ``topology/physical_package_id``; ``siblings``: the sorted
    logical CPUs sharing the core (``topology/thread_siblings_list``), ``id`` included.
    ``numa_node`` is the node the CPU belongs to (``-1`` when the host exposes none).
    """

    id: int
    core_id: int
    package_id: int
    siblings: tuple[int, ...]
    numa_node: int = -1


def _cpu_numa_node(cpu_dir: Path) -> int:
    """The NUMA node a CPU directory links to (``nodeN`` entry), or -1."""
    try:
        for entry in cpu_dir.iterdir():
            if entry.name.startswith("node") and entry.name[4:].isdigit():
                return int(entry.name[4:])
    except OSError:
        pass
    return -1


def _topology_from_cpuinfo(root: str | os.PathLike[str]) -> list[Cpu]:
    """Fallback when /sys has no CPU topology: ``processor``/``physical id``/``core id``."""
    text = _read(_path(root, "/proc/cpuinfo"))
    if not text:
        raise NitroError(
            ErrorCode.CpuError,
            f"{_path(root, '/sys/devices/system/cpu')} and {_path(root, '/proc/cpuinfo')}: "
            "neither describes the host's CPUs (is /sys mounted?)",
        )
    entries: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" in fields:
            entries.append(fields)
    by_core: dict[tuple[int, int], list[int]] = {}
    raw: list[tuple[int, int, int]] = []
    for fields in entries:
        cpu_id = int(fields["processor"])
        package = int(fields.get("physical id", "0"))
        # Without "core id" every CPU is its own core (no SMT information).
        core = int(fields.get("core id", str(cpu_id)))
        raw.append((cpu_id, core, package))
        by_core.setdefault((package, core), []).append(cpu_id)
    return [
        Cpu(id=c, core_id=core, package_id=pkg, siblings=tuple(sorted(by_core[(pkg, core)])))
        for c, core, pkg in sorted(raw)
    ]


def cpu_topology(root: str | os.PathLike[str] = "/") -> list[Cpu]:
    """The host's online CPUs, sorted by id, with their core, package and SMT siblings.

    Source: ``<root>/sys/devices/system/cpu/online`` (CPUs listed there) and each
    ``cpuN/topology/{core_id,physical_package_id,thread_siblings_list}``; siblings are
    restricted to online CPUs. Falls back to ``<root>/proc/cpuinfo`` when /sys lacks the
    topology. A CPU whose topology files are missing counts as a core of its own.
    Raises ``NitroError(E24 CpuError)`` when neither source exists.
    """
    cpu_root = _path(root, "/sys/devices/system/cpu")
    online_text = _read(cpu_root / "online")
    if online_text is None:
        return _topology_from_cpuinfo(root)
    online = parse_cpu_list(online_text, source=str(cpu_root / "online"))
    online_set = set(online)
    cpus: list[Cpu] = []
    for cpu_id in online:
        cpu_dir = cpu_root / f"cpu{cpu_id}"
        topo = cpu_dir / "topology"
        core_text = _read(topo / "core_id")
        package_text = _read(topo / "physical_package_id")
        siblings_text = _read(topo / "thread_siblings_list") or _read(topo / "core_cpus_list")
        siblings = (
            parse_cpu_list(siblings_text, source=str(topo / "thread_siblings_list"))
            if siblings_text
            else [cpu_id]
        )
        siblings = [s for s in siblings if s in online_set]
        if cpu_id not in siblings:
            siblings.append(cpu_id)
        cpus.append(
            Cpu(
                id=cpu_id,
                core_id=int(core_text) if core_text is not None else cpu_id,
                package_id=int(package_text) if package_text is not None else 0,
                siblings=tuple(sorted(siblings)),
                numa_node=_cpu_numa_node(cpu_dir),
            )
        )
    return cpus


def default_enclave_pool(root: str | os.PathLike[str] = "/") -> list[int]:
    """The CPUs an enclave may take on this host: whole cores, never CPU 0's core.

    Shape: sorted CPU ids. Rule (nitro-cli's allocator, docs/nitro-cli.md#cpu-pool): a core
    qualifies only if all of its online threads are offered together, and the core holding CPU 0
    (CPU 0 and its siblings) is reserved for the parent. Example: 2 cores x 1 thread -> ``[1]``;
    4 cores x 2 threads (siblings 0/4, 1/5, 2/6, 3/7) -> ``[1, 2, 3, 5, 6, 7]``; a single
    core -> ``[]``. Raises what :func:`cpu_topology` raises.
    """
    cpus = cpu_topology(root)
    by_id = {cpu.id: cpu for cpu in cpus}
    reserved = set(by_id[0].siblings) if 0 in by_id else {0}
    pool: set[int] = set()
    for cpu in cpus:
        if cpu.id in reserved or reserved.intersection(cpu.siblings):
            continue
        pool.update(cpu.siblings)
    return sorted(pool)


@dataclass(frozen=True)
class HugepagePool:
    """One hugepage size the kernel offers (``/sys/kernel/mm/hugepages/hugepages-<N>kB``).

    ``size_kib``: page size in KiB (2048 for 2M, 1048576 for 1G); ``total``: pages reserved
    in the pool (``nr_hugepages``); ``free``: not yet faulted in (``free_hugepages``);
    ``reserved``: promised to mappings but not faulted (``resv_hugepages``); ``surplus``:
    overcommitted pages in use. Pages available to a new enclave = ``free - reserved``.
    """

    size_kib: int
    total: int
    free: int
    reserved: int
    surplus: int

    @property
    def label(self) -> str:
        """``"2M"``, ``"1G"``: the size as nitro-cli's allocator and QEMU spell it."""
        if self.size_kib % (1024 * 1024) == 0:
            return f"{self.size_kib // (1024 * 1024)}G"
        if self.size_kib % 1024 == 0:
            return f"{self.size_kib // 1024}M"
        return f"{self.size_kib}K"

    @property
    def available(self) -> int:
        """Pages a new mapping can still take: ``free - reserved`` (never negative)."""
        return max(0, self.free - self.reserved)

    @property
    def available_mib(self) -> int:
        """:attr:`available` in MiB."""
        return self.available * self.size_kib // 1024


def hugepages(root: str | os.PathLike[str] = "/") -> list[HugepagePool]:
    """The hugepage sizes the kernel offers, smallest first, with their pool counters.

    Source: ``<root>/sys/kernel/mm/hugepages/hugepages-<N>kB/{nr,free,resv,surplus}_hugepages``.
    Returns ``[]`` when the kernel has no hugetlb support; a counter that cannot be read is 0.
    """
    base = _path(root, "/sys/kernel/mm/hugepages")
    pools: list[HugepagePool] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not (name.startswith("hugepages-") and name.endswith("kB")):
            continue
        try:
            size = int(name[len("hugepages-") : -2])
        except ValueError:
            continue

        def counter(file: str) -> int:
            text = _read(entry / file)
            return int(text) if text and text.isdigit() else 0

        pools.append(
            HugepagePool(
                size_kib=size,
                total=counter("nr_hugepages"),
                free=counter("free_hugepages"),
                reserved=counter("resv_hugepages"),
                surplus=counter("surplus_hugepages"),
            )
        )
    return sorted(pools, key=lambda p: p.size_kib)


def _cpu_flags(root: str | os.PathLike[str]) -> tuple[set[str], str | None]:
    """The first ``flags`` line of /proc/cpuinfo as a set, and the CPU's model name."""
    text = _read(_path(root, "/proc/cpuinfo")) or ""
    flags: set[str] | None = None
    model: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
        if flags is not None and model is not None:
            break
    return flags or set(), model


@dataclass(frozen=True)
class DeviceNode:
    """A ``/dev`` node probed by opening it read-write.

    ``path``: where it was looked for; ``exists``; ``char_device``: whether it is a character
    device (a fake in tests may be a plain file); ``opens``: ``os.open(O_RDWR)`` succeeded;
    ``error``: the errno text when it did not (e.g. ``"Permission denied"``).
    """

    path: str
    exists: bool
    char_device: bool
    opens: bool
    error: str | None = None


def _probe_node(path: Path) -> tuple[DeviceNode, int | None]:
    """Open ``path`` O_RDWR; return the facts and the open fd (caller closes) or None."""
    try:
        st = path.stat()
    except OSError as err:
        return DeviceNode(str(path), False, False, False, os.strerror(err.errno or errno.ENOENT)), None
    is_char = stat.S_ISCHR(st.st_mode)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return DeviceNode(str(path), True, is_char, False, os.strerror(err.errno or errno.EIO)), None
    return DeviceNode(str(path), True, is_char, True), fd


@dataclass(frozen=True)
class KvmStatus:
    """What the host offers for KVM (docs/architecture.md#accelerator).

    ``device``: the ``/dev/kvm`` probe; ``api_version``: ``KVM_GET_API_VERSION`` (12) when the
    node is a real character device that answered, else ``None``; ``cpu_virt_flag``: ``"vmx"``
    (Intel VT-x) or ``"svm"`` (AMD-V) when /proc/cpuinfo lists it, else ``None``;
    ``hypervisor``: the ``hypervisor`` flag is set (this host is itself a guest);
    ``cpu_model``: /proc/cpuinfo's ``model name``; ``vendor``: ``"intel"``, ``"amd"`` or
    ``None`` (from ``vendor_id``), used to name the right ``modprobe``.
    """

    device: DeviceNode
    api_version: int | None
    cpu_virt_flag: str | None
    hypervisor: bool
    cpu_model: str | None
    vendor: str | None

    @property
    def usable(self) -> bool:
        """``/dev/kvm`` opens and the CPU exposes vmx/svm: worth a probe boot, not proof."""
        return self.device.opens and self.cpu_virt_flag is not None


def kvm_status(root: str | os.PathLike[str] = "/") -> KvmStatus:
    """Probe ``<root>/dev/kvm`` (open O_RDWR, then ``KVM_GET_API_VERSION`` if it is a char
    device) and read the CPU's virtualisation flag from ``<root>/proc/cpuinfo``.

    Never raises for a missing or unopenable node: the answer says what is missing.
    """
    node, fd = _probe_node(_path(root, "/dev/kvm"))
    api_version: int | None = None
    if fd is not None:
        try:
            if node.char_device:
                try:
                    api_version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
                except OSError:
                    api_version = None
        finally:
            os.close(fd)
    flags, model = _cpu_flags(root)
    virt = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    vendor_text = ""
    for line in (_read(_path(root, "/proc/cpuinfo")) or "").splitlines():
        if line.startswith("vendor_id"):
            vendor_text = line.partition(":")[2].strip()
            break
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor_text)
    return KvmStatus(
        device=node,
        api_version=api_version,
        cpu_virt_flag=virt,
        hypervisor="hypervisor" in flags,
        cpu_model=model,
        vendor=vendor,
    )


def vhost_vsock_status(root: str | os.PathLike[str] = "/") -> DeviceNode:
    """Probe ``<root>/dev/vhost-vsock`` (kernel vhost-vsock).

    Informational: the harness serves vsock itself over vhost-user (it must: kernel
    vhost-vsock cannot present the parent as CID 3, docs/architecture.md#vsock-on-the-host).
    """
    node, fd = _probe_node(_path(root, "/dev/vhost-vsock"))
    if fd is not None:
        os.close(fd)
    return node


def memory_kib(root: str | os.PathLike[str] = "/") -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` from ``<root>/proc/meminfo``, in KiB (0 if absent)."""
    out = {"MemTotal": 0, "MemAvailable": 0}
    for line in (_read(_path(root, "/proc/meminfo")) or "").splitlines():
        key, _, value = line.partition(":")
        if key in out:
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


@dataclass(frozen=True)
class HostFacts:
    """Everything the doctor and the enclave allocator read about the host, in one object.

    ``cpus``: :func:`cpu_topology`; ``enclave_pool``: :func:`default_enclave_pool`;
    ``hugepages``: :func:`hugepages`; ``kvm``: :func:`kvm_status`; ``vhost_vsock``:
    :func:`vhost_vsock_status`; ``memory_kib``: :func:`memory_kib`; ``root``: where it was read.
    """

    cpus: list[Cpu]
    enclave_pool: list[int]
    hugepages: list[HugepagePool]
    kvm: KvmStatus
    vhost_vsock: DeviceNode
    memory_kib: dict[str, int] = field(default_factory=dict)
    root: str = "/"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (dataclasses as dicts, hugepage labels included)."""
        data = asdict(self)
        data["cpus"] = [
            {**asdict(c), "siblings": list(c.siblings)} for c in self.cpus
        ]
        data["hugepages"] = [
            {**asdict(p), "label": p.label, "available": p.available} for p in self.hugepages
        ]
        data["enclave_pool_list"] = format_cpu_list(self.enclave_pool)
        return data


def host_facts(root: str | os.PathLike[str] = "/") -> HostFacts:
    """Collect :class:`HostFacts` under ``root``. Raises what :func:`cpu_topology` raises."""
    return HostFacts(
        cpus=cpu_topology(root),
        enclave_pool=default_enclave_pool(root),
        hugepages=hugepages(root),
        kvm=kvm_status(root),
        vhost_vsock=vhost_vsock_status(root),
        memory_kib=memory_kib(root),
        root=str(root),
    )
