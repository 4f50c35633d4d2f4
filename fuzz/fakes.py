"""Guest RAM, the guest's ring driver and a synchronous back end, for fuzzing devices without QEMU.

The fuzz targets for the virtqueue walker and the vsock device need what QEMU and the guest
kernel provide: guest RAM the back end maps (:class:`GuestRam`: memfd regions wrapped in the
harness's own :class:`~harness.vhost_user.memory.MemoryRegion`, with a hole between two of
them), split rings laid out in it (:class:`RingDriver`, the driver's side) and the loop the
device runs on (:class:`LoopBackend`: the back end's real :class:`~harness.vhost_user.loop.
EventLoop`, stepped on the calling thread). tests/helpers/vhost_user_frontend.py does the same
over a real vhost-user socket and a back end thread; fuzzing needs thousands of inputs a
second, so here everything happens in one thread and nothing waits.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from dataclasses import dataclass

from harness.vhost_user.loop import EventLoop
from harness.vhost_user.memory import MemoryRegion, MemoryTable
from harness.vhost_user.virtqueue import VirtQueue

DESC = struct.Struct("<QIHH")  # addr, len, flags, next (virtio 1.x 2.7.5)
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


@dataclass(frozen=True)
class RegionSpec:
    """One region of fake guest RAM: guest-physical base, size, QEMU-virtual base, mmap offset."""

    gpa: int
    size: int
    qva: int
    mmap_offset: int = 0


class GuestRam:
    """Guest RAM made of ``specs`` regions, each a memfd mapped as the back end maps QEMU's.

    :attr:`table` is the :class:`MemoryTable` a back end translates through; :meth:`write`
    and :meth:`read` work on guest-physical addresses (inside one region).
    """

    def __init__(self, specs: list[RegionSpec]):
        self.specs = specs
        regions = []
        for s in specs:
            fd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, s.size + s.mmap_offset)
                regions.append(MemoryRegion(fd, s.gpa, s.size, s.qva, s.mmap_offset))
            finally:
                os.close(fd)  # the mapping keeps the memory
        self.table = MemoryTable(regions)

    def _locate(self, gpa: int, n: int) -> tuple[MemoryRegion, int]:
        r, off = self.table.locate_gpa(gpa, n)
        return r, off

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``gpa`` (one region)."""
        if data:
            r, off = self._locate(gpa, len(data))
            r.mm[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa`` (one region)."""
        r, off = self._locate(gpa, n)
        return r.mm[off:off + n]

    def qva(self, gpa: int) -> int:
        """The QEMU-virtual address of guest-physical ``gpa``."""
        return self.table.gpa_to_qva(gpa)


class LoopBackend:
    """The part of :class:`~harness.vhost_user.backend.VhostUserBackend` a device and its
    queues use, on the calling thread: ``queues``, ``memory``, the loop's fd and timer API,
    ``note_refusal``. :meth:`step` runs one non-blocking turn of the real event loop and raises
    the first exception a callback raised (the real back end records it as the device's
    failure)."""

    def __init__(self, device, ram: GuestRam):
        self.device = device
        self.memory = ram.table
        self.ram = ram
        self.refusals: collections.deque[str] = collections.deque(maxlen=16)
        self.queues = [VirtQueue(self, i, device.queue_size) for i in range(device.num_queues)]
        self.errors: list[Exception] = []
        self._loop = loop = EventLoop(self.errors.append)
        self.call_soon, self.call_later = loop.call_soon, loop.call_later
        self.add_reader, self.remove_reader = loop.add_reader, loop.remove_reader
        self.add_writer, self.remove_writer = loop.add_writer, loop.remove_writer
        self._thread = threading.current_thread()  # run_on_loop calls run here, directly
        self.running = True

    def note_refusal(self, line: str) -> None:
        self.refusals.append(line)

    def start_queue(self, index: int, driver: "RingDriver", last_avail_idx: int = 0) -> VirtQueue:
        """Set queue ``index`` up over ``driver``'s ring as SET_VRING_NUM/BASE/ADDR/KICK do."""
        q = self.queues[index]
        q.num = driver.num
        q.last_avail_idx = last_avail_idx & 0xFFFF
        q.desc_addr, q.avail_addr, q.used_addr = (self.ram.qva(driver.desc), self.ram.qva(driver.avail),
                                                  self.ram.qva(driver.used))
        q.addr_set = True
        q._map(self.memory)
        q.used_idx = U16.unpack(self.ram.read(driver.used + 2, 2))[0]
        q.reset_ownership("fuzz: ring started")
        q.started = q.enabled = True
        return q

    def stop_queue(self, index: int) -> None:
        """Stop queue ``index`` as GET_VRING_BASE does (the driver reset its ring)."""
        q = self.queues[index]
        was = q.started
        q.started = q.enabled = False
        q.reset_ownership("fuzz: ring stopped")
        if was:
            self.device.on_queue_stop(index)

    def step(self, *, fire_timers: bool = False) -> None:
        """One turn of the loop: ready fds, queued callbacks, due timers (all timers with
        ``fire_timers``); raises the first exception a callback raised."""
        loop = self._loop
        if fire_timers:
            # Due now: a close that waits 8 s for the guest's RST ends at once. Sorted by
            # sequence number, the list is still a heap.
            loop._timers[:] = sorted((0.0, seq, t) for _, seq, t in loop._timers)
        loop.stopping = False
        loop.call_soon(lambda: setattr(loop, "stopping", True))
        loop.run()
        self.raise_errors()

    def raise_errors(self) -> None:
        """Raise (and forget) the first exception a loop callback raised."""
        if self.errors:
            err = self.errors[0]
            self.errors.clear()
            raise err

    def close(self) -> None:
        """Forget every handler and timer and close the loop's descriptors."""
        self.running = False
        self._loop.close()


class RingDriver:
    """The guest driver's side of one split ring of ``num`` entries in ``ram``: descriptor
    table at ``base``, avail and used rings after it, then ``num`` data slots of ``slot``
    bytes (descriptor ``i`` always uses slot ``i``)."""

    def __init__(self, ram: GuestRam, base: int, num: int, slot: int):
        self.ram, self.num, self.slot = ram, num, slot
        self.desc = base
        self.avail = base + 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) & ~3
        self.data = (self.used + 6 + 8 * num + 15) & ~15
        self.end = self.data + num * slot
        self.reset()

    def reset(self) -> None:
        """An empty ring: every descriptor free, indices zero."""
        self.ram.write(self.desc, bytes(self.data - self.desc))
        self.free = list(range(self.num - 1, -1, -1))
        self.avail_idx = 0
        self.last_used = 0
        self.lengths: dict[int, int] = {}

    def add(self, data: bytes | None, length: int) -> int | None:
        """Make one single-descriptor chain available: readable ``data`` (zero-padded to
        ``length``) or, with ``data`` None, ``length`` writable bytes. Returns the head, None
        when no descriptor is free. ``length`` is capped at the slot size."""
        if not self.free:
            return None
        i = self.free.pop()
        length = min(length, self.slot)
        gpa = self.data + i * self.slot
        if data is not None:
            self.ram.write(gpa, data[:length].ljust(length, b"\0"))
        self.ram.write(self.desc + 16 * i, DESC.pack(gpa, length, 0 if data is not None else F_WRITE, 0))
        self.lengths[i] = length
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.num), U16.pack(i))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, U16.pack(self.avail_idx))
        return i

    def collect(self) -> list[tuple[int, bytes]]:
        """The chains the device returned since the last call: ``(head, bytes it wrote)``;
        their descriptors are free again."""
        out = []
        used_idx = U16.unpack(self.ram.read(self.used + 2, 2))[0]
        while self.last_used != used_idx:
            head, n = USED_ELEM.unpack(self.ram.read(self.used + 4 + 8 * (self.last_used % self.num), 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            if head >= self.num or head not in self.lengths:
                raise AssertionError(f"the device returned head {head}, which the driver did not make available")
            length = self.lengths.pop(head)
            if n > length:
                raise AssertionError(f"the device wrote {n} bytes into a {length}-byte buffer (head {head})")
            out.append((head, self.ram.read(self.data + head * self.slot, min(n, length))))
            self.free.append(head)
        return out
