"""A vsock device's connections and listeners: setting connections up and tearing them down.

docs/vsock.md#connection-setup and #shutdown-and-reset: a guest REQUEST to a listened parent
port (or a Unix bridge target) is accepted with RESPONSE, else answered with RST; a parent
connection sends REQUEST and waits for the guest's RESPONSE or RST. A connection is dropped
with or without an RST to the guest; guest bytes the parent socket has not taken yet are still
delivered before its socket closes (the connection "lingers").
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

from harness.errors import ErrorCode, NitroError
from harness.vsock.connection import _Conn
from harness.vsock.packet import PARENT_CID, Op

if TYPE_CHECKING:
    from harness.vsock.device import VsockDevice
    from harness.vsock.endpoints import VsockListener


class ConnectionTable:
    """The connections (by (parent port, guest port)), listeners and lingering sockets of
    ``device``; loop thread only."""

    def __init__(self, device: "VsockDevice"):
        self.device = device
        self.conns: dict[tuple[int, int], _Conn] = {}
        self.listeners: dict[int, VsockListener] = {}
        self.lingering: set[_Conn] = set()
        self._next_port = 49152

    # -- setup --------------------------------------------------------------------------------

    def add_listener(self, lst: VsockListener) -> None:
        """Listen on ``lst.port``; raises NitroError(InvalidArgument) if it is taken."""
        if lst.port in self.listeners:
            raise NitroError(ErrorCode.InvalidArgument,
                             f"vsock port {lst.port} on CID 3 is already listened on")
        self.listeners[lst.port] = lst

    def accept(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest sent REQUEST to parent port ``local_port`` from ``peer_port``."""
        dev = self.device
        lst = self.listeners.get(local_port)
        sock = None
        user = None
        if len(self.conns) + len(self.lingering) >= dev.max_connections:
            # docs/vsock.md#bounds: each connection holds host descriptors; past the enclave's
            # share, refuse (RST) as Linux refuses a socket it cannot allocate.
            dev.stats["rst_connection_limit"] += 1
            dev._send_rst_to(PARENT_CID, local_port, peer_port)
            return
        if lst is not None and not lst.admits():
            # docs/vsock.md#bounds: a full accept queue (or a heartbeat already taken) gets RST,
            # as Linux's virtio_transport_recv_listen answers when sk_acceptq_is_full.
            dev.stats["rst_backlog_full"] += 1
            dev._send_rst_to(PARENT_CID, local_port, peer_port)
            return
        if lst is not None:
            sock, user = socket.socketpair()
        elif dev._bridge is not None:
            sock = dev._bridge.connect_target(local_port)
        if sock is None:
            # docs/vsock.md#connection-setup: a REQUEST to a port nobody listens on gets RST at
            # once.
            dev.stats["rst_unlistened"] += 1
            dev._send_rst_to(PARENT_CID, local_port, peer_port)
            return
        sock.setblocking(False)
        conn = _Conn(local_port, peer_port, sock)
        conn.peer_update(buf_alloc, fwd_cnt)
        conn.state = "established"
        self.conns[(local_port, peer_port)] = conn
        dev._send_ctrl(dev._hdr(conn, Op.RESPONSE))
        dev.stats["accepted"] += 1
        if user is not None:
            user.setblocking(True)
            lst._deliver(user)
        dev._pump.update_reader(conn)

    def _alloc_port(self, peer_port: int) -> int:
        for _ in range(0x10000):
            p = self._next_port
            self._next_port = p + 1 if p < 0xFFFF else 1024
            if (p, peer_port) not in self.conns and p not in self.listeners:
                return p
        raise NitroError(ErrorCode.InvalidArgument, "no free parent vsock port")

    def start_connect(self, port: int, sock: socket.socket | None,
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
        self.conns[(local, port)] = conn
        self.device._send_ctrl(self.device._hdr(conn, Op.REQUEST))
        return (local, port)

    # -- teardown -----------------------------------------------------------------------------

    def reset(self, conn: _Conn, *, send_rst: bool, err: BaseException | None = None) -> None:
        """Drop ``conn``: optionally RST the guest; deliver pending bytes, then close."""
        dev = self.device
        key = (conn.local_port, conn.peer_port)
        if self.conns.get(key) is conn:
            del self.conns[key]
        if send_rst:
            dev._send_ctrl(dev._hdr(conn, Op.RST))
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        cb, conn.on_result = conn.on_result, None
        if cb is not None:
            cb(err or ConnectionRefusedError(
                f"guest CID {dev.guest_cid} refused port {conn.peer_port}"))
        dev._pump.starved.discard(conn)
        if conn.sock is None:
            return
        if conn.reading:
            conn.reading = False
            dev.backend.remove_reader(conn.sock.fileno())
        if conn.out and dev.backend is not None and dev.backend.running:
            self.lingering.add(conn)  # the writer keeps flushing; closed when empty
            return
        self._close_sock(conn)

    def reset_all(self, err: BaseException) -> None:
        """Drop every connection without RST (the guest side is gone); ``err`` to waiters."""
        for conn in list(self.conns.values()):
            self.reset(conn, send_rst=False, err=err)

    def finish_linger(self, conn: _Conn) -> None:
        """A lingering connection's bytes are delivered (or the parent went away): close it."""
        self.lingering.discard(conn)
        self._close_sock(conn)

    def _close_sock(self, conn: _Conn) -> None:
        s, conn.sock = conn.sock, None
        if s is None:
            return
        backend = self.device.backend
        if backend is not None and s.fileno() >= 0:
            backend.remove_reader(s.fileno())
            backend.remove_writer(s.fileno())
        s.close()

    def unlisten(self, lst: VsockListener) -> None:
        """Stop listening on ``lst``'s port and close what nobody accepted."""
        if self.listeners.get(lst.port) is lst:
            del self.listeners[lst.port]
        lst._drain()

    def close_all(self) -> None:
        """Drop every connection, finish lingering ones, close every listener."""
        self.reset_all(ConnectionResetError("the vsock device was closed"))
        for conn in list(self.lingering):
            self.finish_linger(conn)
        for lst in list(self.listeners.values()):
            self.unlisten(lst)
