"""Guest RAM as a vhost-user back end sees it: the regions QEMU passed in SET_MEM_TABLE.

docs/vhost-user.md#memory-table: each region is a memfd mapped shared; descriptor addresses are
guest-physical, ring addresses (SET_VRING_ADDR) QEMU-virtual, and both translate through the
table to an offset in one region's mapping.
"""

from __future__ import annotations

import mmap

from harness.vhost_user.protocol import VhostUserError


class MemoryRegion:
    """One region of guest RAM mapped from the fd QEMU passed in SET_MEM_TABLE.

    ``guest_phys_addr``, ``size``, ``userspace_addr`` (QEMU's virtual address), ``mmap_offset``
    are as sent (bytes). docs/vhost-user.md#memory-table: the fd is mapped with length
    ``size + mmap_offset`` and the region starts ``mmap_offset`` bytes into the mapping.
    """

    __slots__ = ("guest_phys_addr", "size", "userspace_addr", "mmap_offset", "mm", "view")

    def __init__(self, fd: int, guest_phys_addr: int, size: int, userspace_addr: int,
                 mmap_offset: int):
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.userspace_addr = userspace_addr
        self.mmap_offset = mmap_offset
        self.mm = mmap.mmap(fd, size + mmap_offset, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)

    def close(self) -> bool:
        """Unmap; returns False if a device still holds a view into it (unmapped later)."""
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            return False
        return True


class MemoryTable:
    """Guest RAM as the back end sees it: a list of :class:`MemoryRegion`.

    Translates guest-physical addresses (descriptor ``addr`` fields) and QEMU-virtual addresses
    (SET_VRING_ADDR) to (region, offset-into-mapping) and back
    (docs/vhost-user.md#memory-table).
    """

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = regions

    def _find_gpa(self, gpa: int) -> MemoryRegion:
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size:
                return r
        raise VhostUserError(f"guest physical address {gpa:#x} is outside every memory region")

    def _find_qva(self, qva: int) -> MemoryRegion:
        for r in self.regions:
            if r.userspace_addr <= qva < r.userspace_addr + r.size:
                return r
        raise VhostUserError(f"QEMU virtual address {qva:#x} is outside every memory region")

    def gpa_to_qva(self, gpa: int) -> int:
        """Guest physical -> QEMU virtual address; raises VhostUserError if unmapped."""
        r = self._find_gpa(gpa)
        return r.userspace_addr + (gpa - r.guest_phys_addr)

    def qva_to_gpa(self, qva: int) -> int:
        """QEMU virtual -> guest physical address; raises VhostUserError if unmapped."""
        r = self._find_qva(qva)
        return r.guest_phys_addr + (qva - r.userspace_addr)

    def locate_qva(self, qva: int, length: int) -> tuple[MemoryRegion, int]:
        """(region, offset in its mapping) for ``length`` bytes at QEMU address ``qva``.

        Rings must lie inside one region; raises VhostUserError otherwise.
        """
        r = self._find_qva(qva)
        off = qva - r.userspace_addr
        if off + length > r.size:
            raise VhostUserError(f"ring at QEMU address {qva:#x} (+{length}) crosses its region")
        return r, off + r.mmap_offset

    def locate_gpa(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """(region, offset in its mapping) for ``length`` bytes at guest address ``gpa``."""
        r = self._find_gpa(gpa)
        off = gpa - r.guest_phys_addr
        if off + length > r.size:
            raise VhostUserError(f"guest buffer at {gpa:#x} (+{length}) crosses its region")
        return r, off + r.mmap_offset

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Memoryviews covering ``length`` bytes at guest address ``gpa``.

        A buffer spanning adjacent regions yields one view per region; a hole raises
        VhostUserError.
        """
        out = []
        regions = self.regions
        while length > 0:
            for r in regions:
                if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size:
                    break
            else:
                raise VhostUserError(f"guest buffer at {gpa:#x} is outside every memory region")
            off = gpa - r.guest_phys_addr
            n = min(length, r.size - off)
            start = off + r.mmap_offset
            out.append(r.view[start:start + n])
            gpa += n
            length -= n
        return out

    def close(self) -> list[MemoryRegion]:
        """Unmap every region; returns those still pinned by live views."""
        return [r for r in self.regions if not r.close()]

