"""The virtio-vsock device (virtio ID 19) and the parent's endpoints, served over vhost-user.

docs/vsock.md is the contract. The enclave's guest kernel drives an rx queue (0) and a tx queue (1);
QEMU's vhost-user-vsock-device hands only those two to the back end. The parent is CID 3, as
on Nitro; every other destination CID (the host's 2, other enclaves) is answered with RST.

Packets are a 44-byte little-endian header (src_cid, dst_cid, src_port, dst_port, len, type,
op, flags, buf_alloc, fwd_cnt) plus payload. Stream connections use credit flow control both
ways: the device never sends more than the guest's ``buf_alloc - (tx_cnt - fwd_cnt)`` and
advertises its own ``buf_alloc``/``fwd_cnt`` so that the guest cannot outrun a slow parent.

Parent endpoints are real sockets: the device keeps one end of a ``socket.socketpair()`` and
pumps it on the back end's loop thread; user code gets the other end.

- ``device.listen(port)`` -> :class:`VsockListener` (guest connects to 3:port).
- ``device.connect(port, timeout)`` -> socket (parent connects to guest_cid:port).
- ``device.heartbeat(port=9000)`` -> :class:`HeartbeatListener` (docs/vsock.md#heartbeat: 0xB7
  each way).
- ``device.serve_unix_bridge(path)``: the hybrid-vsock Unix convention (docs/vsock.md#unix-bridge).
- ``device.close()`` releases everything.
"""

from __future__ import annotations

import collections
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import Callable

from harness.errors import ErrorCode, NitroError
from harness.vhost_user import DescriptorChain, VhostUserError, VirtioDevice

__all__ = [
    "VsockDevice",
    "VsockListener",
    "HeartbeatListener",
    "PARENT_CID",
    "HEARTBEAT_PORT",
    "HEARTBEAT_BYTE",
    "HEADER",
    "Op",
]

PARENT_CID = 3  # docs/vsock.md#addresses: the parent instance is CID 3 on Nitro
HEARTBEAT_PORT = 9000
HEARTBEAT_BYTE = 0xB7
VIRTIO_ID_VSOCK = 19
VIRTIO_VSOCK_F_STREAM = 1 << 0
RX_QUEUE, TX_QUEUE = 0, 1
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

HEADER = struct.Struct("<QQIIIHHIII")  # docs/vsock.md#packet-header: 44 bytes little-endian
HDR_SIZE = HEADER.size


class Op:
    """virtio-vsock packet operations (docs/vsock.md#operations)."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


OP_NAMES = {v: k for k, v in vars(Op).items() if isinstance(v, int)}

# A parent close we initiated waits this long for the guest's RST, then resets (Linux's
# vhost-vsock waits 8 s for the same).
CLOSE_TIMEOUT_S = 8.0
# Packets one parent socket may send per wakeup before others get a turn.
_BATCH = 64


class _Conn:
    """One stream connection: parent port ``local_port`` <-> guest port ``peer_port``."""

    __slots__ = (
        "local_port", "peer_port", "sock", "state", "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt",
        "rx_cnt", "fwd_cnt", "announced_fwd", "out", "guest_shut", "parent_eof", "reading",
        "credit_requested", "on_result", "pre_data", "timer", "wr_shut",
    )

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket | None):
        self.local_port = local_port
        self.peer_port = peer_port
        self.sock = sock
        self.state = "connecting"  # connecting -> established -> (removed)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # of those, bytes handed to the parent socket
        self.announced_fwd = 0  # fwd_cnt the guest last saw
        self.out = bytearray()  # guest -> parent bytes not yet accepted by the socket
        self.guest_shut = 0  # SHUTDOWN flags the guest sent
        self.parent_eof = False
        self.reading = False
        self.credit_requested = False
        self.on_result: Callable[[BaseException | None], None] | None = None
        self.pre_data = b""  # parent bytes read before the connection was established
        self.timer = None
        self.wr_shut = False

    def peer_credit(self) -> int:
        """Bytes the guest can still take (docs/vsock.md#credit-flow, u32 wrapping arithmetic)."""
        return (self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)) \
            & 0xFFFFFFFF if self.peer_buf_alloc else 0


class VsockListener:
    """A parent port the guest can connect to (CID 3, ``port``).

    ``accept(timeout)`` returns a connected, blocking ``socket.socket`` (raises TimeoutError
    after ``timeout`` s); ``close()`` stops listening (later REQUESTs get RST) and closes
    connections nobody accepted. Usable as a context manager.
    """

    def __init__(self, device: "VsockDevice", port: int):
        self.device = device
        self.port = port
        self.closed = False
        self._q: queue.Queue[socket.socket] = queue.Queue()

    def _deliver(self, user_sock: socket.socket) -> None:
        """Loop thread: a guest connection was accepted; hand the user's end over."""
        self._q.put(user_sock)

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Next guest connection to this port (blocking socket); TimeoutError if none in time."""
        if self.closed:
            raise OSError(f"vsock listener on port {self.port} is closed")
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no guest connection to vsock port {self.port} within "
                               f"{timeout} s") from None

    def close(self) -> None:
        """Stop listening; close unaccepted connections (idempotent)."""
        if self.closed:
            return
        self.device.run_on_loop(lambda: self.device._unlisten(self))

    def _drain(self) -> None:
        self.closed = True
        while True:
            try:
                self._q.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> "VsockListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HeartbeatListener(VsockListener):
    """The parent's heartbeat endpoint (docs/vsock.md#heartbeat): read one 0xB7, answer one 0xB7.

    Served on the device's loop. ``wait(timeout) -> bool`` is true once the heartbeat was
    read and answered; ``received_at`` is its ``time.monotonic()`` and ``received_wall`` its
    ``time.time()``. ``wrong_byte`` holds the first byte if a guest sent something else
    (init would then fail its own check).
    """

    def __init__(self, device: "VsockDevice", port: int = HEARTBEAT_PORT):
        super().__init__(device, port)
        self._event = threading.Event()
        self.received_at: float | None = None
        self.received_wall: float | None = None
        self.wrong_byte: int | None = None
        self.count = 0
        self._socks: list[socket.socket] = []

    def _deliver(self, user_sock: socket.socket) -> None:
        user_sock.setblocking(False)
        self._socks.append(user_sock)
        backend = self.device.backend
        answered = [False]

        def on_readable() -> None:
            try:
                data = user_sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data and not answered[0]:
                answered[0] = True
                if data[0] == HEARTBEAT_BYTE:
                    try:
                        user_sock.send(bytes([HEARTBEAT_BYTE]))
                    except OSError:
                        pass
                    self.count += 1
                    if self.received_at is None:
                        self.received_at = time.monotonic()
                        self.received_wall = time.time()
                    self._event.set()
                else:
                    self.wrong_byte = data[0]
            if not data:  # the guest closed: done with this connection
                backend.remove_reader(user_sock.fileno())
                self._socks.remove(user_sock)
                user_sock.close()

        backend.add_reader(user_sock.fileno(), on_readable)

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Not available: heartbeat connections are served by the device itself."""
        raise OSError("the heartbeat listener answers connections itself; use wait()")

    def wait(self, timeout: float | None = None) -> bool:
        """True once the heartbeat byte was received and answered, False on timeout."""
        return self._event.wait(timeout)

    def _drain(self) -> None:
        super()._drain()
        backend = self.device.backend
        for s in self._socks:
            if backend is not None and s.fileno() >= 0:
                backend.remove_reader(s.fileno())
            s.close()
        self._socks.clear()


class _Bridge:
    """The hybrid-vsock Unix bridge of one device (docs/vsock.md#unix-bridge)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}


class VsockDevice(VirtioDevice):
    """virtio-vsock device model for the enclave with CID ``guest_cid`` (docs/vsock.md).

    ``buf_alloc``: receive buffer (bytes) advertised to the guest per connection (default
    256 KiB, Linux's default). ``trace``: called on the loop thread with one dict per packet
    (``t``, ``dir`` "rx" (to the guest) or "tx" (from the guest), header fields, ``op_name``).
    Parent-facing methods may be called from any thread. Raises NitroError(InvalidArgument)
    for a CID the guest cannot have (0-3 or >= 2^32-1,
    docs/vsock.md#addresses).
    """

    device_id = VIRTIO_ID_VSOCK
    num_queues = 2  # rx, tx: QEMU keeps the event queue to itself
    queue_names = ("rx", "tx")
    queue_size = 1024
    device_features = VIRTIO_VSOCK_F_STREAM

    def __init__(self, guest_cid: int, *, buf_alloc: int = 256 * 1024,
                 trace: Callable[[dict], None] | None = None):
        if not 4 <= guest_cid < 0xFFFFFFFF:
            raise NitroError(ErrorCode.InvalidArgument,
                             f"vsock guest CID {guest_cid} is invalid: enclave CIDs are 4 .. "
                             "2^32-2 (docs/vsock.md#addresses)")
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.trace = trace
        self.backend = None
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._listeners: dict[int, VsockListener] = {}
        self._ctrl: collections.deque[bytes] = collections.deque()
        self._spare: DescriptorChain | None = None
        self._starved: set[_Conn] = set()
        self._lingering: set[_Conn] = set()
        self._bridge: _Bridge | None = None
        self._next_port = 49152
        self._closed = False
        self.stats = collections.Counter()

    # -- config -----------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """Config space: {le64 guest_cid} (docs/vsock.md#device); bytes past it read as zero."""
        cfg = struct.pack("<Q", self.guest_cid)
        return (cfg[offset:offset + size]).ljust(size, b"\0")

    # -- parent-facing API ------------------------------------------------------------

    def listen(self, port: int) -> VsockListener:
        """Listen on parent port ``port`` (CID 3). Raises NitroError(InvalidArgument) if the
        port is taken or out of range."""
        return self._add_listener(VsockListener(self, port))

    def heartbeat(self, port: int = HEARTBEAT_PORT) -> HeartbeatListener:
        """Serve the Nitro heartbeat on ``port`` (docs/vsock.md#heartbeat); call before QEMU
        starts."""
        return self._add_listener(HeartbeatListener(self, port))

    def _add_listener(self, lst: VsockListener) -> VsockListener:
        if not 0 <= lst.port <= 0xFFFFFFFF:
            raise NitroError(ErrorCode.InvalidArgument, f"vsock port {lst.port} out of range")
        self._check_open()

        def add() -> None:
            if lst.port in self._listeners:
                raise NitroError(ErrorCode.InvalidArgument,
                                 f"vsock port {lst.port} on CID 3 is already listened on")
            self._listeners[lst.port] = lst

        self.run_on_loop(add)
        return lst

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """Connect the parent to the guest's ``port``; returns a connected blocking socket.

        Raises ConnectionRefusedError if the guest answers RST (nobody listens),
        TimeoutError if it does not answer in ``timeout`` s (the attempt is then reset).
        """
        self._check_open()
        done = threading.Event()
        result: list = []

        def on_result(err: BaseException | None, user: socket.socket | None = None) -> None:
            result.append((err, user))
            done.set()

        key_box: list = []
        self.run_on_loop(lambda: key_box.append(self._start_connect(port, None, on_result)))
        if not done.wait(timeout):
            def abort() -> None:
                conn = self._conns.get(key_box[0]) if key_box else None
                if conn is not None and conn.state == "connecting":
                    cb, conn.on_result = conn.on_result, None
                    self._reset(conn, send_rst=True)  # the guest forgets the attempt
                    if cb is not None:
                        cb(TimeoutError(f"guest CID {self.guest_cid} did not answer a "
                                        f"connection to port {port} within {timeout} s"))
            self.run_on_loop(abort)
        err, user = result[0]
        if err is not None:
            raise err
        return user

    def serve_unix_bridge(self, path: str | os.PathLike) -> None:
        """Serve the hybrid-vsock convention on Unix socket ``path``
        (docs/vsock.md#unix-bridge).

        A parent program connects to ``path``, writes ``CONNECT <port>\\n``, reads
        ``OK <local port>\\n`` and then exchanges raw bytes with the guest's ``port`` (the
        connection is closed if the guest refuses). A guest connection to parent port P (with
        no Python listener on P) is connected to the Unix socket ``<path>_<P>`` if it exists,
        else refused with RST. Raises NitroError(FileOperationFailure) if ``path`` cannot be
        bound.
        """
        self._check_open()
        path = os.fspath(path)
        if self._bridge is not None:
            raise NitroError(ErrorCode.InvalidArgument,
                             f"vsock device already serves a Unix bridge at {self._bridge.path}")
        br = _Bridge(path)
        try:
            if os.path.exists(path):
                os.unlink(path)
            br.sock.bind(path)
            br.sock.listen(64)
            br.sock.setblocking(False)
        except OSError as e:
            br.sock.close()
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"vsock Unix bridge {path}: cannot listen: {e.strerror or e}") \
                from None
        self._bridge = br
        if self.backend is not None and self.backend.running:
            self.run_on_loop(lambda: self.backend.add_reader(br.sock.fileno(),
                                                             self._bridge_accept))

    def close(self) -> None:
        """Release every connection, listener and the bridge (idempotent, any thread)."""
        if self._closed:
            return
        self.run_on_loop(self._close_all)

    @property
    def connections(self) -> list[tuple[int, int, str]]:
        """Snapshot of (parent port, guest port, state) for open connections."""
        return [(c.local_port, c.peer_port, c.state) for c in list(self._conns.values())]

    def _check_open(self) -> None:
        if self._closed:
            raise NitroError(ErrorCode.InvalidArgument, "vsock device is closed")

    # -- VirtioDevice hooks -----------------------------------------------------------

    def on_start(self, backend) -> None:
        """Register the bridge's listening socket with the loop."""
        super().on_start(backend)
        if self._bridge is not None:
            backend.add_reader(self._bridge.sock.fileno(), self._bridge_accept)

    def on_kick(self, queue_index: int) -> None:
        """tx: process the guest's packets; rx: new buffers, resume blocked senders."""
        if queue_index == TX_QUEUE:
            self._process_tx()
        self._flush_ctrl()
        if self._starved and not self._ctrl:
            starved = list(self._starved)
            self._starved.clear()
            for conn in starved:
                self._update_reader(conn)

    def on_queue_stop(self, queue_index: int) -> None:
        """The driver reset or QEMU stopped: every connection is gone on the guest side."""
        if self._spare is not None:
            self._spare.release()
            self._spare = None
        self._ctrl.clear()
        for conn in list(self._conns.values()):
            self._reset(conn, send_rst=False,
                        err=ConnectionResetError("the enclave's vsock device was reset"))

    def on_stop(self) -> None:
        """The back end is stopping: release everything."""
        self._close_all()

    # -- packets to the guest ---------------------------------------------------------

    def _hdr(self, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> bytes:
        conn.announced_fwd = conn.fwd_cnt
        h = HEADER.pack(PARENT_CID, self.guest_cid, conn.local_port, conn.peer_port, length,
                        TYPE_STREAM, op, flags, self.buf_alloc, conn.fwd_cnt)
        return h

    def _send_ctrl(self, pkt: bytes) -> None:
        self._ctrl.append(pkt)
        self._flush_ctrl()

    def _send_rst_to(self, src_cid: int, src_port: int, dst_port: int) -> None:
        self._send_ctrl(HEADER.pack(src_cid, self.guest_cid, src_port, dst_port, 0, TYPE_STREAM,
                                    Op.RST, 0, 0, 0))

    def _pop_rx(self) -> DescriptorChain | None:
        if self._spare is not None:
            c, self._spare = self._spare, None
            return c
        b = self.backend
        if b is None:
            return None
        return b.queues[RX_QUEUE].pop()

    def _flush_ctrl(self) -> None:
        if not self._ctrl:
            return
        b = self.backend
        if b is None:
            return
        q = b.queues[RX_QUEUE]
        trace = self.trace
        while self._ctrl:
            chain = self._pop_rx()
            if chain is None:
                break
            pkt = self._ctrl.popleft()
            if chain.writable_len < HDR_SIZE:
                chain.release()
                raise VhostUserError(f"vsock rx buffer of {chain.writable_len} bytes cannot "
                                     f"hold a {HDR_SIZE}-byte header")
            chain.write(pkt)
            q.push(chain, len(pkt))
            self.stats["rx_packets"] += 1
            if trace is not None:
                self._trace("rx", pkt)
        q.notify()

    def _trace(self, direction: str, pkt: bytes) -> None:
        f = HEADER.unpack_from(pkt)
        self.trace({"t": time.monotonic(), "dir": direction, "src_cid": f[0], "dst_cid": f[1],
                    "src_port": f[2], "dst_port": f[3], "len": f[4], "type": f[5], "op": f[6],
                    "op_name": OP_NAMES.get(f[6], str(f[6])), "flags": f[7],
                    "buf_alloc": f[8], "fwd_cnt": f[9]})

    # -- parent socket -> guest -------------------------------------------------------

    def _update_reader(self, conn: _Conn) -> None:
        want = (conn.state == "established" and not conn.parent_eof
                and not conn.guest_shut & SHUTDOWN_RCV and conn.sock is not None
                and conn.peer_credit() > 0)
        if want != conn.reading:
            conn.reading = want
            fd = conn.sock.fileno()
            if want:
                self.backend.add_reader(fd, lambda: self._on_parent_readable(conn))
            else:
                self.backend.remove_reader(fd)

    def _on_parent_readable(self, conn: _Conn) -> None:
        b = self.backend
        q = b.queues[RX_QUEUE]
        sent = 0
        trace = self.trace
        try:
            while sent < _BATCH:
                if self._ctrl:
                    self._flush_ctrl()
                    if self._ctrl:
                        self._starve(conn)
                        break
                credit = conn.peer_credit()
                if credit <= 0:
                    if not conn.credit_requested:
                        conn.credit_requested = True
                        self._send_ctrl(self._hdr(conn, Op.CREDIT_REQUEST))
                    self._update_reader(conn)
                    break
                chain = self._pop_rx()
                if chain is None:
                    self._starve(conn)
                    break
                seg = _payload_segment(chain)
                if seg is None:
                    chain.release()
                    raise VhostUserError(f"vsock rx buffer of {chain.writable_len} bytes has no "
                                         "room for payload after the header")
                n = min(len(seg), credit)
                if conn.pre_data:
                    got = min(n, len(conn.pre_data))
                    seg[:got] = conn.pre_data[:got]
                    conn.pre_data = conn.pre_data[got:]
                else:
                    try:
                        got = conn.sock.recv_into(seg, n)
                    except BlockingIOError:
                        seg.release()
                        self._spare = chain
                        break
                    except OSError:
                        got = 0
                seg.release()
                if got == 0:
                    self._spare = chain
                    self._parent_eof(conn)
                    break
                h = self._hdr(conn, Op.RW, 0, got)
                chain.write(h)
                q.push(chain, HDR_SIZE + got)
                conn.tx_cnt = (conn.tx_cnt + got) & 0xFFFFFFFF
                sent += 1
                self.stats["rx_packets"] += 1
                self.stats["rx_bytes"] += got
                if trace is not None:
                    self._trace("rx", h)
        finally:
            if sent:
                q.notify()

    def _starve(self, conn: _Conn) -> None:
        """No rx buffer: stop reading ``conn`` until the guest posts buffers."""
        if conn.reading:
            conn.reading = False
            self.backend.remove_reader(conn.sock.fileno())
        self._starved.add(conn)

    def _parent_eof(self, conn: _Conn) -> None:
        """The parent shut its sending side; tell the guest (SHUTDOWN SEND, plus RCV if the
        parent closed entirely: its socket reports POLLHUP)."""
        conn.parent_eof = True
        self._update_reader(conn)
        flags = SHUTDOWN_SEND
        if _peer_closed(conn.sock):
            flags = SHUTDOWN_BOTH
            conn.out.clear()  # nobody will read it
            self.backend.remove_writer(conn.sock.fileno())
        self._send_ctrl(self._hdr(conn, Op.SHUTDOWN, flags))
        if flags == SHUTDOWN_BOTH or conn.guest_shut & SHUTDOWN_SEND:
            # Both directions are done: the guest answers with RST; don't wait forever.
            conn.timer = self.backend.call_later(
                CLOSE_TIMEOUT_S, lambda: self._reset(conn, send_rst=True)
                if self._conns.get((conn.local_port, conn.peer_port)) is conn else None)

    # -- guest -> parent --------------------------------------------------------------

    def _process_tx(self) -> None:
        q = self.backend.queues[TX_QUEUE]
        handle = self._handle_packet
        trace = self.trace
        n = 0
        try:
            while (chain := q.pop()) is not None:
                raw = chain.read()
                q.push(chain, 0)
                n += 1
                if len(raw) < HDR_SIZE:
                    raise VhostUserError(f"vsock tx packet of {len(raw)} bytes is shorter than "
                                         f"its {HDR_SIZE}-byte header")
                if trace is not None:
                    self._trace("tx", raw)
                handle(raw)
        finally:
            if n:
                q.notify()

    def _handle_packet(self, raw: bytes) -> None:
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack_from(raw)
        self.stats["tx_packets"] += 1
        if src_cid != self.guest_cid:
            self.stats["dropped_bad_src"] += 1  # a guest spoofing another CID: drop
            return
        if dst_cid != PARENT_CID or typ != TYPE_STREAM:
            # docs/vsock.md#addresses: only CID 3 is reachable from an enclave; no seqpacket
            # offered.
            self.stats["rst_unreachable"] += 1
            if op != Op.RST:
                self._send_rst_to(dst_cid, dst_port, src_port)
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is None:
            if op == Op.REQUEST:
                self._accept(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:
                self._send_rst_to(PARENT_CID, dst_port, src_port)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if op == Op.RW:
            if conn.state != "established":
                self._reset(conn, send_rst=True)
                return
            payload = memoryview(raw)[HDR_SIZE:HDR_SIZE + length]
            conn.rx_cnt = (conn.rx_cnt + len(payload)) & 0xFFFFFFFF
            self.stats["tx_bytes"] += len(payload)
            self._to_parent(conn, payload)
        elif op == Op.RESPONSE:
            if conn.state != "connecting":
                self._reset(conn, send_rst=True)
                return
            conn.state = "established"
            cb, conn.on_result = conn.on_result, None
            if cb is not None:
                cb(None)
        elif op == Op.CREDIT_UPDATE:
            pass
        elif op == Op.CREDIT_REQUEST:
            self._send_ctrl(self._hdr(conn, Op.CREDIT_UPDATE))
        elif op == Op.SHUTDOWN:
            conn.guest_shut |= flags & SHUTDOWN_BOTH
            if conn.guest_shut == SHUTDOWN_BOTH:
                # docs/vsock.md#shutdown-and-reset: a guest close (SHUTDOWN both) gets its RST at
                # once.
                self._reset(conn, send_rst=True)
                return
            if conn.guest_shut & SHUTDOWN_SEND:
                self._maybe_shut_parent(conn)
        elif op == Op.RST:
            self._reset(conn, send_rst=False,
                        err=ConnectionRefusedError(
                            f"guest CID {self.guest_cid} refused port {conn.peer_port}"))
            return
        elif op == Op.REQUEST:
            self._reset(conn, send_rst=True)
            return
        if conn.credit_requested and conn.peer_credit() > 0:
            conn.credit_requested = False
        if conn.state == "established":
            self._update_reader(conn)

    def _to_parent(self, conn: _Conn, payload: memoryview) -> None:
        if conn.sock is None or conn.wr_shut:
            return
        if not conn.out:
            try:
                n = conn.sock.send(payload)
            except BlockingIOError:
                n = 0
            except OSError:
                self._reset(conn, send_rst=True)  # the parent closed: the guest gets RST
                return
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
            if n < len(payload):
                conn.out += payload[n:]
                self.backend.add_writer(conn.sock.fileno(), lambda: self._on_parent_writable(conn))
        else:
            conn.out += payload
        self._maybe_credit_update(conn)

    def _maybe_credit_update(self, conn: _Conn) -> None:
        # Tell the guest about consumed bytes once a quarter of the window is free again; every
        # packet we send carries fwd_cnt too.
        if ((conn.fwd_cnt - conn.announced_fwd) & 0xFFFFFFFF) >= self.buf_alloc // 4:
            self._send_ctrl(self._hdr(conn, Op.CREDIT_UPDATE))

    def _on_parent_writable(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.backend.remove_writer(conn.sock.fileno())
            conn.out.clear()
            if conn in self._lingering:
                self._finish_linger(conn)
            else:
                self._reset(conn, send_rst=True)
            return
        del conn.out[:n]
        conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
        if not conn.out:
            self.backend.remove_writer(conn.sock.fileno())
            if conn in self._lingering:
                self._finish_linger(conn)
                return
            if conn.guest_shut & SHUTDOWN_SEND:
                self._maybe_shut_parent(conn)
        if conn in self._lingering:
            return
        self._maybe_credit_update(conn)

    def _maybe_shut_parent(self, conn: _Conn) -> None:
        """Guest sent SHUTDOWN SEND: the parent reads EOF once pending bytes are delivered."""
        if conn.out or conn.wr_shut or conn.sock is None:
            return
        conn.wr_shut = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- connection setup and teardown ------------------------------------------------

    def _accept(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        lst = self._listeners.get(local_port)
        sock = None
        user = None
        if lst is not None:
            sock, user = socket.socketpair()
        elif self._bridge is not None:
            target = f"{self._bridge.path}_{local_port}"
            if os.path.exists(target):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(target)
                    sock = s
                except OSError:
                    s.close()
        if sock is None:
            # docs/vsock.md#connection-setup: a REQUEST to a port nobody listens on gets RST at
            # once.
            self.stats["rst_unlistened"] += 1
            self._send_rst_to(PARENT_CID, local_port, peer_port)
            return
        sock.setblocking(False)
        conn = _Conn(local_port, peer_port, sock)
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        conn.state = "established"
        self._conns[(local_port, peer_port)] = conn
        self._send_ctrl(self._hdr(conn, Op.RESPONSE))
        self.stats["accepted"] += 1
        if user is not None:
            user.setblocking(True)
            lst._deliver(user)
        self._update_reader(conn)

    def _alloc_port(self, peer_port: int) -> int:
        for _ in range(0x10000):
            p = self._next_port
            self._next_port = p + 1 if p < 0xFFFF else 1024
            if (p, peer_port) not in self._conns and p not in self._listeners:
                return p
        raise NitroError(ErrorCode.InvalidArgument, "no free parent vsock port")

    def _start_connect(self, port: int, sock: socket.socket | None,
                       on_result: Callable) -> tuple[int, int]:
        """Loop thread: send REQUEST to guest ``port``; ``on_result(err, user_sock)`` later."""
        user = None
        if sock is None:
            sock, user = socket.socketpair()
            sock.setblocking(False)
        local = self._alloc_port(port)
        conn = _Conn(local, port, sock)

        def result(err: BaseException | None) -> None:
            if err is None:
                if user is not None:
                    user.setblocking(True)
                on_result(None, user)
            else:
                if user is not None:
                    user.close()
                on_result(err, None)

        conn.on_result = result
        self._conns[(local, port)] = conn
        self._send_ctrl(self._hdr(conn, Op.REQUEST))
        return (local, port)

    def _reset(self, conn: _Conn, *, send_rst: bool, err: BaseException | None = None) -> None:
        """Drop ``conn``: optionally RST the guest; deliver pending bytes, then close."""
        key = (conn.local_port, conn.peer_port)
        if self._conns.get(key) is conn:
            del self._conns[key]
        if send_rst:
            self._send_ctrl(self._hdr(conn, Op.RST))
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        cb, conn.on_result = conn.on_result, None
        if cb is not None:
            cb(err or ConnectionRefusedError(
                f"guest CID {self.guest_cid} refused port {conn.peer_port}"))
        self._starved.discard(conn)
        if conn.sock is None:
            return
        if conn.reading:
            conn.reading = False
            self.backend.remove_reader(conn.sock.fileno())
        if conn.out and self.backend is not None and self.backend.running:
            self._lingering.add(conn)  # the writer keeps flushing; closed when empty
            return
        self._close_sock(conn)

    def _finish_linger(self, conn: _Conn) -> None:
        self._lingering.discard(conn)
        self._close_sock(conn)

    def _close_sock(self, conn: _Conn) -> None:
        s, conn.sock = conn.sock, None
        if s is None:
            return
        if self.backend is not None and s.fileno() >= 0:
            self.backend.remove_reader(s.fileno())
            self.backend.remove_writer(s.fileno())
        s.close()

    def _unlisten(self, lst: VsockListener) -> None:
        if self._listeners.get(lst.port) is lst:
            del self._listeners[lst.port]
        lst._drain()

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._reset(conn, send_rst=False,
                        err=ConnectionResetError("the vsock device was closed"))
        for conn in list(self._lingering):
            self._finish_linger(conn)
        for lst in list(self._listeners.values()):
            self._unlisten(lst)
        if self._spare is not None:
            self._spare.release()
            self._spare = None
        self._ctrl.clear()
        br, self._bridge = self._bridge, None
        if br is not None:
            for s, _ in br.pending.values():
                if self.backend is not None:
                    self.backend.remove_reader(s.fileno())
                s.close()
            br.pending.clear()
            if self.backend is not None:
                self.backend.remove_reader(br.sock.fileno())
            br.sock.close()
            try:
                os.unlink(br.path)
            except FileNotFoundError:
                pass

    # -- hybrid Unix bridge -----------------------------------------------------------

    def _bridge_accept(self) -> None:
        br = self._bridge
        if br is None:
            return
        try:
            s, _ = br.sock.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        buf = bytearray()
        br.pending[s.fileno()] = (s, buf)
        self.backend.add_reader(s.fileno(), lambda: self._bridge_read_line(s, buf))

    def _bridge_read_line(self, s: socket.socket, buf: bytearray) -> None:
        br = self._bridge
        try:
            data = s.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        fd = s.fileno()
        if data:
            buf += data
            if b"\n" not in buf:
                if len(buf) < 64:
                    return
                data = b""  # no line in 64 bytes: not the convention
        self.backend.remove_reader(fd)
        br.pending.pop(fd, None)
        line, _, rest = bytes(buf).partition(b"\n")
        parts = line.split()
        if not data and b"\n" not in buf or len(parts) != 2 or parts[0] != b"CONNECT" \
                or not parts[1].isdigit() or int(parts[1]) > 0xFFFFFFFF:
            s.close()
            return
        port = int(parts[1])
        box: list = []

        def on_result(err: BaseException | None, _user: socket.socket | None) -> None:
            if err is not None:
                return  # _reset closes the client socket: the parent sees EOF
            conn = self._conns.get(box[0])
            try:
                s.send(b"OK %d\n" % conn.local_port)
            except OSError:
                self._reset(conn, send_rst=True)
                return
            self._update_reader(conn)
            if conn.pre_data:  # bytes the client sent right after its CONNECT line
                self.backend.call_soon(
                    lambda: self._on_parent_readable(conn) if conn.sock is not None else None)

        box.append(self._start_connect(port, s, on_result))
        conn = self._conns[box[0]]
        conn.pre_data = rest
        conn.timer = self.backend.call_later(
            10.0, lambda: self._reset(conn, send_rst=True, err=TimeoutError("no answer"))
            if conn.state == "connecting" and self._conns.get(box[0]) is conn else None)


def _payload_segment(chain: DescriptorChain) -> memoryview | None:
    """The first contiguous writable span after the header (None if there is none)."""
    skip = HDR_SIZE
    for v in chain.writable:
        lv = len(v)
        if skip >= lv:
            skip -= lv
            continue
        return v[skip:]
    return None


def _peer_closed(sock: socket.socket) -> bool:
    """True if the other end of a Unix stream socket is fully closed (POLLHUP)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
