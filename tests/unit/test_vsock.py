"""virtio-vsock device (harness.vsock) driven through a fake QEMU front end and a fake guest
driver that speaks its packets (docs/vsock.md) on real split virtqueues."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections import namedtuple

import pytest

from harness.errors import NitroError
from harness.vhost_user import VhostUserBackend
from harness.vsock import HEADER, Op, VsockDevice
from helpers import guest_programs
from helpers.vhost_user_frontend import FakeFrontend

CID = 16
class Pkt(namedtuple("Pkt", "src_cid dst_cid src_port dst_port len type op flags buf_alloc "
                             "fwd_cnt payload")):
    def __repr__(self) -> str:  # keep assertion messages short
        return (f"Pkt({self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} op={self.op} "
                f"len={self.len} flags={self.flags} fwd={self.fwd_cnt})")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Guest:
    """The guest kernel's side of virtio-vsock, by hand: posts rx buffers, sends packets on tx,
    collects what the device put on rx."""

    def __init__(self, fe: FakeFrontend, rx_mode: str = "single", nbufs: int = 64,
                 cid: int = CID):
        self.fe = fe
        self.rxq, self.txq = fe.queues
        self.cid = cid
        self.rx_mode = rx_mode
        self.inbox: list[Pkt] = []
        self.post_rx(nbufs)

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            if self.rx_mode == "single":  # Linux >= 6.2: one 44 + 4096 descriptor
                self.rxq.add([], [44 + 4096])
            elif self.rx_mode == "split":  # older kernels: header and data apart
                self.rxq.add([], [44, 4096])
            else:
                self.rxq.add([], [44, 4096], indirect=True)
        self.rxq.kick()

    def send(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", *,
             flags: int = 0, buf_alloc: int = 1 << 18, fwd_cnt: int = 0, dst_cid: int = 3,
             src_cid: int | None = None, typ: int = 1, split: bool = False,
             indirect: bool = False) -> None:
        hdr = HEADER.pack(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                          len(payload), typ, op, flags, buf_alloc, fwd_cnt)
        self.txq.collect()
        bufs = [hdr, payload] if split and payload else [hdr + payload]
        self.txq.add(bufs, [], indirect=indirect)
        self.txq.kick()

    def poll(self, timeout: float = 5.0) -> int:
        """Move rx packets into the inbox (re-posting buffers); returns how many arrived."""
        got = 0
        if self.rxq.wait_used(1, timeout):
            entries = self.rxq.collect()
            for _, n, data in entries:
                f = HEADER.unpack_from(data)
                self.inbox.append(Pkt(*f, data[44:44 + f[4]]))
                assert n == 44 + f[4]
            got = len(entries)
            self.post_rx(got)
        return got

    def expect(self, op: int, timeout: float = 5.0, **fields) -> Pkt:
        """First packet with ``op`` (and matching ``fields``) from the inbox or the ring."""
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(self.inbox):
                if p.op == op and all(getattr(p, k) == v for k, v in fields.items()):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no packet op={op} {fields}; inbox: {self.inbox}")
            self.poll(min(left, 0.5))

    def quiet(self, wait: float = 0.2) -> list[Pkt]:
        """Everything that arrives within ``wait`` s."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.poll(max(0.0, deadline - time.monotonic()))
        out, self.inbox = self.inbox, []
        return out

    def connect(self, port: int, src_port: int = 40000, buf_alloc: int = 1 << 18) -> Pkt:
        self.send(src_port, port, Op.REQUEST, buf_alloc=buf_alloc)
        return self.expect(Op.RESPONSE, src_port=port, dst_port=src_port)


@pytest.fixture
def env(tmp_path):
    before = _fds()
    trace: list[dict] = []
    dev = VsockDevice(CID, trace=trace.append)
    be = VhostUserBackend(str(tmp_path / "vsock.sock"), dev, offer_config=True)
    be.start()
    fe = FakeFrontend(be.socket_path, mem_size=8 << 20)
    fe.handshake()
    assert fe.config == struct.pack("<Q", CID)
    fe.start_queues([128, 128])
    yield dev, be, fe, trace
    fe.close()
    dev.close()
    be.stop()
    assert not (_fds() - before), "fd leak"  # new descriptors only: others may close meanwhile


def make_guest(env, **kw) -> Guest:
    dev, be, fe, trace = env
    return Guest(fe, **kw)


def guest_connected(env, port: int, *, src_port: int, **kw) -> tuple[Guest, socket.socket]:
    """A guest connected from ``src_port`` to the parent listening on ``port`` (``kw`` for the
    REQUEST, e.g. ``buf_alloc``): (the guest, the parent's accepted socket)."""
    lst = env[0].listen(port)
    g = make_guest(env)
    g.connect(port, src_port=src_port, **kw)
    return g, lst.accept(5)


def test_config_and_queue_count(env):
    dev, be, fe, _ = env
    assert fe.num_queues == 2
    assert dev.get_config(0, 8) == struct.pack("<Q", CID)
    assert dev.get_config(4, 8) == bytes(8)


def test_invalid_cid_rejected():
    with pytest.raises(NitroError, match="CID 3"):
        VsockDevice(3)


def test_request_to_unlistened_port_gets_rst_at_once(env):
    g = make_guest(env)
    g.send(1234, 5005, Op.REQUEST)
    p = g.expect(Op.RST, timeout=2)
    assert (p.src_cid, p.dst_cid, p.src_port, p.dst_port) == (3, CID, 5005, 1234)


@pytest.mark.parametrize("dst_cid", [2, 17, 1])
def test_other_cids_are_unreachable(env, dst_cid):
    dev = env[0]
    lst = dev.listen(5000)  # even a listened port is unreachable on another CID
    g = make_guest(env)
    g.send(1234, 5000, Op.REQUEST, dst_cid=dst_cid)
    p = g.expect(Op.RST)
    assert (p.src_cid, p.dst_cid, p.src_port, p.dst_port) == (dst_cid, CID, 5000, 1234)
    with pytest.raises(TimeoutError):
        lst.accept(0.05)


def test_heartbeat_as_init_sends_it(env):
    dev, be, fe, trace = env
    hb = dev.heartbeat()
    g = make_guest(env)
    port = 2802523667  # an ephemeral port like Linux's
    resp = g.connect(9000, src_port=port)
    assert resp.buf_alloc == dev.buf_alloc and resp.fwd_cnt == 0
    g.send(port, 9000, Op.RW, bytes([0xB7]))
    g.send(port, 9000, Op.CREDIT_UPDATE)
    p = g.expect(Op.RW, dst_port=port)
    assert p.payload == bytes([0xB7])
    assert hb.wait(5)
    assert hb.received_at is not None and hb.count == 1
    g.send(port, 9000, Op.SHUTDOWN, flags=3, fwd_cnt=1)
    rst = g.expect(Op.RST, dst_port=port)
    assert rst.src_port == 9000
    deadline = time.monotonic() + 5
    while dev.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.connections == []
    ops = [(t["dir"], t["op_name"]) for t in trace]
    assert ops[:2] == [("tx", "REQUEST"), ("rx", "RESPONSE")]


@pytest.mark.parametrize("rx_mode", ["single", "split", "indirect"])
def test_data_both_ways_with_hash(env, rx_mode):
    dev, be, fe, _ = env
    lst = dev.listen(7000)
    g = make_guest(env, rx_mode=rx_mode)
    gport = 41000
    g.connect(7000, src_port=gport)
    user = lst.accept(5)
    user.settimeout(5)
    data = os.urandom(300_000)
    # guest -> parent, honouring the device's credit
    sent = 0
    peer_fwd = 0
    received = bytearray()
    reader = threading.Thread(target=lambda: _read_n(user, len(data), received))
    reader.start()
    while sent < len(data):
        credit = dev.buf_alloc - (sent - peer_fwd)
        if credit <= 0:
            p = g.expect(Op.CREDIT_UPDATE, dst_port=gport)
            peer_fwd = p.fwd_cnt
            continue
        chunk = data[sent:sent + min(4096, credit)]
        g.send(gport, 7000, Op.RW, chunk, split=(rx_mode == "split"),
               indirect=(rx_mode == "indirect"))
        sent += len(chunk)
        for p in g.inbox:
            if p.op == Op.CREDIT_UPDATE:
                peer_fwd = max(peer_fwd, p.fwd_cnt)
        g.inbox = [p for p in g.inbox if p.op != Op.CREDIT_UPDATE]
    reader.join(10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    # parent -> guest; the guest returns credit as it consumes
    back = os.urandom(200_000)
    user.sendall(back)
    got = bytearray()
    fwd = 0
    while len(got) < len(back):
        p = g.expect(Op.RW, dst_port=gport)
        assert p.len <= 4096
        got += p.payload
        fwd += p.len
        if fwd % 65536 < 4096:
            g.send(gport, 7000, Op.CREDIT_UPDATE, fwd_cnt=fwd)
    assert hashlib.sha256(got).digest() == hashlib.sha256(back).digest()
    user.close()
    lst.close()


def _read_n(s: socket.socket, n: int, out: bytearray) -> None:
    while len(out) < n:
        c = s.recv(65536)
        if not c:
            break
        out += c


def test_credit_exhaustion_then_credit_update(env):
    dev, be, fe, _ = env
    # The guest can hold 10 000 bytes.
    g, user = guest_connected(env, 7001, src_port=500, buf_alloc=10_000)
    user.sendall(b"z" * 25_000)
    got = bytearray()
    while len(got) < 10_000:
        got += g.expect(Op.RW, dst_port=500).payload
    assert len(got) == 10_000  # exactly the credit, not a byte more
    req = g.expect(Op.CREDIT_REQUEST, dst_port=500)
    assert req.src_port == 7001
    assert [p for p in g.quiet(0.2) if p.op == Op.RW] == []
    g.send(500, 7001, Op.CREDIT_UPDATE, buf_alloc=10_000, fwd_cnt=10_000)
    while len(got) < 20_000:
        got += g.expect(Op.RW, dst_port=500).payload
    assert len(got) == 20_000
    g.send(500, 7001, Op.CREDIT_UPDATE, buf_alloc=10_000, fwd_cnt=20_000)
    while len(got) < 25_000:
        got += g.expect(Op.RW, dst_port=500).payload
    assert bytes(got) == b"z" * 25_000
    user.close()


def test_device_announces_credit_as_parent_consumes(env):
    dev, be, fe, _ = env
    g, user = guest_connected(env, 7002, src_port=501)
    for _ in range(16):  # 64 KiB = buf_alloc / 4: one CREDIT_UPDATE is due
        g.send(501, 7002, Op.RW, b"q" * 4096)
    p = g.expect(Op.CREDIT_UPDATE, dst_port=501)
    assert p.fwd_cnt == 65536 and p.buf_alloc == dev.buf_alloc
    assert len(_recv_all(user, 65536)) == 65536
    user.close()


def _recv_all(s: socket.socket, n: int) -> bytes:
    s.settimeout(5)
    buf = bytearray()
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            break
        buf += c
    return bytes(buf)


def test_credit_request_is_answered(env):
    dev, be, fe, _ = env
    g, user = guest_connected(env, 7003, src_port=502)
    g.send(502, 7003, Op.RW, b"abc")
    g.send(502, 7003, Op.CREDIT_REQUEST)
    p = g.expect(Op.CREDIT_UPDATE, dst_port=502)
    assert p.fwd_cnt == 3
    user.close()


def test_guest_close_gets_rst_and_parent_reads_everything_then_eof(env):
    dev, be, fe, _ = env
    g, user = guest_connected(env, 7004, src_port=503)
    g.send(503, 7004, Op.RW, b"last words")
    g.send(503, 7004, Op.SHUTDOWN, flags=3)
    g.expect(Op.RST, dst_port=503, timeout=2)
    user.settimeout(5)
    assert _recv_all(user, 100) == b"last words"
    user.close()


def test_guest_shutdown_send_only_half_closes(env):
    dev, be, fe, _ = env
    g, user = guest_connected(env, 7005, src_port=504)
    g.send(504, 7005, Op.RW, b"req")
    g.send(504, 7005, Op.SHUTDOWN, flags=2)  # guest: shutdown(SHUT_WR)
    assert _recv_all(user, 100) == b"req"  # then EOF
    user.sendall(b"answer")
    assert g.expect(Op.RW, dst_port=504).payload == b"answer"
    assert not [p for p in g.quiet(0.1) if p.op == Op.RST]
    user.close()
    p = g.expect(Op.SHUTDOWN, dst_port=504)
    assert p.flags == 3
    g.send(504, 7005, Op.RST)
    deadline = time.monotonic() + 5
    while dev.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.connections == []


def test_parent_shutdown_write_sends_shutdown_send(env):
    dev, be, fe, _ = env
    g, user = guest_connected(env, 7006, src_port=505)
    user.sendall(b"x")
    user.shutdown(socket.SHUT_WR)
    assert g.expect(Op.RW, dst_port=505).payload == b"x"
    assert g.expect(Op.SHUTDOWN, dst_port=505).flags == 2
    g.send(505, 7006, Op.RW, b"still open")
    assert _recv_all(user, 10) == b"still open"
    user.close()


def test_parent_connect_accepted_refused_and_timed_out(env):
    dev, be, fe, _ = env
    g = make_guest(env)
    res = {}

    def do(port, timeout):
        try:
            res[port] = dev.connect(port, timeout)
        except Exception as e:
            res[port] = e

    t = threading.Thread(target=do, args=(6000, 5))
    t.start()
    req = g.expect(Op.REQUEST, dst_port=6000)
    assert (req.src_cid, req.dst_cid) == (3, CID)
    g.send(6000, req.src_port, Op.RESPONSE)
    t.join(5)
    s = res[6000]
    assert isinstance(s, socket.socket)
    s.sendall(b"hi guest")
    assert g.expect(Op.RW, dst_port=6000).payload == b"hi guest"
    s.close()

    t = threading.Thread(target=do, args=(6001, 5))
    t.start()
    req = g.expect(Op.REQUEST, dst_port=6001)
    g.send(6001, req.src_port, Op.RST)
    t.join(5)
    assert isinstance(res[6001], ConnectionRefusedError)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        dev.connect(6002, timeout=0.3)
    req = g.expect(Op.REQUEST, dst_port=6002)
    g.expect(Op.RST, dst_port=6002, src_port=req.src_port)
    assert time.monotonic() - t0 < 10


def test_many_short_connections(env):
    dev, be, fe, _ = env
    lst = dev.listen(7007)
    g = make_guest(env)
    for k in range(60):
        port = 30000 + k
        g.connect(7007, src_port=port)
        user = lst.accept(5)
        g.send(port, 7007, Op.RW, b"%d" % k)
        assert _recv_all(user, len(b"%d" % k)) == b"%d" % k
        user.sendall(b"ok%d" % k)
        assert g.expect(Op.RW, dst_port=port).payload == b"ok%d" % k
        g.send(port, 7007, Op.SHUTDOWN, flags=3)
        g.expect(Op.RST, dst_port=port)
        user.close()
    deadline = time.monotonic() + 5
    while dev.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.connections == []


def test_rx_starvation_resumes_when_buffers_are_posted(env):
    dev, be, fe, _ = env
    lst = dev.listen(7008)
    g = make_guest(env, nbufs=2)
    g.connect(7008, src_port=506)  # uses one buffer
    user = lst.accept(5)
    payload = os.urandom(5 * 4096)
    user.sendall(payload)
    # the guest re-posted one buffer after RESPONSE: two hold data, then the device starves
    assert g.rxq.wait_used(2, 5)
    got = bytearray()
    for _, n, data in g.rxq.collect():
        assert HEADER.unpack_from(data)[6] == Op.RW
        got += data[44:n]
    time.sleep(0.1)
    assert g.rxq.used_idx() == g.rxq.last_used  # nothing more: no buffers
    assert len(got) == 2 * 4096
    g.post_rx(8)
    while len(got) < len(payload):
        got += g.expect(Op.RW, dst_port=506).payload
    assert bytes(got) == payload
    user.close()


def test_rx_chain_survives_an_unexpected_parent_socket_error(env):
    # The pump pops an rx chain before it reads the parent socket: an error other than OSError
    # from that read must leave the chain in the spare slot, where the next read takes it, not
    # hold its head forever (the guest would lose one rx buffer per such error).
    dev, be, fe, _ = env
    lst = dev.listen(7012)
    g = make_guest(env, nbufs=4)
    g.connect(7012, src_port=507)
    rxq = be.queues[0]

    class FlakySocket(socket.socket):
        failed = False

        def recv_into(self, buffer, nbytes=0, flags=0):
            if not self.failed:
                self.failed = True
                raise RuntimeError("parent socket broke once")
            return super().recv_into(buffer, nbytes, flags)

    def make_flaky() -> int:
        conn = dev._conns[(7012, 507)]
        conn.sock = FlakySocket(fileno=conn.sock.detach())  # same fd: the loop keeps watching it
        return rxq.last_avail_idx

    with lst.accept(5) as user:
        popped_before = dev.run_on_loop(make_flaky)
        assert dev.run_on_loop(lambda: (rxq.outstanding, dev._spare)) == (0, None)
        user.sendall(b"after the error")
        p = g.expect(Op.RW, dst_port=507)
        assert p.payload == b"after the error"
        assert be.error == "device VsockDevice failed: RuntimeError: parent socket broke once"
        # Two chains popped in all: the one the failed read took carried the payload, the next
        # read found nothing and left its chain in the spare slot. The device holds that one
        # head and no other.
        popped, held, spare = dev.run_on_loop(
            lambda: (rxq.last_avail_idx, rxq.outstanding, dev._spare))
        assert (popped - popped_before) & 0xFFFF == 2
        assert spare is not None and held == 1


def test_unix_bridge_both_directions(env, tmp_path):
    dev, be, fe, _ = env
    path = str(tmp_path / "enclave.vsock")
    dev.serve_unix_bridge(path)
    g = make_guest(env)
    # parent -> guest: CONNECT <port>
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(path)
    c.sendall(b"CONNECT 5555\n")
    req = g.expect(Op.REQUEST, dst_port=5555)
    g.send(5555, req.src_port, Op.RESPONSE)
    assert c.recv(64) == b"OK %d\n" % req.src_port
    c.sendall(b"over the bridge")
    assert g.expect(Op.RW, dst_port=5555).payload == b"over the bridge"
    g.send(5555, req.src_port, Op.RW, b"and back")
    assert c.recv(64) == b"and back"
    c.close()
    assert g.expect(Op.SHUTDOWN, dst_port=5555).flags == 3
    # refused: the client's connection is closed
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(path)
    c.sendall(b"CONNECT 5556\n")
    req = g.expect(Op.REQUEST, dst_port=5556)
    g.send(5556, req.src_port, Op.RST)
    assert c.recv(64) == b""
    c.close()
    # guest -> parent port 8000 reaches <path>_8000
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path + "_8000")
    srv.listen(1)
    srv.settimeout(5)
    try:
        g.connect(8000, src_port=777)
        a, _ = srv.accept()
        a.settimeout(5)
        g.send(777, 8000, Op.RW, b"to the proxy")
        assert a.recv(64) == b"to the proxy"
        a.sendall(b"from the proxy")
        assert g.expect(Op.RW, dst_port=777).payload == b"from the proxy"
        a.close()
        g.send(777, 8001, Op.REQUEST)  # no <path>_8001: RST
        g.expect(Op.RST, dst_port=777, src_port=8001)
    finally:
        srv.close()
    dev.close()
    assert not os.path.exists(path)


def test_unexpected_packet_for_unknown_connection_gets_rst(env):
    g = make_guest(env)
    g.send(900, 9999, Op.RW, b"stray")
    g.expect(Op.RST, dst_port=900, src_port=9999)


def test_spoofed_source_cid_is_dropped(env):
    dev = env[0]
    dev.listen(7009)
    g = make_guest(env)
    g.send(900, 7009, Op.REQUEST, src_cid=CID + 1)
    assert g.quiet(0.2) == []
    assert dev.stats["dropped_bad_src"] == 1


def test_too_small_rx_buffer_is_a_clear_error(env):
    dev, be, fe, _ = env
    g = Guest(fe, nbufs=0)
    g.rxq.add([], [20])
    g.rxq.kick()
    g.send(1, 2, Op.REQUEST)  # RST needs an rx buffer
    assert be.disconnected.wait(5)
    assert "cannot hold a 44-byte header" in be.error


def test_listen_twice_is_refused(env):
    dev = env[0]
    dev.listen(7010)
    with pytest.raises(NitroError, match="already listened"):
        dev.listen(7010)


def test_close_releases_user_facing_waits(env):
    dev, be, fe, _ = env
    lst = dev.listen(7011)
    g = make_guest(env)
    g.connect(7011, src_port=600)  # accepted, never taken by accept()
    dev.close()
    with pytest.raises(OSError):
        lst.accept(0.1)
    with pytest.raises(NitroError):
        dev.listen(7012)


def test_guest_program_stream_is_deterministic_and_echo_round_trips():
    ve = guest_programs.load("vsock_echo")
    a = b"".join(ve.stream_chunks(200_001, seed=7))
    assert len(a) == 200_001
    assert a == b"".join(ve.stream_chunks(200_001, seed=7))
    assert a != b"".join(ve.stream_chunks(200_001, seed=8))
    assert ve.stream_digest(200_001, 7) == hashlib.sha256(a).hexdigest()
    # echo_connection / send_stream / read_to_eof over a plain socketpair (the guest uses
    # AF_VSOCK; the byte handling is the same)
    g, p = socket.socketpair()
    t = threading.Thread(target=ve.echo_connection, args=(g,))
    t.start()
    try:
        sender = threading.Thread(
            target=lambda: (ve.send_stream(p, 300_000, 3), p.shutdown(socket.SHUT_WR)))
        sender.start()
        n, digest = ve.read_to_eof(p)
        sender.join(10)
    finally:
        t.join(10)
        p.close()
    assert (n, digest) == (300_000, ve.stream_digest(300_000, 3))


def test_echo_through_the_device_with_guest_program_helpers(env):
    """Parent socket -> device -> fake guest echo -> device -> parent socket, hash checked."""
    ve = guest_programs.load("vsock_echo")
    dev, be, fe, _ = env
    g = make_guest(env)
    res = {}
    t = threading.Thread(target=lambda: res.update(s=dev.connect(6100, 5)))
    t.start()
    req = g.expect(Op.REQUEST, dst_port=6100)
    g.send(6100, req.src_port, Op.RESPONSE)
    t.join(5)
    s = res["s"]
    data = b"".join(ve.stream_chunks(100_000, 1))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    echoed = 0
    while echoed < len(data):  # the fake guest echoes each RW back, returning credit
        p = g.expect(Op.RW, dst_port=6100)
        g.send(6100, req.src_port, Op.RW, p.payload, fwd_cnt=echoed + p.len)
        echoed += p.len
    assert g.expect(Op.SHUTDOWN, dst_port=6100).flags == 2
    g.send(6100, req.src_port, Op.SHUTDOWN, flags=3, fwd_cnt=echoed)
    g.expect(Op.RST, dst_port=6100)
    n, digest = ve.read_to_eof(s)
    s.close()
    assert (n, digest) == (100_000, ve.stream_digest(100_000, 1))
