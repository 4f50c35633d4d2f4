"""virtio-vsock packets: the 44-byte header, operations, shutdown flags and Nitro's fixed addresses.

docs/vsock.md#packet-header: a packet is a little-endian header (src_cid, dst_cid, src_port,
dst_port, len, type, op, flags, buf_alloc, fwd_cnt) plus ``len`` bytes of payload.
"""

from __future__ import annotations

import struct
import time

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
# docs/vsock.md#bounds: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE. vhost-vsock drops a tx packet
# whose buffers hold more than header + 64 KiB, or whose header claims more payload than that.
MAX_PKT_PAYLOAD = 64 * 1024
MAX_TX_PACKET = HDR_SIZE + MAX_PKT_PAYLOAD
# docs/vsock.md#bounds: a listener's accept queue, as Linux's listen() backlog (sk_max_ack_backlog;
# somaxconn was 128 for years); REQUESTs beyond it get RST.
DEFAULT_BACKLOG = 128
# docs/vsock.md#bounds: connections per enclave (each holds up to two host descriptors, a
# socketpair), so that a guest cannot exhaust the supervisor's descriptors (a common soft
# RLIMIT_NOFILE is 1024); REQUESTs beyond it get RST.
MAX_CONNECTIONS = 256


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


def trace_record(direction: str, pkt: bytes) -> dict:
    """One packet as a trace dict: ``t`` (time.monotonic()), ``dir`` ("rx": to the guest, "tx":
    from it), the header fields by name and ``op_name``. ``pkt`` starts with a header."""
    f = HEADER.unpack_from(pkt)
    return {"t": time.monotonic(), "dir": direction, "src_cid": f[0], "dst_cid": f[1],
            "src_port": f[2], "dst_port": f[3], "len": f[4], "type": f[5], "op": f[6],
            "op_name": OP_NAMES.get(f[6], str(f[6])), "flags": f[7],
            "buf_alloc": f[8], "fwd_cnt": f[9]}


def header_refusal(guest_cid: int, src_cid: int, dst_cid: int, typ: int, length: int,
                   packet_size: int) -> str | None:
    """Why a packet from the guest with these header fields is refused, as the device's
    ``stats`` counter name, or None when it goes to its connection. ``packet_size``: bytes the
    chain held (header included).

    - ``dropped_bad_len``: the header claims more than 64 KiB of payload or more than the chain
      holds (Linux vhost_vsock_alloc_skb: "the pkt is too big or the length in the header is
      invalid": dropped);
    - ``dropped_bad_src``: a source CID other than the enclave's own (a spoofed CID: dropped);
    - ``rst_unreachable``: a destination other than the parent, or a socket type other than
      stream (docs/vsock.md#addresses: only CID 3 is reachable; no seqpacket): answered RST.
    """
    if length > MAX_PKT_PAYLOAD or HDR_SIZE + length > packet_size:
        return "dropped_bad_len"
    if src_cid != guest_cid:
        return "dropped_bad_src"
    if dst_cid != PARENT_CID or typ != TYPE_STREAM:
        return "rst_unreachable"
    return None
