"""Fuzz target: the vsock device's packet handler, driven by a hostile guest and a busy parent.

One input is a script of records ``[op] [length u16] [body]`` played against a fresh
:class:`harness.vsock.VsockDevice` (guest CID 21, a 2 KiB receive window, at most 8
connections) served by the synchronous back end of :mod:`fuzz.fakes`, with its rx and tx rings
in fake guest RAM, parent port 5000 listened on (backlog 2) and the heartbeat on 9000
(docs/vsock.md). ``op & 7``:

0. put ``body`` on tx as one packet (flag 8: a descriptor 64 KiB longer than the packet; flag
   16: kick at once);
1. kick tx;
2. collect rx, post ``body[0] % 32 + 1`` rx buffers (flag 8: of ``body[1]`` bytes, else 4 KiB
   plus the header) and kick rx;
3. / 4. the parent sends ``body[1:]`` on / receives from its connection ``body[0]``;
5. the parent closes (or shuts down one direction of) its connection ``body[0]``;
6. one turn of the loop (flag 8: every timer fires);
7. the parent connects to guest port ``body[:4]``; flag 8 instead stops and restarts ring
   ``body[0] & 1`` (the driver reset it).

Declared errors: ``VhostUserError`` (a guest that broke a ring rule: the back end drops it).
Checked besides exceptions: no connection ever buffers more guest bytes than the window it
was offered, the device never writes more than an rx buffer holds, and after the device is
closed every descriptor it opened is closed again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct

from harness.vhost_user import VhostUserError
from harness.vsock import VsockDevice
from harness.vsock.packet import HDR_SIZE, MAX_TX_PACKET, RX_QUEUE, TX_QUEUE

from fuzz.fakes import GuestRam, LoopBackend, RegionSpec, RingDriver

NAME = "vsock"
DECLARED = (VhostUserError,)
MAX_LEN = 8192

GUEST_CID = 21
#: The receive window the device offers per connection: small, so that an input of a few KiB
#: can overrun it (the device's default is 256 KiB).
BUF_ALLOC = 2048
LISTEN_PORT, HEARTBEAT_PORT = 5000, 9000
RX_NUM, TX_NUM = 32, 32
RX_SLOT, TX_SLOT = HDR_SIZE + 4096, MAX_TX_PACKET + 16
RAM_GPA = 0x4000_0000
_LEN = struct.Struct("<H")


@functools.cache
def _ram() -> tuple[GuestRam, int]:
    rx_size = 16 * RX_NUM + 8 * RX_NUM + 64 + RX_NUM * RX_SLOT
    tx_size = 16 * TX_NUM + 8 * TX_NUM + 64 + TX_NUM * TX_SLOT
    size = (rx_size + tx_size + 0xFFFF) & ~0xFFFF
    return GuestRam([RegionSpec(RAM_GPA, size, 0x7F30_0000_0000, 0x1000)]), RAM_GPA + rx_size


def _records(data: bytes):
    pos = 0
    while pos < len(data):
        op = data[pos]
        n = _LEN.unpack(data[pos + 1:pos + 3].ljust(2, b"\0"))[0]
        yield op, data[pos + 3:pos + 3 + n]
        pos += 3 + n


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Session:
    """One input's device, back end, rings and parent-side sockets."""

    def __init__(self) -> None:
        ram, tx_base = _ram()
        self.device = VsockDevice(GUEST_CID, buf_alloc=BUF_ALLOC, max_connections=8)
        self.backend = LoopBackend(self.device, ram)
        self.device.on_start(self.backend)
        self.rx = RingDriver(ram, RAM_GPA, RX_NUM, RX_SLOT)
        self.tx = RingDriver(ram, tx_base, TX_NUM, TX_SLOT)
        self.backend.start_queue(RX_QUEUE, self.rx)
        self.backend.start_queue(TX_QUEUE, self.tx)
        self.listener = self.device.listen(LISTEN_PORT, backlog=2)
        self.device.heartbeat(HEARTBEAT_PORT)
        self.parents: list[socket.socket] = []
        self.shrunk: set[socket.socket] = set()
        self.post_rx(16, RX_SLOT)

    def post_rx(self, count: int, size: int) -> None:
        self.collect_rx()
        for _ in range(count):
            if self.rx.add(None, size) is None:
                break
        self.device.on_kick(RX_QUEUE)

    def collect_rx(self) -> None:
        for _head, pkt in self.rx.collect():
            assert len(pkt) >= HDR_SIZE or not pkt, f"an rx packet of {len(pkt)} bytes"

    def kick_tx(self) -> None:
        self.device.on_kick(TX_QUEUE)
        self.tx.collect()

    def send_tx(self, body: bytes, flags: int) -> None:
        length = len(body) + (64 << 10 if flags & 1 else 0)
        if self.tx.add(body, length) is None:
            self.kick_tx()  # the ring is full: the guest waits for the device
            if self.tx.add(body, length) is None:
                return
        if flags & 2:
            self.kick_tx()

    def parent(self, body: bytes) -> socket.socket | None:
        self.accept_waiting()
        if not self.parents or not body:
            return None
        return self.parents[body[0] % len(self.parents)]

    def accept_waiting(self) -> None:
        while True:
            try:
                self.parents.append(self.listener.accept(0))
            except (TimeoutError, OSError):
                return

    def connect(self, port: int) -> None:
        def on_result(err, user) -> None:
            if user is not None:
                self.parents.append(user)

        self.device._table.start_connect(port, None, on_result)

    def restart_ring(self, index: int) -> None:
        driver = self.rx if index == RX_QUEUE else self.tx
        self.backend.stop_queue(index)
        driver.reset()
        self.backend.start_queue(index, driver)

    def shrink_socket_buffers(self) -> None:
        """Give each new connection's parent socket the smallest send buffer, so that a parent
        that does not read makes the device hold guest bytes after a few KiB."""
        for conn in self.device._conns.values():
            if conn.sock is not None and conn.sock not in self.shrunk:
                self.shrunk.add(conn.sock)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)

    def play(self, op: int, body: bytes) -> None:
        self.shrink_socket_buffers()
        kind, flags = op & 7, op >> 3
        if kind == 0:
            self.send_tx(body, flags)
        elif kind == 1:
            self.kick_tx()
        elif kind == 2:
            count = (body[0] % 32 + 1) if body else 1
            size = body[1] if flags & 1 and len(body) > 1 else RX_SLOT
            self.post_rx(count, size)
        elif kind in (3, 4, 5):
            sock = self.parent(body)
            if sock is None:
                return
            with contextlib.suppress(OSError):
                if kind == 3:
                    sock.send(body[1:], socket.MSG_DONTWAIT)
                elif kind == 4:
                    sock.recv(1 << 16, socket.MSG_DONTWAIT)
                else:
                    mode = body[1] % 3 if len(body) > 1 else 0
                    if mode == 0:
                        sock.close()
                    else:
                        sock.shutdown(socket.SHUT_WR if mode == 1 else socket.SHUT_RD)
        elif kind == 6:
            self.backend.step(fire_timers=bool(flags & 1))
        elif flags & 1:
            self.restart_ring(body[0] & 1 if body else 0)
        else:
            self.connect(int.from_bytes(body[:4].ljust(4, b"\0"), "little"))
        self.check_windows()

    def check_windows(self) -> None:
        limit = self.device.buf_alloc
        for conn in list(self.device._conns.values()) + list(self.device._table.lingering):
            assert len(conn.out) <= limit, \
                f"connection {conn.local_port}<-{conn.peer_port} buffers {len(conn.out)} bytes " \
                f"for a {limit}-byte window"

    def close(self) -> None:
        try:
            self.device.close()
            self.accept_waiting()
        finally:
            for s in self.parents:
                s.close()
            self.backend.close()


def one_input(data: bytes) -> None:
    """Play ``data``'s records against a fresh vsock device (see the module doc)."""
    _ram()  # made once per process; its mappings hold descriptors of their own
    fds = _open_fds()
    session = _Session()
    try:
        for op, body in _records(data):
            session.play(op, body)
        session.kick_tx()
        session.backend.step()
    finally:
        session.close()
    left = _open_fds() - fds
    assert left == 0, f"{left} descriptors left open after the device was closed"
