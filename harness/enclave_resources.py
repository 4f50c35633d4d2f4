"""What one enclave takes from the host: CPUs, memory, a CID, a slot and a state folder.

Taken under the registry's lock, so two enclaves starting at once (in this process or another)
never get the same CPU (strict mode), CID or slot, and the memory budget counts every running
enclave (docs/nitro-cli.md#validation-rules, docs/nitro-cli.md#cpu-pool). Released by
:func:`release` on every path of a terminate.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from harness import allocator, host
from harness.errors import ErrorCode, NitroError

if TYPE_CHECKING:
    from harness.enclave import EnclaveConfig
    from harness.registry import Registry

__all__ = ["Reservation", "reserve", "make_state_dir", "hugepage_size_kib", "release"]


@dataclass(frozen=True)
class Reservation:
    """The host resources of one enclave: ``cpus`` (:class:`harness.allocator.CpuAllocation`:
    vCPU host CPUs, CPU mode, the CPUs left for the harness), ``cid``, ``slot`` (the enclave's
    number in the runtime directory), ``state_dir`` (its sockets and boot files, not yet created)
    and ``alloc_cfg`` (the allocator file it was checked against)."""

    cpus: allocator.CpuAllocation
    cid: int
    slot: int
    state_dir: Path
    alloc_cfg: allocator.AllocatorConfig


@contextlib.contextmanager
def reserve(registry: "Registry", config: "EnclaveConfig", *, eif_size: int) -> Iterator[Reservation]:
    """Hold the registry's lock and yield the CPUs, CID and slot for ``config`` (``eif_size`` in
    bytes). The caller records the enclave (``registry.put``) inside the ``with`` block: once the
    lock is released, the record is what keeps other starts off these resources.

    Raises NitroError: E01/E02/E20/E21/E22 CPU rules, E26/E27 memory rules
    (docs/nitro-cli.md#validation-rules), E03 bad or busy CID, E03/E25 a malformed allocator file
    (docs/nitro-cli.md#cpu-pool). Nothing is taken when it raises.
    """
    alloc_cfg = allocator.load_config()
    all_cpus = [c.id for c in host.cpu_topology()]
    with registry.locked():
        records = registry.records()
        busy = {c for r in records if not r.shared_cpus for c in r.cpu_ids}
        cpus = allocator.allocate_cpus(
            cpu_count=config.cpu_count,
            cpu_ids=config.cpu_ids,
            pool=alloc_cfg.pool,
            busy=busy,
            mode=config.cpu_mode,
            all_cpus=all_cpus,
        )
        if alloc_cfg.memory_mib is not None:
            budget, used = alloc_cfg.memory_mib, sum(r.memory_mib for r in records)
        else:
            # MemAvailable already lacks the running enclaves' (preallocated) memory.
            budget, used = allocator.host_memory_budget_mib(), 0
        allocator.check_memory(config.memory_mib, eif_size=eif_size, budget_mib=budget, used_mib=used)
        cid = registry.allocate_cid(config.cid)
        slot = registry.allocate_slot()
        # Named by slot, not by enclave ID: Unix socket paths must stay under 108 bytes.
        state_dir = registry.root / f"enc{slot}"
        yield Reservation(cpus=cpus, cid=cid, slot=slot, state_dir=state_dir, alloc_cfg=alloc_cfg)


def make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` empty and private (0700), removing a crashed run's leftovers first.
    Raises OSError when it cannot."""
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(mode=0o700)


def hugepage_size_kib(memory_mib: int, hugepages: bool | None, alloc_cfg: allocator.AllocatorConfig) -> int | None:
    """The hugepage size in KiB that backs guest memory, or None for ordinary memory.

    Hugepages are used when the allocator file names ``hugepage_size`` and ``hugepages`` is not
    False (docs/nitro-cli.md#cpu-pool). Raises NitroError E27 when fewer pages of that size are
    free than ``memory_mib`` needs.
    """
    if hugepages is False or not alloc_cfg.hugepage_size:
        return None
    size_kib = allocator.HUGEPAGE_SIZES_KIB[alloc_cfg.hugepage_size]
    needed = math.ceil(memory_mib * 1024 / size_kib)
    free = sum(p.available for p in host.hugepages() if p.size_kib == size_kib)
    if free < needed:
        raise NitroError(
            ErrorCode.InsufficientMemoryAvailable,
            f"{alloc_cfg.source}: hugepage_size {alloc_cfg.hugepage_size}: {needed} pages "
            f"needed for {memory_mib} MiB, {free} free (reserve them in "
            f"/sys/kernel/mm/hugepages/hugepages-{size_kib}kB/nr_hugepages)",
        )
    return size_kib


def release(registry: "Registry", slot: int | None, state_dir: Path | None) -> None:
    """Remove the state folder (sockets, extracted kernel and initrd) and the registry record;
    either may be None (never taken). Idempotent. Raises only what the registry raises for a
    record it cannot remove (the state folder is removed regardless of errors)."""
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    if slot is not None:
        registry.remove(slot)
