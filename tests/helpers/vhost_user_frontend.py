"""A fake QEMU vhost-user front end for tests: drives a back end without QEMU.

It does what QEMU and the guest driver do together: connects to the back end's Unix socket, sends
real vhost-user messages (SCM_RIGHTS fds included) in QEMU's order (docs/vhost-user.md#handshake),
owns a memfd as guest RAM (guest-physical base ``gpa_base``, a made-up QEMU-virtual base
``qva_base`` and a non-zero ``mmap_offset`` so that both translations are exercised), lays split
vrings out in it and plays the driver on them (:class:`GuestQueue`: add buffers, kick, collect used
entries, wait for the call eventfd).

Reusable by any device test (vsock, NSM)::

    fe = FakeFrontend(sock_path)
    fe.handshake()
    qs = fe.start_queues([128, 128])
    head = qs[1].add([b"request"], [0x3000])
    qs[1].kick(); qs[1].wait_call(5)
    for head, length, data in qs[1].collect(): ...
    fe.close()
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time

from harness.vhost_user import ProtocolFeature, Request

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class FrontendError(AssertionError):
    """The back end answered something the front end did not expect."""


class FakeFrontend:
    """QEMU's side of a vhost-user connection plus guest RAM (test helper).

    ``mem_size`` bytes of guest RAM at guest-physical ``gpa_base``. Raises FrontendError on a
    missing or wrong reply; ``socket.timeout`` after ``timeout`` s of silence.
    """

    def __init__(self, socket_path: str, *, mem_size: int = 4 << 20, gpa_base: int = 0x4000_0000,
                 qva_base: int = 0x7F55_0000_0000, mmap_offset: int = 0x2000,
                 timeout: float = 5.0, connect: bool = True):
        self.socket_path = socket_path
        self.mem_size = mem_size
        self.gpa_base = gpa_base
        self.qva_base = qva_base
        self.mmap_offset = mmap_offset
        self.memfd = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size + mmap_offset)
        self.mm = mmap.mmap(self.memfd, mem_size + mmap_offset)
        self._brk = gpa_base
        self._free: dict[int, list[int]] = {}
        self.queues: list[GuestQueue] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.features = 0
        self.protocol_features = 0
        self.config: bytes | None = None
        if connect:
            self.sock.connect(socket_path)

    # -- guest memory ------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """Allocate ``size`` bytes of guest RAM; returns its guest-physical address."""
        lst = self._free.get(size)
        if lst:
            return lst.pop()
        gpa = (self._brk + align - 1) & ~(align - 1)
        if gpa + size > self.gpa_base + self.mem_size:
            raise MemoryError("fake guest RAM exhausted")
        self._brk = gpa + size
        return gpa

    def free(self, gpa: int, size: int) -> None:
        """Return a buffer from :meth:`alloc` for reuse by a later same-size allocation."""
        self._free.setdefault(size, []).append(gpa)

    def _off(self, gpa: int) -> int:
        return gpa - self.gpa_base + self.mmap_offset

    def write_mem(self, gpa: int, data: bytes) -> None:
        """Write guest RAM at a guest-physical address."""
        o = self._off(gpa)
        self.mm[o:o + len(data)] = data

    def read_mem(self, gpa: int, n: int) -> bytes:
        """Read ``n`` bytes of guest RAM at a guest-physical address."""
        o = self._off(gpa)
        return self.mm[o:o + n]

    def qva(self, gpa: int) -> int:
        """The made-up QEMU virtual address of a guest-physical address."""
        return gpa - self.gpa_base + self.qva_base

    # -- messages ----------------------------------------------------------------------
    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (),
             *, need_reply: bool = False, flags: int | None = None) -> None:
        """Send one vhost-user message (fds as SCM_RIGHTS on the header)."""
        if flags is None:
            flags = 1 | (0x8 if need_reply else 0)
        msg = _HDR.pack(req, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([msg], anc)

    def recv_reply(self, req: int) -> bytes:
        """Read one reply to ``req``; returns its payload. Raises FrontendError if wrong."""
        hdr = self._recv_exact(12)
        r, flags, size = _HDR.unpack(hdr)
        if r != req or flags & 0x7 != 0x5:
            raise FrontendError(f"expected reply to {req}, got request {r} flags {flags:#x}")
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            c = self.sock.recv(n - len(buf))
            if not c:
                raise FrontendError("back end closed the connection")
            buf += c
        return buf

    def request(self, req: int, payload: bytes = b"", fds=(), *, reply: bool = False,
                need_reply: bool = False) -> bytes | None:
        """Send ``req``; return its reply payload if ``reply``, or check the REPLY_ACK status
        (u64 0) when ``need_reply`` and REPLY_ACK was negotiated."""
        self.send(req, payload, fds, need_reply=need_reply)
        if reply:
            return self.recv_reply(req)
        if need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
            (status,) = _U64.unpack(self.recv_reply(req))
            if status:
                raise FrontendError(f"request {req} acked with failure status {status}")
        return None

    def get_u64(self, req: int) -> int:
        """Send a GET_* request with no payload and return its u64 answer."""
        return _U64.unpack(self.request(req, reply=True))[0]

    # -- QEMU's sequence (docs/vhost-user.md#handshake) --------------------------------
    def handshake(self, *, num_call_queues: int | None = None, config_size: int = 8,
                  protocol_mask: int | None = None) -> None:
        """Device realize: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
        GET_FEATURES, SET_VRING_CALL per queue, GET_CONFIG when CONFIG was offered."""
        self.features = self.get_u64(Request.GET_FEATURES)
        offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        want = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) \
            | (1 << ProtocolFeature.CONFIG)
        if protocol_mask is not None:
            want &= protocol_mask
        self.protocol_features = offered & want
        self.send(Request.SET_PROTOCOL_FEATURES, _U64.pack(self.protocol_features))
        self.num_queues = self.get_u64(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        if self.get_u64(Request.GET_FEATURES) != self.features:
            raise FrontendError("GET_FEATURES changed between two calls")
        n = self.num_queues if num_call_queues is None else num_call_queues
        self._init_calls = []
        for i in range(n):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._init_calls.append(fd)
            self.send(Request.SET_VRING_CALL, _U64.pack(i), [fd])
        if self.protocol_features & (1 << ProtocolFeature.CONFIG):
            p = self.request(Request.GET_CONFIG, struct.pack("<III", 0, config_size, 0)
                             + bytes(config_size), reply=True)
            off, size, _ = struct.unpack_from("<III", p)
            if (off, size) != (0, config_size) or len(p) != 12 + config_size:
                raise FrontendError(f"GET_CONFIG reply header {(off, size)} len {len(p)}")
            self.config = p[12:]

    def start_queues(self, sizes: list[int], *, features: int = 0x4000_0000,
                     bases: list[int] | None = None) -> list["GuestQueue"]:
        """Driver start: SET_FEATURES, SET_MEM_TABLE, per queue NUM/BASE/ADDR/KICK, ENABLE,
        CALL (QEMU 10's order). ``features`` defaults to what a legacy virtio-mmio guest acks
        (bit 30 only, docs/vhost-user.md#observed-behaviour). Returns the driver-side queues."""
        self.request(Request.SET_FEATURES, _U64.pack(features), need_reply=True)
        region = struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", self.gpa_base, self.mem_size, self.qva_base, self.mmap_offset)
        self.request(Request.SET_MEM_TABLE, region, [self.memfd], need_reply=True)
        qs = [GuestQueue(self, i, n) for i, n in enumerate(sizes)]
        for q in qs:
            base = bases[q.index] if bases else 0
            q.avail_idx = q.last_used = base
            self.write_mem(q.used + 2, struct.pack("<H", base))
            self.write_mem(q.avail + 2, struct.pack("<H", base))
            self.request(Request.SET_VRING_NUM, struct.pack("<II", q.index, q.size),
                         need_reply=True)
            self.request(Request.SET_VRING_BASE, struct.pack("<II", q.index, base),
                         need_reply=True)
            self.request(Request.SET_VRING_ADDR, struct.pack(
                "<IIQQQQ", q.index, 0, self.qva(q.desc), self.qva(q.used), self.qva(q.avail), 0),
                need_reply=True)
            self.request(Request.SET_VRING_KICK, _U64.pack(q.index), [q.kick_fd],
                         need_reply=True)
        for q in qs:
            if features & (1 << 30):
                self.request(Request.SET_VRING_ENABLE, struct.pack("<II", q.index, 1),
                             need_reply=True)
            self.request(Request.SET_VRING_CALL, _U64.pack(q.index), [q.call_fd],
                         need_reply=True)
        self.queues = qs
        return qs

    def stop_queues(self) -> list[int]:
        """Driver stop: GET_VRING_BASE per queue; returns each ring's next avail index."""
        out = []
        for q in self.queues:
            p = self.request(Request.GET_VRING_BASE, struct.pack("<II", q.index, 0), reply=True)
            i, base = struct.unpack("<II", p)
            if i != q.index:
                raise FrontendError(f"GET_VRING_BASE answered queue {i} for {q.index}")
            out.append(base)
        return out

    def close(self) -> None:
        """Disconnect and release RAM, eventfds and the socket (idempotent)."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        for q in self.queues:
            q.close()
        self.queues = []
        for fd in getattr(self, "_init_calls", []):
            os.close(fd)
        self._init_calls = []
        if not self.mm.closed:
            self.mm.close()
            os.close(self.memfd)

    def __enter__(self) -> "FakeFrontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GuestQueue:
    """The driver's side of one split virtqueue laid out in the fake guest RAM."""

    def __init__(self, fe: FakeFrontend, index: int, size: int):
        self.fe = fe
        self.index = index
        self.size = size
        self.desc = fe.alloc(16 * size, 16)
        self.avail = fe.alloc(6 + 2 * size, 2)
        self.used = fe.alloc(6 + 8 * size, 4)
        fe.write_mem(self.desc, bytes(16 * size))
        fe.write_mem(self.avail, bytes(6 + 2 * size))
        fe.write_mem(self.used, bytes(6 + 8 * size))
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free_desc = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        # head -> (descriptor ids, [(gpa, len, writable)], indirect table or None)
        self.inflight: dict[int, tuple[list[int], list[tuple[int, int, bool]], tuple | None]] = {}

    def _write_desc(self, base: int, i: int, addr: int, length: int, flags: int, nxt: int):
        self.fe.write_mem(base + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def add(self, out: list[bytes], in_lens: list[int], *, indirect: bool = False) -> int:
        """Make a chain available: readable buffers ``out`` then writable ones of
        ``in_lens`` bytes (optionally through one indirect table). Returns the head index.
        Not visible to the device until :meth:`publish` (done here) and :meth:`kick`."""
        bufs = []
        for data in out:
            g = self.fe.alloc(len(data), 8)
            self.fe.write_mem(g, data)
            bufs.append((g, len(data), False))
        for n in in_lens:
            g = self.fe.alloc(n, 8)
            self.fe.write_mem(g, bytes(n))
            bufs.append((g, n, True))
        if indirect:
            tsize = 16 * len(bufs)
            table = self.fe.alloc(tsize, 16)
            for k, (g, n, w) in enumerate(bufs):
                fl = (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0)
                self._write_desc(table, k, g, n, fl, k + 1 if k + 1 < len(bufs) else 0)
            head = self.free_desc.pop()
            self._write_desc(self.desc, head, table, tsize, F_INDIRECT, 0)
            self.inflight[head] = ([head], bufs, (table, tsize))
        else:
            if len(bufs) > len(self.free_desc):
                raise MemoryError("no free descriptors")
            ids = [self.free_desc.pop() for _ in bufs]
            for k, (g, n, w) in enumerate(bufs):
                last = k + 1 == len(bufs)
                fl = (F_WRITE if w else 0) | (0 if last else F_NEXT)
                self._write_desc(self.desc, ids[k], g, n, fl, 0 if last else ids[k + 1])
            head = ids[0]
            self.inflight[head] = (ids, bufs, None)
        self.fe.write_mem(self.avail + 4 + 2 * (self.avail_idx % self.size),
                          struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.fe.write_mem(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head

    def add_raw(self, head_desc: list[tuple[int, int, int, int]], head: int | None = None) -> int:
        """Write raw descriptors (addr, len, flags, next) at ids 0.. and publish ``head``
        (default 0): for malformed-ring tests."""
        for i, (a, n, fl, nx) in enumerate(head_desc):
            self._write_desc(self.desc, i, a, n, fl, nx)
        h = 0 if head is None else head
        self.fe.write_mem(self.avail + 4 + 2 * (self.avail_idx % self.size),
                          struct.pack("<H", h))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.fe.write_mem(self.avail + 2, struct.pack("<H", self.avail_idx))
        return h

    def _publish(self, head: int) -> None:
        self.fe.write_mem(self.avail + 4 + 2 * (self.avail_idx % self.size),
                          struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.fe.write_mem(self.avail + 2, struct.pack("<H", self.avail_idx))

    def add_raw_chain(self, descs: list[tuple[int, int, int, int]]) -> int:
        """Make a hand-written (possibly malformed) direct chain available on free descriptors,
        for hostile-guest tests. ``descs`` are (addr, len, flags, next) with ``next`` an index
        into ``descs``, written as the descriptor id it maps to; a ``next`` of ``len(descs)`` or
        more is written as is (an index outside the chain, or outside the table). Returns the
        head; :meth:`collect` frees the ids when the device returns it."""
        if len(descs) > len(self.free_desc):
            raise MemoryError("no free descriptors")
        ids = [self.free_desc.pop() for _ in descs]
        for k, (a, n, fl, nx) in enumerate(descs):
            self._write_desc(self.desc, ids[k], a, n, fl, ids[nx] if nx < len(descs) else nx)
        self.inflight[ids[0]] = (ids, [], None)
        self._publish(ids[0])
        return ids[0]

    def add_indirect_raw(self, entries: list[tuple[int, int, int, int]], *,
                         table_len: int | None = None, table_gpa: int | None = None,
                         head_flags: int = F_INDIRECT) -> int:
        """Make one head descriptor available that points at an indirect table of raw
        ``entries`` (addr, len, flags, next; ``next`` indexes the table), for hostile-guest
        tests. ``table_len`` overrides the length in the head (default 16 per entry);
        ``table_gpa`` puts the head's table address anywhere (nothing is written then).
        Returns the head."""
        size = 16 * len(entries)
        table = None
        if table_gpa is None:
            table_gpa = self.fe.alloc(max(size, 16), 16)
            self.fe.write_mem(table_gpa, b"".join(_DESC.pack(*e) for e in entries))
            table = (table_gpa, max(size, 16))
        head = self.free_desc.pop()
        self._write_desc(self.desc, head, table_gpa, size if table_len is None else table_len,
                         head_flags, 0)
        self.inflight[head] = ([head], [], table)
        self._publish(head)
        return head

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags."""
        self.fe.write_mem(self.avail, struct.pack("<H", 1 if on else 0))

    def kick(self) -> None:
        """Notify the device (write the kick eventfd)."""
        os.eventfd_write(self.kick_fd, 1)

    def used_idx(self) -> int:
        """The device's used->idx."""
        return struct.unpack("<H", self.fe.read_mem(self.used + 2, 2))[0]

    def collect(self) -> list[tuple[int, int, bytes]]:
        """Take every new used entry: (head, length, the first ``length`` written bytes of the
        chain's writable part). Frees the descriptors and buffers."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.fe.read_mem(slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            ids, bufs, table = self.inflight.pop(head)
            data = bytearray()
            for g, n, w in bufs:
                if w and len(data) < length:
                    data += self.fe.read_mem(g, min(n, length - len(data)))
                self.fe.free(g, n)
            if table:
                self.fe.free(*table)
            self.free_desc.extend(ids)
            out.append((head, length, bytes(data)))
        return out

    def wait_call(self, timeout: float = 5.0) -> bool:
        """Wait for the call eventfd; True if the device signalled (counter reset)."""
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        if not r:
            return False
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        return True

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` used entries are pending (polls the call fd)."""
        deadline = time.monotonic() + timeout
        while ((self.used_idx() - self.last_used) & 0xFFFF) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_call(min(left, 0.2))
        return True

    def close(self) -> None:
        """Close the kick and call eventfds (idempotent)."""
        for a in ("kick_fd", "call_fd"):
            fd = getattr(self, a)
            if fd >= 0:
                os.close(fd)
                setattr(self, a, -1)
