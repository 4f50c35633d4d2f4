"""Split virtqueues in guest RAM (virtio 1.x section 2.7, which legacy virtio-mmio shares byte for
byte): :class:`VirtQueue` pops available descriptor chains and pushes used ones, and keeps the
ownership invariant of docs/vhost-user.md#used-ring-invariant.

The guest is untrusted (docs/vhost-user.md#bounds): a chain is walked over at most the queue
size's descriptors and never copied here; a malformed chain is refused (returned unused) and the
queue keeps serving.
"""

from __future__ import annotations

import collections
import os
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

from harness.vhost_user.chain_walk import RefusedChain, walk_chain
from harness.vhost_user.memory import MemoryTable
from harness.vhost_user.protocol import VhostUserError

if TYPE_CHECKING:
    from harness.vhost_user.backend import VhostUserBackend

# Split virtqueue layout (virtio 1.x 2.7).
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
# The ring's indices and used elements are read and written through memoryviews of native
# format "H" and "Q": CPython turns each item access into one load or store of that width.
# struct.pack_into is not usable here: it clears the field and then stores it a byte at a time,
# and a driver reading used->idx in between sees it go back (docs/vhost-user.md#single-stores).
# Virtio rings are little-endian, as is every host the harness runs on.
assert sys.byteorder == "little"
VRING_AVAIL_F_NO_INTERRUPT = 1


class ChainTooLarge(VhostUserError):
    """A device asked for a chain's readable bytes and the chain holds more than its limit
    (:meth:`DescriptorChain.read` with ``max_bytes``); nothing was copied."""


class DescriptorChain:
    """One buffer the driver made available: a head index and its readable/writable parts.

    ``readable`` and ``writable`` are lists of memoryviews into guest RAM (device-readable
    parts first, as virtio requires). ``read()`` copies the readable bytes out;
    ``write(data)`` fills writable parts in order and advances ``written``. The views are
    released by :meth:`VirtQueue.push` (or :meth:`release`); do not keep them afterwards.
    """

    __slots__ = ("head", "readable", "writable", "written", "readable_len", "writable_len",
                 "generation", "avail_index")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 generation: int = 0, avail_index: int | None = None):
        self.head = head
        self.avail_index = avail_index  # the avail ring index it was taken from
        self.generation = generation  # the ring session it was popped in (VirtQueue.generation)
        self.readable = readable
        self.writable = writable
        self.written = 0
        self.readable_len = sum(len(v) for v in readable)
        self.writable_len = sum(len(v) for v in writable)

    def read(self, max_bytes: int | None = None) -> bytes:
        """All device-readable bytes, concatenated.

        ``max_bytes``: the most the device takes (its own limit, docs/vhost-user.md#bounds);
        a chain with more readable bytes raises :class:`ChainTooLarge` before anything is
        copied (devices check ``readable_len`` first and refuse in their own terms)."""
        if max_bytes is not None and self.readable_len > max_bytes:
            raise ChainTooLarge(f"descriptor chain {self.head} holds {self.readable_len} "
                                f"readable bytes, more than the device's {max_bytes}")
        r = self.readable
        if len(r) == 1:
            return r[0].tobytes()
        return b"".join(r)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` to the writable parts; returns bytes written (short if full)."""
        pos = self.written
        n_total = 0
        data = memoryview(data)
        for v in self.writable:
            lv = len(v)
            if pos >= lv:
                pos -= lv
                continue
            n = min(lv - pos, len(data) - n_total)
            v[pos:pos + n] = data[n_total:n_total + n]
            n_total += n
            pos = 0
            if n_total == len(data):
                break
        self.written += n_total
        return n_total

    def release(self) -> None:
        """Release the memoryviews (idempotent)."""
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable = []
        self.writable = []


class VirtQueue:
    """A split virtqueue in guest RAM, driven by the back end's loop thread.

    State comes from SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE. ``pop()`` returns the next
    available :class:`DescriptorChain` or None; ``push(chain, length)`` puts it on the used
    ring; ``notify()`` signals the call eventfd (unless the driver set NO_INTERRUPT).
    Malformed rings (descriptor loops, bad indirect tables, addresses outside RAM) raise
    VhostUserError (virtio 1.x 2.7.5.3).

    Ownership invariant (docs/vhost-user.md#used-ring-invariant): between ``pop`` and ``push`` a
    head belongs to the device, and only the chain object that popped it may return it, once.
    The queue records which chain holds each head; ``push`` of a chain that does not hold its
    head (a double return, a stale chain, a chain of another queue) raises VhostUserError
    naming the queue, the head and the last operations, instead of writing an id the driver
    would reject ("id N is not a head") or, worse, accept for the wrong buffer. A chain popped
    before the ring was stopped or re-based belongs to an older ``generation`` and is dropped
    silently on push: the driver reset that ring and forgot the buffer.
    """

    #: Operations remembered per queue for the error message of a broken invariant.
    HISTORY = 16

    def __init__(self, backend: "VhostUserBackend", index: int, max_size: int):
        self.backend = backend
        self.index = index
        self.max_size = max_size
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0  # QEMU virtual addresses
        self.addr_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False  # kick received after the ring address
        self.enabled = False
        self._desc = self._avail = self._used = None  # (mmap, offset)
        # Single-access views (see _map): avail flags, idx, ring[n]; used flags, idx; used ring.
        self._avail_words: memoryview | None = None
        self._used_words: memoryview | None = None
        self._used_elems: memoryview | None = None
        self.pending_push = 0  # used entries since the last notify
        self.generation = 0  # bumped whenever the ring is stopped or re-based
        self._holders: list[DescriptorChain | None] = []  # head -> the chain that holds it
        self.outstanding = 0  # heads popped and not yet pushed
        self.refused = 0  # malformed chains returned unused (docs/vhost-user.md#bounds)
        self.history: collections.deque[tuple] = collections.deque(maxlen=self.HISTORY)
        # A long journal of every pop and push, for debugging a driver that rejects our
        # used entries (NITRO_HARNESS_VRING_JOURNAL=N keeps the last N operations per queue).
        depth = int(os.environ.get("NITRO_HARNESS_VRING_JOURNAL", "0") or 0)
        self.journal: collections.deque[tuple] | None = (
            collections.deque(maxlen=depth) if depth > 0 else None)

    @property
    def name(self) -> str:
        """The queue's name for messages: its index and the device's name for it (``0 (rx)``)."""
        names = getattr(self.backend.device, "queue_names", ())
        return f"{self.index} ({names[self.index]})" if self.index < len(names) else str(self.index)

    def reset_ownership(self, why: str) -> None:
        """Forget every held head: the ring was stopped, re-based or re-sized (loop thread).

        Chains popped before keep their old generation and are dropped by :meth:`push`."""
        self.generation += 1
        self._holders = [None] * self.num if self.num else []
        self.outstanding = 0
        self.history.append(("reset", why, self.last_avail_idx, self.used_idx))

    def snapshot(self) -> dict:
        """The ring as the device sees it now (for debugging journals): indices, and every avail
        and used slot. Empty when the ring is not mapped."""
        if self._avail is None or self._used is None or not self.num:
            return {}
        amm, ao = self._avail
        umm, uo = self._used
        n = self.num
        return {
            "avail_idx": _U16.unpack_from(amm, ao + 2)[0],
            "used_idx": _U16.unpack_from(umm, uo + 2)[0],
            "last_avail_idx": self.last_avail_idx,
            "device_used_idx": self.used_idx,
            "avail": [_U16.unpack_from(amm, ao + 4 + 2 * i)[0] for i in range(n)],
            "used": [list(_USED_ELEM.unpack_from(umm, uo + 4 + 8 * i)) for i in range(n)],
        }

    def _check_thread(self, op: str) -> None:
        # Rings belong to the back end's loop thread (docs/vhost-user.md#used-ring-invariant);
        # a device touching one from another thread races the loop on the same indices.
        t = getattr(self.backend, "_thread", None)
        if t is not None and t.ident != threading.get_ident() and t.is_alive():
            raise VhostUserError(
                f"queue {self.name}: {op} from thread {threading.current_thread().name!r}, not "
                f"the back end's loop thread {t.name!r}")

    def _history_text(self) -> str:
        return "; ".join(" ".join(str(x) for x in op) for op in self.history)

    @property
    def ready(self) -> bool:
        """True when the ring is started and enabled: the device may pop and push."""
        return self.started and self.enabled and self._desc is not None

    def _map(self, table: MemoryTable | None) -> None:
        """Resolve ring addresses against the memory table (called on ADDR and MEM_TABLE)."""
        self.unmap()
        if not self.addr_set or table is None or self.num == 0:
            return
        n = self.num
        r, o = table.locate_qva(self.desc_addr, 16 * n)
        self._desc = (r.mm, o)
        r, o = table.locate_qva(self.avail_addr, 6 + 2 * n)
        self._avail = (r.mm, o)
        self._avail_words = r.view[o:o + 4 + 2 * n].cast("H")
        r, o = table.locate_qva(self.used_addr, 6 + 8 * n)
        self._used = (r.mm, o)
        self._used_words = r.view[o:o + 4].cast("H")
        self._used_elems = r.view[o + 4:o + 4 + 8 * n].cast("Q")

    def unmap(self) -> None:
        """Forget the ring's place in guest RAM and release the views into it (so the memory
        table can be unmapped)."""
        for view in (self._avail_words, self._used_words, self._used_elems):
            if view is not None:
                view.release()
        self._avail_words = self._used_words = self._used_elems = None
        self._desc = self._avail = self._used = None

    def avail_idx(self) -> int:
        """The driver's avail->idx (u16), read with one load."""
        return self._avail_words[1]

    def device_used_idx_in_ring(self) -> int:
        """used->idx as it is in guest RAM now (u16, one load)."""
        return self._used_words[1]

    def has_available(self) -> bool:
        """True if the driver has made buffers available that were not popped yet."""
        return self.ready and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """Take the next available descriptor chain, or None if the ring is empty/not ready.

        Direct and indirect descriptors are followed; device-readable parts must precede
        writable ones. A malformed chain (docs/vhost-user.md#bounds: a loop, more descriptors
        than the queue size, a bad or nested indirect table, a readable part after a writable
        one, an address outside guest RAM) is refused: returned to the driver unused (length
        0), counted in ``refused`` and named in the back end's ``refusals``; the next chain is
        taken. A broken ring (an avail index or head the device cannot trust) raises
        VhostUserError.
        """
        while True:
            if not self.ready:
                return None
            words = self._avail_words
            idx = words[1]
            last = self.last_avail_idx
            if idx == last:
                return None
            n = self.num
            if (idx - last) & 0xFFFF > n:
                raise VhostUserError(
                    f"queue {self.index}: avail idx {idx} is {(idx - last) & 0xFFFF} ahead of "
                    f"{last}, more than the ring size {n}")
            head = words[2 + last % n]
            self.last_avail_idx = (last + 1) & 0xFFFF
            if head >= n:
                raise VhostUserError(f"queue {self.index}: head descriptor {head} >= ring size {n}")
            if len(self._holders) != n:
                self._holders = [None] * n
            if self._holders[head] is not None:
                raise VhostUserError(
                    f"queue {self.name}: the driver made head {head} available at avail index "
                    f"{last} while the device still holds it (last operations: "
                    f"{self._history_text()})")
            try:
                readable, writable = walk_chain(self.backend.memory, self._desc, self.num, head)
            except RefusedChain as e:
                self._refuse(head, last, str(e))
                continue
            self._check_thread("pop")
            chain = DescriptorChain(head, readable, writable, self.generation, last)
            self._holders[head] = chain
            self.outstanding += 1
            if self.journal is not None:
                self.journal.append(("pop", time.monotonic(), head, last, last % n, idx,
                                     chain.readable_len, chain.writable_len,
                                     threading.get_ident()))
            self.history.append(("pop", head, last, sys._getframe(1).f_code.co_name))
            return chain

    def _refuse(self, head: int, avail_index: int, why: str) -> None:
        """Return the malformed chain at ``head`` unused (length 0) and record why.

        QEMU marks the whole device broken on such a chain (virtio_error) and Linux's vhost
        leaves the queue stuck on it; the harness only refuses the chain, so a misbehaving
        guest driver loses that buffer, not its device (docs/vhost-user.md#bounds)."""
        self.refused += 1
        note = getattr(self.backend, "note_refusal", None)
        if note is not None:
            note(f"queue {self.name}: {why}; chain refused")
        chain = DescriptorChain(head, [], [], self.generation, avail_index)
        self._holders[head] = chain
        self.outstanding += 1
        self.history.append(("refuse", head, avail_index))
        self.push(chain, 0)
        self.notify()

    def push(self, chain: DescriptorChain, length: int | None = None) -> None:
        """Return ``chain`` to the driver with ``length`` bytes written (default: chain.written).

        Releases the chain's views. The driver is not signalled until :meth:`notify`.
        """
        if length is None:
            length = chain.written
        chain.release()
        if self._used is None or chain.generation != self.generation:
            # The ring was stopped (or re-based) since the pop: the driver forgot the buffer.
            self.history.append(("drop-stale", chain.head, chain.generation))
            return
        head = chain.head
        holders = self._holders
        if head >= len(holders) or holders[head] is not chain:
            why = ("returned already" if head < len(holders) and holders[head] is None
                   else "held by another chain")
            raise VhostUserError(
                f"queue {self.name}: {sys._getframe(1).f_code.co_name} returned head {head}, "
                f"which the device does not hold ({why}; last operations: "
                f"{self._history_text()})")
        self._check_thread("push")
        used_words = self._used_words
        u = self.used_idx
        ring_idx = used_words[1]
        if ring_idx != u:
            # Only the device writes the used ring: a different index means another writer.
            raise VhostUserError(
                f"queue {self.name}: the used ring's index reads {ring_idx}, but the device last "
                f"wrote {u}: something else writes this ring (last operations: "
                f"{self._history_text()})")
        if chain.avail_index is not None and self._avail_words is not None:
            # While the device holds a head the driver cannot reuse its avail slot (that needs
            # every descriptor free), so the slot still names it; if not, the pop read a stale
            # entry and this return would hand the driver a head it does not expect.
            now = self._avail_words[2 + chain.avail_index % self.num]
            if now != head:
                raise VhostUserError(
                    f"queue {self.name}: head {head} was taken from avail index "
                    f"{chain.avail_index}, whose slot now reads {now}: the driver rewrote a slot "
                    f"the device still holds, or the pop read a stale entry (last operations: "
                    f"{self._history_text()})")
        holders[head] = None
        self.outstanding -= 1
        self.history.append(("push", head, u, length, sys._getframe(1).f_code.co_name))
        if self.journal is not None:
            self.journal.append(("push", time.monotonic(), head, u, u % self.num, length,
                                 threading.get_ident()))
        # One 8-byte store of {id, len}, then one 2-byte store of the index: x86 (and the guest)
        # see stores in order, so the element is visible before the index that publishes it.
        self._used_elems[u % self.num] = chain.head | (length << 32)
        u = (u + 1) & 0xFFFF
        used_words[1] = u
        self.used_idx = u
        self.pending_push += 1

    def notify(self, force: bool = False) -> None:
        """Signal the driver (write 1 to the call eventfd) if anything was pushed since the
        last notify (or ``force``) and the driver did not set VRING_AVAIL_F_NO_INTERRUPT."""
        if not (self.pending_push or force) or self.call_fd is None or self._avail_words is None:
            return
        self.pending_push = 0
        if self._avail_words[0] & VRING_AVAIL_F_NO_INTERRUPT and not force:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the driver is signalled already
