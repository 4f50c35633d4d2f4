"""Fuzz target: the split-virtqueue chain walker, on rings a hostile guest wrote.

One input is a ring and the guest RAM around it (layout below), put into fake guest RAM of
three regions: two adjacent 64 KiB ones (a buffer may span them) and a 16 KiB one past a hole.
A :class:`harness.vhost_user.VirtQueue` is started on it as SET_VRING_* would, then every
available chain is popped and handled the way devices handle them (the readable length
checked against a limit before ``read``, the writable part filled, the chain pushed back);
docs/vhost-user.md#bounds. Declared errors: ``VhostUserError`` (a ring the device cannot trust,
``ChainTooLarge``). Besides exceptions, the queue's own invariant is checked after every input:
each chain returned exactly once, the used index where the device wrote it, every id returned
a head the driver made available (right after each push; again at the end only when the device
wrote nothing, since a guest may point a writable buffer at its own used ring).

Input layout: ``[log2(num) % 9] [last_avail_idx u16] [mode] [used idx u16]`` then the
descriptor table (16 bytes per entry), the avail ring (flags, idx, ``num`` heads), and the rest
copied to guest-physical 0x3000 (buffers and indirect tables). Mode bit 0: the ring is stopped
and restarted after the first chain (its chains go stale); bit 1: the device takes at most 64
readable bytes (else 64 KiB); bit 2: the device writes nothing.
"""

from __future__ import annotations

import functools
import struct

from harness.vhost_user import VhostUserError
from harness.vhost_user.virtqueue import ChainTooLarge, VirtQueue

from fuzz.fakes import U16, USED_ELEM, GuestRam, RegionSpec

NAME = "virtqueue"
DECLARED = (VhostUserError,)
MAX_LEN = 8192

RAM = [RegionSpec(0x0, 0x10000, 0x7F00_0000_0000, 0x1000),
       RegionSpec(0x10000, 0x10000, 0x7F10_0000_0000),
       RegionSpec(0x100000, 0x4000, 0x7F20_0000_0000)]
DESC_GPA, AVAIL_GPA, USED_GPA, DATA_GPA = 0x0, 0x1000, 0x2000, 0x3000
_HEAD = struct.Struct("<BHBH")


class _Backend:
    """What a VirtQueue asks of its back end: the memory table and refusal notes."""

    def __init__(self, ram: GuestRam):
        self.memory = ram.table
        self.device = None
        self.refusals: list[str] = []

    def note_refusal(self, line: str) -> None:
        self.refusals.append(line)


@functools.cache
def _ram() -> GuestRam:
    return GuestRam(RAM)


def _load(ram: GuestRam, data: bytes) -> tuple[int, int, int, int]:
    """Zero guest RAM and lay ``data`` out in it; returns (num, last_avail_idx, mode, used idx)."""
    for r in ram.table.regions:
        r.mm[r.mmap_offset:] = bytes(r.size)
    head = data[:_HEAD.size].ljust(_HEAD.size, b"\0")
    order, base, mode, used_idx = _HEAD.unpack(head)
    num = 1 << (order % 9)
    rest = data[_HEAD.size:]
    desc, rest = rest[:16 * num], rest[16 * num:]
    avail, rest = rest[:4 + 2 * num], rest[4 + 2 * num:]
    ram.write(DESC_GPA, desc)
    ram.write(AVAIL_GPA, avail)
    ram.write(USED_GPA + 2, U16.pack(used_idx))
    ram.write(DATA_GPA, rest[:0x10000 - DATA_GPA])
    return num, base, mode, used_idx


def one_input(data: bytes) -> None:
    """Pop and serve every chain of the ring ``data`` describes (see the module doc)."""
    ram = _ram()
    num, base, mode, used_idx = _load(ram, data)
    backend = _Backend(ram)
    q = VirtQueue(backend, 0, 256)
    q.num = num
    q.last_avail_idx = base
    q.desc_addr, q.avail_addr, q.used_addr = (ram.qva(DESC_GPA), ram.qva(AVAIL_GPA),
                                              ram.qva(USED_GPA))
    q.addr_set = True
    q._map(ram.table)
    q.used_idx = used_idx
    q.reset_ownership("fuzz")
    q.started = q.enabled = True
    limit = 64 if mode & 2 else 64 << 10
    returned = 0
    stale = None
    while (chain := q.pop()) is not None:
        if chain.readable_len > limit:
            try:
                chain.read(limit)
                raise AssertionError("read() copied more than its limit")
            except ChainTooLarge:
                pass
        else:
            got = chain.read(limit)
            assert len(got) == chain.readable_len
        if not mode & 4:
            n = chain.write(b"\xa5" * min(chain.writable_len, 4096))
            assert n == min(chain.writable_len, 4096)
        if mode & 1 and stale is None:
            stale = chain  # the ring is stopped and started again: this chain goes stale
            q.reset_ownership("fuzz: ring restarted")
            q.push(chain)
            continue
        q.push(chain)
        returned += 1
        assert not chain.readable and not chain.writable, "push left views into guest RAM"
        # Checked at once: a later chain's writable buffer may lie on the used ring itself (the
        # guest's choice; a device writes where it is told), overwriting this element.
        slot = USED_GPA + 4 + 8 * ((q.used_idx - 1) % num)
        head, _length = USED_ELEM.unpack(ram.read(slot, 8))
        assert head == chain.head < num, \
            f"used element names head {head} for chain {chain.head} of a {num}-entry ring"
    assert q.outstanding == 0, f"{q.outstanding} chains popped and never returned"
    written = (q.used_idx - used_idx) & 0xFFFF
    assert written == returned + q.refused, \
        f"used index moved by {written} for {returned} chains and {q.refused} refusals"
    assert U16.unpack(ram.read(USED_GPA + 2, 2))[0] == q.used_idx
    if not mode & 4:
        return  # the device wrote into guest RAM, maybe onto the used ring: checked per push
    for k in range(written):
        slot = USED_GPA + 4 + 8 * ((used_idx + k) % num)
        head, _length = USED_ELEM.unpack(ram.read(slot, 8))
        assert head < num, f"used element {k} names head {head} of a {num}-entry ring"
