"""``vsock``: talk to the enclave from the parent (CID 3) and check what comes back.

``connect: PORT`` connects to the guest's port (retried while its server starts), ``accept:
PORT`` listens on the parent's port for the guest (started by ``trigger``). Then each
connection sends a payload and checks the reply (docs/scenarios.md lists the keys; docs/vsock.md
the device: a refused connection is an RST from the guest).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError
from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register
from harness.scenario.steps.report import indent

if TYPE_CHECKING:
    from harness.console import ExecResult
    from harness.enclave_factory import RunningEnclave
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str:
    """``connect 5005`` or ``accept 7000``."""
    return f"connect {body['connect']}" if "connect" in body else f"accept {body.get('accept')}"


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Connect or accept ``connections`` times (default 1) within ``within``; each exchange
    must meet the step's expectations (StepFailed otherwise)."""
    body = call.body
    enclave = runner.ensure_enclave()
    deadline = time.monotonic() + min(float(body.get("within", call.limit)), call.limit)
    count = int(body.get("connections", 1))
    if "connect" in body:
        port = int(body["connect"])
        for n in range(count):
            sock = connect(enclave, port, deadline, expect_refused=bool(body.get("expect_refused")))
            if sock is None:
                continue
            with contextlib.closing(sock):
                _exchange(runner, sock, body, deadline, f"connection {n + 1}/{count} to port {port}")
        return
    _accept(runner, enclave, body, deadline, count)


def connect(enclave: RunningEnclave, port: int, deadline: float, *,
            expect_refused: bool) -> socket.socket | None:
    """Connect to the guest's ``port`` before ``deadline`` (``time.monotonic()``).

    Without ``expect_refused`` a failed attempt (the guest's server may still be starting) is
    retried every 0.5 s until the deadline, then StepFailed. With it, only a refusal passes
    (ConnectionRefusedError: the guest's RST, docs/vsock.md; returns None): a connection is
    StepFailed, and so is an attempt that timed out (no answer is not a refusal) or failed
    otherwise.
    """
    while True:
        remaining = deadline - time.monotonic()
        wait = max(0.5, min(10.0, remaining))
        try:
            sock = enclave.vsock_connect(port, timeout=wait)
        except ConnectionRefusedError as exc:
            if expect_refused:
                return None
            error: BaseException = exc
        except TimeoutError as exc:
            if expect_refused:
                raise StepFailed(f"vsock connect to port {port} timed out after {wait:g} s rather than "
                                 f"being refused (the guest sent no RST): {exc}") from None
            error = exc
        except (OSError, NitroError) as exc:
            if expect_refused:
                raise StepFailed(f"vsock connect to port {port} failed without being refused: {exc}") from None
            error = exc
        else:
            if expect_refused:
                sock.close()
                raise StepFailed(f"vsock connect to port {port} succeeded; expected it to be refused")
            return sock
        if remaining <= 0.5:
            raise StepFailed(f"vsock connect to the enclave's port {port} failed: {error}")
        time.sleep(0.5)


def _accept(runner: ScenarioRunner, enclave: RunningEnclave, body: dict, deadline: float,
            count: int) -> None:
    port = int(body["accept"])
    listener = enclave.vsock_listen(port)
    trigger: dict[str, Any] = {}
    thread = None
    try:
        if body.get("trigger"):
            def run_trigger() -> None:
                try:
                    trigger["result"] = enclave.exec(
                        body["trigger"], timeout=max(1.0, deadline - time.monotonic()))
                except Exception as exc:  # reported after the exchange
                    trigger["error"] = exc

            thread = threading.Thread(target=run_trigger, name="scenario-trigger", daemon=True)
            thread.start()
        for n in range(count):
            remaining = deadline - time.monotonic()
            try:
                conn: Any = listener.accept(timeout=max(0.1, remaining))
            except (OSError, NitroError, TimeoutError) as exc:
                raise StepFailed(f"no guest connection {n + 1}/{count} on parent port {port} "
                                 f"within the step's time: {exc}") from None
            if isinstance(conn, tuple):
                conn = conn[0]
            with contextlib.closing(conn):
                _exchange(runner, conn, body, deadline, f"guest connection {n + 1}/{count} on port {port}")
    finally:
        if thread is not None:
            thread.join(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            listener.close()
    if thread is not None:
        if "error" in trigger:
            raise StepFailed(f"trigger {body['trigger']!r}: {trigger['error']}")
        res: ExecResult | None = trigger.get("result")
        if res is None:
            raise StepFailed(f"trigger {body['trigger']!r} did not finish in time")
        if res.status != 0:
            raise StepFailed(f"trigger {body['trigger']!r} exited {res.status}:\n{indent(res.output)}")


def _payload(runner: ScenarioRunner, body: dict) -> bytes | None:
    if "send" in body:
        return body["send"].encode()
    if "send_hex" in body:
        return bytes.fromhex(body["send_hex"])
    if "send_file" in body:
        path = Path(body["send_file"])
        if not path.is_absolute():
            path = runner.scenario.path.parent / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StepFailed(f"send_file {path}: {exc.strerror}") from None
    if "send_random" in body:
        return secrets.token_bytes(int(body["send_random"]))
    return None


def _exchange(runner: ScenarioRunner, sock: socket.socket, body: dict, deadline: float, what: str) -> None:
    payload = _payload(runner, body)
    sender = None
    send_error: list[BaseException] = []
    if payload is not None:
        def send() -> None:
            try:
                sock.sendall(payload)
                if body.get("half_close", True):
                    sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                send_error.append(exc)

        # Sending from a thread while reading here: an echo peer would otherwise fill
        # both directions' credit and deadlock on large payloads.
        sender = threading.Thread(target=send, name="scenario-vsock-send", daemon=True)
        sender.start()
    expect_re = re.compile(body["expect"].encode(), re.MULTILINE) if "expect" in body else None
    want: int | None = None
    if "expect_hex" in body:
        want = len(bytes.fromhex(body["expect_hex"]))
    elif "expect_bytes" in body:
        want = int(body["expect_bytes"])
    elif body.get("expect_echo"):
        want = len(payload or b"")
    digest_reply = bool(body.get("reply_digest"))
    digest_expect = bool(body.get("expect_digest"))
    # reply_digest reads to EOF before answering; expect_digest reads the one-line answer.
    reading = expect_re is not None or want is not None or digest_reply or digest_expect
    received = bytearray()
    while reading:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StepFailed(f"{what}: timed out after receiving {len(received)} bytes"
                             + _received_excerpt(received))
        sock.settimeout(min(remaining, 1.0))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError as exc:
            raise StepFailed(f"{what}: receive failed after {len(received)} bytes: {exc}") from None
        if not chunk:
            break
        received += chunk
        if digest_expect and b"\n" in received:
            break
        if expect_re is not None and expect_re.search(received):
            break
        if want is not None and expect_re is None and len(received) >= want:
            break
    if sender is not None:
        sender.join(max(0.1, deadline - time.monotonic()))
        if sender.is_alive():
            raise StepFailed(f"{what}: sending {len(payload or b'')} bytes did not finish in time")
        if send_error:
            raise StepFailed(f"{what}: send failed: {send_error[0]}")
    if digest_reply:
        try:
            sock.sendall(f"{len(received)} {hashlib.sha256(received).hexdigest()}\n".encode())
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise StepFailed(f"{what}: sending the digest failed: {exc}") from None
    _check_reply(body, payload, bytes(received), expect_re, want, what)


def _check_reply(body: dict, payload: bytes | None, received: bytes, expect_re: re.Pattern[bytes] | None,
                 want: int | None, what: str) -> None:
    if body.get("expect_digest"):
        sent = payload or b""
        want_line = f"{len(sent)} {hashlib.sha256(sent).hexdigest()}"
        got_line = received.decode("utf-8", "replace").strip()
        if got_line != want_line:
            raise StepFailed(f"{what}: the peer's digest {got_line!r} differs from what was sent "
                             f"{want_line!r}")
    if expect_re is not None and not expect_re.search(received):
        raise StepFailed(f"{what}: reply does not match {body['expect']!r}" + _received_excerpt(received))
    if "expect_hex" in body and received[:want] != bytes.fromhex(body["expect_hex"]):
        raise StepFailed(f"{what}: expected {body['expect_hex']}, got {received[:(want or 0) + 16].hex()}")
    if "expect_bytes" in body and len(received) < (want or 0):
        raise StepFailed(f"{what}: got {len(received)} bytes, expected {want}")
    if body.get("expect_echo"):
        sent = payload or b""
        if received != sent:
            raise StepFailed(
                f"{what}: echo differs: sent {len(sent)} bytes sha256 {hashlib.sha256(sent).hexdigest()[:16]}, "
                f"got {len(received)} bytes sha256 {hashlib.sha256(received).hexdigest()[:16]}")


def _received_excerpt(data: bytes | bytearray) -> str:
    if not data:
        return " (nothing received)"
    shown = bytes(data[-200:]).decode("utf-8", "replace")
    return f"; last bytes received: {shown!r}"


STEP = register("vsock", needs_enclave=True, label=label, run=run)
