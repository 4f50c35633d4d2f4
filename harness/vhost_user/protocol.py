"""The vhost-user wire format: request codes, feature bits, message structs and VhostUserError.

docs/vhost-user.md is the contract. A message is a 12-byte header {u32 request, u32 flags, u32
size} plus ``size`` bytes of payload, with up to 8 fds alongside (SCM_RIGHTS). :func:`read_message`
takes one off the front end's socket and checks its header.
"""

from __future__ import annotations

import os
import socket
import struct

from harness.errors import ErrorCode, NitroError

# Request codes and constants: vhost-user spec, "Front-end message types".


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
MAX_REQUEST = max(REQUEST_NAMES)


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

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100  # SET_VRING_KICK/CALL/ERR: no fd attached, poll instead
MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD = 0x10000  # far above any message QEMU sends; bigger means a broken stream
MAX_FDS = 8

# Requests that carry their own reply; REPLY_ACK never adds a second one to these.
HAS_REPLY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
}

MSG_HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags

class VhostUserError(NitroError):
    """A vhost-user protocol or virtqueue rule was broken (by QEMU, the guest or a device).

    Always carries ErrorCode.UnspecifiedError; the enclave layer decides which E-code the user
    sees (usually E36 when it ends a boot). The message is one line naming the rule.
    """

    def __init__(self, message: str):
        super().__init__(ErrorCode.UnspecifiedError, message)



def read_message(conn: socket.socket, fds: list[int]) -> tuple[int, int, bytes] | None:
    """One front-end message from ``conn``: ``(request, flags, payload)``, None at end of stream.

    Fds that came with it are appended to ``fds`` before anything can fail, so that the caller
    closes them whatever happens. Raises VhostUserError for a malformed header (version, unknown
    request, payload over 64 KiB, more than 8 fds), ConnectionResetError if the stream ends
    mid-message and socket.timeout if its payload does not follow (``conn``'s timeout).
    """
    data, anc, msg_flags, _ = conn.recvmsg(
        MSG_HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
    if not data:
        return None
    if msg_flags & socket.MSG_CTRUNC:
        raise VhostUserError("vhost-user message carried more than 8 fds")
    if len(data) < MSG_HEADER.size:
        data += _recv_exact(conn, MSG_HEADER.size - len(data))
    req, flags, size = MSG_HEADER.unpack(data)
    if flags & 0x3 != VERSION:
        raise VhostUserError(
            f"malformed vhost-user message: version {flags & 3} in flags {flags:#x}, "
            "expected 1")
    if req == 0 or req > MAX_REQUEST:
        raise VhostUserError(f"malformed vhost-user message: unknown request {req}")
    if size > MAX_PAYLOAD:
        raise VhostUserError(
            f"malformed vhost-user message: {REQUEST_NAMES[req]} payload size {size} "
            f"exceeds {MAX_PAYLOAD}")
    payload = _recv_exact(conn, size) if size else b""
    return req, flags, payload


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("front end closed mid-message")
        buf += chunk
    return bytes(buf)


def close_quiet(fd: int) -> None:
    """Close ``fd``, ignoring errors (an fd nobody took ownership of)."""
    try:
        os.close(fd)
    except OSError:
        pass
