"""The virtio-vsock device model (virtio ID 19) a vhost-user back end serves to the enclave.

docs/vsock.md is the contract. The enclave's guest kernel drives an rx queue (0) and a tx queue
(1); QEMU's vhost-user-vsock-device hands only those two to the back end. The parent is CID 3,
as on Nitro; every other destination CID (the host's 2, other enclaves) is answered with RST.

:class:`VsockDevice` owns the queues: it reads the guest's packets off tx and dispatches them,
and it puts control packets (RESPONSE, RST, SHUTDOWN, credit) on rx ahead of data. It delegates
connection setup and teardown to :class:`~harness.vsock.lifecycle.ConnectionTable`, the parent
sockets' bytes to :class:`~harness.vsock.pump.ParentPump` and the Unix bridge to
:class:`~harness.vsock.bridge.UnixBridge`.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
from typing import Callable

from harness.errors import ErrorCode, NitroError
from harness.vhost_user import DescriptorChain, VhostUserError, VirtioDevice
from harness.vsock.bridge import UnixBridge
from harness.vsock.connection import _Conn
from harness.vsock.endpoints import HeartbeatListener, VsockListener, connect_parent
from harness.vsock.lifecycle import ConnectionTable
from harness.vsock.packet import (
    DEFAULT_BACKLOG,
    HDR_SIZE,
    HEADER,
    HEARTBEAT_PORT,
    MAX_CONNECTIONS,
    MAX_TX_PACKET,
    PARENT_CID,
    RX_QUEUE,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TX_QUEUE,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_F_STREAM,
    Op,
    header_refusal,
    trace_record,
)
from harness.vsock.pump import ParentPump


class VsockDevice(VirtioDevice):
    """virtio-vsock device model for the enclave with CID ``guest_cid`` (docs/vsock.md).

    ``buf_alloc``: receive buffer (bytes) advertised to the guest per connection (default
    256 KiB, Linux's default); a guest sending beyond it gets RST. ``max_connections``: open
    connections the guest may have at once (default 256; more REQUESTs get RST). Both bound
    what one enclave can make the host hold (docs/vsock.md#bounds); ``stats`` counts each
    refusal. ``trace``: called on the loop thread with one dict per packet
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
                 max_connections: int = MAX_CONNECTIONS,
                 trace: Callable[[dict], None] | None = None):
        if not 4 <= guest_cid < 0xFFFFFFFF:
            raise NitroError(ErrorCode.InvalidArgument,
                             f"vsock guest CID {guest_cid} is invalid: enclave CIDs are 4 .. "
                             "2^32-2 (docs/vsock.md#addresses)")
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.trace = trace
        self.backend = None
        self._table = ConnectionTable(self)
        self._conns = self._table.conns  # the table's dict: looked up for every guest packet
        self._pump = ParentPump(self)
        # Replies waiting for rx buffers: tx is not read while they number the rx ring's size
        # (_ctrl_limit, docs/vsock.md#bounds).
        self._ctrl: collections.deque[bytes] = collections.deque()
        self._spare: DescriptorChain | None = None
        self._bridge: UnixBridge | None = None
        self._closed = False
        self.stats = collections.Counter()

    # -- config -----------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """Config space: {le64 guest_cid} (docs/vsock.md#device); bytes past it read as zero."""
        cfg = struct.pack("<Q", self.guest_cid)
        return (cfg[offset:offset + size]).ljust(size, b"\0")

    # -- parent-facing API ------------------------------------------------------------

    def listen(self, port: int, backlog: int = DEFAULT_BACKLOG) -> VsockListener:
        """Listen on parent port ``port`` (CID 3) with an accept queue of ``backlog``
        connections (more REQUESTs get RST, docs/vsock.md#bounds). Raises
        NitroError(InvalidArgument) if the port is taken or out of range, or ``backlog`` < 1."""
        if backlog < 1:
            raise NitroError(ErrorCode.InvalidArgument,
                             f"vsock listen backlog {backlog} on port {port}: at least 1")
        return self._add_listener(VsockListener(self, port, backlog))

    def heartbeat(self, port: int = HEARTBEAT_PORT) -> HeartbeatListener:
        """Serve the Nitro heartbeat on ``port`` (docs/vsock.md#heartbeat); call before QEMU
        starts."""
        return self._add_listener(HeartbeatListener(self, port))

    def _add_listener(self, lst: VsockListener) -> VsockListener:
        if not 0 <= lst.port <= 0xFFFFFFFF:
            raise NitroError(ErrorCode.InvalidArgument, f"vsock port {lst.port} out of range")
        self._check_open()
        self.run_on_loop(lambda: self._table.add_listener(lst))
        return lst

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """Connect the parent to the guest's ``port``; returns a connected blocking socket.

        Raises ConnectionRefusedError if the guest answers RST (nobody listens),
        TimeoutError if it does not answer in ``timeout`` s (the attempt is then reset).
        """
        self._check_open()
        return connect_parent(self, port, timeout)

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
        br = self._bridge = UnixBridge(self, path)
        if self.backend is not None and self.backend.running:
            self.run_on_loop(lambda: br.start(self.backend))

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

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.close_all()
        if self._spare is not None:
            self._spare.release()
            self._spare = None
        self._ctrl.clear()
        br, self._bridge = self._bridge, None
        if br is not None:
            br.close()

    # -- VirtioDevice hooks -----------------------------------------------------------

    def on_start(self, backend) -> None:
        """Register the bridge's listening socket with the loop."""
        super().on_start(backend)
        if self._bridge is not None:
            self._bridge.start(backend)

    def on_kick(self, queue_index: int) -> None:
        """tx: process the guest's packets; rx: new buffers, resume blocked senders (and tx
        processing paused for lack of room for replies)."""
        if queue_index == TX_QUEUE:
            self._process_tx()
        self._flush_ctrl()
        if queue_index == RX_QUEUE and len(self._ctrl) < self._ctrl_limit():
            if self.backend.queues[TX_QUEUE].has_available():
                self._process_tx()
                self._flush_ctrl()
        if self._pump.starved and not self._ctrl:
            self._pump.resume()

    def on_queue_stop(self, queue_index: int) -> None:
        """The driver reset or QEMU stopped: every connection is gone on the guest side."""
        if self._spare is not None:
            self._spare.release()
            self._spare = None
        self._ctrl.clear()
        self._table.reset_all(ConnectionResetError("the enclave's vsock device was reset"))

    def on_stop(self) -> None:
        """The back end is stopping: release everything."""
        self._close_all()

    # -- packets to the guest ---------------------------------------------------------

    def _hdr(self, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> bytes:
        return conn.header(self.guest_cid, self.buf_alloc, op, flags, length)

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
                trace(trace_record("rx", pkt))
        q.notify()

    # -- packets from the guest -------------------------------------------------------

    def _ctrl_limit(self) -> int:
        """Replies (RESPONSE, RST, credit) that may wait for rx buffers before tx is paused:
        Linux's vhost-vsock stops reading tx while more replies are queued than the rx ring
        holds (vhost_vsock_more_replies), so a guest that sends without posting rx buffers
        cannot grow the reply queue (docs/vsock.md#bounds)."""
        return max(self.backend.queues[RX_QUEUE].num, 1)

    def _process_tx(self) -> None:
        q = self.backend.queues[TX_QUEUE]
        handle = self._handle_packet
        trace = self.trace
        ctrl = self._ctrl
        ctrl_limit = self._ctrl_limit()
        n = 0
        try:
            while len(ctrl) < ctrl_limit and (chain := q.pop()) is not None:
                n += 1
                size = chain.readable_len
                if not HDR_SIZE <= size <= MAX_TX_PACKET:
                    # Linux vhost_vsock_alloc_skb: a packet shorter than its header or longer
                    # than header + 64 KiB is dropped, before anything is copied.
                    q.push(chain, 0)
                    self.stats["dropped_short" if size < HDR_SIZE else "dropped_oversized"] += 1
                    continue
                raw = chain.read(MAX_TX_PACKET)
                q.push(chain, 0)
                if trace is not None:
                    trace(trace_record("tx", raw))
                handle(raw)
        finally:
            if n:
                q.notify()

    def _handle_packet(self, raw: bytes) -> None:
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack_from(raw)
        self.stats["tx_packets"] += 1
        refusal = header_refusal(self.guest_cid, src_cid, dst_cid, typ, length, len(raw))
        if refusal is not None:
            self.stats[refusal] += 1
            if refusal == "rst_unreachable" and op != Op.RST:
                self._send_rst_to(dst_cid, dst_port, src_port)
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is None:
            if op == Op.REQUEST:
                self._table.accept(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:
                self._send_rst_to(PARENT_CID, dst_port, src_port)
            return
        conn.peer_update(buf_alloc, fwd_cnt)
        if op == Op.RW:
            if conn.state != "established":
                self._table.reset(conn, send_rst=True)
                return
            if not self._pump.from_guest(conn, memoryview(raw)[HDR_SIZE:HDR_SIZE + length]):
                return
        elif op == Op.RESPONSE:
            if conn.state != "connecting":
                self._table.reset(conn, send_rst=True)
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
                self._table.reset(conn, send_rst=True)
                return
            if conn.guest_shut & SHUTDOWN_SEND:
                self._pump.maybe_shut_parent(conn)
        elif op == Op.RST:
            self._table.reset(conn, send_rst=False,
                              err=ConnectionRefusedError(
                                  f"guest CID {self.guest_cid} refused port {conn.peer_port}"))
            return
        elif op == Op.REQUEST:
            self._table.reset(conn, send_rst=True)
            return
        if conn.state == "established":
            self._pump.update_reader(conn)
