"""A hostile guest against the device back ends (vsock, NSM, their virtqueues), through the fake
QEMU front end: every offence gets its refusal, the back end keeps serving (a good exchange
works afterwards) and host resources stay bounded (docs/vsock.md#bounds,
docs/vhost-user.md#bounds).

Stated bounds, per test: the process's peak RSS grows by less than ``RSS_BOUND`` over what it
was when the offence started (VmHWM after resetting it through /proc/self/clear_refs), and no
descriptor outlives the test; during connection floods the open descriptors stay within two per
connection the bounds allow (a socketpair each) plus ``FD_SLACK``.
"""

from __future__ import annotations

import gc
import os
import random
import struct
import time

import pytest

from harness.nsm import (
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    Nsm,
    NsmErrorCode,
    NsmState,
    decode_response,
    encode_request,
)
from harness.nsm.device import NsmDevice
from harness.pcr import Measurements
from harness.pki import Pki
from harness.vhost_user import VhostUserBackend
from harness.vsock import HEADER, Op, VsockDevice
from helpers.vhost_user_frontend import F_INDIRECT, F_NEXT, F_WRITE, FakeFrontend

CID = 21
RSS_BOUND = 16 << 20  # bytes of peak RSS growth allowed per offence
FD_SLACK = 16  # descriptors the test and the loop may open besides the connections' own
BIG = 64 << 20  # the "huge" buffer: 64 MiB of guest RAM in one descriptor
RAM = 96 << 20  # fake guest RAM: room for BIG, rings and small buffers
RX_SIZE = TX_SIZE = 256
MAX_TX_PACKET = 44 + 64 * 1024


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/self/status has no {field}")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HostUse:
    """The process's peak RSS growth and open descriptors from ``__enter__`` on."""

    def __enter__(self) -> "HostUse":
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        self.rss0 = _status_bytes("VmRSS")
        self.fds0 = _open_fds()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def rss_growth(self) -> int:
        """Bytes the peak RSS rose above the RSS at entry."""
        return _status_bytes("VmHWM") - self.rss0

    def check_rss(self) -> None:
        grown = self.rss_growth()
        assert grown < RSS_BOUND, f"peak RSS grew by {grown >> 20} MiB (bound {RSS_BOUND >> 20})"


# -- vsock --------------------------------------------------------------------------------------

class Guest:
    """The guest kernel's side of virtio-vsock by hand, able to misbehave: posts rx buffers,
    sends packets (in batches, one kick each), collects what the device put on rx."""

    def __init__(self, fe: FakeFrontend):
        self.fe = fe
        self.rxq, self.txq = fe.queues
        self.inbox: list[tuple] = []
        self.post_rx(RX_SIZE - 8)

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            self.rxq.add([], [44 + 4096])
        self.rxq.kick()

    def packet(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", *,
               flags: int = 0, buf_alloc: int = 1 << 18, fwd_cnt: int = 0) -> bytes:
        return HEADER.pack(CID, 3, src_port, dst_port, len(payload), 1, op, flags, buf_alloc,
                           fwd_cnt) + payload

    def send_raw(self, pkts: list[bytes]) -> None:
        """Put each of ``pkts`` on tx as one readable descriptor; waits for room on the ring."""
        for p in pkts:
            while not self.txq.free_desc:
                self.txq.kick()
                assert self.txq.wait_used(1, 5), "the device stopped taking tx packets"
                self.txq.collect()
                self.poll(0)
            self.txq.add([p], [])
        self.txq.kick()

    def send(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", **kw) -> None:
        self.send_raw([self.packet(src_port, dst_port, op, payload, **kw)])

    def poll(self, timeout: float = 0.5) -> int:
        """Move rx packets into the inbox (re-posting the buffers); how many arrived."""
        got = 0
        if self.rxq.wait_used(1, timeout):
            entries = self.rxq.collect()
            for _, n, data in entries:
                f = HEADER.unpack_from(data)
                self.inbox.append(f + (data[44:44 + f[4]],))
            got = len(entries)
            self.post_rx(got)
        return got

    def take(self, op: int, **fields) -> list[tuple]:
        """Remove and return the inbox packets with ``op`` (and header ``fields``: src_port,
        dst_port)."""
        idx = {"src_port": 2, "dst_port": 3}
        keep, out = [], []
        for p in self.inbox:
            if p[6] == op and all(p[idx[k]] == v for k, v in fields.items()):
                out.append(p)
            else:
                keep.append(p)
        self.inbox = keep
        return out

    def expect(self, op: int, timeout: float = 5.0, **fields) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            got = self.take(op, **fields)
            if got:
                self.inbox[:0] = got[1:]
                return got[0]
            left = deadline - time.monotonic()
            assert left > 0, f"no packet op={op} {fields}; inbox ops {[p[6] for p in self.inbox]}"
            self.poll(min(left, 0.2))

    def answers(self, count: int, timeout: float = 30.0) -> None:
        """Poll until ``count`` packets are in the inbox."""
        deadline = time.monotonic() + timeout
        while len(self.inbox) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(self.inbox)} of {count} answers arrived"
            self.poll(min(left, 0.2))


_PORTS = iter(range(30000, 40000))


def good_exchange(dev: VsockDevice, guest: Guest) -> None:
    """A fresh guest connection to a fresh listened port carries bytes both ways."""
    port, src = next(_PORTS), next(_PORTS)
    with dev.listen(port) as lst:
        guest.send(src, port, Op.REQUEST)
        guest.expect(Op.RESPONSE, src_port=port, dst_port=src)
        s = lst.accept(5)
        s.settimeout(5)
        guest.send(src, port, Op.RW, b"ping")
        assert s.recv(16) == b"ping"
        s.sendall(b"pong")
        assert guest.expect(Op.RW, src_port=port, dst_port=src)[-1] == b"pong"
        guest.send(src, port, Op.SHUTDOWN, flags=3)
        guest.expect(Op.RST, src_port=port, dst_port=src)
        s.close()


@pytest.fixture
def vsock(tmp_path):
    gc.collect()
    fds0 = _open_fds()
    dev = VsockDevice(CID)
    be = VhostUserBackend(str(tmp_path / "vsock.sock"), dev, offer_config=True)
    be.start()
    fe = FakeFrontend(be.socket_path, mem_size=RAM)
    fe.handshake()
    fe.start_queues([RX_SIZE, TX_SIZE])
    guest = Guest(fe)
    yield dev, be, fe, guest
    assert be.error is None
    fe.close()
    dev.close()
    be.stop()
    gc.collect()
    assert _open_fds() <= fds0, "descriptors left open"


def test_data_beyond_the_advertised_credit_resets_the_connection(vsock):
    """A guest that ignores the window the parent advertised: RST once its data would exceed
    buf_alloc - (rx_cnt - fwd_cnt), counted; the device never buffers more than buf_alloc."""
    dev, be, fe, guest = vsock
    lst = dev.listen(5000)
    guest.send(40000, 5000, Op.REQUEST)
    guest.expect(Op.RESPONSE, src_port=5000, dst_port=40000)
    parent = lst.accept(5)  # never read until the end: the device's window fills up
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    with HostUse() as use:
        for _ in range(600 // 8):  # up to 37.5 MiB, far beyond the window
            guest.send_raw([guest.packet(40000, 5000, Op.RW, chunk) for _ in range(8)])
            sent += 8
            guest.poll(0.05)
            if guest.take(Op.RST, src_port=5000, dst_port=40000):
                break
        else:
            pytest.fail(f"{sent} RW packets of 64 KiB beyond the window got no RST")
        use.check_rss()
        assert dev.stats["rst_credit_exceeded"] == 1
        assert (5000, 40000) not in {(a, b) for a, b, _ in dev.connections}
        # What the device accepted (the parent still gets it, then EOF) fits its window plus
        # the socket's own buffer; nothing after the offending packet.
        parent.settimeout(5)
        got = bytearray()
        while data := parent.recv(1 << 16):
            got += data
        parent.close()
        assert len(got) % len(chunk) == 0 and 0 < len(got) < sent * len(chunk)
        assert got == chunk * (len(got) // len(chunk))
    lst.close()
    good_exchange(dev, guest)


@pytest.mark.parametrize("backlog", [None, 5])
def test_requests_beyond_the_accept_backlog_get_rst(vsock, backlog):
    """10,000 REQUESTs to a listened port nobody accepts: the backlog (128 by default) is
    answered, every other one gets RST; descriptors stay bounded by the backlog."""
    dev, be, fe, guest = vsock
    lst = dev.listen(6000) if backlog is None else dev.listen(6000, backlog=backlog)
    expect = 128 if backlog is None else backlog
    with HostUse() as use:
        peak_fds = 0
        for base in range(0, 10_000, 200):
            guest.send_raw([guest.packet(10_000 + base + i, 6000, Op.REQUEST)
                            for i in range(200)])
            guest.answers(base + 200)
            peak_fds = max(peak_fds, _open_fds())
        responses = guest.take(Op.RESPONSE, src_port=6000)
        rsts = guest.take(Op.RST, src_port=6000)
        assert (len(responses), len(rsts)) == (expect, 10_000 - expect)
        assert dev.stats["rst_backlog_full"] == 10_000 - expect
        assert peak_fds <= use.fds0 + 2 * expect + FD_SLACK
        use.check_rss()
    # The backlog is still served: accept one and talk on it.
    s = lst.accept(5)
    s.settimeout(5)
    src = responses[0][3]
    guest.send(src, 6000, Op.RW, b"late")
    assert s.recv(16) == b"late"
    s.close()
    lst.close()
    guest.answers(len(guest.inbox) + expect)  # SHUTDOWNs for the closed sockets
    for p in guest.take(Op.SHUTDOWN):
        guest.send(p[3], 6000, Op.RST)
    good_exchange(dev, guest)


def test_the_heartbeat_listener_takes_one_connection(vsock):
    dev, be, fe, guest = vsock
    hb = dev.heartbeat()
    guest.send(1023, 9000, Op.REQUEST)
    guest.expect(Op.RESPONSE, src_port=9000, dst_port=1023)
    guest.send(1023, 9000, Op.RW, b"\xb7")
    assert guest.expect(Op.RW, src_port=9000, dst_port=1023)[-1] == b"\xb7"
    assert hb.wait(5)
    fds = _open_fds()
    guest.send_raw([guest.packet(2000 + i, 9000, Op.REQUEST) for i in range(500)])
    guest.answers(500)
    assert len(guest.take(Op.RST, src_port=9000)) == 500
    assert dev.stats["rst_backlog_full"] == 500
    assert _open_fds() <= fds + FD_SLACK
    good_exchange(dev, guest)


def test_connections_per_enclave_are_capped(vsock):
    dev, be, fe, guest = vsock
    cap = 256  # the documented default (docs/vsock.md#bounds)
    ports = [7001, 7002, 7003]
    lsts = [dev.listen(p) for p in ports]  # 3 x 128 backlog > the cap
    with HostUse() as use:
        for p in ports:
            guest.send_raw([guest.packet(20000 + i, p, Op.REQUEST) for i in range(128)])
        guest.answers(3 * 128)
        assert len(guest.take(Op.RESPONSE)) == cap
        assert len(guest.take(Op.RST)) == 3 * 128 - cap
        assert dev.stats["rst_connection_limit"] == 3 * 128 - cap
        assert dev.max_connections == cap
        assert _open_fds() <= use.fds0 + 2 * cap + FD_SLACK
        use.check_rss()
    # A full table refuses even a good connection; closing some makes room again.
    for lst in lsts:
        lst.close()
    guest.answers(cap)
    for p in guest.take(Op.SHUTDOWN):
        guest.send(p[3], p[2], Op.RST)
    good_exchange(dev, guest)


def _malformed(kind: str, fe: FakeFrontend, q) -> tuple[int, str]:
    """Publish one malformed chain of ``kind`` on ``q``; (head, words of its refusal)."""
    buf = fe.alloc(4096)
    if kind == "64k-entry indirect table":
        # Every entry points at the same 1 KiB: 64 MiB readable from 64 KiB of entries' worth.
        n = 65536
        ents = [(buf, 1024, F_NEXT, k + 1) for k in range(n - 1)] + [(buf, 1024, 0, 0)]
        return q.add_indirect_raw(ents), "indirect table of 65536"
    if kind == "indirect loop":
        ents = [(buf, 16, F_NEXT, k + 1) for k in range(3)] + [(buf, 16, F_NEXT, 0)]
        return q.add_indirect_raw(ents), "loops"
    if kind == "nested indirect":
        inner = fe.alloc(16)
        fe.write_mem(inner, struct.pack("<QIHH", buf, 16, 0, 0))
        return q.add_indirect_raw([(buf, 16, F_NEXT, 1), (inner, 16, F_INDIRECT, 0)]), "nested"
    if kind == "indirect length not a multiple of 16":
        return q.add_indirect_raw([(buf, 16, 0, 0)] * 2, table_len=24), "multiple of 16"
    if kind == "indirect table outside RAM":
        return q.add_indirect_raw([(buf, 16, 0, 0)], table_gpa=0x1000), "outside"
    if kind == "direct loop":
        return q.add_raw_chain([(buf, 16, F_NEXT, 1), (buf, 16, F_NEXT, 0)]), "loops"
    if kind == "next outside the table":
        return q.add_raw_chain([(buf, 16, F_NEXT, 60000)]), "out of range"
    if kind == "buffer outside RAM":
        return q.add_raw_chain([(0x10, 64, 0, 0)]), "outside"
    if kind == "buffer crossing the end of RAM":
        return q.add_raw_chain([(fe.gpa_base + fe.mem_size - 8, 64, 0, 0)]), "outside"
    if kind == "address wrapping 2^64":
        return q.add_raw_chain([((1 << 64) - 16, 64, 0, 0)]), "outside"
    if kind == "readable after writable":
        return q.add_raw_chain([(buf, 64, F_WRITE | F_NEXT, 1), (buf, 64, 0, 0)]), \
            "readable descriptor after a writable"
    raise AssertionError(kind)


MALFORMED = ["64k-entry indirect table", "indirect loop", "nested indirect",
             "indirect length not a multiple of 16", "indirect table outside RAM", "direct loop",
             "next outside the table", "buffer outside RAM", "buffer crossing the end of RAM",
             "address wrapping 2^64", "readable after writable"]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_chains_are_refused_and_the_device_keeps_serving(vsock, kind):
    """virtio 1.x 2.7.5.3 and QEMU's virtqueue_pop: the chain is refused (returned unused, length
    0, counted and named), never walked further or copied; the back end keeps serving."""
    dev, be, fe, guest = vsock
    txq = guest.txq
    with HostUse() as use:
        head, words = _malformed(kind, fe, txq)
        txq.kick()
        assert txq.wait_used(1, 5), f"{kind}: the chain was not returned ({be.error})"
        assert txq.collect() == [(head, 0, b"")]
        use.check_rss()
        assert _open_fds() <= use.fds0
    assert be.error is None
    assert be.queues[1].refused == 1
    assert words in be.refusals[-1] and "queue 1 (tx)" in be.refusals[-1]
    good_exchange(dev, guest)


@pytest.mark.parametrize("kind", ["64 MiB packet", "header len over 64 KiB",
                                  "header len beyond the buffer", "short packet"])
def test_oversized_or_short_packets_are_dropped_before_any_copy(vsock, kind):
    """Linux vhost-vsock drops a tx packet over 64 KiB of payload, or whose header does not fit
    or claims more than the buffer holds; the harness does the same, before copying it."""
    dev, be, fe, guest = vsock
    txq = guest.txq
    with HostUse() as use:
        if kind == "64 MiB packet":
            gpa = fe.alloc(BIG)
            fe.write_mem(gpa, guest.packet(40000, 5000, Op.RW)[:44])
            head = txq.add_raw_chain([(gpa, BIG, 0, 0)])
            fe.free(gpa, BIG)
            counter = "dropped_oversized"
        elif kind == "header len over 64 KiB":
            pkt = bytearray(guest.packet(40000, 5000, Op.RW, bytes(0x10001)))
            head = txq.add([bytes(pkt)], [])
            counter = "dropped_oversized"
        elif kind == "header len beyond the buffer":
            pkt = bytearray(guest.packet(40000, 5000, Op.RW, b"abc"))
            struct.pack_into("<I", pkt, 24, 4000)
            head = txq.add([bytes(pkt)], [])
            counter = "dropped_bad_len"
        else:
            head = txq.add([b"\x01" * 20], [])
            counter = "dropped_short"
        txq.kick()
        assert txq.wait_used(1, 5), f"{kind}: the packet was not returned ({be.error})"
        assert [(h, n) for h, n, _ in txq.collect()] == [(head, 0)]
        use.check_rss()
    assert be.error is None
    assert dev.stats[counter] == 1
    good_exchange(dev, guest)


def test_garbage_headers_and_ops(vsock):
    """Thousands of random headers (any op, type, CID, port, length, flags, window) and random
    short blobs: each is answered (RST), dropped or ignored; the device keeps serving and its
    connections, descriptors and memory stay within the bounds."""
    dev, be, fe, guest = vsock
    lst = dev.listen(8000)
    r = random.Random(16)
    with HostUse() as use:
        for _ in range(15):
            pkts = []
            for _ in range(200):
                roll = r.random()
                if roll < 0.1:
                    pkts.append(r.randbytes(r.randrange(44)))
                    continue
                payload = r.randbytes(r.choice([0, 1, 100, 4096]))
                length = len(payload) if r.random() < 0.7 else r.getrandbits(32)
                pkts.append(HEADER.pack(
                    CID if r.random() < 0.9 else r.getrandbits(64),
                    3 if r.random() < 0.9 else r.getrandbits(64),
                    r.randrange(40000, 40050), r.choice([8000, 8000, 8001, r.getrandbits(32)]),
                    length, 1 if r.random() < 0.9 else r.getrandbits(16),
                    r.randrange(9) if r.random() < 0.9 else r.getrandbits(16),
                    r.getrandbits(32), r.getrandbits(32), r.getrandbits(32)) + payload)
            guest.send_raw(pkts)
            while guest.poll(0.05):
                pass
            guest.inbox.clear()
            assert _open_fds() <= use.fds0 + 2 * 128 + FD_SLACK
        use.check_rss()
    assert be.error is None
    assert dev.stats["dropped_short"] > 0
    assert len(dev.connections) <= dev.max_connections
    lst.close()
    good_exchange(dev, guest)


# -- NSM ----------------------------------------------------------------------------------------

RESPONSE_BUFFER = 0x3000


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
def nsm_served(tmp_path, pki):
    gc.collect()
    fds0 = _open_fds()
    nsm = Nsm(NsmState(Measurements(pcr0=bytes(48), pcr1=bytes(48), pcr2=bytes(48)),
                       module_id="i-0123456789abcdef0-enc0000000000000015"), pki)
    dev = NsmDevice(nsm)
    be = VhostUserBackend(str(tmp_path / "nsm.sock"), dev, offer_config=False)
    be.start()
    fe = FakeFrontend(be.socket_path, mem_size=RAM)
    fe.handshake()
    (queue,) = fe.start_queues([64])
    yield nsm, dev, be, fe, queue
    assert be.error is None
    fe.close()
    be.stop()
    gc.collect()
    assert _open_fds() <= fds0, "descriptors left open"


def _extend_request(size: int) -> bytes:
    """An ExtendPCR(16, data) request of exactly ``size`` bytes of CBOR."""
    for k in range(size - 40, size):
        raw = encode_request(ExtendPCR(16, bytes(k)))
        if len(raw) == size:
            return raw
    raise AssertionError(size)


def _nsm_good_exchange(queue) -> None:
    req = queue.add([encode_request(DescribePCR(0))], [])
    resp = queue.add([], [RESPONSE_BUFFER])
    queue.kick()
    assert queue.wait_used(2, 10)
    used = {h: (n, d) for h, n, d in queue.collect()}
    assert used[req][0] == 0
    assert isinstance(decode_response(used[resp][1]), DescribePCRResponse)


@pytest.mark.parametrize("size,layout", [
    (0xFFF, "one"), (0x1000, "one"), (0x1000, "split"), (0x1001, "one"), (0x1001, "split"),
    (0x1001, "in place"), (0x10000, "one"), (BIG, "one"), (BIG, "in place"),
])
def test_nsm_requests_around_the_size_limit(nsm_served, size, layout):
    """docs/nsm.md#errors: up to 0x1000 bytes a request is answered; longer gets InputTooLarge,
    decided from the chain's length before anything is copied; every chain comes back."""
    nsm, dev, be, fe, queue = nsm_served
    gpa = fe.alloc(size)
    if size <= 0x10000:
        fe.write_mem(gpa, _extend_request(size))
    with HostUse() as use:
        if layout == "one":
            req = queue.add_raw_chain([(gpa, size, 0, 0)])
            resp = queue.add([], [RESPONSE_BUFFER])
            heads = 2
        elif layout == "split":
            req = queue.add_raw_chain([(gpa, 100, F_NEXT, 1), (gpa + 100, size - 100, 0, 0)])
            resp = queue.add([], [RESPONSE_BUFFER])
            heads = 2
        else:  # one chain, request then response buffer, answered in place
            out = fe.alloc(RESPONSE_BUFFER)
            req = resp = queue.add_raw_chain([(gpa, size, F_NEXT, 1),
                                              (out, RESPONSE_BUFFER, F_WRITE, 0)])
            heads = 1
        queue.kick()
        assert queue.wait_used(heads, 10)
        used = {h: (n, d) for h, n, d in queue.collect()}
        use.check_rss()
    fe.free(gpa, size)
    if heads == 2:
        assert used[req][0] == 0
    length, data = used[resp]
    answer = decode_response(data if heads == 2 else fe.read_mem(out, length))
    if size <= 0x1000:
        assert isinstance(answer, ExtendPCRResponse)
    else:
        assert answer == ErrorResponse(NsmErrorCode.InputTooLarge)
    assert be.error is None
    _nsm_good_exchange(queue)


def test_nsm_64k_entry_request_chain_is_refused(nsm_served):
    nsm, dev, be, fe, queue = nsm_served
    buf = fe.alloc(4096)
    with HostUse() as use:
        ents = [(buf, 1024, F_NEXT, k + 1) for k in range(65535)] + [(buf, 1024, 0, 0)]
        req = queue.add_indirect_raw(ents)
        resp = queue.add([], [RESPONSE_BUFFER])
        queue.kick()
        assert queue.wait_used(2, 10)
        used = {h: n for h, n, _ in queue.collect()}
        use.check_rss()
    assert used == {req: 0, resp: 0}
    assert be.queues[0].refused == 1
    _nsm_good_exchange(queue)
