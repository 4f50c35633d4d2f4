"""The enclave's RAM, allocated by the harness on the enclave's own CPUs while the boot goes on.

docs/boot.md#guest-ram. On Nitro the hypervisor carves the enclave's memory out of the parent
before the enclave starts; the harness does the same with a memfd that QEMU maps as the guest's
RAM (``memory-backend-file`` on ``/proc/self/fd/N``, ``share=on`` so the vhost-user back ends
can map it too, ``prealloc=on`` so every page is mapped and locked before the guest runs).

Left to QEMU, allocating and zeroing 512 MiB page by page took about 0.3 s of every boot under
TCG, on QEMU's main thread, before the guest could start. Here a thread pinned to the enclave's
CPUs, idle until the vCPUs are resumed, allocates the whole file with one ``fallocate`` (0.12-0.16
s for 512 MiB) while the harness extracts the boot files, runs the preflight, starts the back
ends and QEMU: QEMU's preallocation of the same file, on the other CPUs, then mostly maps pages
that exist, and whichever of the two reaches a page first allocates it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from harness.errors import ErrorCode, NitroError

if TYPE_CHECKING:
    from harness.allocator import CpuAllocation

__all__ = ["GuestRam"]


class GuestRam:
    """A memfd of ``size_mib`` MiB, filled by a background thread pinned to ``cpus``.

    ``fd`` is valid from construction until :meth:`close`; pass it to QEMU with the same
    number (``pass_fds``), fill or no fill. :meth:`ready` waits for the fill and raises
    NitroError E27 when the host could not give the memory; :meth:`settled` only waits. :meth:`close` waits for the thread and closes the fd: call
    it on every path (it is idempotent); the memory is freed once QEMU has exited too.
    """

    def __init__(self, size_mib: int, cpus: tuple[int, ...]):
        self.size_mib = size_mib
        # Close-on-exec, or every process the harness starts would hold the enclave's memory;
        # QEMU gets it through pass_fds, which keeps the number.
        self.fd = os.memfd_create("nitro-enclave-ram", os.MFD_CLOEXEC)
        self._error: OSError | None = None
        #: ``time.monotonic()`` when the fill ended, for the boot timeline's ``guest_ram_ready``.
        self.filled_at: float | None = None
        try:
            os.ftruncate(self.fd, size_mib << 20)
            self._thread = threading.Thread(target=self._fill, args=(cpus,),
                                            name="enclave-ram-fill", daemon=True)
            self._thread.start()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @classmethod
    def unless_hugepages(cls, size_mib: int, hugepage_size_kib: int | None,
                         cpus: "CpuAllocation") -> "GuestRam | None":
        """The guest RAM of an enclave with ``cpus`` (filled on its vCPU CPUs), or None when it
        is to be hugepage-backed: QEMU allocates that itself (``hugetlb=on``)."""
        return None if hugepage_size_kib else cls(size_mib, tuple(cpus.vcpu_cpus))

    def _fill(self, cpus: tuple[int, ...]) -> None:
        try:
            if cpus:
                # Best effort: a host that refuses the CPU set still gets its memory filled.
                try:
                    os.sched_setaffinity(0, set(cpus))
                except OSError:
                    pass
            os.posix_fallocate(self.fd, 0, self.size_mib << 20)
            self.filled_at = time.monotonic()
        except OSError as err:  # ENOMEM / ENOSPC: the host has not that much memory to give
            self._error = err

    @property
    def qemu_path(self) -> str:
        """The path QEMU opens: the memfd under its own number in QEMU's process."""
        return f"/proc/self/fd/{self.fd}"

    def ready(self) -> int:
        """Wait for the fill and return the memfd; NitroError E27 when the host could not
        allocate it. When the fill ended is :attr:`filled_at` (docs/boot.md#boot-timeline)."""
        self._thread.join()
        if self._error is not None:
            raise NitroError(
                ErrorCode.InsufficientMemoryAvailable,
                f"cannot allocate the enclave's {self.size_mib} MiB of RAM on this host "
                f"({os.strerror(self._error.errno or 0)})",
            )
        return self.fd

    def settled(self) -> None:
        """Wait for the fill once QEMU's own preallocation of the same file has succeeded:
        then every page exists whatever the fill met, so nothing is raised."""
        self._thread.join()

    def close(self) -> None:
        """Wait for the fill thread and close the memfd (idempotent)."""
        if self.fd < 0:
            return
        self._thread.join()
        fd, self.fd = self.fd, -1
        os.close(fd)
