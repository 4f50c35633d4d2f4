"""Moving a vsock device's bytes between the parent's sockets and the guest.

Parent -> guest: a parent socket is read (on the loop, level-triggered) only while its
connection is established, the guest still receives and has credit; each read fills one rx
buffer (an RW packet). Without credit the device asks once (CREDIT_REQUEST); without rx buffers
it stops reading until the guest posts some (the connection is "starved"). Guest -> parent: RW
payloads go to the socket at once, the rest waits for it to become writable; consumed bytes
are announced back (docs/vsock.md#credit-flow, #buffers, #shutdown-and-reset).
"""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING

from harness.vhost_user import DescriptorChain, VhostUserError
from harness.vsock.connection import _Conn
from harness.vsock.packet import (
    HDR_SIZE,
    RX_QUEUE,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Op,
    trace_record,
)

if TYPE_CHECKING:
    from harness.vsock.device import VsockDevice

# A parent close we initiated waits this long for the guest's RST, then resets (Linux's
# vhost-vsock waits 8 s for the same).
CLOSE_TIMEOUT_S = 8.0
# Packets one parent socket may send per wakeup before others get a turn.
_BATCH = 64


class ParentPump:
    """The parent-socket side of ``device``'s connections, both directions; loop thread only.

    ``starved`` holds the connections waiting for rx buffers (:meth:`resume` restarts them).
    """

    def __init__(self, device: "VsockDevice"):
        self.device = device
        self.starved: set[_Conn] = set()

    # -- parent socket -> guest ---------------------------------------------------------------

    def update_reader(self, conn: _Conn) -> None:
        """Watch ``conn``'s socket for reading exactly while it may send to the guest."""
        want = (conn.state == "established" and not conn.parent_eof
                and not conn.guest_shut & SHUTDOWN_RCV and conn.sock is not None
                and conn.peer_credit() > 0)
        if want != conn.reading:
            conn.reading = want
            fd = conn.sock.fileno()
            if want:
                self.device.backend.add_reader(fd, lambda: self.on_parent_readable(conn))
            else:
                self.device.backend.remove_reader(fd)

    def resume(self) -> None:
        """The guest posted rx buffers: starved connections read again."""
        starved = list(self.starved)
        self.starved.clear()
        for conn in starved:
            self.update_reader(conn)

    def on_parent_readable(self, conn: _Conn) -> None:
        """Send what the parent wrote as RW packets, up to a batch, credit and rx buffers."""
        dev = self.device
        q = dev.backend.queues[RX_QUEUE]
        ctrl = dev._ctrl
        guest_cid, buf_alloc = dev.guest_cid, dev.buf_alloc
        sent = 0
        trace = dev.trace
        try:
            while sent < _BATCH:
                if ctrl:
                    dev._flush_ctrl()
                    if ctrl:
                        self._starve(conn)
                        break
                credit = conn.peer_credit()
                if credit <= 0:
                    if conn.credit_request_due():
                        dev._send_ctrl(dev._hdr(conn, Op.CREDIT_REQUEST))
                    self.update_reader(conn)
                    break
                chain = dev._pop_rx()
                if chain is None:
                    self._starve(conn)
                    break
                seg = _payload_segment(chain)
                if seg is None:
                    chain.release()
                    raise VhostUserError(f"vsock rx buffer of {chain.writable_len} bytes has no "
                                         "room for payload after the header")
                try:
                    n = min(len(seg), credit)
                    if conn.pre_data:
                        got = min(n, len(conn.pre_data))
                        seg[:got] = conn.pre_data[:got]
                        conn.pre_data = conn.pre_data[got:]
                    else:
                        try:
                            got = conn.sock.recv_into(seg, n)
                        except BlockingIOError:
                            got = -1  # nothing to read now
                        except OSError:
                            got = 0
                    seg.release()
                    if got > 0:
                        h = conn.header(guest_cid, buf_alloc, Op.RW, 0, got)
                        chain.write(h)
                except BaseException:
                    # The device holds the chain's head from pop to push: an unexpected error in
                    # between (a parent socket raising something else than OSError) must not
                    # lose it. It waits in the spare slot for the next packet.
                    seg.release()
                    dev._spare = chain
                    raise
                if got <= 0:
                    dev._spare = chain
                    if got == 0:
                        self._parent_eof(conn)
                    break
                q.push(chain, HDR_SIZE + got)
                conn.sent(got)
                sent += 1
                dev.stats["rx_packets"] += 1
                dev.stats["rx_bytes"] += got
                if trace is not None:
                    trace(trace_record("rx", h))
        finally:
            if sent:
                q.notify()

    def _starve(self, conn: _Conn) -> None:
        """No rx buffer: stop reading ``conn`` until the guest posts buffers."""
        if conn.reading:
            conn.reading = False
            self.device.backend.remove_reader(conn.sock.fileno())
        self.starved.add(conn)

    def _parent_eof(self, conn: _Conn) -> None:
        """The parent shut its sending side; tell the guest (SHUTDOWN SEND, plus RCV if the
        parent closed entirely: its socket reports POLLHUP)."""
        dev = self.device
        conn.parent_eof = True
        self.update_reader(conn)
        flags = SHUTDOWN_SEND
        if _peer_closed(conn.sock):
            flags = SHUTDOWN_BOTH
            conn.out.clear()  # nobody will read it
            dev.backend.remove_writer(conn.sock.fileno())
        dev._send_ctrl(dev._hdr(conn, Op.SHUTDOWN, flags))
        if flags == SHUTDOWN_BOTH or conn.guest_shut & SHUTDOWN_SEND:
            # Both directions are done: the guest answers with RST; don't wait forever.
            table = dev._table
            conn.timer = dev.backend.call_later(
                CLOSE_TIMEOUT_S, lambda: table.reset(conn, send_rst=True)
                if table.conns.get((conn.local_port, conn.peer_port)) is conn else None)

    # -- guest -> parent ----------------------------------------------------------------------

    def from_guest(self, conn: _Conn, payload: memoryview) -> bool:
        """An RW payload from the guest on established ``conn``: within the window the device
        advertised it goes to the parent (:meth:`to_parent`) and True is returned; beyond it the
        connection is reset (RST, counted in ``rst_credit_exceeded``) and False is returned.

        docs/vsock.md#bounds: Linux drops data beyond the receive window
        (virtio_transport_recv_enqueue: virtio_transport_inc_rx_pkt fails); a silent hole in the
        parent's stream would be worse, so the connection is reset. The device never buffers
        more than buf_alloc bytes per connection."""
        dev = self.device
        if len(payload) > conn.room(dev.buf_alloc):
            dev.stats["rst_credit_exceeded"] += 1
            dev._table.reset(conn, send_rst=True)
            return False
        conn.received(len(payload))
        dev.stats["tx_bytes"] += len(payload)
        self.to_parent(conn, payload)
        return True

    def to_parent(self, conn: _Conn, payload: memoryview) -> None:
        """Hand an RW payload from the guest to the parent socket (or queue it)."""
        if conn.sock is None or conn.wr_shut:
            return
        if not conn.out:
            try:
                n = conn.sock.send(payload)
            except BlockingIOError:
                n = 0
            except OSError:
                self.device._table.reset(conn, send_rst=True)  # the parent closed: guest gets RST
                return
            conn.forwarded(n)
            if n < len(payload):
                conn.out += payload[n:]
                self.device.backend.add_writer(conn.sock.fileno(),
                                               lambda: self._on_parent_writable(conn))
        else:
            conn.out += payload
        if conn.credit_update_due(self.device.buf_alloc):
            self._credit_update(conn)

    def _credit_update(self, conn: _Conn) -> None:
        dev = self.device
        dev._send_ctrl(dev._hdr(conn, Op.CREDIT_UPDATE))

    def _on_parent_writable(self, conn: _Conn) -> None:
        table = self.device._table
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.device.backend.remove_writer(conn.sock.fileno())
            conn.out.clear()
            if conn in table.lingering:
                table.finish_linger(conn)
            else:
                table.reset(conn, send_rst=True)
            return
        del conn.out[:n]
        conn.forwarded(n)
        if not conn.out:
            self.device.backend.remove_writer(conn.sock.fileno())
            if conn in table.lingering:
                table.finish_linger(conn)
                return
            if conn.guest_shut & SHUTDOWN_SEND:
                self.maybe_shut_parent(conn)
        if conn in table.lingering:
            return
        if conn.credit_update_due(self.device.buf_alloc):
            self._credit_update(conn)

    def maybe_shut_parent(self, conn: _Conn) -> None:
        """Guest sent SHUTDOWN SEND: the parent reads EOF once pending bytes are delivered."""
        if conn.out or conn.wr_shut or conn.sock is None:
            return
        conn.wr_shut = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


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
