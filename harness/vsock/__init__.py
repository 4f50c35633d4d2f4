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

Modules: ``packet`` (header, operations, constants), ``connection`` (one connection's state and
credit accounting), ``device`` (:class:`VsockDevice`: queues and packets), ``lifecycle``
(connection setup and teardown), ``pump`` (parent sockets <-> guest), ``endpoints`` (listeners,
heartbeat, parent connect), ``bridge`` (the Unix bridge). Import from here.
"""

from __future__ import annotations

from harness.vsock.device import VsockDevice
from harness.vsock.endpoints import HeartbeatListener, VsockListener
# The other constants stay importable from here, as before the split.
from harness.vsock.packet import (  # noqa: F401
    HDR_SIZE,
    HEADER,
    HEARTBEAT_BYTE,
    HEARTBEAT_PORT,
    OP_NAMES,
    PARENT_CID,
    RX_QUEUE,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TX_QUEUE,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_F_STREAM,
    Op,
)
from harness.vsock.pump import CLOSE_TIMEOUT_S  # noqa: F401

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
