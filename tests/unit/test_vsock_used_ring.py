"""The vsock device's rx used ring under load: every head it returns must be one the guest made
available and has not had back (docs/vsock.md, docs/vhost-user.md). Linux checks the same rule
and, on a violation, prints ``rx:id N is not a head!`` and marks the queue broken: every later
vsock exchange hangs.

Two seeded models drive the device through the fake front end: a random one (parent connects
and accepts from threads, random sizes, half and full closes, guest RW/SHUTDOWN/RST/CREDIT
packets, rx buffers posted in small batches so the device starves) and a scenario-like one (a
Linux-like guest keeping a 1024-entry rx ring full runs an echo server; the parent does a large
echo then short connections, sender thread plus reader, as scenarios/vsock.yaml does). A failure
names its seed; more seeds: ``VSOCK_USED_RING_SEEDS=0:200 pytest tests/unit/test_vsock_used_ring.py``.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
import traceback

import pytest

from harness.vhost_user import VhostUserBackend
from harness.vsock import HEADER, Op, VsockDevice
from helpers.vhost_user_frontend import FakeFrontend, GuestQueue

CID = 16


def _seeds(default: list[int]) -> list[int]:
    spec = os.environ.get("VSOCK_USED_RING_SEEDS")
    if not spec:
        return default
    a, _, b = spec.partition(":")
    return list(range(int(a), int(b))) if b else [int(a)]


def collect_checked(q: GuestQueue, what: str) -> list[tuple[int, int, bytes]]:
    """GuestQueue.collect(), with a returned head the guest does not hold as a clear failure."""
    try:
        return q.collect()
    except KeyError as e:
        raise AssertionError(
            f"{what}: the device put head {e.args[0]} on the used ring, but the guest did not "
            f"have it outstanding (a double or stale return; Linux prints 'id {e.args[0]} is "
            f"not a head!' and breaks the queue)") from None


class DeviceSideGuard:
    """Wraps the rx queue's pop/push on the back end to catch a bad return where it happens
    (the stack of the offending push), and any ring access off the loop thread."""

    def __init__(self, be: VhostUserBackend, index: int = 0):
        self.violations: list[str] = []
        q = be.queues[index]
        held: set[int] = set()
        pop0, push0 = q.pop, q.push

        def note(msg: str) -> None:
            self.violations.append(msg + "\n" + "".join(traceback.format_stack(limit=14)[:-2]))

        def pop():
            if threading.current_thread() is not be._thread:
                note(f"queue {index}: pop from thread {threading.current_thread().name}")
            c = pop0()
            if c is not None:
                if c.head in held:
                    note(f"queue {index}: popped head {c.head} while the device still holds it")
                held.add(c.head)
            return c

        def push(chain, length=None):
            if threading.current_thread() is not be._thread:
                note(f"queue {index}: push from thread {threading.current_thread().name}")
            if chain.head not in held:
                note(f"queue {index}: pushed head {chain.head}, which the device does not hold")
            held.discard(chain.head)
            return push0(chain, length)

        q.pop, q.push = pop, push

    def check(self, seed: int) -> None:
        assert not self.violations, f"seed {seed}: {self.violations[0]}"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def ring(tmp_path):
    """(make, cleanup): make(rx_size, tx_size, **device kw) -> (dev, be, fe, rxq, txq, guard)."""
    made = []
    before = _fds()

    def make(rx_size: int, tx_size: int, **kw):
        dev = VsockDevice(CID, **kw)
        be = VhostUserBackend(str(tmp_path / f"v{len(made)}.sock"), dev, offer_config=True)
        be.start()
        fe = FakeFrontend(be.socket_path, mem_size=16 << 20)
        made.append((dev, be, fe))
        fe.handshake()
        rxq, txq = fe.start_queues([rx_size, tx_size])
        return dev, be, fe, rxq, txq, DeviceSideGuard(be)

    yield make
    for dev, be, fe in made:
        fe.close()
        dev.close()
        be.stop()
    deadline = time.monotonic() + 5
    while _fds() - before and time.monotonic() < deadline:
        time.sleep(0.05)  # parent threads of the models close their sockets last
    assert not (_fds() - before), "fd leak"


def test_front_end_check_catches_a_double_return(ring):
    """The check the models rely on fails on a head returned twice (written by hand here)."""
    dev, be, fe, rxq, txq, guard = ring(8, 8)
    head = rxq.add([], [44 + 64])
    slot = rxq.used_idx()
    fe.write_mem(rxq.used + 4 + 8 * (slot % rxq.size), struct.pack("<II", head, 44))
    fe.write_mem(rxq.used + 4 + 8 * ((slot + 1) % rxq.size), struct.pack("<II", head, 44))
    fe.write_mem(rxq.used + 2, struct.pack("<H", (slot + 2) & 0xFFFF))
    with pytest.raises(AssertionError, match=f"head {head} on the used ring, but the guest"):
        collect_checked(rxq, "rx")


# --- random model ------------------------------------------------------------------------


def _parent_worker(s: socket.socket, r: random.Random, stop: threading.Event) -> None:
    with s:
        s.settimeout(2)
        if r.random() < 0.3:  # small buffers: the device's sends would-block
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
        data = os.urandom(r.choice([0, 10, 5000, 100_000]))
        half_close = r.random() < 0.7

        def send() -> None:
            try:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=send, daemon=True)
        t.start()
        end = time.monotonic() + r.random() * 1.5
        while time.monotonic() < end and not stop.is_set():
            try:
                if not s.recv(65536):
                    break
            except OSError:
                break
        if r.random() < 0.5:
            time.sleep(r.random() * 0.05)
        if r.random() < 0.2:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        t.join(3)


def run_random_model(ring, seed: int, steps: int = 1500) -> None:
    rnd = random.Random(seed)
    dev, be, fe, rxq, txq, guard = ring(256, 256, buf_alloc=rnd.choice([4096, 16384, 1 << 18]))
    lst = dev.listen(7000)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    conns: dict[tuple[int, int], dict] = {}  # (guest port, parent port) -> state
    next_gport = 30000

    def spawn(fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        threads.append(t)

    def do_connect(port: int, timeout: float, r: random.Random) -> None:
        try:
            s = dev.connect(port, timeout)
        except (ConnectionError, TimeoutError, OSError):
            return
        _parent_worker(s, r, stop)

    def do_accept(r: random.Random) -> None:
        try:
            s = lst.accept(2)
        except (TimeoutError, OSError):
            return
        _parent_worker(s, r, stop)

    def gsend(src: int, dst: int, op: int, payload: bytes = b"", flags: int = 0,
              buf_alloc: int = 65536, fwd: int = 0) -> None:
        collect_checked(txq, f"seed {seed}: tx")
        if txq.free_desc:
            txq.add([HEADER.pack(CID, 3, src, dst, len(payload), 1, op, flags, buf_alloc, fwd)
                     + payload], [])
            txq.kick()

    def post(n: int) -> None:
        for _ in range(n):
            if not rxq.free_desc:
                break
            rxq.add([], [44 + rnd.choice([4096, 4096, 64, 200])])
        rxq.kick()

    post(rnd.randint(1, 8))
    try:
        for _ in range(steps):
            if guard.violations or be.error:
                break
            a = rnd.random()
            busy = sum(t.is_alive() for t in threads) >= 12
            if a < 0.08 and not busy:
                spawn(do_connect, rnd.choice([5005, 5005, 5006]), rnd.choice([0.05, 2.0]),
                      random.Random(rnd.random()))
            elif a < 0.12 and not busy:
                conns[(next_gport, 7000)] = {"rx": 0, "ba": 65536}
                gsend(next_gport, 7000, Op.REQUEST)
                next_gport += 1
                spawn(do_accept, random.Random(rnd.random()))
            elif a < 0.40:
                post(rnd.choice([0, 1, 1, 2, 3, 8]))
            elif a < 0.45:
                time.sleep(rnd.random() * 0.01)
            elif a < 0.55 and conns:
                (gp, pp), c = rnd.choice(list(conns.items()))
                op = rnd.choice([Op.RW, Op.RW, Op.SHUTDOWN, Op.RST, Op.CREDIT_UPDATE,
                                 Op.CREDIT_REQUEST])
                if op == Op.RW:
                    gsend(gp, pp, op, os.urandom(rnd.choice([1, 100, 3000])), fwd=c["rx"],
                          buf_alloc=c["ba"])
                elif op == Op.SHUTDOWN:
                    fl = rnd.choice([1, 2, 3])
                    gsend(gp, pp, op, flags=fl, fwd=c["rx"], buf_alloc=c["ba"])
                    if fl == 3:
                        del conns[(gp, pp)]
                elif op == Op.RST:
                    gsend(gp, pp, op)
                    del conns[(gp, pp)]
                else:
                    if op == Op.CREDIT_UPDATE:
                        c["ba"] = rnd.choice([0, 512, 65536, 1 << 20])
                    gsend(gp, pp, op, fwd=c["rx"], buf_alloc=c["ba"])
            else:  # the guest's rx processing
                for _head, length, data in collect_checked(rxq, f"seed {seed}: rx"):
                    f = HEADER.unpack_from(data)
                    sport, dport, ln, op, key = f[2], f[3], f[4], f[6], (f[3], f[2])
                    c = conns.get(key)
                    if op == Op.REQUEST:
                        if dport == 5005 and rnd.random() < 0.9:
                            if rnd.random() < 0.9:  # else ignored: the parent times out
                                conns[key] = {"rx": 0, "ba": 65536}
                                gsend(dport, sport, Op.RESPONSE,
                                      buf_alloc=rnd.choice([4096, 65536]))
                        else:
                            gsend(dport, sport, Op.RST)
                    elif op == Op.RW and c is None:
                        gsend(dport, sport, Op.RST)
                    elif op == Op.RW:
                        c["rx"] += ln
                        if rnd.random() < 0.3:
                            gsend(dport, sport, Op.CREDIT_UPDATE, fwd=c["rx"],
                                  buf_alloc=c["ba"])
                        if rnd.random() < 0.2:
                            gsend(dport, sport, Op.RW, data[44:44 + min(ln, 2000)],
                                  fwd=c["rx"], buf_alloc=c["ba"])
                    elif op == Op.SHUTDOWN and c is not None and rnd.random() < 0.6:
                        gsend(dport, sport, Op.SHUTDOWN, flags=3, fwd=c["rx"])
                        del conns[key]
                    elif op == Op.RST:
                        conns.pop(key, None)
                    elif op == Op.CREDIT_REQUEST and c is not None:
                        gsend(dport, sport, Op.CREDIT_UPDATE, fwd=c["rx"], buf_alloc=c["ba"])
                if rnd.random() < 0.5:
                    post(rnd.randint(0, 4))
        for _ in range(20):  # let everything in flight come back
            post(4)
            collect_checked(rxq, f"seed {seed}: rx")
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        lst.close()
    guard.check(seed)
    assert be.error is None, f"seed {seed}: back end error: {be.error}"


@pytest.mark.parametrize("seed", _seeds([0, 1, 2]))
def test_random_model_keeps_the_used_ring_valid(ring, seed):
    run_random_model(ring, seed)


# --- scenario-like model -----------------------------------------------------------------


def run_echo_model(ring, seed: int, big: int, shorts: int) -> None:
    """A Linux-like guest: one 44 + 4096 buffer per rx descriptor, the 1024-entry ring filled
    to the brim and refilled once half is used; an echo server on port 5005 that honours the
    device's credit, shuts down its sending side at EOF, then closes."""
    rnd = random.Random(seed)
    dev, be, fe, rxq, txq, guard = ring(1024, 256)
    stop = threading.Event()
    errors: list[str] = []
    conns: dict[tuple[int, int], dict] = {}
    gbuf = 256 * 1024

    def fill() -> None:
        while rxq.free_desc:
            rxq.add([], [44 + 4096])
        rxq.kick()

    def gsend(src: int, dst: int, op: int, payload: bytes = b"", flags: int = 0,
              fwd: int = 0) -> None:
        while True:
            collect_checked(txq, f"seed {seed}: tx")
            if txq.free_desc:
                break
            txq.wait_call(0.05)
        txq.add([HEADER.pack(CID, 3, src, dst, len(payload), 1, op, flags, gbuf, fwd)
                 + payload], [])
        txq.kick()

    def guest() -> None:
        try:
            while not stop.is_set() and not guard.violations:
                got = collect_checked(rxq, f"seed {seed}: rx")
                for _head, _n, data in got:
                    f = HEADER.unpack_from(data)
                    sport, dport, ln, op, flags, key = f[2], f[3], f[4], f[6], f[7], (f[3], f[2])
                    c = conns.get(key)
                    if c is not None:
                        c["ba"], c["fwd"] = f[8], f[9]
                    if op == Op.REQUEST and dport == 5005:
                        conns[key] = {"pending": bytearray(), "rx": 0, "tx": 0, "ba": f[8],
                                      "fwd": f[9], "eof": False, "shut": False, "said": 0}
                        gsend(dport, sport, Op.RESPONSE)
                    elif op == Op.REQUEST:
                        gsend(dport, sport, Op.RST)
                    elif op == Op.RW and c is not None:
                        c["pending"] += data[44:44 + ln]
                    elif op == Op.SHUTDOWN and c is not None and flags & 2:
                        c["eof"] = True
                    elif op == Op.RST:
                        conns.pop(key, None)
                    elif op == Op.CREDIT_REQUEST and c is not None:
                        gsend(dport, sport, Op.CREDIT_UPDATE, fwd=c["rx"])
                if len(rxq.inflight) < 512:
                    fill()
                for (gp, pp), c in list(conns.items()):
                    while c["pending"] and c["ba"] - (c["tx"] - c["fwd"]) > 0:
                        n = min(len(c["pending"]), 4096, c["ba"] - (c["tx"] - c["fwd"]))
                        chunk = bytes(c["pending"][:n])
                        del c["pending"][:n]
                        c["rx"] += n
                        c["tx"] += n
                        gsend(gp, pp, Op.RW, chunk, fwd=c["rx"])
                    if c["rx"] - c["said"] >= 64 * 1024:
                        c["said"] = c["rx"]
                        gsend(gp, pp, Op.CREDIT_UPDATE, fwd=c["rx"])
                    if c["eof"] and not c["pending"] and not c["shut"]:
                        c["shut"] = True
                        gsend(gp, pp, Op.SHUTDOWN, flags=2, fwd=c["rx"])
                        time.sleep(rnd.random() * 0.002)
                        gsend(gp, pp, Op.SHUTDOWN, flags=3, fwd=c["rx"])
                if not got:
                    rxq.wait_call(0.002)
        except Exception as e:  # reported by the parent side below
            errors.append(f"{type(e).__name__}: {e}")

    def exchange(payload: bytes) -> None:
        s = dev.connect(5005, 10)
        with s:
            def send() -> None:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send, daemon=True)
            t.start()
            got = bytearray()
            s.settimeout(0.5)
            deadline = time.monotonic() + 60
            while len(got) < len(payload) and time.monotonic() < deadline:
                if errors or guard.violations:
                    return
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                got += chunk
            t.join(10)
            assert bytes(got) == payload, f"seed {seed}: echo differs ({len(got)} bytes)"

    fill()
    gt = threading.Thread(target=guest, daemon=True)
    gt.start()
    try:
        exchange(os.urandom(big))
        for _ in range(shorts):
            if errors or guard.violations:
                break
            exchange(b"ping\n")
    finally:
        stop.set()
        gt.join(5)
    assert not errors, f"seed {seed}: {errors[0]}"
    guard.check(seed)
    assert be.error is None, f"seed {seed}: back end error: {be.error}"


@pytest.mark.parametrize("seed", _seeds([0]))
def test_scenario_like_echo_keeps_the_used_ring_valid(ring, seed):
    big = int(os.environ.get("VSOCK_USED_RING_ECHO_BYTES", 1 << 20))
    run_echo_model(ring, seed, big, shorts=10)
