"""One vsock stream connection's state, and all of its credit accounting.

docs/vsock.md#credit-flow: each side advertises ``buf_alloc`` (its receive buffer) and
``fwd_cnt`` (bytes it has consumed) in every packet; a sender may have at most
``buf_alloc - (tx_cnt - fwd_cnt)`` bytes in flight, counters wrapping at 2^32. The device keeps
the guest's figures (``peer_*``) to bound what it sends, and counts what the guest sent it
(``rx_cnt``) and what the parent socket took (``fwd_cnt``) to advertise its own.
"""

from __future__ import annotations

import socket
from typing import Callable

from harness.vsock.packet import HEADER, PARENT_CID, TYPE_STREAM


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
        # Guest -> parent bytes not yet accepted by the socket: at most the device's buf_alloc,
        # since data beyond the advertised window resets the connection (docs/vsock.md#bounds).
        self.out = bytearray()
        self.guest_shut = 0  # SHUTDOWN flags the guest sent
        self.parent_eof = False
        self.reading = False
        self.credit_requested = False
        self.on_result: Callable[[BaseException | None], None] | None = None
        self.pre_data = b""  # parent bytes read before the connection was established
        self.timer = None
        self.wr_shut = False

    # -- the guest's window ----------------------------------------------------------------

    def peer_update(self, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest's ``buf_alloc``/``fwd_cnt`` from a packet it sent (every packet has them).

        A CREDIT_REQUEST the device sent is answered once the guest has room again: a later
        full window asks anew."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        if self.credit_requested and self.peer_credit() > 0:
            self.credit_requested = False

    def peer_credit(self) -> int:
        """Bytes the guest can still take (docs/vsock.md#credit-flow, u32 wrapping arithmetic)."""
        return (self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)) \
            & 0xFFFFFFFF if self.peer_buf_alloc else 0

    def sent(self, n: int) -> None:
        """``n`` payload bytes went to the guest (they count against its window)."""
        self.tx_cnt = (self.tx_cnt + n) & 0xFFFFFFFF

    def credit_request_due(self) -> bool:
        """True once per full window: the guest has no room and was not asked yet, so the
        device sends CREDIT_REQUEST now."""
        if self.credit_requested:
            return False
        self.credit_requested = True
        return True

    # -- the device's window -----------------------------------------------------------------

    def received(self, n: int) -> None:
        """``n`` payload bytes arrived from the guest."""
        self.rx_cnt = (self.rx_cnt + n) & 0xFFFFFFFF

    def room(self, buf_alloc: int) -> int:
        """Bytes the device can still take from the guest: its advertised window
        ``buf_alloc - (rx_cnt - fwd_cnt)`` (docs/vsock.md#credit-flow). The guest only ever saw
        an older, smaller ``fwd_cnt``, so a guest keeping to its credit never exceeds this."""
        return buf_alloc - ((self.rx_cnt - self.fwd_cnt) & 0xFFFFFFFF)

    def forwarded(self, n: int) -> None:
        """The parent socket took ``n`` of the guest's bytes: they free the device's window."""
        self.fwd_cnt = (self.fwd_cnt + n) & 0xFFFFFFFF

    def credit_update_due(self, buf_alloc: int) -> bool:
        """True when the guest should hear about consumed bytes (CREDIT_UPDATE)."""
        # Tell the guest about consumed bytes once a quarter of the window is free again; every
        # packet we send carries fwd_cnt too.
        return ((self.fwd_cnt - self.announced_fwd) & 0xFFFFFFFF) >= buf_alloc // 4

    def header(self, guest_cid: int, buf_alloc: int, op: int, flags: int = 0,
               length: int = 0) -> bytes:
        """The header of a packet to the guest on this connection; it announces ``fwd_cnt``."""
        self.announced_fwd = self.fwd_cnt
        return HEADER.pack(PARENT_CID, guest_cid, self.local_port, self.peer_port, length,
                           TYPE_STREAM, op, flags, buf_alloc, self.fwd_cnt)
