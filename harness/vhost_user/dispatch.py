"""What a vhost-user back end does with each front-end request: a table of handler functions.

docs/vhost-user.md#messages-served lists them. Each handler takes ``(backend, req, payload,
fds)`` and returns True when it took ownership of ``fds`` (the ones it keeps or has closed);
:func:`dispatch` closes the fds nobody took and sends the REPLY_ACK answer the front end asked
for. Handlers raise VhostUserError for a malformed message; the back end then drops the
connection.
"""

from __future__ import annotations

import os
import struct
import time
from typing import TYPE_CHECKING, Callable

from harness.vhost_user.memory import MemoryRegion, MemoryTable
from harness.vhost_user.protocol import (
    CONFIG_HEADER,
    FLAG_NEED_REPLY,
    HAS_REPLY,
    MAX_MEM_REGIONS,
    MEM_REGION,
    REQUEST_NAMES,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_ADDR,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    ProtocolFeature,
    Request,
    VhostUserError,
    close_quiet,
)

if TYPE_CHECKING:
    from harness.vhost_user.backend import VhostUserBackend
    from harness.vhost_user.virtqueue import VirtQueue


Handler = Callable[["VhostUserBackend", int, bytes, "list[int]"], "bool | None"]


def dispatch(be: VhostUserBackend, req: int, flags: int, payload: bytes, fds: list[int]) -> None:
    """Serve request ``req`` (its header ``flags``, ``payload`` and received ``fds``) on ``be``.

    A known request without a handler (a feature never offered) is answered with REPLY_ACK
    status 1 when the front end asked for an ack. Raises VhostUserError (malformed message).
    """
    be.times.setdefault("handshake", time.monotonic())
    handler = HANDLERS.get(req)
    ack_status = 0
    if handler is None:
        # Known request we do not implement (we never offered the feature behind it).
        ack_status = 1
    elif handler(be, req, payload, fds):
        fds = []
    for fd in fds:  # fds nobody took ownership of
        close_quiet(fd)
    if (flags & FLAG_NEED_REPLY and req not in HAS_REPLY
            and be.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK)):
        be._reply(req, U64.pack(ack_status))


def _queue(be: VhostUserBackend, index: int, req: int) -> VirtQueue:
    if index >= len(be.queues):
        raise VhostUserError(
            f"malformed vhost-user message: {REQUEST_NAMES[req]} for queue {index}, "
            f"device has {len(be.queues)}")
    return be.queues[index]


def _expect(req: int, payload: bytes, size: int, fds: list[int], nfds: int = 0) -> None:
    if len(payload) != size:
        raise VhostUserError(
            f"malformed vhost-user message: {REQUEST_NAMES[req]} payload is "
            f"{len(payload)} bytes, expected {size}")
    if len(fds) > nfds:
        raise VhostUserError(
            f"malformed vhost-user message: {REQUEST_NAMES[req]} carried {len(fds)} fds, "
            f"expected at most {nfds}")


def _get_u64(value: Callable[[VhostUserBackend], int]) -> Handler:
    """A GET request answered with one u64 (its optional 8-byte payload is ignored)."""
    def handler(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
        _expect(req, payload, len(payload) if len(payload) in (0, 8) else 0, fds)
        be._reply(req, U64.pack(value(be)))
    return handler


def _set_features(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    (feat,) = U64.unpack(payload)
    if feat & ~be.features:
        raise VhostUserError(
            f"SET_FEATURES acked bits {feat & ~be.features:#x} the back end never "
            "offered")
    be.acked_features = feat


def _set_protocol_features(be: VhostUserBackend, req: int, payload: bytes,
                           fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    (feat,) = U64.unpack(payload)
    be.acked_protocol_features = feat & be.protocol_features


def _owner(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    if req != Request.SET_OWNER:
        be._stop_rings()  # calls on_queue_stop for each running ring


def _set_mem_table(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> bool:
    try:
        if len(payload) < 8:
            raise VhostUserError("malformed vhost-user message: SET_MEM_TABLE payload "
                                 "shorter than 8 bytes")
        nregions = struct.unpack_from("<I", payload)[0]
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise VhostUserError(f"malformed vhost-user message: SET_MEM_TABLE with "
                                 f"{nregions} regions (1..{MAX_MEM_REGIONS})")
        if len(payload) != 8 + MEM_REGION.size * nregions:
            raise VhostUserError(
                f"malformed vhost-user message: SET_MEM_TABLE payload is {len(payload)} "
                f"bytes for {nregions} regions, expected {8 + 32 * nregions}")
        if len(fds) != nregions:
            raise VhostUserError(f"malformed vhost-user message: SET_MEM_TABLE has "
                                 f"{nregions} regions but {len(fds)} fds")
        regions = []
        try:
            for k in range(nregions):
                gpa, size, uva, off = MEM_REGION.unpack_from(payload, 8 + 32 * k)
                try:
                    regions.append(MemoryRegion(fds[k], gpa, size, uva, off))
                except (OSError, ValueError, OverflowError) as e:
                    raise VhostUserError(
                        f"SET_MEM_TABLE region {k} (gpa {gpa:#x}, {size} bytes, offset "
                        f"{off:#x}): mmap failed: {e}") from None
        except BaseException:
            for r in regions:
                r.close()
            raise
    finally:
        for fd in fds:  # the mappings keep the memory; the fds are not needed
            close_quiet(fd)
    be._unmap()
    be.memory = MemoryTable(regions)
    for q in be.queues:
        q._map(be.memory)
    return True


def _set_vring_num(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    i, num = VRING_STATE.unpack(payload)
    q = _queue(be, i, req)
    if num == 0 or num > q.max_size or num & (num - 1):
        raise VhostUserError(
            f"SET_VRING_NUM: queue {i} size {num} is not a power of two in "
            f"[1, {q.max_size}]")
    q.num = num
    q.reset_ownership("SET_VRING_NUM")
    try:
        q._map(be.memory)  # the ring views are sized by num
    except VhostUserError:
        q.unmap()  # the old address does not fit the new size: SET_VRING_ADDR follows


def _set_vring_base(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    i, base = VRING_STATE.unpack(payload)
    q = _queue(be, i, req)
    q.last_avail_idx = base & 0xFFFF
    q.reset_ownership("SET_VRING_BASE")


def _set_vring_addr(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 40, fds)
    i, _fl, desc, used, avail, _log = VRING_ADDR.unpack(payload)
    q = _queue(be, i, req)
    q.desc_addr, q.used_addr, q.avail_addr = desc, used, avail
    q.addr_set = True
    q._map(be.memory)
    if q._used is not None:
        q.used_idx = q.device_used_idx_in_ring()


def _get_vring_base(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    i, _ = VRING_STATE.unpack(payload)
    q = _queue(be, i, req)
    was = q.started
    be._stop_queue(q)
    q.enabled = False
    q.reset_ownership("GET_VRING_BASE")
    if was:
        be.device.on_queue_stop(i)
    be._reply(req, VRING_STATE.pack(i, q.last_avail_idx))


def _set_vring_fd(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> bool:
    """SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR: one eventfd per ring (or the no-fd flag)."""
    _expect(req, payload, 8, fds, 1)
    (u,) = U64.unpack(payload)
    q = _queue(be, u & VRING_IDX_MASK, req)
    nofd = bool(u & VRING_NOFD_MASK)
    if nofd != (not fds):
        raise VhostUserError(
            f"malformed vhost-user message: {REQUEST_NAMES[req]} for queue {q.index} "
            f"{'has' if fds else 'lacks'} an fd but the no-fd flag is "
            f"{'set' if nofd else 'clear'}")
    fd = fds[0] if fds else None
    if req == Request.SET_VRING_KICK:
        be._stop_queue(q)
        if fd is None:
            raise VhostUserError(
                f"SET_VRING_KICK for queue {q.index} without an fd: polling mode is "
                "not supported")
        os.set_blocking(fd, False)
        q.kick_fd = fd
        q.started = True
        if all(x.started for x in be.queues):  # the guest's driver started the device
            be.times.setdefault("rings", time.monotonic())
        if not be.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
            q.enabled = True  # vhost-user spec: rings start enabled without it
        be.add_reader(fd, lambda q=q: be._on_kick(q))
        if q.ready:
            be._on_kick(q, drain=False)
    else:
        attr = "call_fd" if req == Request.SET_VRING_CALL else "err_fd"
        old = getattr(q, attr)
        if old is not None:
            os.close(old)
        setattr(q, attr, fd)
    return True


def _set_vring_enable(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    _expect(req, payload, 8, fds)
    i, on = VRING_STATE.unpack(payload)
    q = _queue(be, i, req)
    was = q.ready
    q.enabled = bool(on)
    if q.ready and not was:
        be._on_kick(q, drain=False)


def _get_config(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    if len(payload) < CONFIG_HEADER.size:
        raise VhostUserError("malformed vhost-user message: GET_CONFIG payload shorter "
                             "than its 12-byte header")
    off, size, cflags = CONFIG_HEADER.unpack_from(payload)
    _expect(req, payload, CONFIG_HEADER.size + size, fds)
    data = bytes(be.device.get_config(off, size))[:size]
    data += bytes(size - len(data))
    be._reply(req, CONFIG_HEADER.pack(off, size, cflags) + data)


def _set_config(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    if len(payload) < CONFIG_HEADER.size:
        raise VhostUserError("malformed vhost-user message: SET_CONFIG payload shorter "
                             "than its 12-byte header")
    off, size, _cf = CONFIG_HEADER.unpack_from(payload)
    _expect(req, payload, CONFIG_HEADER.size + size, fds)
    be.device.set_config(off, payload[CONFIG_HEADER.size:])


def _get_max_mem_slots(be: VhostUserBackend, req: int, payload: bytes, fds: list[int]) -> None:
    be._reply(req, U64.pack(MAX_MEM_REGIONS))


HANDLERS: dict[int, Handler] = {
    Request.GET_FEATURES: _get_u64(lambda be: be.features),
    Request.GET_PROTOCOL_FEATURES: _get_u64(lambda be: be.protocol_features),
    Request.SET_FEATURES: _set_features,
    Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
    Request.GET_QUEUE_NUM: _get_u64(lambda be: len(be.queues)),
    Request.SET_OWNER: _owner,
    Request.RESET_OWNER: _owner,
    Request.RESET_DEVICE: _owner,
    Request.SET_MEM_TABLE: _set_mem_table,
    Request.SET_VRING_NUM: _set_vring_num,
    Request.SET_VRING_BASE: _set_vring_base,
    Request.SET_VRING_ADDR: _set_vring_addr,
    Request.GET_VRING_BASE: _get_vring_base,
    Request.SET_VRING_KICK: _set_vring_fd,
    Request.SET_VRING_CALL: _set_vring_fd,
    Request.SET_VRING_ERR: _set_vring_fd,
    Request.SET_VRING_ENABLE: _set_vring_enable,
    Request.GET_CONFIG: _get_config,
    Request.SET_CONFIG: _set_config,
    Request.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
}
