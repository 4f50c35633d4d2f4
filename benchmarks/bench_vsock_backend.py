#!/usr/bin/env python3
"""Benchmark: the Python vsock back end's ceiling on a synthetic queue, beside references.

The back end must never be the bottleneck of a TCG guest, and its ceiling is worth
knowing. This script drives :class:`harness.vsock.VsockDevice` through the real vhost-user
protocol with the fake front end from ``tests/helpers/vhost_user_frontend.py`` (memfd guest
RAM, split rings, eventfds) and a lean in-process guest driver that reuses pre-built
descriptors, so the numbers are the back end's packet handling plus the parent socket, not
QEMU's. The guest driver shares the process (and the GIL, and this machine's 2 cores) with the
back end: the figures are a lower bound of the ceiling.

Printed side by side, in one run:

- back end, guest -> parent: MB/s and packets/s for RW packets of 4 KiB and 64 KiB payload
  (Linux sends up to 64 KiB per tx packet) and 1 byte (packet-rate ceiling);
- back end, parent -> guest: MB/s into 44 + 4096-byte rx buffers (Linux >= 6.2's layout);
- reference: a bare Python ``socketpair`` copy loop with the same chunk sizes (what any
  Python parent endpoint costs on this machine), and the ratio back end / reference;
- with ``--qemu``: a real TCG guest (the python image, ``vsock_echo.py send/recv``) moving
  ``--qemu-bytes`` each way through the same back end, and the ratio ceiling / guest rate
  (above 1 means the back end is not the bottleneck).

Usage: ``python benchmarks/bench_vsock_backend.py [--seconds 2] [--qemu [--qemu-bytes N]]``
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import assets  # noqa: E402

sys.path.insert(0, str(assets.guest_dir()))

from harness.vhost_user import VhostUserBackend  # noqa: E402
from harness.vsock import HEADER, Op, VsockDevice  # noqa: E402
from helpers.vhost_user_frontend import FakeFrontend  # noqa: E402

CID = 16
QSIZE = 256
_U16 = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")


class LeanRing:
    """Driver side of one ring with one pre-built descriptor (and buffer) per slot."""

    def __init__(self, fe: FakeFrontend, q, buf_len: int, writable: bool, content: bytes = b""):
        self.fe, self.q, self.n = fe, q, q.size
        self.mm = fe.mm
        self.avail_off = fe._off(q.avail)
        self.used_off = fe._off(q.used)
        self.bufs = []
        for i in range(self.n):
            g = fe.alloc(buf_len, 8)
            if content:
                fe.write_mem(g, content)
            self.bufs.append(g)
            fe.write_mem(q.desc + 16 * i, _DESC.pack(g, buf_len, 2 if writable else 0, 0))
        self.avail_idx = q.avail_idx
        self.last_used = q.last_used
        self.inflight = 0

    def publish(self, count: int) -> int:
        """Make up to ``count`` free slots available; returns how many."""
        k = min(count, self.n - self.inflight)
        mm, ao, n = self.mm, self.avail_off, self.n
        idx = self.avail_idx
        for _ in range(k):
            _U16.pack_into(mm, ao + 4 + 2 * (idx % n), idx % n)
            idx = (idx + 1) & 0xFFFF
        _U16.pack_into(mm, ao + 2, idx)
        self.avail_idx = idx
        self.inflight += k
        return k

    def reap(self) -> list[tuple[int, int]]:
        """(descriptor id, length) of every new used entry."""
        mm, uo, n = self.mm, self.used_off, self.n
        idx = _U16.unpack_from(mm, uo + 2)[0]
        out = []
        while self.last_used != idx:
            out.append(struct.unpack_from("<II", mm, uo + 4 + 8 * (self.last_used % n)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.inflight -= len(out)
        return out


class Drainer:
    """Reads and counts everything arriving on ``sock`` on a thread until :meth:`stop`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.received += len(chunk)

    def stop(self) -> None:
        """Stop reading and wait for the thread."""
        self._stop.set()
        self._thread.join()


def _setup(tmp: str):
    dev = VsockDevice(CID)
    be = VhostUserBackend(os.path.join(tmp, "vs.sock"), dev, offer_config=True)
    be.start()
    fe = FakeFrontend(be.socket_path, mem_size=96 << 20)
    fe.handshake()
    fe.start_queues([QSIZE, QSIZE])
    return dev, be, fe


def _teardown(dev, be, fe) -> None:
    fe.close()
    dev.close()
    be.stop()


def _guest_connect(fe, rx: LeanRing, port: int, gport: int, buf_alloc: int) -> None:
    """REQUEST via the test helper's tx path, wait RESPONSE on the lean rx ring."""
    rxq, txq = fe.queues
    txq.add([HEADER.pack(CID, 3, gport, port, 0, 1, Op.REQUEST, 0, buf_alloc, 0)], [])
    txq.kick()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for i, n in rx.reap():
            op = HEADER.unpack(fe.read_mem(rx.bufs[i], 44))[6]
            rx.publish(1)
            rx.q.kick()
            if op == Op.RESPONSE:
                txq.wait_used(1)
                txq.collect()
                return
        time.sleep(0.001)
    raise RuntimeError("no RESPONSE from the device")


def bench_guest_to_parent(payload: int, seconds: float) -> tuple[float, float]:
    """Returns (MB/s, packets/s) for RW packets of ``payload`` bytes from the guest."""
    tmp = tempfile.mkdtemp(prefix="bench-vsock-")
    dev, be, fe = _setup(tmp)
    try:
        lst = dev.listen(5000)
        rxq, txq = fe.queues
        rx = LeanRing(fe, rxq, 44 + 4096, writable=True)
        rx.publish(QSIZE)
        rxq.kick()
        _guest_connect(fe, rx, 5000, 1000, 1 << 18)
        user = lst.accept(5)
        # the free tx descriptors: ids the helper never handed out are reused by LeanRing
        hdr = HEADER.pack(CID, 3, 1000, 5000, payload, 1, Op.RW, 0, 1 << 18, 0)
        tx = LeanRing(fe, txq, 44 + payload, writable=False, content=hdr + os.urandom(payload))
        drainer = Drainer(user)
        sent = 0
        peer_fwd = 0
        credit_window = dev.buf_alloc
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for i, n in rx.reap():  # credit updates from the device
                f = HEADER.unpack(fe.read_mem(rx.bufs[i], 44))
                if f[6] == Op.CREDIT_UPDATE or f[6] == Op.RW:
                    peer_fwd = max(peer_fwd, f[9])
                rx.publish(1)
            credit = credit_window - (sent * payload - peer_fwd)
            k = min(credit // payload, QSIZE) if payload else QSIZE
            tx.reap()
            k = tx.publish(k) if k > 0 else 0
            sent += k
            txq.kick()
            rxq.kick()
            if k == 0:
                rxq.wait_call(0.01)
        while drainer.received < sent * payload and time.perf_counter() < end + 5:
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        drainer.stop()
        user.close()
        return drainer.received / dt / 1e6, sent / dt
    finally:
        _teardown(dev, be, fe)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_parent_to_guest(seconds: float) -> tuple[float, float]:
    """Returns (MB/s, packets/s) from a parent socket into 44 + 4096-byte rx buffers."""
    tmp = tempfile.mkdtemp(prefix="bench-vsock-")
    dev, be, fe = _setup(tmp)
    try:
        lst = dev.listen(5001)
        rxq, txq = fe.queues
        rx = LeanRing(fe, rxq, 44 + 4096, writable=True)
        rx.publish(QSIZE)
        rxq.kick()
        guest_buf = 1 << 18
        _guest_connect(fe, rx, 5001, 1001, guest_buf)
        user = lst.accept(5)
        stop = threading.Event()
        block = os.urandom(1 << 16)

        def feed() -> None:
            try:
                while not stop.is_set():
                    user.sendall(block)
            except OSError:
                pass

        th = threading.Thread(target=feed)
        th.start()
        consumed = 0
        announced = 0
        pkts = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            entries = rx.reap()
            for i, n in entries:
                consumed += n - 44
                pkts += 1
            if entries:
                rx.publish(len(entries))
                rxq.kick()
            if consumed - announced >= guest_buf // 4:  # as Linux: return credit in bulk
                txq.collect()
                txq.add([HEADER.pack(CID, 3, 1001, 5001, 0, 1, Op.CREDIT_UPDATE, 0, guest_buf,
                                     consumed & 0xFFFFFFFF)], [])
                txq.kick()
                announced = consumed
            if not entries:
                rxq.wait_call(0.01)
        dt = time.perf_counter() - t0
        stop.set()
        user.shutdown(socket.SHUT_RDWR)  # wakes the feeder blocked in sendall
        th.join()
        user.close()
        return consumed / dt / 1e6, pkts / dt
    finally:
        _teardown(dev, be, fe)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_socketpair(chunk: int, seconds: float) -> float:
    """Reference: MB/s of a bare Python socketpair copy with ``chunk``-byte sends."""
    a, b = socket.socketpair()
    data = os.urandom(chunk)
    drainer = Drainer(b)
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            a.sendall(data)
    dt = time.perf_counter() - t0
    a.close()
    drainer.stop()
    b.close()
    return drainer.received / dt / 1e6


def bench_qemu(nbytes: int, qemu: str | None = None) -> tuple[float, float] | None:
    """A real TCG guest through the same back end: (guest->parent MB/s, parent->guest MB/s).

    Boots the newest cached python image with an extra cpio appended to its initrd that sets
    ``cmd`` to run vsock_echo.py (initramfs unpacking lets a later archive replace a file), so
    no image rebuild is needed. Returns None if QEMU or the image is missing.
    """
    from harness.cpio import Entry, write_cpio
    from harness.eif import extract_boot_files
    from vsock_echo import stream_chunks

    cache = Path.home() / ".cache" / "nitro-harness"
    qemus = sorted(glob.glob(str(cache / "qemu-*" / "bin" / "qemu-system-x86_64")),
                   key=os.path.getmtime)  # the newest build
    eifs = sorted(glob.glob(str(cache / "images" / "python-*.eif")), key=os.path.getmtime)
    if qemu:
        qemus = [qemu]
    if not qemus or not eifs:
        return None
    tmp = tempfile.mkdtemp(prefix="bench-vsock-qemu-")
    dev = be = proc = None
    try:
        bf = extract_boot_files(eifs[-1], tmp)
        script = (f"cd /opt/nitro-harness && python3 vsock_echo.py send 5000 {nbytes} --seed 7"
                  f" && python3 vsock_echo.py recv 5001")
        with open(bf.initrd, "ab") as f:
            write_cpio(f, [Entry.file("cmd", b"/bin/sh\n-c\n" + script.encode() + b"\n"),
                           Entry.file("rootfs/opt/nitro-harness/vsock_echo.py",
                                      (assets.guest_dir() / "vsock_echo.py").read_bytes(),
                                      mode=0o755)], add_parents=False)
        dev = VsockDevice(CID)
        hb = dev.heartbeat()
        l0, l1 = dev.listen(5000), dev.listen(5001)
        be = VhostUserBackend(os.path.join(tmp, "vs.sock"), dev, offer_config=True)
        be.start()
        # A bare microvm (qboot, memfd RAM shared with the back end); this command line
        # booted the python image to its heartbeat in about 4 s under TCG.
        cmd = [qemus[-1], "-M", "microvm", "-bios", "/usr/share/qemu/qboot.rom", "-nodefaults",
               "-no-reboot", "-nographic", "-serial", f"file:{tmp}/serial.log", "-m", "1024M",
               "-smp", "2", "-object", "memory-backend-memfd,id=mem,size=1024M,share=on",
               "-machine", "memory-backend=mem", "-chardev", f"socket,id=vs,path={be.socket_path}",
               "-device", "vhost-user-vsock-device,chardev=vs", "-kernel", str(bf.kernel),
               "-initrd", str(bf.initrd), "-append", bf.cmdline]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not hb.wait(120):
            log = Path(tmp, "serial.log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError("no heartbeat from the guest within 120 s; console ends: "
                               + " | ".join(log[-3:]))
        s = l0.accept(120)
        t0 = time.perf_counter()
        h, n = hashlib.sha256(), 0
        while c := s.recv(1 << 16):
            h.update(c)
            n += len(c)
        up = n / (time.perf_counter() - t0) / 1e6
        s.sendall(f"{n} {h.hexdigest()}\n".encode())
        s.close()
        s = l1.accept(60)
        t0 = time.perf_counter()
        for c in stream_chunks(nbytes, 9):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        s.recv(256)
        down = nbytes / (time.perf_counter() - t0) / 1e6
        s.close()
        proc.wait(60)
        return up, down
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if dev is not None:
            dev.close()
        if be is not None:
            be.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """Run every measurement and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each synthetic run")
    ap.add_argument("--qemu", action="store_true", help="also measure a real TCG guest")
    ap.add_argument("--qemu-bytes", type=int, default=64 << 20)
    ap.add_argument("--qemu-binary", help="QEMU to use (default: the newest cached build)")
    a = ap.parse_args()
    rows = []
    ref4 = bench_socketpair(4096, a.seconds)
    ref64 = bench_socketpair(65536, a.seconds)
    for payload, ref in ((4096, ref4), (65536, ref64), (1, None)):
        mbps, pps = bench_guest_to_parent(payload, a.seconds)
        rows.append((f"guest->parent RW {payload} B", mbps, pps, ref))
    mbps, pps = bench_parent_to_guest(a.seconds)
    rows.append(("parent->guest rx 44+4096", mbps, pps, ref4))
    print(f"{'path':32} {'MB/s':>9} {'pkts/s':>10} {'ref MB/s':>9} {'ratio':>6}")
    for name, mbps, pps, ref in rows:
        r = f"{ref:9.1f} {mbps / ref:6.2f}" if ref else f"{'-':>9} {'-':>6}"
        print(f"{name:32} {mbps:9.1f} {pps:10.0f} {r}")
    print("ref = bare Python socketpair copy, same chunk size; ratio = back end / ref")
    if a.qemu:
        try:
            q = bench_qemu(a.qemu_bytes, a.qemu_binary)
        except (RuntimeError, OSError, TimeoutError) as e:
            print(f"qemu: failed: {e}")
            return 1
        if q is None:
            print("qemu: skipped (no QEMU build or python image in ~/.cache/nitro-harness)")
        else:
            up, down = q
            best_up = max(r[1] for r in rows[:2])
            print(f"TCG guest (python vsock_echo, {a.qemu_bytes >> 20} MiB): guest->parent "
                  f"{up:.1f} MB/s (ceiling/guest {best_up / up:.1f}x), parent->guest "
                  f"{down:.1f} MB/s (ceiling/guest {rows[3][1] / down:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
