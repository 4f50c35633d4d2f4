"""Walking one descriptor chain of a split virtqueue (virtio 1.x 2.7.5) in untrusted guest RAM.

The guest writes the descriptor table, so every step is bounded (docs/vhost-user.md#bounds):
:func:`walk_chain` returns views into guest RAM, never copies, and raises :class:`RefusedChain`
for a chain the device must refuse; :class:`~harness.vhost_user.virtqueue.VirtQueue` returns such
a chain unused and keeps serving.
"""

from __future__ import annotations

import struct

from harness.vhost_user.memory import MemoryTable
from harness.vhost_user.protocol import VhostUserError

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4


class RefusedChain(Exception):
    """A malformed descriptor chain: why, in words (the device refuses the chain, not the queue)."""


def walk_chain(table: MemoryTable, desc: tuple, num: int, head: int
               ) -> tuple[list[memoryview], list[memoryview]]:
    """The readable and writable views of the chain at ``head`` of a split ring of ``num``
    entries whose descriptor table is at ``desc`` (an (mmap, offset) pair in ``table``'s guest
    RAM); raises :class:`RefusedChain` naming what is malformed.

    Bounds (docs/vhost-user.md#bounds), QEMU's virtqueue_split_pop: at most the queue size's
    descriptors in the ring ("Looped descriptor": max = vring num), an indirect table a
    non-zero multiple of 16 bytes ("Invalid size for indirect buffer table") of at most the
    queue size's entries (virtio 1.x 2.7.5.3.1: no chain longer than the queue size),
    walked over at most its own entries, and no indirect table inside one (Linux vhost:
    "Nested indirect descriptor"). Views only: nothing is copied, whatever the lengths."""
    dmm, do = desc
    n = num
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    i = head
    count = 0
    limit = n
    indirect = False
    try:
        while True:
            count += 1
            if count > limit:
                raise RefusedChain(f"descriptor chain from head {head} loops (more than {limit} "
                                   f"descriptors{' in its indirect table' if indirect else ''})")
            addr, length, flags, nxt = _DESC.unpack_from(dmm, do + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise RefusedChain(f"nested indirect descriptor in the chain from head {head}")
                if length == 0 or length % 16:
                    raise RefusedChain(f"indirect table length {length} of the chain from head "
                                       f"{head} is not a non-zero multiple of 16")
                if length // 16 > n:
                    raise RefusedChain(f"indirect table of {length // 16} entries in the chain "
                                       f"from head {head} is longer than the queue size {n}")
                try:
                    r, o = table.locate_gpa(addr, length)
                except VhostUserError as e:
                    raise RefusedChain(f"indirect table of the chain from head {head}: "
                                       f"{e.message}") from None
                dmm, do = r.mm, o
                limit = length // 16
                indirect = True
                i = 0
                count = 0
                continue
            if length:
                try:
                    views = table.views(addr, length)
                except VhostUserError as e:
                    raise RefusedChain(f"chain from head {head}: {e.message}") from None
                if flags & VRING_DESC_F_WRITE:
                    writable.extend(views)
                elif writable:
                    for v in views:
                        v.release()
                    raise RefusedChain(f"readable descriptor after a writable one in the chain "
                                       f"from head {head}")
                else:
                    readable.extend(views)
            if not flags & VRING_DESC_F_NEXT:
                return readable, writable
            i = nxt
            if i >= limit:
                raise RefusedChain(f"next descriptor {i} of the chain from head {head} out of "
                                   f"range (table of {limit})")
    except RefusedChain:
        for v in readable:
            v.release()
        for v in writable:
            v.release()
        raise
