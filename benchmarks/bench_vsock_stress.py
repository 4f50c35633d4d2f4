#!/usr/bin/env python3
"""Stress benchmark: the vsock traffic of scenarios/vsock.yaml over many boots, under load.

A one-off rx virtqueue corruption (the guest printing ``rx:id N is not a head!`` after the
8 MiB echo, then a short connection timing out) needs many repetitions to show up, and a fix
needs many clean repetitions to be believed. This script boots the ``python`` image again and
again (``--boots``, ``--parallel`` at a time) and drives in each boot, in this order, the
patterns of ``scenarios/vsock.yaml`` (docs/vsock.md: the parent is CID 3):

- ``boot``: :meth:`harness.enclave.Enclave.start` to the heartbeat, then a shell command;
- ``echo``: the guest's ``vsock_echo.py serve`` echoes ``--echo-mib`` MiB sent by the parent
  (random bytes in send sizes from 1 byte to 300,000), compared byte for byte and by SHA-256;
- ``short``: ``--connections-per-boot`` parent -> guest connections, each sending 1 B-4 KiB,
  half-closing (shutdown of writing) and reading the echo to EOF;
- ``guest_connect``: ``--guest-connections`` guest -> parent connections to a parent echo
  listener, the same exchange the other way;
- ``guest_echo``: the guest's ``vsock_echo.py roundtrip`` pushes ``--echo-mib`` MiB through a
  parent echo listener, both sides check SHA-256;
- ``half_close_guest``: the guest sends ``--half-close-kib`` KiB, half-closes and reads the
  parent's ``<n> <sha256>`` answer (``vsock_echo.py send``);
- ``half_close_parent``: the parent sends ``--half-close-kib`` KiB, half-closes and reads the
  guest's answer (``vsock_echo.py recv``);
- ``console``: the guest's console must show no virtqueue or kernel trouble (``is not a head``,
  ``out of range``, ``BUG:``, ``WARNING:``, ``Kernel panic`` ...).

The guest side of the four guest phases runs in one Python process (one interpreter start per
boot under TCG, not four), importing the image's ``vsock_echo.py``. A boot stops at its first
failed phase and its enclave is terminated.

For the whole run a SECOND enclave (the load enclave, ``--load``) keeps the machine busy:
``echo`` (the default) streams 256 KiB rounds, one connection each, through its guest echo
server at ``--load-mib-per-s`` (checked byte for byte too: a load failure is a failure, and
is reported with the boot then running), ``cpu`` spins a shell loop on a vCPU, ``both`` does
both. It is restarted if it fails. Every enclave's vCPUs share the CPU pool (a single CPU on a
2-core machine), so the echo is paced and ``cpu`` roughly halves the boots' speed.

Time on the 2-core TCG machine the defaults were tuned on (another helper's load beside):
11-15 s per boot with ``--memory-mib 512`` and the load echo at 2-4 MiB/s, so the 200 boots
and 24,800 connections of the defaults take 40-55 min; ``--memory-mib 1024`` (the scenario's)
adds about 4 s per boot (QEMU preallocates the memory).

Every enclave is terminated on every path (end, failure, Ctrl-C, SIGTERM). A failed boot keeps
its folder under the artifacts directory (``--artifacts``): console.log, qemu.cmdline,
qemu.stderr, vsock.trace and ``console-excerpt.txt``; a passed boot's folder is removed.

Output: one progress line per boot on stderr; at the end a table on stdout (boots,
connections, bytes echoed, failures with boot index, phase, error and console excerpt path,
wall time) and with ``--json FILE`` the same as JSON. Exit status 0 when every boot passed, 1
when anything failed, 2 when the run could not start, 130 when interrupted.

Usage::

    python benchmarks/bench_vsock_stress.py [--boots 200] [--connections-per-boot 100]
        [--echo-mib 8] [--parallel 1] [--load echo] [--json FILE] [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import assets  # noqa: E402

sys.path.insert(0, str(assets.guest_dir()))

from harness.console import ConsoleError, ConsoleTimeout  # noqa: E402
from harness.enclave import Enclave, EnclaveConfig  # noqa: E402
from harness.errors import NitroError  # noqa: E402
from harness.images.recipes import build_image  # noqa: E402
from vsock_echo import stream_digest  # noqa: E402 - the guest helper's own test stream

MIB = 1 << 20
ECHO = "python3 /opt/nitro-harness/vsock_echo.py"
SERVE_PORT = 5005  # the guest's echo server (parent-initiated phases)
GC_PORT, GE_PORT, SEND_PORT, RECV_PORT = 7100, 7101, 7102, 7103  # parent listeners
LOAD_PORT = 5006
LOAD_ROUND = 256 * 1024
# Send sizes: single bytes, around one rx buffer (4 KiB payload; 44-byte header), Linux's
# 64 KiB tx packet, and more than the 256 KiB credit window.
SEND_SIZES = (1, 100, 4052, 4096, 4097, 16384, 65536, 262144, 300000)
DRIVER_PATH = "/tmp/stress-driver.b64"
DRIVER_PIECE = 768
GUEST_PHASES = ("guest_connect", "guest_echo", "half_close_guest", "half_close_parent")
# What a broken virtqueue or kernel prints on the guest console (Linux's virtio_ring BAD_RING
# messages, lockups, oopses and warnings).
GUEST_TROUBLE = re.compile(
    r"is not a head|out of range|used len \d+ is larger|unexpected avail|Kernel panic|BUG:|"
    r"WARNING:|Oops:|soft lockup|hard LOCKUP|self-detected stall|blocked for more than|"
    r"Call Trace"
)

# The guest side of the guest phases, written to DRIVER_PATH in base64 and run as
# `python3 -c "exec(b64decode(open(DRIVER_PATH).read()))" ARGS` (nothing added to the image).
# ARGS: gc_port connections seed ge_port echo_bytes send_port send_bytes recv_port. It prints
# one `PHASE <name> OK` or `PHASE <name> FAILED <reason>` line per phase; the first failure
# ends it.
GUEST_DRIVER = r'''
import random, socket, sys, vsock_echo
gc, k, seed, ge, ge_n, sp, sp_n, rp = map(int, sys.argv[1:9])
def guest_connect():
    r = random.Random(seed)
    for i in range(k):
        msg = r.randbytes(r.randint(1, 4096))
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect((3, gc))
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while c := s.recv(65536):
            got += c
        s.close()
        if got != msg:
            return (f"connection {i + 1}/{k}: sent {len(msg)} bytes, the echo has {len(got)} bytes"
                    + (" with different content" if len(got) == len(msg) else ""))
def tool(*a):
    return None if vsock_echo.main([str(x) for x in a]) == 0 else "vsock_echo.py " + " ".join(map(str, a)) + " failed"
for name, fn in (("guest_connect", guest_connect),
                 ("guest_echo", lambda: tool("roundtrip", ge, ge_n, "--seed", seed)),
                 ("half_close_guest", lambda: tool("send", sp, sp_n, "--seed", seed + 1)),
                 ("half_close_parent", lambda: tool("recv", rp))):
    try:
        err = fn()
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    print(f"PHASE {name} " + (f"FAILED {err}" if err else "OK"), flush=True)
    if err:
        sys.exit(1)
'''


class RunAborted(Exception):
    """The run could not go on (the load enclave never started); one-line message."""


class PhaseFailed(Exception):
    """One phase of one boot failed; the message is the one-line reason."""


@dataclass
class Failure:
    """A failure as reported: ``boot`` index (1-based; 0 for the load enclave outside any
    boot), ``phase``, one-line ``error`` and the kept ``console`` excerpt path ("" if none)."""

    boot: int
    phase: str
    error: str
    console: str


@dataclass
class BootResult:
    """One boot: ``phases`` maps phase name to seconds; ``connections`` completed, bytes
    ``echoed`` (checked after a round trip) and ``one_way`` (checked by the other side's digest)."""

    index: int
    ok: bool = False
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    connections: int = 0
    echoed: int = 0
    one_way: int = 0
    failure: Failure | None = None


class Live:
    """Every enclave the run holds, so that any exit path can terminate them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enclaves: set[Enclave] = set()
        self.stop = threading.Event()

    def add(self, enclave: Enclave) -> None:
        """Track ``enclave``; if the run is stopping, terminate it at once and raise PhaseFailed."""
        with self._lock:
            if not self.stop.is_set():
                self._enclaves.add(enclave)
                return
        enclave.terminate()
        raise PhaseFailed("the run is stopping")

    def remove(self, enclave: Enclave) -> None:
        with self._lock:
            self._enclaves.discard(enclave)

    def terminate_all(self) -> None:
        """Stop the run and terminate every tracked enclave (idempotent)."""
        self.stop.set()
        with self._lock:
            enclaves = list(self._enclaves)
        for enclave in enclaves:
            with contextlib.suppress(Exception):
                enclave.terminate()


# ------------------------------------------------------------------------------------------
# socket helpers (parent side)


def _deadline_left(deadline: float, what: str, got: int, want: int | None = None) -> float:
    """Seconds left before ``deadline``; PhaseFailed once it has passed. Used as the socket
    timeout, which a sender thread's next sendall also picks up, so both sides end in time."""
    left = deadline - time.monotonic()
    if left <= 0:
        of = f" of {want}" if want is not None else ""
        raise PhaseFailed(f"{what}: timed out with {got}{of} bytes received")
    return left


def _recv_before(sock: socket.socket, deadline: float, what: str, got: int,
                 want: int | None = None) -> bytes:
    """The next chunk (up to 256 KiB) from ``sock``, b"" at EOF, after ``got`` bytes so far.

    Raises PhaseFailed at ``deadline`` (time.monotonic) or on a socket error, naming ``what``.
    """
    while True:
        sock.settimeout(_deadline_left(deadline, what, got, want))
        try:
            return sock.recv(1 << 18)
        except TimeoutError:
            continue
        except OSError as exc:
            raise PhaseFailed(f"{what}: receive failed after {got} bytes: {exc}") from None


def read_to_eof(sock: socket.socket, deadline: float, what: str, want: int | None = None,
                keep: bool = True) -> tuple[bytearray, int, str]:
    """Read ``sock`` until EOF: (bytes if ``keep``, count, sha256 hex).

    Raises PhaseFailed at ``deadline`` (time.monotonic) or on a socket error, naming ``what``.
    """
    data, digest, n = bytearray(), hashlib.sha256(), 0
    while True:
        chunk = _recv_before(sock, deadline, what, n, want)
        if not chunk:
            return data, n, digest.hexdigest()
        n += len(chunk)
        digest.update(chunk)
        if keep:
            data += chunk


def send_varied(sock: socket.socket, data: bytes, rng: random.Random, *, half_close: bool) -> None:
    """sendall ``data`` in sizes drawn from SEND_SIZES, then shutdown(SHUT_WR) if ``half_close``."""
    view, pos = memoryview(data), 0
    while pos < len(data):
        n = rng.choice(SEND_SIZES)
        sock.sendall(view[pos:pos + n])
        pos += n
    if half_close:
        sock.shutdown(socket.SHUT_WR)


def echo_exchange(sock: socket.socket, payload: bytes, rng: random.Random, deadline: float,
                  what: str) -> None:
    """Send ``payload`` from a thread (an echo peer needs both directions moving), half-close,
    read the echo to EOF and compare it byte for byte. Raises PhaseFailed naming ``what``."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            send_varied(sock, payload, rng, half_close=True)
        except OSError as exc:
            errors.append(exc)

    sock.settimeout(_deadline_left(deadline, what, 0, len(payload)))
    sender = threading.Thread(target=send, name="stress-send", daemon=True)
    sender.start()
    try:
        got, n, digest = read_to_eof(sock, deadline, what, len(payload))
    except BaseException:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the sender
        raise
    finally:
        sender.join(max(0.1, deadline - time.monotonic()))
    if errors:
        raise PhaseFailed(f"{what}: send failed: {errors[0]}")
    if sender.is_alive():
        raise PhaseFailed(f"{what}: sending {len(payload)} bytes did not finish in time")
    if got != payload:
        at = next((i for i, (a, b) in enumerate(zip(got, payload)) if a != b), min(n, len(payload)))
        raise PhaseFailed(
            f"{what}: echo differs: sent {len(payload)} bytes sha256 "
            f"{hashlib.sha256(payload).hexdigest()[:16]}, got {n} bytes sha256 {digest[:16]}, "
            f"first difference at byte {at}")


def connect(enclave: Enclave, port: int, deadline: float, what: str, *,
            retry_refused: bool = False) -> socket.socket:
    """Parent -> guest connection; a refusal is retried until ``deadline`` when the guest's
    server may still be starting (``retry_refused``). Raises PhaseFailed."""
    while True:
        left = deadline - time.monotonic()
        try:
            return enclave.vsock_connect(port, timeout=max(0.5, min(30.0, left)))
        except ConnectionRefusedError as exc:
            if not retry_refused or left <= 0.5:
                raise PhaseFailed(f"{what}: connect to guest port {port} refused: {exc}") from None
            time.sleep(0.3)
        except (OSError, NitroError) as exc:
            raise PhaseFailed(f"{what}: connect to guest port {port} failed: {exc}") from None


def accept(listener: Any, deadline: float, cancel: threading.Event, what: str) -> socket.socket:
    """Next guest connection on a parent listener; PhaseFailed at ``deadline`` or on ``cancel``."""
    while not cancel.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise PhaseFailed(f"{what}: no guest connection on parent port {listener.port} in time")
        try:
            return listener.accept(timeout=min(left, 0.5))
        except TimeoutError:
            continue
        except OSError as exc:
            raise PhaseFailed(f"{what}: accept on parent port {listener.port} failed: {exc}") from None
    raise PhaseFailed(f"{what}: cancelled (an earlier guest phase failed)")


def echo_until_eof(conn: socket.socket, deadline: float, what: str) -> tuple[int, str]:
    """Parent echo peer: send back what arrives until EOF, then half-close; (bytes, sha256)."""
    digest, n = hashlib.sha256(), 0
    while True:
        chunk = _recv_before(conn, deadline, what, n)
        if not chunk:
            break
        n += len(chunk)
        digest.update(chunk)
        try:
            conn.sendall(chunk)
        except OSError as exc:
            raise PhaseFailed(f"{what}: echo send failed after {n} bytes: {exc}") from None
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    return n, digest.hexdigest()


# ------------------------------------------------------------------------------------------
# one boot


class Boot:
    """The phases of one boot of the test image (see the module doc)."""

    def __init__(self, index: int, args: argparse.Namespace, eif: Path, artifacts: Path,
                 live: Live, seed: str):
        self.index = index
        self.args = args
        self.eif = eif
        self.dir = artifacts / f"boot-{index:04d}"
        self.live = live
        self.rng = random.Random(f"{seed}:{index}")
        self.guest_seed = self.rng.randrange(1 << 30)
        self.enclave: Enclave | None = None
        self.result = BootResult(index)

    def run(self) -> BootResult:
        """Every phase in order; never raises (a failure is recorded in the result)."""
        start = time.monotonic()
        phase = "boot"
        try:
            self._timed("boot", self._boot)
            phase = "echo"
            self._timed("echo", self._echo)
            phase = "short"
            self._timed("short", self._short)
            phase = "guest"
            self._timed("guest", self._guest)
            phase = "console"
            self._check_console()
            self.result.ok = True
        except PhaseFailed as exc:
            self._fail(getattr(exc, "phase", phase), str(exc))
        except (OSError, NitroError, ConsoleError) as exc:
            self._fail(phase, _one_line(exc))
        except Exception as exc:  # noqa: BLE001 - one boot's surprise must not end the run
            self._fail(phase, f"{type(exc).__name__}: {_one_line(exc)}")
        finally:
            if self.enclave is not None:
                self.enclave.terminate()
                self.live.remove(self.enclave)
            self.result.seconds = time.monotonic() - start
            if self.result.ok and not self.args.keep_artifacts:
                shutil.rmtree(self.dir, ignore_errors=True)
        return self.result

    def _timed(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        fn()
        self.result.phases[name] = round(time.monotonic() - t0, 3)

    def _deadline(self) -> float:
        return time.monotonic() + self.args.phase_timeout

    def _boot(self) -> None:
        config = EnclaveConfig(eif_path=self.eif, memory_mib=self.args.memory_mib, cpu_count=2,
                               debug_mode=True,
                               name=f"stress-{self.index:04d}")
        try:
            self.enclave = Enclave.start(config, artifacts_dir=self.dir, qemu=self.args.qemu)
        except NitroError as err:
            self._excerpt_text = err.details or ""
            raise
        self.live.add(self.enclave)
        self.result.phases["heartbeat"] = round(self.enclave.heartbeat_seconds or 0.0, 3)
        # The shell on the console is ready once it runs a command.
        self.enclave.exec("true", timeout=self.args.phase_timeout)

    def _echo(self) -> None:
        assert self.enclave is not None
        self.enclave.exec(f"{ECHO} serve {SERVE_PORT} > /tmp/echo.log 2>&1 &", timeout=60)
        size = self.args.echo_mib * MIB
        payload = self.rng.randbytes(size)
        deadline = self._deadline()
        what = f"{self.args.echo_mib} MiB parent -> guest -> parent"
        # python starts slowly under TCG: refusals until the server listens are expected.
        sock = connect(self.enclave, SERVE_PORT, deadline, what, retry_refused=True)
        with sock:
            echo_exchange(sock, payload, random.Random(self.rng.random()), deadline, what)
        self.result.connections += 1
        self.result.echoed += size

    def _short(self) -> None:
        assert self.enclave is not None
        count = self.args.connections_per_boot
        for i in range(count):
            what = f"short connection {i + 1}/{count} to guest port {SERVE_PORT}"
            msg = self.rng.randbytes(self.rng.randint(1, 4096))
            deadline = time.monotonic() + self.args.connection_timeout
            with connect(self.enclave, SERVE_PORT, deadline, what) as sock:
                sock.settimeout(_deadline_left(deadline, what, 0, len(msg)))
                try:
                    sock.sendall(msg)
                    sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    raise PhaseFailed(f"{what}: send failed: {exc}") from None
                got, n, _ = read_to_eof(sock, deadline, what, len(msg))
            if got != msg:
                raise PhaseFailed(f"{what}: sent {len(msg)} bytes, the echo has {n} bytes"
                                  + ("" if n != len(msg) else " with different content"))
            self.result.connections += 1
            self.result.echoed += len(msg)

    def _guest(self) -> None:
        """The guest-initiated phases: one guest process, four parent handler threads."""
        assert self.enclave is not None
        enclave, a = self.enclave, self.args
        k, echo_n, half_n = a.guest_connections, a.echo_mib * MIB, a.half_close_kib * 1024
        seed = self.guest_seed
        to_guest = self.rng.randbytes(half_n)
        deadline = self._deadline()
        cancel = threading.Event()
        errors: dict[str, str] = {}
        done: dict[str, tuple[int, int, int]] = {}  # phase -> (connections, echoed, one_way)

        def gc(lst) -> None:
            echoed = 0
            for i in range(k):
                what = f"guest connection {i + 1}/{k} to parent port {GC_PORT}"
                with accept(lst, deadline, cancel, what) as conn:
                    echoed += echo_until_eof(conn, deadline, what)[0]
            done["guest_connect"] = (k, echoed, 0)

        def ge(lst) -> None:
            what = f"{a.echo_mib} MiB guest -> parent -> guest"
            with accept(lst, deadline, cancel, what) as conn:
                n, digest = echo_until_eof(conn, deadline, what)
            want = stream_digest(echo_n, seed)
            if (n, digest) != (echo_n, want):
                raise PhaseFailed(f"{what}: the parent received {n} bytes sha256 {digest[:16]}, "
                                  f"the guest sent {echo_n} bytes sha256 {want[:16]}")
            done["guest_echo"] = (1, n, 0)

        def hc_guest(lst) -> None:
            what = f"{a.half_close_kib} KiB guest -> parent, half-closed by the guest"
            with accept(lst, deadline, cancel, what) as conn:
                _, n, digest = read_to_eof(conn, deadline, what, half_n, keep=False)
                conn.sendall(f"{n} {digest}\n".encode())
            want = stream_digest(half_n, seed + 1)
            if (n, digest) != (half_n, want):
                raise PhaseFailed(f"{what}: the parent received {n} bytes sha256 {digest[:16]}, "
                                  f"the guest sent {half_n} bytes sha256 {want[:16]}")
            done["half_close_guest"] = (1, 0, n)

        def hc_parent(lst) -> None:
            what = f"{a.half_close_kib} KiB parent -> guest, half-closed by the parent"
            with accept(lst, deadline, cancel, what) as conn:
                conn.settimeout(_deadline_left(deadline, what, 0))
                try:
                    send_varied(conn, to_guest, random.Random(seed), half_close=True)
                except OSError as exc:
                    raise PhaseFailed(f"{what}: send failed: {exc}") from None
                answer, _, _ = read_to_eof(conn, deadline, what)
            want = f"{half_n} {hashlib.sha256(to_guest).hexdigest()}"
            if answer.decode(errors="replace").strip() != want:
                raise PhaseFailed(f"{what}: the guest answered {bytes(answer[:120])!r}, "
                                  f"expected {want!r}")
            done["half_close_parent"] = (1, 0, half_n)

        handlers = dict(zip(GUEST_PHASES, (gc, ge, hc_guest, hc_parent)))
        ports = dict(zip(GUEST_PHASES, (GC_PORT, GE_PORT, SEND_PORT, RECV_PORT)))
        listeners = {name: enclave.vsock_listen(ports[name]) for name in GUEST_PHASES}

        def run_handler(name: str) -> None:
            try:
                handlers[name](listeners[name])
            except PhaseFailed as exc:
                errors[name] = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported as this phase's failure
                errors[name] = f"{type(exc).__name__}: {_one_line(exc)}"

        threads = [threading.Thread(target=run_handler, args=(n,), name=f"stress-{n}", daemon=True)
                   for n in GUEST_PHASES]
        for t in threads:
            t.start()
        argv = [GC_PORT, k, seed, GE_PORT, echo_n, SEND_PORT, half_n, RECV_PORT]
        command = (f"python3 -c \"import base64; exec(base64.b64decode(open('{DRIVER_PATH}')"
                   f".read()))\" " + " ".join(map(str, argv)))
        guest_out, guest_error = "", None
        try:
            self._install_driver()
            res = enclave.exec(command, timeout=max(1.0, deadline - time.monotonic()))
            guest_out = res.output
        except ConsoleTimeout:
            guest_error = f"the guest driver did not finish within the phase's {a.phase_timeout:g} s"
        except (ConsoleError, NitroError, OSError) as exc:
            guest_error = _one_line(exc)
        finally:
            cancel.set()
            for t in threads:
                t.join(max(1.0, min(60.0, deadline - time.monotonic())))
            for lst in listeners.values():
                with contextlib.suppress(Exception):
                    lst.close()
        guest_lines = dict(re.findall(r"^PHASE (\S+) (.*)$", guest_out, re.MULTILINE))
        for name in GUEST_PHASES:
            said = guest_lines.get(name, "")
            if name in done and said == "OK":
                c, e, o = done[name]
                self.result.connections += c
                self.result.echoed += e
                self.result.one_way += o
                continue
            parts = []
            if said.startswith("FAILED"):
                parts.append("guest: " + said.removeprefix("FAILED").strip())
            if name in errors and "cancelled" not in errors[name]:
                parts.append("parent: " + errors[name])
            if not parts:
                parts.append("guest: " + (guest_error or _one_line(guest_out[-300:]) or "no output"))
            exc = PhaseFailed("; ".join(parts))
            exc.phase = name  # type: ignore[attr-defined]
            raise exc

    def _install_driver(self) -> None:
        """Write GUEST_DRIVER (base64) to DRIVER_PATH in pieces: the guest shell's line editor
        takes lines of at most 1024 characters (busybox's default)."""
        assert self.enclave is not None
        text = b64encode(GUEST_DRIVER.encode()).decode()
        for i in range(0, len(text), DRIVER_PIECE):
            redirect = ">" if i == 0 else ">>"
            res = self.enclave.exec(f"printf %s '{text[i:i + DRIVER_PIECE]}' {redirect} {DRIVER_PATH}",
                                    timeout=60)
            if res.status != 0:
                raise PhaseFailed(f"writing {DRIVER_PATH} in the guest: status {res.status}: "
                                  + _one_line(res.output))

    def _check_console(self) -> None:
        assert self.enclave is not None
        text = self.enclave.console.text()
        found = GUEST_TROUBLE.search(text)
        if found:
            raise PhaseFailed("the guest console printed: " + _line_at(text, found.start()))

    _excerpt_text = ""

    def _fail(self, phase: str, error: str) -> None:
        enclave = self.enclave
        if enclave is not None and phase != "console":
            # What the guest kernel said, and why the enclave ended, belong to the reason.
            with contextlib.suppress(Exception):
                text = enclave.console.text()
                if found := GUEST_TROUBLE.search(text):
                    error += f"; the guest console printed: {_line_at(text, found.start())}"
            if enclave.end_reason and enclave.end_reason != "terminated by the parent":
                error += f"; the enclave ended: {_one_line(enclave.end_reason)}"
        if self.live.stop.is_set():
            error += " (while the run was stopping)"
        self.result.failure = Failure(self.index, phase, error, self._keep_excerpt())

    def _keep_excerpt(self) -> str:
        """Write the console excerpt (last lines, and the lines around the first sign of guest
        trouble) into the boot's folder; returns its path, "" if there is no console text."""
        text = ""
        with contextlib.suppress(Exception):
            if self.enclave is not None:
                text = self.enclave.console.text()
        text = text or self._excerpt_text
        if not text:
            return ""
        parts = []
        found = GUEST_TROUBLE.search(text)
        if found:
            before = text[:found.start()].splitlines()[-20:]
            after = text[found.start():].splitlines()[:20]
            parts.append("--- around the first sign of trouble ---\n" + "\n".join(before + after))
        parts.append("--- last 80 lines ---\n" + "\n".join(text.splitlines()[-80:]))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "console-excerpt.txt"
        path.write_text("\n\n".join(parts) + "\n")
        return str(path)


def _one_line(exc: BaseException | str) -> str:
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# ------------------------------------------------------------------------------------------
# the load enclave


class LoadEnclave:
    """The second enclave kept busy for the whole run (``mode``: echo, cpu, both, none).

    Runs on its own thread, which also starts and terminates the enclave (QEMU dies with the
    thread that started it). Failures are reported through ``on_failure`` and the enclave is
    restarted; ``echoed`` counts verified bytes, ``restarts`` the restarts.
    """

    def __init__(self, mode: str, rate_mib: float, memory_mib: int, eif: Path, artifacts: Path,
                 live: Live, qemu: str | None, on_failure: Callable[[str, str, str], None]):
        self.mode, self.eif, self.artifacts, self.live, self.qemu = mode, eif, artifacts, live, qemu
        self.rate = rate_mib * MIB
        self.memory_mib = memory_mib
        self.on_failure = on_failure
        self.echoed = 0
        self.rounds = 0
        self.restarts = 0
        self.starts = 0
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.start_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="stress-load", daemon=True)

    def start(self) -> None:
        if self.mode != "none":
            self._thread.start()
        else:
            self.ready.set()
            self.finished.set()

    def _run(self) -> None:
        try:
            self._keep_busy()
        finally:
            self.finished.set()

    def _keep_busy(self) -> None:
        rng = random.Random("load")
        while not self.live.stop.is_set():
            self.starts += 1
            folder = self.artifacts / f"load-{self.starts:03d}"
            enclave = None
            phase = "load boot"
            try:
                enclave = Enclave.start(
                    EnclaveConfig(eif_path=self.eif, memory_mib=self.memory_mib, cpu_count=2,
                                  debug_mode=True, name="stress-load"),
                    artifacts_dir=folder, qemu=self.qemu)
                self.live.add(enclave)
                enclave.exec("true", timeout=300)
                if self.mode in ("cpu", "both"):
                    enclave.exec("while :; do :; done > /dev/null 2>&1 &", timeout=60)
                if self.mode in ("echo", "both"):
                    enclave.exec(f"{ECHO} serve {LOAD_PORT} > /tmp/load.log 2>&1 &", timeout=60)
                    phase = "load echo"
                    sock = connect(enclave, LOAD_PORT, time.monotonic() + 300, "load echo",
                                   retry_refused=True)
                    sock.close()
                self.ready.set()
                phase = f"load {self.mode}"
                since, echoed = time.monotonic(), 0
                while not self.live.stop.is_set():
                    if self.mode in ("echo", "both"):
                        self._echo_round(enclave, rng)
                        echoed += LOAD_ROUND
                        # Paced: every enclave's vCPUs share the pool's CPUs (one on a 2-core
                        # machine), so an unpaced echo would mostly slow the boots down.
                        if self.rate:
                            self.live.stop.wait(max(0.0, since + echoed / self.rate - time.monotonic()))
                    else:
                        self.live.stop.wait(0.5)
                    if not enclave.running:
                        raise PhaseFailed(f"the load enclave ended: {enclave.end_reason}")
                    found = GUEST_TROUBLE.search(enclave.console.text())
                    if found:
                        raise PhaseFailed("the load enclave's console printed: "
                                          + _line_at(enclave.console.text(), found.start()))
            except Exception as exc:  # noqa: BLE001 - reported, then the load restarts
                if self.live.stop.is_set():
                    break
                message = exc if isinstance(exc, PhaseFailed) else f"{type(exc).__name__}: {exc}"
                if not self.ready.is_set() and self.starts == 1:
                    self.start_error = _one_line(message)
                    _write_excerpt(enclave, folder, getattr(exc, "details", None))
                    folder = None  # kept for the error message
                    self.ready.set()
                    break
                excerpt = _write_excerpt(enclave, folder, getattr(exc, "details", None))
                self.on_failure(phase, _one_line(message), excerpt)
                self.restarts += 1
                folder = None
            finally:
                if enclave is not None:
                    enclave.terminate()
                    self.live.remove(enclave)
                if folder is not None:  # nothing to keep
                    shutil.rmtree(folder, ignore_errors=True)
            if not self.live.stop.is_set():
                time.sleep(1.0)

    def _echo_round(self, enclave: Enclave, rng: random.Random) -> None:
        payload = rng.randbytes(LOAD_ROUND)
        deadline = time.monotonic() + 300
        with connect(enclave, LOAD_PORT, deadline, "load echo round") as sock:
            echo_exchange(sock, payload, random.Random(rng.random()), deadline,
                          f"load echo round {self.rounds + 1}")
        self.rounds += 1
        self.echoed += LOAD_ROUND


def _line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start:end if end >= 0 else None].strip()


def _write_excerpt(enclave: Enclave | None, folder: Path, details: str | None) -> str:
    text = ""
    with contextlib.suppress(Exception):
        if enclave is not None:
            text = enclave.console.text()
    text = text or details or ""
    if not text:
        return ""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "console-excerpt.txt"
    path.write_text("\n".join(text.splitlines()[-100:]) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------
# the run


class Run:
    """Boots ``--boots`` times, ``--parallel`` at a time, beside the load enclave."""

    def __init__(self, args: argparse.Namespace, eif: Path, artifacts: Path, seed: str):
        self.args, self.eif, self.artifacts, self.seed = args, eif, artifacts, seed
        self.live = Live()
        self.lock = threading.Lock()
        self.next_index = 1
        self.results: list[BootResult] = []
        self.failures: list[Failure] = []
        self.running: set[int] = set()
        self.workers_left = 0
        self.workers_done = threading.Event()
        self.workers_done.set()  # none started yet
        self.started = time.monotonic()
        self.load = LoadEnclave(args.load, args.load_mib_per_s, args.memory_mib, eif, artifacts,
                                self.live, args.qemu, self._load_failure)

    def _load_failure(self, phase: str, error: str, excerpt: str) -> None:
        with self.lock:
            failure = Failure(min(self.running, default=0), phase, error, excerpt)
            self.failures.append(failure)
        _progress(f"load enclave FAILED at {phase} (during boot {failure.boot}): {error}; "
                  f"console excerpt: {excerpt or '-'}; restarting it")

    def worker(self) -> None:
        try:
            self._boots()
        finally:
            with self.lock:
                self.workers_left -= 1
                if self.workers_left == 0:
                    self.workers_done.set()

    def _boots(self) -> None:
        while not self.live.stop.is_set():
            with self.lock:
                if self.next_index > self.args.boots:
                    return
                index = self.next_index
                self.next_index += 1
                self.running.add(index)
            result = Boot(index, self.args, self.eif, self.artifacts, self.live, self.seed).run()
            with self.lock:
                self.running.discard(index)
                if result.failure is not None and self.live.stop.is_set() and not result.ok:
                    if not self.args.keep_artifacts:  # interrupted, not failed
                        shutil.rmtree(self.artifacts / f"boot-{index:04d}", ignore_errors=True)
                    return
                self.results.append(result)
                if result.failure is not None:
                    self.failures.append(result.failure)
                total_conns = sum(r.connections for r in self.results)
                fails = len(self.failures)
            self._report(result, total_conns, fails)

    def _report(self, r: BootResult, total_conns: int, fails: int) -> None:
        head = f"boot {r.index}/{self.args.boots}"
        if r.ok:
            phases = " ".join(f"{k} {v:.1f}" for k, v in r.phases.items())
            line = (f"{head} ok {r.seconds:.1f} s [{phases}] conns {r.connections} "
                    f"(total {total_conns})")
        else:
            f = r.failure
            assert f is not None
            line = (f"{head} FAILED at {f.phase} after {r.seconds:.1f} s: {f.error}; "
                    f"console excerpt: {f.console or '-'}")
        if self.args.load in ("echo", "both"):
            line += f" | load {self.load.echoed / MIB:.0f} MiB echoed"
        line += f" | failures {fails} | {time.monotonic() - self.started:.0f} s"
        _progress(line)

    def execute(self) -> bool:
        """Run everything; True if interrupted. Terminates every enclave before returning."""
        interrupted = False

        def on_term(_signum, _frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            self.load.start()
            while not self.load.ready.wait(0.5):
                if self.load.finished.is_set():
                    raise RunAborted("the load enclave's thread ended before the enclave was up")
            if self.load.start_error:
                raise RunAborted(f"the load enclave did not start: {self.load.start_error} "
                                 f"(artifacts: {self.artifacts / 'load-001'})")
            if self.args.load != "none":
                _progress(f"load enclave up ({self.args.load}) after "
                          f"{time.monotonic() - self.started:.0f} s")
            # Waited on through an Event, never Thread.join: on Python 3.11 a join that a
            # signal interrupts marks the (still running) thread as ended.
            self.workers_left = self.args.parallel
            self.workers_done.clear()
            for i in range(self.args.parallel):
                threading.Thread(target=self.worker, name=f"stress-worker-{i}", daemon=True).start()
            while not self.workers_done.wait(0.5):
                pass
        except KeyboardInterrupt:
            interrupted = True
            _progress("interrupted: terminating every enclave")
        finally:
            # A second Ctrl-C must not interrupt the release (QEMU would die with us anyway,
            # but the registry records and state folders would stay behind).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.live.terminate_all()
            if self.workers_left and not self.workers_done.is_set():
                _progress(f"waiting for the boot(s) in progress to end ({self.workers_left})")
            deadline = time.monotonic() + 120  # a worker in Enclave.start ends with the boot
            self.workers_done.wait(max(0.1, deadline - time.monotonic()))
            self.live.terminate_all()  # started meanwhile
            self.load.finished.wait(max(0.1, deadline - time.monotonic()))
            self.live.terminate_all()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
        return interrupted

    def summary(self, interrupted: bool) -> dict:
        ok = [r for r in self.results if r.ok]
        per_phase: dict[str, list[float]] = {}
        for r in ok:
            for k, v in r.phases.items():
                per_phase.setdefault(k, []).append(v)
        wall = time.monotonic() - self.started
        return {
            "image": self.args.image,
            "eif": str(self.eif),
            "seed": self.seed,
            "boots_requested": self.args.boots,
            "boots": len(self.results),
            "boots_ok": len(ok),
            "parallel": self.args.parallel,
            "connections": sum(r.connections for r in self.results),
            "bytes_echoed": sum(r.echoed for r in self.results),
            "bytes_one_way": sum(r.one_way for r in self.results),
            "settings": {k: getattr(self.args, k) for k in (
                "connections_per_boot", "guest_connections", "echo_mib", "half_close_kib",
                "memory_mib", "load", "load_mib_per_s", "phase_timeout", "connection_timeout")},
            "load": {"mode": self.args.load, "bytes_echoed": self.load.echoed,
                     "rounds": self.load.rounds, "restarts": self.load.restarts},
            "wall_s": round(wall, 1),
            "boot_s_mean": round(sum(r.seconds for r in ok) / len(ok), 2) if ok else None,
            "phase_s_mean": {k: round(sum(v) / len(v), 2) for k, v in per_phase.items()},
            "interrupted": interrupted,
            "artifacts": str(self.artifacts),
            "failures": [asdict(f) for f in self.failures],
            "per_boot": [{"index": r.index, "ok": r.ok, "seconds": round(r.seconds, 2),
                          "phases": r.phases, "connections": r.connections}
                         for r in sorted(self.results, key=lambda r: r.index)],
        }


def print_table(s: dict) -> None:
    rows = [
        ("boots", f"{s['boots']} of {s['boots_requested']} ({s['boots_ok']} passed, "
                  f"{s['boots'] - s['boots_ok']} failed; {s['parallel']} at a time)"
                  + (" - interrupted" if s["interrupted"] else "")),
        ("connections", str(s["connections"])),
        ("bytes echoed", f"{s['bytes_echoed']} ({s['bytes_echoed'] / MIB:.1f} MiB, "
                         "checked after the round trip)"),
        ("bytes one way", f"{s['bytes_one_way']} ({s['bytes_one_way'] / MIB:.1f} MiB, "
                          "half-closed, checked by digest)"),
        ("load enclave", f"{s['load']['mode']}: {s['load']['bytes_echoed'] / MIB:.0f} MiB echoed "
                         f"in {s['load']['rounds']} rounds, {s['load']['restarts']} restarts"),
        ("per boot", (f"{s['boot_s_mean']:.1f} s mean (" + ", ".join(
            f"{k} {v:.1f}" for k, v in s["phase_s_mean"].items()) + ")")
            if s["boot_s_mean"] is not None else "-"),
        ("wall time", f"{s['wall_s']:.0f} s"),
        ("seed", s["seed"]),
        ("failures", str(len(s["failures"]))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if s["failures"]:
        print(f"\n{'boot':>5}  {'phase':<18} error / console excerpt")
        for f in s["failures"]:
            print(f"{f['boot']:>5}  {f['phase']:<18} {f['error']}")
            print(f"{'':>5}  {'':<18} {f['console'] or '-'}")
    print(f"artifacts: {s['artifacts']}")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=_positive, default=200, help="boots of the test image (200)")
    ap.add_argument("--connections-per-boot", type=_positive, default=100,
                    help="short parent -> guest connections per boot (100)")
    ap.add_argument("--guest-connections", type=_count, default=20,
                    help="short guest -> parent connections per boot (20)")
    ap.add_argument("--echo-mib", type=_positive, default=8,
                    help="MiB each way of each large echo (8, as scenarios/vsock.yaml)")
    ap.add_argument("--half-close-kib", type=_positive, default=1024,
                    help="KiB sent before each half-close (1024)")
    ap.add_argument("--parallel", type=_positive, default=1,
                    help="test boots at a time, besides the load enclave (1)")
    ap.add_argument("--load", choices=("echo", "cpu", "both", "none"), default="echo",
                    help="what keeps the load enclave busy (echo)")
    ap.add_argument("--load-mib-per-s", type=_rate, default=4.0,
                    help="pace of the load enclave's echo in MiB/s each way, 0 = unpaced (4)")
    ap.add_argument("--memory-mib", type=_positive, default=512,
                    help="memory of every enclave in MiB (512: QEMU preallocates it at each "
                         "boot, 1024 as in the scenario costs about 4 s more per boot here)")
    ap.add_argument("--image", default="python", help="image recipe with the guest helpers (python)")
    ap.add_argument("--qemu", help="QEMU binary (default: the harness's choice)")
    ap.add_argument("--phase-timeout", type=float, default=300.0,
                    help="seconds for one phase (300, as the scenario's steps)")
    ap.add_argument("--connection-timeout", type=float, default=30.0,
                    help="seconds for one short connection (30)")
    ap.add_argument("--seed", help="seed of every payload (default: a new one, printed)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--artifacts", type=Path,
                    help="folder for failed boots' artifacts (default: a new one in the temp dir)")
    ap.add_argument("--keep-artifacts", action="store_true", help="keep passed boots' folders too")
    args = ap.parse_args(argv)

    seed = args.seed or f"{random.randrange(1 << 32):08x}"
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="vsock-stress-"))
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        eif = build_image(args.image)
    except NitroError as err:
        print(str(err), file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{artifacts}: {err.strerror}", file=sys.stderr)
        return 2
    _progress(f"vsock stress: {args.boots} boots of {args.image} ({eif.name}), seed {seed}, "
              f"load {args.load}, artifacts {artifacts}")
    run = Run(args, eif, artifacts, seed)
    try:
        interrupted = run.execute()
    except RunAborted as err:
        print(f"bench_vsock_stress: {err}", file=sys.stderr)
        return 2
    summary = run.summary(interrupted)
    print_table(summary)
    if args.json:
        try:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as err:
            print(f"{args.json}: {err.strerror}", file=sys.stderr)
            return 2
    if interrupted:
        return 130
    return 1 if summary["failures"] or summary["boots_ok"] < args.boots else 0


if __name__ == "__main__":
    sys.exit(main())
