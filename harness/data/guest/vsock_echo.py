#!/usr/bin/env python3
"""vsock test program for the harness's python guest image (python3.11 stdlib only).

Modes (all on AF_VSOCK stream sockets; the parent is CID 3, as on Nitro):

  vsock_echo.py serve PORT [--count K]
      Listen on PORT (any CID) and echo every byte back on each connection until the peer
      shuts down its side; serve K connections (default: forever), one thread each.
  vsock_echo.py send PORT NBYTES [--seed S] [--cid C]
      Connect to C:PORT (default 3), send NBYTES of the deterministic stream for seed S,
      shutdown(SHUT_WR), read the parent's answer line ``<nbytes> <sha256 hex>`` and compare
      it with what was sent. Prints ``SEND OK <n> <sha256> <MB/s>`` (exit 0) or
      ``SEND MISMATCH ...`` (exit 1).
  vsock_echo.py recv PORT [--cid C]
      Connect to C:PORT, read until EOF, answer ``<nbytes> <sha256 hex>\\n`` and print
      ``RECV <n> <sha256> <MB/s>``.
  vsock_echo.py roundtrip PORT NBYTES [--seed S] [--cid C]
      Connect, send the stream while reading the echo back, compare hashes. Prints
      ``ROUNDTRIP OK <n> <sha256> <MB/s>`` (exit 0) or ``ROUNDTRIP MISMATCH ...`` (exit 1).
  vsock_echo.py connect PORT [--cid C]
      Try one connection; prints ``CONNECT OK`` or ``CONNECT FAILED <errno name> <ms>``
      (a refused port must fail at once, docs/vsock.md#connection-setup).

The stream for a seed is ``random.Random(seed).randbytes`` in 64 KiB blocks, so the parent can
regenerate it with :func:`stream_chunks` to check content, not only length.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import random
import socket
import sys
import threading
import time

PARENT_CID = 3
BLOCK = 65536


def stream_chunks(nbytes: int, seed: int = 0):
    """Yield the deterministic test stream: ``nbytes`` bytes in blocks of at most 64 KiB."""
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(BLOCK, left)
        yield rng.randbytes(n)
        left -= n


def stream_digest(nbytes: int, seed: int = 0) -> str:
    """SHA-256 hex of the test stream for (nbytes, seed)."""
    h = hashlib.sha256()
    for c in stream_chunks(nbytes, seed):
        h.update(c)
    return h.hexdigest()


def echo_connection(conn: socket.socket) -> int:
    """Echo until EOF, then shut down writing; returns bytes echoed."""
    total = 0
    with conn:
        while True:
            data = conn.recv(BLOCK)
            if not data:
                break
            conn.sendall(data)
            total += len(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return total


def read_to_eof(conn: socket.socket) -> tuple[int, str]:
    """Read until EOF; returns (bytes, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(BLOCK)
        if not data:
            return n, h.hexdigest()
        h.update(data)
        n += len(data)


def send_stream(conn: socket.socket, nbytes: int, seed: int) -> str:
    """Send the stream; returns its sha256 hex."""
    h = hashlib.sha256()
    for c in stream_chunks(nbytes, seed):
        conn.sendall(c)
        h.update(c)
    return h.hexdigest()


def _readline(conn: socket.socket, limit: int = 256) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        c = conn.recv(1)
        if not c:
            break
        buf += c
    return buf


def _connect(cid: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((cid, port))
    return s


def _rate(n: int, dt: float) -> str:
    return f"{n / max(dt, 1e-9) / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("serve")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=0)
    for name in ("send", "roundtrip"):
        p = sub.add_parser(name)
        p.add_argument("port", type=int)
        p.add_argument("nbytes", type=int)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--cid", type=int, default=PARENT_CID)
    for name in ("recv", "connect"):
        p = sub.add_parser(name)
        p.add_argument("port", type=int)
        p.add_argument("--cid", type=int, default=PARENT_CID)
    a = ap.parse_args(argv)

    if a.mode == "serve":
        srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        srv.bind((socket.VMADDR_CID_ANY, a.port))
        srv.listen(64)
        print(f"SERVE {a.port}", flush=True)
        served = 0
        threads = []
        while not a.count or served < a.count:
            conn, _ = srv.accept()
            t = threading.Thread(target=echo_connection, args=(conn,), daemon=True)
            t.start()
            threads.append(t)
            served += 1
        for t in threads:
            t.join()
        srv.close()
        return 0

    if a.mode == "connect":
        t0 = time.monotonic()
        try:
            _connect(a.cid, a.port).close()
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            print(f"CONNECT FAILED {name} {(time.monotonic() - t0) * 1000:.0f}", flush=True)
            return 1
        print("CONNECT OK", flush=True)
        return 0

    conn = _connect(a.cid, a.port)
    t0 = time.monotonic()
    with conn:
        if a.mode == "recv":
            n, digest = read_to_eof(conn)
            conn.sendall(f"{n} {digest}\n".encode())
            print(f"RECV {n} {digest} {_rate(n, time.monotonic() - t0)}", flush=True)
            return 0
        if a.mode == "send":
            digest = send_stream(conn, a.nbytes, a.seed)
            conn.shutdown(socket.SHUT_WR)
            answer = _readline(conn).decode(errors="replace").split()
            dt = time.monotonic() - t0
            ok = answer == [str(a.nbytes), digest]
            print(f"SEND {'OK' if ok else 'MISMATCH'} {a.nbytes} {digest} {_rate(a.nbytes, dt)}"
                  + ("" if ok else f" parent={' '.join(answer)}"), flush=True)
            return 0 if ok else 1
        # roundtrip: a sender thread keeps both directions busy (the echo needs credit back)
        sent = {}
        t = threading.Thread(target=lambda: sent.update(
            d=send_stream(conn, a.nbytes, a.seed)) or conn.shutdown(socket.SHUT_WR))
        t.start()
        n, digest = read_to_eof(conn)
        t.join()
        dt = time.monotonic() - t0
        ok = n == a.nbytes and digest == sent.get("d")
        print(f"ROUNDTRIP {'OK' if ok else 'MISMATCH'} {n} {digest} {_rate(2 * n, dt)}",
              flush=True)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
