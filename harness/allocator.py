"""The enclave CPU pool and memory budget, with nitro-cli's rules and error codes.

Nitro reserves whole host cores and hugepage memory for enclaves through
``/etc/nitro_enclaves/allocator.yaml`` (keys ``memory_mib`` and exactly one of ``cpu_count`` or
``cpu_pool``). The harness reads the same file (``NITRO_HARNESS_ALLOCATOR_CONFIG`` overrides the
path); without one, the pool is every whole core except CPU 0's and the memory budget is what
the host has available.

CPU modes (a harness extension; nitro-cli has only the strict one, docs/nitro-cli.md#cpu-pool):

- ``strict``: as Nitro. Enclave vCPUs get dedicated pool CPUs; too many is E22.
- ``shared``: when the pool is smaller than the request (2-core CI runners have a pool of one
  CPU), vCPUs are placed round-robin on the pool's CPUs with overcommit so tests still run. The
  mode is reported by describe-enclaves (``CPUMode``) and logged.
- ``auto`` (default): strict when the request fits, else shared.

Optional harness key ``hugepage_size`` (``2M`` or ``1G``) asks for hugepage-backed guest memory;
it is used when enough pages of that size are reserved and free (docs/nitro-cli.md#cpu-pool: Nitro
always uses hugepages; here the choice is explicit because CI hosts reserve none).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.errors import ErrorCode, NitroError

DEFAULT_CONFIG = Path("/etc/nitro_enclaves/allocator.yaml")
MIN_MEMORY_MIB = 64
CPU_MODES = ("auto", "strict", "shared")
HUGEPAGE_SIZES_KIB = {"2M": 2048, "1G": 1048576}


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator file's content: ``memory_mib`` budget and the CPU ``pool`` it yields."""

    memory_mib: int | None
    pool: tuple[int, ...]
    source: str
    hugepage_size: str | None = None


@dataclass(frozen=True)
class CpuAllocation:
    """CPUs given to one enclave.

    ``vcpu_cpus[i]`` is the host CPU vCPU ``i`` is pinned to; ``cpu_ids`` the sorted distinct
    host CPUs; ``mode`` is ``"strict"`` or ``"shared"``; ``others`` the host CPUs everything else
    (QEMU's non-vCPU threads, the harness) is kept on.
    """

    vcpu_cpus: tuple[int, ...]
    mode: str
    others: tuple[int, ...]

    @property
    def cpu_ids(self) -> list[int]:
        return sorted(set(self.vcpu_cpus))


def load_config(path: Path | None = None, *, sysroot: str = "/") -> AllocatorConfig:
    """Read the allocator file (see module doc) and resolve its CPU pool.

    Raises NitroError E03 naming the file and key for a malformed file, both or neither of
    ``cpu_count``/``cpu_pool``, a pool containing CPU 0's core, or a count larger than the host
    can give.
    """
    from harness import host

    default_pool = host.default_enclave_pool(sysroot)
    env = os.environ.get("NITRO_HARNESS_ALLOCATOR_CONFIG")
    path = Path(env) if env else (path or DEFAULT_CONFIG)
    if not path.exists():
        return AllocatorConfig(memory_mib=None, pool=tuple(default_pool), source="default")
    src = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise NitroError(ErrorCode.InvalidArgument, f"{src}: not readable YAML: {err}") from None
    if not isinstance(data, dict):
        raise NitroError(ErrorCode.InvalidArgument, f"{src}: must be a mapping of keys")
    unknown = set(data) - {"memory_mib", "cpu_count", "cpu_pool", "hugepage_size"}
    if unknown:
        raise NitroError(ErrorCode.InvalidArgument, f"{src}: unknown key {sorted(unknown)[0]!r}")
    memory = data.get("memory_mib")
    if memory is not None and (not isinstance(memory, int) or memory <= 0):
        raise NitroError(ErrorCode.InvalidArgument, f"{src}: memory_mib: must be a positive integer")
    has_count, has_pool = "cpu_count" in data, "cpu_pool" in data
    if has_count == has_pool:
        raise NitroError(
            ErrorCode.InvalidArgument, f"{src}: exactly one of cpu_count or cpu_pool must be set"
        )
    if has_pool:
        pool = host.parse_cpu_list(str(data["cpu_pool"]), source=f"{src}: cpu_pool")
        forbidden = sorted(set(pool) - set(default_pool))
        if forbidden:
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"{src}: cpu_pool: CPU {forbidden[0]} is CPU 0's core, offline, or not a whole "
                "core in the pool",
            )
    else:
        count = data["cpu_count"]
        if not isinstance(count, int) or count <= 0 or count > len(default_pool):
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"{src}: cpu_count: must be 1..{len(default_pool)} (the CPUs outside CPU 0's core)",
            )
        pool = default_pool[:count]
    size = data.get("hugepage_size")
    if size is not None and size not in HUGEPAGE_SIZES_KIB:
        raise NitroError(ErrorCode.NoSuchHugepageFlag, f"{src}: hugepage_size: must be 2M or 1G")
    return AllocatorConfig(memory_mib=memory, pool=tuple(pool), source=src, hugepage_size=size)


def allocate_cpus(
    *,
    cpu_count: int | None,
    cpu_ids: list[int] | None,
    pool: tuple[int, ...],
    busy: set[int],
    mode: str = "auto",
    all_cpus: list[int] | None = None,
) -> CpuAllocation:
    """Choose host CPUs for an enclave's vCPUs.

    docs/nitro-cli.md#validation-rules: both or neither of ``cpu_count``/``cpu_ids`` is E02/E01; a
    CPU id given twice is E20; a CPU outside the pool (CPU 0's core included) is E21; more CPUs
    than the pool has free is E22 in strict mode. ``busy`` are CPUs dedicated to other running
    strict-mode enclaves.
    """
    if mode not in CPU_MODES:
        raise NitroError(ErrorCode.InvalidArgument, f"--cpu-mode {mode}: must be one of {CPU_MODES}")
    if cpu_count is not None and cpu_ids:
        raise NitroError(ErrorCode.ConflictingArgument, "both --cpu-count and --cpu-ids were given")
    if cpu_count is None and not cpu_ids:
        raise NitroError(ErrorCode.MissingArgument, "one of --cpu-count or --cpu-ids is required")
    others = tuple(c for c in (all_cpus or []) if c not in pool) or (0,)
    if cpu_ids:
        seen: set[int] = set()
        dupes = sorted({c for c in cpu_ids if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
        if dupes:
            raise NitroError(
                ErrorCode.InvalidCpuConfiguration,
                f"--cpu-ids contains CPU(s) {','.join(map(str, dupes))} more than once",
            )
        for cpu in cpu_ids:
            if cpu not in pool:
                raise NitroError(
                    ErrorCode.NoSuchCpuAvailableInPool,
                    f"--cpu-ids contains CPU {cpu}, which is not in the enclave CPU pool "
                    f"{list(pool)} (CPU 0's core is never given to enclaves)",
                )
        taken = sorted(set(cpu_ids) & busy)
        if taken and mode == "strict":
            raise NitroError(
                ErrorCode.NoSuchCpuAvailableInPool,
                f"--cpu-ids contains CPU {taken[0]}, which another enclave is using",
            )
        return CpuAllocation(tuple(cpu_ids), "shared" if taken else "strict", others)
    assert cpu_count is not None
    if cpu_count <= 0:
        raise NitroError(ErrorCode.InvalidArgument, f"--cpu-count {cpu_count}: must be at least 1")
    free = [c for c in pool if c not in busy]
    if cpu_count <= len(free) and mode != "shared":
        return CpuAllocation(tuple(free[:cpu_count]), "strict", others)
    if mode == "strict" or not pool:
        raise NitroError(
            ErrorCode.InsufficientCpus,
            f"--cpu-count is {cpu_count}, which is more than the {len(free)} free CPU(s) of the "
            f"enclave pool {list(pool)} (strict CPU mode)",
        )
    # Shared mode: overcommit onto the pool's CPUs, least busy first.
    order = free + [c for c in pool if c in busy]
    return CpuAllocation(tuple(order[i % len(order)] for i in range(cpu_count)), "shared", others)


def check_memory(
    memory_mib: int, *, eif_size: int, budget_mib: int | None, used_mib: int
) -> None:
    """Apply nitro-cli's memory rules.

    docs/nitro-cli.md#validation-rules: below 64 MiB is rejected (E26), memory under 4 x the EIF
    size is E26 (the minimum is reported in MiB, rounded up), and more than the allocator budget
    left is E27.
    """
    minimum = max(MIN_MEMORY_MIB, math.ceil(4 * eif_size / (1 << 20)))
    if memory_mib < minimum:
        raise NitroError(
            ErrorCode.InsufficientMemoryRequested,
            f"--memory is {memory_mib} MiB, but based on the EIF file size ({eif_size} bytes) "
            f"the minimum is {minimum} MiB",
        )
    if budget_mib is not None and memory_mib + used_mib > budget_mib:
        raise NitroError(
            ErrorCode.InsufficientMemoryAvailable,
            f"--memory is {memory_mib} MiB, but only {budget_mib - used_mib} MiB of the enclave "
            f"memory budget ({budget_mib} MiB) is free",
        )


def host_memory_budget_mib(meminfo: str = "/proc/meminfo") -> int:
    """Memory an enclave may take when no allocator file sets ``memory_mib``: MemAvailable - 512 MiB."""
    with open(meminfo) as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return max(0, int(line.split()[1]) // 1024 - 512)
    return 0


def parse_memory(text: str) -> int:
    """Parse ``--memory`` into MiB: a number of MiB or with suffix M, G or T
    (docs/nitro-cli.md#run-enclave).

    Raises NitroError E03 for anything else.
    """
    value = str(text).strip()
    scale = {"M": 1, "G": 1024, "T": 1024 * 1024}
    factor = 1
    if value[-1:].upper() in scale:
        factor = scale[value[-1].upper()]
        value = value[:-1]
    try:
        number = int(value)
    except ValueError:
        raise NitroError(
            ErrorCode.InvalidArgument, f"--memory {text!r}: not an integer number of MiB (suffix M, G or T)"
        ) from None
    if number <= 0:
        raise NitroError(ErrorCode.InsufficientMemoryRequested, f"--memory {text}: must be greater than 0")
    return number * factor
