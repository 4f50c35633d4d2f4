"""vhost-user back end (harness.vhost_user) driven by a fake QEMU front end (docs/vhost-user.md)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from harness.errors import NitroError
from harness.vhost_user import (
    MemoryRegion,
    MemoryTable,
    ChainTooLarge,
    ProtocolFeature,
    Request,
    VhostUserBackend,
    VirtioDevice,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from helpers.vhost_user_frontend import FakeFrontend, FrontendError


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class EchoDevice(VirtioDevice):
    """Test device: every chain on queue 0 gets its readable bytes back, upper-cased."""

    device_id = 42
    num_queues = 2
    queue_size = 256
    device_features = 1 << 3

    def __init__(self):
        self.kicks: list[int] = []
        self.stopped_queues: list[int] = []
        self.started = threading.Event()
        self.stopped = False
        self.config = bytes(range(16))

    def on_start(self, backend):
        super().on_start(backend)
        self.started.set()

    def get_config(self, offset, size):
        return self.config[offset:offset + size]

    def on_kick(self, i):
        self.kicks.append(i)
        if i != 0:
            return
        q = self.backend.queues[0]
        while (chain := q.pop()) is not None:
            data = chain.read()
            n = chain.write(data.upper())
            q.push(chain, n)
        q.notify()

    def on_queue_stop(self, i):
        self.stopped_queues.append(i)

    def on_stop(self):
        self.stopped = True


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vu.sock")


@pytest.fixture
def served(sock_path):
    before = _fds()
    dev = EchoDevice()
    be = VhostUserBackend(sock_path, dev, offer_config=True)
    be.start()
    fe = FakeFrontend(sock_path)
    assert be.wait_connected(5)
    yield dev, be, fe
    fe.close()
    be.stop()
    assert not os.path.exists(sock_path)
    assert not (_fds() - before), "fd leak"  # new descriptors only: others may close meanwhile


def test_handshake_in_qemu_order_answers_features_queue_num_and_config(served):
    dev, be, fe = served
    fe.handshake(config_size=16)
    assert fe.features == (1 << 3) | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1 \
        | VIRTIO_RING_F_INDIRECT_DESC
    assert fe.protocol_features == (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) \
        | (1 << ProtocolFeature.CONFIG)
    assert fe.num_queues == 2
    assert fe.config == bytes(range(16))
    # GET_FEATURES is answered at any time, even after the rings run.
    fe.start_queues([8, 8])
    assert fe.get_u64(Request.GET_FEATURES) == fe.features
    assert be.acked_features == 0x4000_0000
    assert be.error is None


def test_no_config_feature_when_not_offered(sock_path):
    dev = EchoDevice()
    be = VhostUserBackend(sock_path, dev, offer_config=False)
    be.start()
    try:
        with FakeFrontend(sock_path) as fe:
            fe.handshake()
            assert not fe.protocol_features & (1 << ProtocolFeature.CONFIG)
            assert fe.config is None
    finally:
        be.stop()


def test_single_descriptor_split_and_indirect_chains(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([16, 16])
    h1 = q0.add([b"hello world"], [64])
    h2 = q0.add([b"abc", b"def", b"ghi"], [4, 4, 8])  # split over 6 descriptors
    h3 = q0.add([b"indirect", b"-chain"], [10, 10], indirect=True)
    q0.kick()
    assert q0.wait_used(3)
    got = {h: (n, d) for h, n, d in q0.collect()}
    assert got[h1] == (11, b"HELLO WORLD")
    assert got[h2] == (9, b"ABCDEFGHI")
    assert got[h3] == (14, b"INDIRECT-CHAIN")
    assert fe.stop_queues() == [3, 0]
    assert dev.stopped_queues == [0, 1]  # GET_VRING_BASE stops each started ring
    assert be.error is None


def test_many_chains_wrap_the_ring_and_base_is_reported(served):
    dev, be, fe = served
    fe.handshake()
    q0, q1 = fe.start_queues([8, 8])
    total = 0
    for k in range(25):  # 25 rounds of 3 on an 8-entry ring: slots wrap many times
        payloads = [bytes([97 + (k + j) % 26]) * (j + 1) for j in range(3)]
        heads = [q0.add([p], [8]) for p in payloads]
        q0.kick()
        assert q0.wait_used(3)
        got = q0.collect()
        assert [h for h, _, _ in got] == heads
        assert [d for _, _, d in got] == [p.upper() for p in payloads]
        total += 3
    assert fe.stop_queues()[0] == total & 0xFFFF
    assert be.error is None


def test_restart_with_nonzero_base(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8], bases=[65534, 0])  # avail/used indices wrap past 0xffff
    for k in range(4):
        h = q0.add([b"x%d" % k], [8])
        q0.kick()
        assert q0.wait_used(1)
        assert q0.collect() == [(h, 2, b"X%d" % k)]
    assert fe.stop_queues()[0] == 2  # 65534 + 4 wraps to 2


def test_no_interrupt_suppresses_call(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    q0.set_no_interrupt(True)
    q0.add([b"a"], [4])
    q0.kick()
    deadline = time.monotonic() + 5
    while q0.used_idx() != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert q0.used_idx() == 1
    assert not q0.wait_call(0.1)
    q0.set_no_interrupt(False)
    q0.add([b"b"], [4])
    q0.kick()
    assert q0.wait_call(5)


def test_memory_table_translates_both_ways():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x3000)
        r1 = MemoryRegion(fd, 0x1000, 0x1000, 0x7F00_0000_0000, 0x0)
        r2 = MemoryRegion(fd, 0x2000, 0x1000, 0x7F00_0010_0000, 0x1000)
        t = MemoryTable([r1, r2])
        assert t.gpa_to_qva(0x1010) == 0x7F00_0000_0010
        assert t.gpa_to_qva(0x2ABC) == 0x7F00_0010_0ABC
        assert t.qva_to_gpa(0x7F00_0010_0ABC) == 0x2ABC
        os.pwrite(fd, b"XYZ", 0xFFF)  # last byte of r1, first two of r2 (file offset 0x1000)
        views = t.views(0x1FFF, 3)
        assert [bytes(v) for v in views] == [b"X", b"YZ"]
        for v in views:
            v.release()
        with pytest.raises(NitroError, match="outside every memory region"):
            t.gpa_to_qva(0x3000)
        with pytest.raises(NitroError, match="crosses its region"):
            t.locate_qva(0x7F00_0000_0FF0, 0x20)
        assert t.close() == []
    finally:
        os.close(fd)


def test_reply_ack_reports_failure_for_unimplemented_request(served):
    dev, be, fe = served
    fe.handshake()
    fe.send(Request.SET_LOG_BASE, struct.pack("<QQ", 0, 0), need_reply=True)
    (status,) = struct.unpack("<Q", fe.recv_reply(Request.SET_LOG_BASE))
    assert status == 1
    assert be.error is None
    assert fe.get_u64(Request.GET_QUEUE_NUM) == 2  # connection still served


@pytest.mark.parametrize("bad, reason", [
    (struct.pack("<III", Request.GET_FEATURES, 2, 0), "version 2"),
    (struct.pack("<III", 99, 1, 0), "unknown request 99"),
    (struct.pack("<III", Request.SET_FEATURES, 1, 4) + b"\0" * 4, "payload is 4 bytes"),
    (struct.pack("<III", Request.SET_VRING_NUM, 1, 8) + struct.pack("<II", 7, 8),
     "queue 7, device has 2"),
    (struct.pack("<III", Request.SET_VRING_NUM, 1, 8) + struct.pack("<II", 0, 3),
     "not a power of two"),
    (struct.pack("<III", Request.SET_MEM_TABLE, 1, 40) + struct.pack("<II", 1, 0)
     + bytes(32), "1 regions but 0 fds"),
    (struct.pack("<III", Request.SET_FEATURES, 1, 8) + struct.pack("<Q", 1 << 40),
     "never offered"),
])
def test_malformed_message_gives_clear_error_and_closes(served, bad, reason):
    dev, be, fe = served
    fe.sock.sendall(bad)
    assert be.disconnected.wait(5)
    assert be.error is not None and reason in be.error
    assert "\n" not in be.error
    with pytest.raises((FrontendError, OSError)):
        fe.get_u64(Request.GET_FEATURES)


def _refused_then_served(be, fe, q0, head: int, words: str) -> None:
    """docs/vhost-user.md#bounds: the malformed chain comes back unused (length 0), named in
    ``refusals``; the back end keeps its connection and serves the next chain."""
    q0.kick()
    assert q0.wait_used(1, 5), be.error
    assert q0.collect() == [(head, 0, b"")]
    assert be.error is None and not be.disconnected.is_set()
    assert be.queues[0].refused == 1
    assert words in be.refusals[-1] and be.refusals[-1].startswith("queue 0:")
    h = q0.add([b"after"], [16])
    q0.kick()
    assert q0.wait_used(1, 5)
    assert q0.collect() == [(h, 5, b"AFTER")]


def test_descriptor_loop_is_refused(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    buf = fe.alloc(16)
    head = q0.add_raw_chain([(buf, 4, 1, 1), (buf, 4, 1, 0)])  # 0 -> 1 -> 0 -> ...
    _refused_then_served(be, fe, q0, head, "loops (more than 8 descriptors)")


def test_readable_after_writable_is_refused(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    buf = fe.alloc(16)
    head = q0.add_raw_chain([(buf, 4, 2 | 1, 1), (buf, 4, 0, 0)])
    _refused_then_served(be, fe, q0, head, "readable descriptor after a writable one")


def test_buffer_outside_guest_ram_is_refused(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    head = q0.add_raw_chain([(0x10, 4, 0, 0)])
    _refused_then_served(be, fe, q0, head, "outside every memory region")


def test_a_chain_longer_than_the_device_reads_raises_before_copying(served):
    dev, be, fe = served
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    q0.add([b"x" * 100], [])
    vq = be.queues[0]
    dev.on_kick = lambda i: None  # pop by hand below, on the loop thread
    q0.kick()
    got = []

    def take():
        c = vq.pop()
        try:
            c.read(99)
        except ChainTooLarge as e:
            got.append(str(e))
        got.append(c.read(100))
        vq.push(c, 0)

    dev.run_on_loop(take)
    assert "100 readable bytes, more than the device's 99" in got[0]
    assert got[1] == b"x" * 100


def test_disconnect_with_running_rings_sets_error(served):
    dev, be, fe = served
    fe.handshake()
    fe.start_queues([8, 8])
    fe.sock.close()
    assert be.disconnected.wait(5)
    assert "the vhost-user connection closed while the device's rings were running" in be.error
    assert sorted(dev.stopped_queues) == [0, 1]


def test_clean_stop_then_disconnect_is_not_an_error(served):
    dev, be, fe = served
    fe.handshake()
    fe.start_queues([8, 8])
    fe.stop_queues()
    fe.sock.close()
    assert be.disconnected.wait(5)
    assert be.error is None


def test_stop_is_idempotent_and_releases_everything(sock_path):
    before = _fds()
    dev = EchoDevice()
    be = VhostUserBackend(sock_path, dev)
    assert os.path.exists(sock_path)  # listening before QEMU would start
    be.start()
    fe = FakeFrontend(sock_path)
    fe.handshake()
    fe.start_queues([8, 8])
    be.stop()
    be.stop()
    assert dev.stopped
    assert not be.running
    assert not os.path.exists(sock_path)
    fe.close()
    assert not (_fds() - before)


def test_stop_without_start(sock_path):
    before = _fds()
    be = VhostUserBackend(sock_path, EchoDevice())
    be.stop()
    assert not os.path.exists(sock_path)
    assert not (_fds() - before)


def test_bind_failure_is_a_nitro_error(tmp_path):
    with pytest.raises(NitroError, match="cannot listen"):
        VhostUserBackend(str(tmp_path / "missing-dir" / "s.sock"), EchoDevice())


def test_call_soon_call_later_and_add_reader_run_on_the_loop(served):
    dev, be, fe = served
    seen = []
    done = threading.Event()
    a, b = socket.socketpair()
    try:
        def on_readable():
            seen.append(("read", a.recv(10), threading.current_thread() is be._thread))
            be.remove_reader(a.fileno())
            be.call_later(0.01, lambda: (seen.append("later"), done.set()))

        be.call_soon(lambda: be.add_reader(a.fileno(), on_readable))
        b.send(b"ping")
        assert done.wait(5)
        assert seen == [("read", b"ping", True), "later"]
        assert dev.run_on_loop(lambda: threading.current_thread() is be._thread) is True
    finally:
        a.close()
        b.close()


def _socket_at(fd: int, sock: socket.socket) -> socket.socket:
    """``sock`` moved to descriptor number ``fd`` (a free one)."""
    if sock.fileno() == fd:
        return sock
    os.dup2(sock.fileno(), fd)
    sock.close()
    return socket.socket(fileno=fd)


@pytest.mark.parametrize("old_slot", ["reader", "writer"])
def test_an_fd_number_closed_behind_the_loops_back_can_be_watched_again(served, old_slot):
    # A device closes a watched socket without remove_reader/remove_writer: epoll forgets the
    # file, the loop's table still has its number. A new socket with that number must then be
    # watched for real, and the dead socket's callback must never run for it.
    dev, be, fe = served
    fired = []
    readable = threading.Event()
    old_a, old_b = socket.socketpair()
    new: list[socket.socket] = []

    def on_new_readable() -> None:
        fired.append(new[0].recv(10))
        readable.set()

    def reuse_the_number() -> int:
        n = old_a.fileno()
        watch = be.add_reader if old_slot == "reader" else be.add_writer
        watch(n, lambda: fired.append("old"))
        old_a.close()  # behind the loop's back
        a, b = socket.socketpair()
        new.extend((_socket_at(n, a), b))
        be.add_reader(n, on_new_readable)
        return n

    try:
        n = dev.run_on_loop(reuse_the_number)
        assert new[0].fileno() == n
        new[1].send(b"ping")
        assert readable.wait(5), "the new socket's reader never ran"
        time.sleep(0.05)
        assert fired == [b"ping"]
        assert be.error is None
        dev.run_on_loop(lambda: be.remove_reader(n))
    finally:
        old_b.close()
        for s in new:
            s.close()


def test_second_connection_is_refused(served):
    dev, be, fe = served
    fe.handshake()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(be.socket_path)
        s.settimeout(5)
        assert s.recv(1) == b""  # closed at once: one front end per back end
    finally:
        s.close()
    assert fe.get_u64(Request.GET_QUEUE_NUM) == 2


def test_trace_records_messages(sock_path):
    rec = []
    be = VhostUserBackend(sock_path, EchoDevice(), trace=rec.append)
    be.start()
    try:
        with FakeFrontend(sock_path) as fe:
            fe.handshake()
            fe.start_queues([8, 8])
        be.disconnected.wait(5)
    finally:
        be.stop()
    names = [r["name"] for r in rec if r["dir"] == "in"]
    assert names[:6] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                         "GET_QUEUE_NUM", "SET_OWNER", "GET_FEATURES"]
    assert "SET_MEM_TABLE" in names
    assert [r for r in rec if r["name"] == "SET_MEM_TABLE"][0]["fds"] == 1


class HoldingDevice(EchoDevice):
    """Test device: queue 0's chains are popped on kick and held until the test returns them."""

    def __init__(self):
        super().__init__()
        self.held = []

    def on_kick(self, i):
        if i == 0:
            q = self.backend.queues[0]
            while (chain := q.pop()) is not None:
                self.held.append(chain)


def _serve_with_rings(sock_path, dev):
    """``dev`` served at ``sock_path`` to a FakeFrontend that has shaken hands and started both
    rings (8 entries each): (backend, front end, queue 0's driver side)."""
    be = VhostUserBackend(sock_path, dev, offer_config=True)
    be.start()
    fe = FakeFrontend(sock_path)
    assert be.wait_connected(5)
    fe.handshake()
    q0, _ = fe.start_queues([8, 8])
    return be, fe, q0


@pytest.fixture
def holding(sock_path):
    dev = HoldingDevice()
    be, fe, q0 = _serve_with_rings(sock_path, dev)
    yield dev, be, fe, q0
    fe.close()
    be.stop()


def _wait_held(dev, n):
    deadline = time.monotonic() + 5
    while len(dev.held) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(dev.held) == n


def test_returning_a_head_twice_is_refused_with_the_queue_head_and_history(holding):
    dev, be, fe, q0 = holding
    h = q0.add([b"a"], [8])
    q0.kick()
    _wait_held(dev, 1)
    q = be.queues[0]
    chain = dev.held[0]
    dev.run_on_loop(lambda: q.push(chain, 0))
    assert q0.wait_used(1) and [x[0] for x in q0.collect()] == [h]
    with pytest.raises(NitroError) as exc:
        dev.run_on_loop(lambda: q.push(chain, 0))  # the double return the driver would reject
    msg = str(exc.value)
    assert f"queue 0: <lambda> returned head {h}, which the device does not hold (returned already" in msg
    assert f"pop {h} 0 on_kick" in msg and f"push {h} 0 0 <lambda>" in msg  # the last operations on that queue
    assert q0.used_idx() == 1  # nothing was written for the refused return


def test_a_chain_popped_before_the_ring_was_stopped_is_dropped_not_returned(holding):
    dev, be, fe, q0 = holding
    q0.add([b"a"], [8])
    q0.kick()
    _wait_held(dev, 1)
    stale = dev.held.pop()
    assert fe.stop_queues()[0] == 1  # GET_VRING_BASE: the driver forgets the buffer
    q = be.queues[0]
    dev.run_on_loop(lambda: q.push(stale, 0))
    assert q0.used_idx() == 0 and q.history[-1][0] == "drop-stale"
    assert q.outstanding == 0


def test_a_driver_reoffering_a_held_head_is_a_clear_error(holding):
    dev, be, fe, q0 = holding
    h = q0.add([b"a"], [8])
    q0.kick()
    _wait_held(dev, 1)
    q0.add_raw([], head=h)  # the same head published again while the device holds it
    q0.kick()
    assert be.disconnected.wait(5)
    assert f"driver made head {h} available at avail index 1 while the device still holds it" \
        in be.error


def test_a_stuck_loop_is_reported_by_stop_and_its_resources_are_released(sock_path):
    # A device callback that never returns: stop() says where the loop is stuck and still
    # releases the socket, fds and guest memory instead of pretending it stopped.
    before = _fds()
    release = threading.Event()
    armed = threading.Event()

    class StuckDevice(EchoDevice):
        def on_kick(self, i):
            if armed.is_set():
                release.wait(30)

    be, fe, q0 = _serve_with_rings(sock_path, StuckDevice())
    armed.set()
    q0.add([b"a"], [8])
    q0.kick()
    time.sleep(0.3)
    try:
        with pytest.raises(NitroError) as exc:
            be.stop(timeout=0.5)
        assert "did not stop in 0.5 s" in str(exc.value)
        assert "still running in test_vhost_user.py:" in str(exc.value)
        assert "in on_kick" in str(exc.value)
        assert not os.path.exists(sock_path)
        assert be.memory is None
    finally:
        release.set()
        be._thread.join(5)
        fe.close()
    assert not be._thread.is_alive()
    assert not (_fds() - before), "fd leak"


def test_a_used_index_changed_behind_the_device_is_refused(holding):
    # Only the device writes the used ring: another writer is named at the next push.
    dev, be, fe, q0 = holding
    q0.add([b"a"], [8])
    q0.kick()
    _wait_held(dev, 1)
    fe.write_mem(q0.used + 2, struct.pack("<H", 5))
    q = be.queues[0]
    chain = dev.held[0]
    with pytest.raises(NitroError) as exc:
        dev.run_on_loop(lambda: q.push(chain, 0))
    assert "the used ring's index reads 5, but the device last wrote 0: something else writes" \
        in str(exc.value)


def test_a_ring_touched_off_the_loop_thread_is_refused(holding):
    dev, be, fe, q0 = holding
    q0.add([b"a"], [8])
    q0.kick()
    _wait_held(dev, 1)
    q = be.queues[0]
    with pytest.raises(NitroError) as exc:
        q.push(dev.held[0], 0)  # from the test's thread while the loop runs
    assert "push from thread 'MainThread', not the back end's loop thread" in str(exc.value)
    assert q0.used_idx() == 0
