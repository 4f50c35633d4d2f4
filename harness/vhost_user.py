"""A vhost-user back end in Python: QEMU is the front end, the harness serves the device.

docs/vhost-user.md is the contract. QEMU connects to a Unix socket the back end listens on
(``-chardev socket,id=X,path=...``), negotiates features, hands over guest RAM as memfd regions
(SCM_RIGHTS) and one kick and one call eventfd per virtqueue. The back end maps the regions,
walks split virtqueues in that shared memory and lets a :class:`VirtioDevice` model consume and
produce buffers. Everything runs on one event-loop thread per back end (``selectors``/epoll over
the vhost-user socket, the kick eventfds and any fds the device registers), so device models
need no locks for their own state.

Public pieces:

- :class:`VirtioDevice`: the device-model interface (vsock, NSM).
- :class:`VhostUserBackend`: socket, protocol, memory table, virtqueues, event loop.
- :class:`MemoryTable`: guest-physical and QEMU-virtual address translation.
- :class:`VirtQueue` / :class:`DescriptorChain`: split-ring access (virtio 1.x section 2.7,
  which legacy virtio-mmio shares byte for byte).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import mmap
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable

from harness.errors import ErrorCode, NitroError

__all__ = [
    "VirtioDevice",
    "VhostUserBackend",
    "VhostUserError",
    "MemoryTable",
    "MemoryRegion",
    "VirtQueue",
    "DescriptorChain",
    "Request",
    "ProtocolFeature",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_INDIRECT_DESC",
]

# --- protocol constants (vhost-user spec, "Front-end message types") -------------------------


class Request:
    """vhost-user front-end request codes (u32 ``request`` field)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


REQUEST_NAMES: dict[int, str] = {
    v: k for k, v in vars(Request).items() if isinstance(v, int) and not k.startswith("_")
}
_MAX_REQUEST = max(REQUEST_NAMES)


class ProtocolFeature:
    """vhost-user protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28

_VERSION = 0x1
_FLAG_REPLY = 0x4
_FLAG_NEED_REPLY = 0x8
_VRING_IDX_MASK = 0xFF
_VRING_NOFD_MASK = 0x100  # SET_VRING_KICK/CALL/ERR: no fd attached, poll instead
_MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
_MAX_PAYLOAD = 0x10000  # far above any message QEMU sends; bigger means a broken stream
_MAX_FDS = 8

# Requests that carry their own reply; REPLY_ACK never adds a second one to these.
_HAS_REPLY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
}

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_CONFIG_HDR = struct.Struct("<III")  # offset, size, flags

# Split virtqueue layout (virtio 1.x 2.7).
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1


class VhostUserError(NitroError):
    """A vhost-user protocol or virtqueue rule was broken (by QEMU, the guest or a device).

    Always carries ErrorCode.UnspecifiedError; the enclave layer decides which E-code the user
    sees (usually E36 when it ends a boot). The message is one line naming the rule.
    """

    def __init__(self, message: str):
        super().__init__(ErrorCode.UnspecifiedError, message)


# --- guest memory --------------------------------------------------------------------------


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


# --- split virtqueues -----------------------------------------------------------------------


class DescriptorChain:
    """One buffer the driver made available: a head index and its readable/writable parts.

    ``readable`` and ``writable`` are lists of memoryviews into guest RAM (device-readable
    parts first, as virtio requires). ``read()`` copies the readable bytes out;
    ``write(data)`` fills writable parts in order and advances ``written``. The views are
    released by :meth:`VirtQueue.push` (or :meth:`release`); do not keep them afterwards.
    """

    __slots__ = ("head", "readable", "writable", "written", "readable_len", "writable_len",
                 "generation")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 generation: int = 0):
        self.head = head
        self.generation = generation  # the ring session it was popped in (VirtQueue.generation)
        self.readable = readable
        self.writable = writable
        self.written = 0
        self.readable_len = sum(len(v) for v in readable)
        self.writable_len = sum(len(v) for v in writable)

    def read(self) -> bytes:
        """All device-readable bytes, concatenated."""
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
        self.pending_push = 0  # used entries since the last notify
        self.generation = 0  # bumped whenever the ring is stopped or re-based
        self._holders: list[DescriptorChain | None] = []  # head -> the chain that holds it
        self.outstanding = 0  # heads popped and not yet pushed
        self.history: collections.deque[tuple] = collections.deque(maxlen=self.HISTORY)

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

    def _history_text(self) -> str:
        return "; ".join(" ".join(str(x) for x in op) for op in self.history)

    @property
    def ready(self) -> bool:
        """True when the ring is started and enabled: the device may pop and push."""
        return self.started and self.enabled and self._desc is not None

    def _map(self, table: MemoryTable | None) -> None:
        """Resolve ring addresses against the memory table (called on ADDR and MEM_TABLE)."""
        if not self.addr_set or table is None or self.num == 0:
            self._desc = self._avail = self._used = None
            return
        n = self.num
        r, o = table.locate_qva(self.desc_addr, 16 * n)
        self._desc = (r.mm, o)
        r, o = table.locate_qva(self.avail_addr, 6 + 2 * n)
        self._avail = (r.mm, o)
        r, o = table.locate_qva(self.used_addr, 6 + 8 * n)
        self._used = (r.mm, o)

    def avail_idx(self) -> int:
        """The driver's avail->idx (u16)."""
        mm, o = self._avail
        return _U16.unpack_from(mm, o + 2)[0]

    def has_available(self) -> bool:
        """True if the driver has made buffers available that were not popped yet."""
        return self.ready and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """Take the next available descriptor chain, or None if the ring is empty/not ready.

        Direct and indirect descriptors are followed; device-readable parts must precede
        writable ones. Raises VhostUserError on a malformed chain.
        """
        if not self.ready:
            return None
        amm, ao = self._avail
        idx = _U16.unpack_from(amm, ao + 2)[0]
        last = self.last_avail_idx
        if idx == last:
            return None
        n = self.num
        if (idx - last) & 0xFFFF > n:
            raise VhostUserError(
                f"queue {self.index}: avail idx {idx} is {(idx - last) & 0xFFFF} ahead of "
                f"{last}, more than the ring size {n}")
        head = _U16.unpack_from(amm, ao + 4 + 2 * (last % n))[0]
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
        table = self.backend.memory
        dmm, do = self._desc
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        count = 0
        limit = n
        indirect = False
        while True:
            addr, length, flags, nxt = _DESC.unpack_from(dmm, do + 16 * i)
            count += 1
            if count > limit:
                raise VhostUserError(f"queue {self.index}: descriptor chain from {head} loops")
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise VhostUserError(f"queue {self.index}: nested indirect descriptor")
                if length == 0 or length % 16:
                    raise VhostUserError(
                        f"queue {self.index}: indirect table length {length} is not a "
                        "multiple of 16")
                r, o = table.locate_gpa(addr, length)
                dmm, do = r.mm, o
                limit = length // 16
                indirect = True
                i = 0
                count = 0
                continue
            if length:
                views = table.views(addr, length)
                if flags & VRING_DESC_F_WRITE:
                    writable.extend(views)
                elif writable:
                    raise VhostUserError(
                        f"queue {self.index}: readable descriptor after a writable one")
                else:
                    readable.extend(views)
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
            if i >= limit:
                raise VhostUserError(f"queue {self.index}: next descriptor {i} out of range")
        chain = DescriptorChain(head, readable, writable, self.generation)
        self._holders[head] = chain
        self.outstanding += 1
        self.history.append(("pop", head, last, sys._getframe(1).f_code.co_name))
        return chain

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
        holders[head] = None
        self.outstanding -= 1
        mm, o = self._used
        u = self.used_idx
        self.history.append(("push", head, u, length, sys._getframe(1).f_code.co_name))
        _USED_ELEM.pack_into(mm, o + 4 + 8 * (u % self.num), chain.head, length)
        u = (u + 1) & 0xFFFF
        # x86 and the guest see stores in order; the element is visible before the index.
        _U16.pack_into(mm, o + 2, u)
        self.used_idx = u
        self.pending_push += 1

    def notify(self, force: bool = False) -> None:
        """Signal the driver (write 1 to the call eventfd) if anything was pushed since the
        last notify (or ``force``) and the driver did not set VRING_AVAIL_F_NO_INTERRUPT."""
        if not (self.pending_push or force) or self.call_fd is None or self._avail is None:
            return
        self.pending_push = 0
        mm, o = self._avail
        if _U16.unpack_from(mm, o)[0] & VRING_AVAIL_F_NO_INTERRUPT and not force:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the driver is signalled already


# --- device interface ----------------------------------------------------------------------


class VirtioDevice:
    """Base class for a device model served over vhost-user.

    Subclasses set ``device_id`` (virtio device ID, e.g. 19 vsock, 33 NSM), ``num_queues``,
    ``queue_names`` (for messages), ``queue_size`` (largest ring accepted) and
    ``device_features`` (device-specific feature
    bits only; the back end adds VERSION_1, INDIRECT_DESC and PROTOCOL_FEATURES). Callbacks run
    on the back end's loop thread:

    - ``on_start(backend)``: once, when the loop starts (before QEMU connects): register fds.
    - ``on_kick(index)``: the driver kicked queue ``index`` (also once when it becomes ready).
    - ``on_queue_stop(index)``: the front end stopped the ring (GET_VRING_BASE or disconnect).
    - ``on_stop()``: once, when the back end stops; release device resources.

    ``get_config(offset, size)`` answers GET_CONFIG; ``set_config(offset, data)`` SET_CONFIG.
    """

    device_id: int = 0
    num_queues: int = 1
    queue_names: tuple[str, ...] = ()
    queue_size: int = 1024
    device_features: int = 0

    backend: "VhostUserBackend | None" = None

    def get_config(self, offset: int, size: int) -> bytes:
        """Config-space bytes [offset, offset+size); default: zeros."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        """Driver write to config space; default: ignored (read-only config)."""

    def on_start(self, backend: "VhostUserBackend") -> None:
        """Loop started; keep ``backend`` for queue access and fd registration."""
        self.backend = backend

    def on_kick(self, queue_index: int) -> None:
        """Queue ``queue_index`` has new available buffers (or just became ready)."""

    def on_queue_stop(self, queue_index: int) -> None:
        """The front end stopped queue ``queue_index``; buffers popped earlier are void."""

    def on_stop(self) -> None:
        """The back end is stopping; release what the device registered."""

    def run_on_loop(self, fn: Callable[[], Any], timeout: float | None = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (or raise its exception).

        Called from any thread. Runs ``fn`` directly when no loop is running or when already
        on the loop thread. Raises TimeoutError if the loop does not run it in ``timeout`` s.
        """
        b = self.backend
        if b is None or not b.running or threading.current_thread() is b._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed back to the caller's thread
                    fut.set_exception(e)

        b.call_soon(job)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("device loop did not answer in time") from None


# --- the back end ---------------------------------------------------------------------------


class _Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (safe from any thread)."""
        self.cancelled = True


class VhostUserBackend:
    """Serves one :class:`VirtioDevice` to one QEMU over a vhost-user Unix socket.

    The socket is bound and listening when the constructor returns, so QEMU (the client,
    ``-chardev socket,path=socket_path``) can start right after. ``start()`` runs the loop on
    its own thread; ``stop()`` (idempotent) joins it, calls ``device.on_stop()``, closes every
    fd, unmaps guest RAM and unlinks the socket. Only one front-end connection is served;
    reconnection is not supported (docs/vhost-user.md#roles).

    ``offer_config``: offer the CONFIG protocol feature (vsock: yes; NSM on vhost-user-device: no,
    docs/vhost-user.md#features). ``trace``: called on the loop thread with a dict per vhost-user
    message (``{"t", "dir", "request", "name", "flags", "size", "fds", ...}``).

    ``error`` is None, or one line saying why serving ended abnormally (QEMU disconnected with
    rings running, a malformed message or ring, a device callback raising). ``disconnected``
    is set when the front end's connection ends for any reason.

    Raises NitroError(FileOperationFailure) if the socket cannot be bound.
    """

    def __init__(self, socket_path: str | os.PathLike, device: VirtioDevice, *,
                 offer_config: bool = True, trace: Callable[[dict], None] | None = None,
                 reply_ack: bool = True):
        self.socket_path = os.fspath(socket_path)
        self.device = device
        self.offer_config = offer_config
        self.trace = trace
        self.error: str | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.queues = [VirtQueue(self, i, device.queue_size) for i in range(device.num_queues)]
        self.memory: MemoryTable | None = None
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.protocol_features = (1 << ProtocolFeature.MQ)
        if reply_ack:
            self.protocol_features |= 1 << ProtocolFeature.REPLY_ACK
        if offer_config:
            self.protocol_features |= 1 << ProtocolFeature.CONFIG
        self.features = (device.device_features | VHOST_USER_F_PROTOCOL_FEATURES
                         | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC)
        self.messages = 0
        self._pinned: list[MemoryRegion] = []
        self._sel = selectors.DefaultSelector()
        self._handlers: dict[int, list] = {}  # fd -> [reader, writer]
        self._ready: collections.deque = collections.deque()
        self._timers: list = []
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._conn: socket.socket | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)  # a stale socket from a dead run
            self._listener.bind(self.socket_path)
            self._listener.listen(1)
            self._listener.setblocking(False)
        except OSError as e:
            self._listener.close()
            os.close(self._wake_fd)
            self._sel.close()
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"vhost-user socket {self.socket_path}: cannot listen: "
                             f"{e.strerror or e}") from None
        self._bound = True
        self.add_reader(self._wake_fd, self._on_wake)
        self.add_reader(self._listener.fileno(), self._on_accept)

    # -- public API ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the loop thread (calls ``device.on_start(self)`` on it first)."""
        if self._thread is not None or self._stopped:
            raise VhostUserError("vhost-user back end already started or stopped")
        self._thread = threading.Thread(target=self._run, name=f"vhost-user:{self.socket_path}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent): join the loop, ``on_stop``, close fds, unmap, unlink."""
        with self._lock:
            if self._stopped:
                return
            self._stopping = True
        t = self._thread
        if t is not None and t.is_alive():
            self._wake()
            if threading.current_thread() is t:
                return  # the loop thread tears down when it exits
            t.join(timeout)
            if not t.is_alive():
                return
            # The loop is stuck in a callback. Release everything anyway (its fds, sockets and
            # guest memory), so nothing leaks, and say what is still running.
            where = _thread_location(t)
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # unblocks a recv/send on the connection
            t.join(1.0)
            if t.is_alive():
                self._teardown()
            raise VhostUserError(
                f"vhost-user loop for {self.socket_path} did not stop in {timeout:g} s (thread "
                f"{t.name} still running in {where}); its sockets and guest memory were released")
        self._teardown()

    @property
    def native_id(self) -> int | None:
        """Kernel thread id of the loop thread (for CPU placement), None before :meth:`start`."""
        return self._thread.native_id if self._thread is not None else None

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until QEMU connected (True) or ``timeout`` seconds passed (False)."""
        return self.connected.wait(timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (thread-safe)."""
        self._ready.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        """Run ``fn`` on the loop thread after ``delay`` s; returns a handle with ``cancel()``.

        Call from the loop thread (use call_soon to schedule from elsewhere).
        """
        t = _Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (t.when, next(self._timer_seq), t))
        return t

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop whenever ``fd`` is readable (loop thread only)."""
        self._set_handler(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` for reading (no error if not watched)."""
        self._set_handler(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop whenever ``fd`` is writable (loop thread only)."""
        self._set_handler(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        """Stop watching ``fd`` for writing (no error if not watched)."""
        self._set_handler(fd, 1, None)

    # -- loop ---------------------------------------------------------------------------

    def _set_handler(self, fd: int, slot: int, cb: Callable[[], None] | None) -> None:
        h = self._handlers.get(fd)
        if h is None:
            if cb is None:
                return
            h = [None, None]
            h[slot] = cb
            self._handlers[fd] = h
            self._sel.register(fd, selectors.EVENT_READ if slot == 0 else selectors.EVENT_WRITE)
            return
        if h[slot] is cb:
            return
        h[slot] = cb
        events = (selectors.EVENT_READ if h[0] else 0) | (selectors.EVENT_WRITE if h[1] else 0)
        if events:
            self._sel.modify(fd, events)
        else:
            del self._handlers[fd]
            self._sel.unregister(fd)

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass  # saturated or already closed: the loop is awake or gone

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def _run(self) -> None:
        try:
            try:
                self.device.on_start(self)
            except Exception as e:
                self._fail(f"device {type(self.device).__name__}.on_start failed: {e}")
                return
            handlers = self._handlers
            ready = self._ready
            timers = self._timers
            while not self._stopping:
                timeout = None
                if ready:
                    timeout = 0
                elif timers:
                    timeout = max(0.0, timers[0][0] - time.monotonic())
                events = self._sel.select(timeout)
                for key, mask in events:
                    h = handlers.get(key.fd)
                    if h is None:
                        continue
                    try:
                        if mask & selectors.EVENT_READ and h[0]:
                            h[0]()
                        if mask & selectors.EVENT_WRITE and h[1] and handlers.get(key.fd) is h:
                            h[1]()
                    except Exception as e:
                        self._callback_failed(e)
                while ready:
                    fn = ready.popleft()
                    try:
                        fn()
                    except Exception as e:
                        self._callback_failed(e)
                if timers:
                    now = time.monotonic()
                    while timers and timers[0][0] <= now:
                        t = heapq.heappop(timers)[2]
                        if not t.cancelled:
                            try:
                                t.fn()
                            except Exception as e:
                                self._callback_failed(e)
        except Exception as e:  # e.g. the selector closed by a forced stop: end quietly
            self._fail(f"vhost-user loop for {self.socket_path} ended: {type(e).__name__}: {e}")
        finally:
            self._teardown()

    def _callback_failed(self, e: Exception) -> None:
        if isinstance(e, VhostUserError):
            self._fail(e.message)
            self._drop_connection()
        else:
            self._fail(f"device {type(self.device).__name__} failed: "
                       f"{type(e).__name__}: {e}")

    def _teardown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping = True
        if self._thread is not None:
            try:
                self._stop_rings()
                self.device.on_stop()
            except Exception as e:
                self._fail(f"device {type(self.device).__name__}.on_stop failed: {e}")
        self._drop_connection(teardown=True)
        for fd in list(self._handlers):
            self._sel.unregister(fd)
        self._handlers.clear()
        self._sel.close()
        self._listener.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
        if self._bound:
            self._bound = False
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self._ready.clear()
        self._timers.clear()
        self._unmap()
        if self._pinned:
            import gc
            gc.collect()  # views dropped by the device without release()
            self._pinned = [r for r in self._pinned if not r.close()]
        self.disconnected.set()

    # -- connection ---------------------------------------------------------------------

    def _on_accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._conn is not None or self.disconnected.is_set():
            conn.close()  # one front end per back end; no reconnection
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a message's payload follows its header at once
        self._conn = conn
        self.add_reader(conn.fileno(), self._on_message)
        self.connected.set()

    def _drop_connection(self, teardown: bool = False) -> None:
        """End the front-end connection and stop the rings (used on error and disconnect)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self.remove_reader(conn.fileno())
            conn.close()
            if not teardown:
                try:
                    self._stop_rings()
                except Exception as e:
                    self._fail(f"device {type(self.device).__name__}.on_queue_stop failed: {e}")
        if not teardown:
            self.disconnected.set()

    def _stop_rings(self) -> None:
        for q in self.queues:
            was = q.started
            self._stop_queue(q)
            q.reset_ownership("rings stopped")
            if was:
                self.device.on_queue_stop(q.index)
        for q in self.queues:
            for attr in ("call_fd", "err_fd"):
                fd = getattr(q, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(q, attr, None)

    def _stop_queue(self, q: VirtQueue) -> None:
        if q.kick_fd is not None:
            self.remove_reader(q.kick_fd)
            os.close(q.kick_fd)
            q.kick_fd = None
        q.started = False

    def _unmap(self) -> None:
        if self.memory is not None:
            self._pinned.extend(self.memory.close())
            self.memory = None
        for q in self.queues:
            q._desc = q._avail = q._used = None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("front end closed mid-message")
            buf += chunk
        return bytes(buf)

    def _on_message(self) -> None:
        conn = self._conn
        if conn is None:
            return
        fds: list[int] = []
        try:
            data, anc, msg_flags, _ = conn.recvmsg(
                _HDR.size, socket.CMSG_SPACE(_MAX_FDS * 4))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % 4
                    fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
            if not data:
                self._on_disconnect()
                return
            if msg_flags & socket.MSG_CTRUNC:
                raise VhostUserError("vhost-user message carried more than 8 fds")
            if len(data) < _HDR.size:
                data += self._recv_exact(_HDR.size - len(data))
            req, flags, size = _HDR.unpack(data)
            if flags & 0x3 != _VERSION:
                raise VhostUserError(
                    f"malformed vhost-user message: version {flags & 3} in flags {flags:#x}, "
                    "expected 1")
            if req == 0 or req > _MAX_REQUEST:
                raise VhostUserError(f"malformed vhost-user message: unknown request {req}")
            if size > _MAX_PAYLOAD:
                raise VhostUserError(
                    f"malformed vhost-user message: {REQUEST_NAMES[req]} payload size {size} "
                    f"exceeds {_MAX_PAYLOAD}")
            payload = self._recv_exact(size) if size else b""
            self.messages += 1
            if self.trace is not None:
                self.trace({"t": time.monotonic(), "dir": "in", "request": req,
                            "name": REQUEST_NAMES[req], "flags": flags, "size": size,
                            "fds": len(fds), "payload": payload.hex() if size <= 64 else None})
            self._dispatch(req, flags, payload, fds)
        except VhostUserError as e:
            for fd in fds:
                _close_quiet(fd)
            self._fail(e.message)
            self._drop_connection()
        except (ConnectionError, socket.timeout, OSError) as e:
            for fd in fds:
                _close_quiet(fd)
            if isinstance(e, socket.timeout):
                self._fail("malformed vhost-user message: payload did not arrive within 5 s")
            else:
                self._fail(f"vhost-user connection failed: {e}")
            self._drop_connection()

    def _on_disconnect(self) -> None:
        running = any(q.started for q in self.queues)
        if running and not self._stopping:
            self._fail("QEMU disconnected from the vhost-user socket while the device's "
                       "rings were running (QEMU exited or was killed)")
        self._drop_connection()

    def _reply(self, req: int, payload: bytes) -> None:
        msg = _HDR.pack(req, _VERSION | _FLAG_REPLY, len(payload)) + payload
        if self.trace is not None:
            self.trace({"t": time.monotonic(), "dir": "out", "request": req,
                        "name": REQUEST_NAMES.get(req, str(req)), "flags": _VERSION | _FLAG_REPLY,
                        "size": len(payload), "fds": 0,
                        "payload": payload.hex() if len(payload) <= 64 else None})
        self._conn.sendall(msg)

    def _queue(self, index: int, req: int) -> VirtQueue:
        if index >= len(self.queues):
            raise VhostUserError(
                f"malformed vhost-user message: {REQUEST_NAMES[req]} for queue {index}, "
                f"device has {len(self.queues)}")
        return self.queues[index]

    @staticmethod
    def _expect(req: int, payload: bytes, size: int, fds: list[int], nfds: int = 0) -> None:
        if len(payload) != size:
            raise VhostUserError(
                f"malformed vhost-user message: {REQUEST_NAMES[req]} payload is "
                f"{len(payload)} bytes, expected {size}")
        if len(fds) > nfds:
            raise VhostUserError(
                f"malformed vhost-user message: {REQUEST_NAMES[req]} carried {len(fds)} fds, "
                f"expected at most {nfds}")

    def _dispatch(self, req: int, flags: int, payload: bytes, fds: list[int]) -> None:
        R = Request
        ack_status = 0
        if req == R.GET_FEATURES:
            self._expect(req, payload, len(payload) if len(payload) in (0, 8) else 0, fds)
            self._reply(req, _U64.pack(self.features))
        elif req == R.GET_PROTOCOL_FEATURES:
            self._expect(req, payload, len(payload) if len(payload) in (0, 8) else 0, fds)
            self._reply(req, _U64.pack(self.protocol_features))
        elif req == R.SET_FEATURES:
            self._expect(req, payload, 8, fds)
            (feat,) = _U64.unpack(payload)
            if feat & ~self.features:
                raise VhostUserError(
                    f"SET_FEATURES acked bits {feat & ~self.features:#x} the back end never "
                    "offered")
            self.acked_features = feat
        elif req == R.SET_PROTOCOL_FEATURES:
            self._expect(req, payload, 8, fds)
            (feat,) = _U64.unpack(payload)
            self.acked_protocol_features = feat & self.protocol_features
        elif req == R.GET_QUEUE_NUM:
            self._expect(req, payload, len(payload) if len(payload) in (0, 8) else 0, fds)
            self._reply(req, _U64.pack(len(self.queues)))
        elif req in (R.SET_OWNER, R.RESET_OWNER, R.RESET_DEVICE):
            if req != R.SET_OWNER:
                self._stop_rings()  # calls on_queue_stop for each running ring
        elif req == R.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            fds = []
        elif req == R.SET_VRING_NUM:
            self._expect(req, payload, 8, fds)
            i, num = _VRING_STATE.unpack(payload)
            q = self._queue(i, req)
            if num == 0 or num > q.max_size or num & (num - 1):
                raise VhostUserError(
                    f"SET_VRING_NUM: queue {i} size {num} is not a power of two in "
                    f"[1, {q.max_size}]")
            q.num = num
            q.reset_ownership("SET_VRING_NUM")
        elif req == R.SET_VRING_BASE:
            self._expect(req, payload, 8, fds)
            i, base = _VRING_STATE.unpack(payload)
            q = self._queue(i, req)
            q.last_avail_idx = base & 0xFFFF
            q.reset_ownership("SET_VRING_BASE")
        elif req == R.SET_VRING_ADDR:
            self._expect(req, payload, 40, fds)
            i, _fl, desc, used, avail, _log = _VRING_ADDR.unpack(payload)
            q = self._queue(i, req)
            q.desc_addr, q.used_addr, q.avail_addr = desc, used, avail
            q.addr_set = True
            q._map(self.memory)
            if q._used is not None:
                mm, o = q._used
                q.used_idx = _U16.unpack_from(mm, o + 2)[0]
        elif req == R.GET_VRING_BASE:
            self._expect(req, payload, 8, fds)
            i, _ = _VRING_STATE.unpack(payload)
            q = self._queue(i, req)
            was = q.started
            self._stop_queue(q)
            q.enabled = False
            q.reset_ownership("GET_VRING_BASE")
            if was:
                self.device.on_queue_stop(i)
            self._reply(req, _VRING_STATE.pack(i, q.last_avail_idx))
        elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            self._expect(req, payload, 8, fds, 1)
            (u,) = _U64.unpack(payload)
            q = self._queue(u & _VRING_IDX_MASK, req)
            nofd = bool(u & _VRING_NOFD_MASK)
            if nofd != (not fds):
                raise VhostUserError(
                    f"malformed vhost-user message: {REQUEST_NAMES[req]} for queue {q.index} "
                    f"{'has' if fds else 'lacks'} an fd but the no-fd flag is "
                    f"{'set' if nofd else 'clear'}")
            fd = fds[0] if fds else None
            fds = []
            if req == R.SET_VRING_KICK:
                self._stop_queue(q)
                if fd is None:
                    raise VhostUserError(
                        f"SET_VRING_KICK for queue {q.index} without an fd: polling mode is "
                        "not supported")
                os.set_blocking(fd, False)
                q.kick_fd = fd
                q.started = True
                if not self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
                    q.enabled = True  # vhost-user spec: rings start enabled without it
                self.add_reader(fd, lambda q=q: self._on_kick(q))
                if q.ready:
                    self._on_kick(q, drain=False)
            else:
                attr = "call_fd" if req == R.SET_VRING_CALL else "err_fd"
                old = getattr(q, attr)
                if old is not None:
                    os.close(old)
                setattr(q, attr, fd)
        elif req == R.SET_VRING_ENABLE:
            self._expect(req, payload, 8, fds)
            i, on = _VRING_STATE.unpack(payload)
            q = self._queue(i, req)
            was = q.ready
            q.enabled = bool(on)
            if q.ready and not was:
                self._on_kick(q, drain=False)
        elif req == R.GET_CONFIG:
            if len(payload) < _CONFIG_HDR.size:
                raise VhostUserError("malformed vhost-user message: GET_CONFIG payload shorter "
                                     "than its 12-byte header")
            off, size, cflags = _CONFIG_HDR.unpack_from(payload)
            self._expect(req, payload, _CONFIG_HDR.size + size, fds)
            data = bytes(self.device.get_config(off, size))[:size]
            data += bytes(size - len(data))
            self._reply(req, _CONFIG_HDR.pack(off, size, cflags) + data)
        elif req == R.SET_CONFIG:
            if len(payload) < _CONFIG_HDR.size:
                raise VhostUserError("malformed vhost-user message: SET_CONFIG payload shorter "
                                     "than its 12-byte header")
            off, size, _cf = _CONFIG_HDR.unpack_from(payload)
            self._expect(req, payload, _CONFIG_HDR.size + size, fds)
            self.device.set_config(off, payload[_CONFIG_HDR.size:])
        elif req == R.GET_MAX_MEM_SLOTS:
            self._reply(req, _U64.pack(_MAX_MEM_REGIONS))
        else:
            # Known request we do not implement (we never offered the feature behind it).
            ack_status = 1
        for fd in fds:  # fds nobody took ownership of
            _close_quiet(fd)
        if (flags & _FLAG_NEED_REPLY and req not in _HAS_REPLY
                and self.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK)):
            self._reply(req, _U64.pack(ack_status))

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            if len(payload) < 8:
                raise VhostUserError("malformed vhost-user message: SET_MEM_TABLE payload "
                                     "shorter than 8 bytes")
            nregions = struct.unpack_from("<I", payload)[0]
            if not 1 <= nregions <= _MAX_MEM_REGIONS:
                raise VhostUserError(f"malformed vhost-user message: SET_MEM_TABLE with "
                                     f"{nregions} regions (1..{_MAX_MEM_REGIONS})")
            if len(payload) != 8 + _MEM_REGION.size * nregions:
                raise VhostUserError(
                    f"malformed vhost-user message: SET_MEM_TABLE payload is {len(payload)} "
                    f"bytes for {nregions} regions, expected {8 + 32 * nregions}")
            if len(fds) != nregions:
                raise VhostUserError(f"malformed vhost-user message: SET_MEM_TABLE has "
                                     f"{nregions} regions but {len(fds)} fds")
            regions = []
            try:
                for k in range(nregions):
                    gpa, size, uva, off = _MEM_REGION.unpack_from(payload, 8 + 32 * k)
                    try:
                        regions.append(MemoryRegion(fds[k], gpa, size, uva, off))
                    except (OSError, ValueError, OverflowError) as e:
                        raise VhostUserError(
                            f"SET_MEM_TABLE region {k} (gpa {gpa:#x}, {size} bytes, offset "
                            f"{off:#x}): mmap failed: {e}") from None
            except BaseException:
                for r in regions:
                    r.close()
                raise
        finally:
            for fd in fds:  # the mappings keep the memory; the fds are not needed
                _close_quiet(fd)
        self._unmap()
        self.memory = MemoryTable(regions)
        for q in self.queues:
            q._map(self.memory)

    def _on_kick(self, q: VirtQueue, drain: bool = True) -> None:
        if drain and q.kick_fd is not None:
            try:
                os.eventfd_read(q.kick_fd)
            except BlockingIOError:
                pass
        if q.ready:
            self.device.on_kick(q.index)


def _thread_location(t: threading.Thread) -> str:
    """Where thread ``t`` runs now (``file:line in function``), for a stuck-loop message."""
    frame = sys._current_frames().get(t.ident or -1)
    if frame is None:
        return "an unknown place"
    stdlib = os.path.dirname(os.__file__)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(stdlib):
        frame = frame.f_back  # the caller blocked in threading/socket is the useful place
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
