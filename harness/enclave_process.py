"""The supervising process behind ``run-enclave`` (nitro-cli's "enclave process").

``run-enclave`` starts ``python -m harness.enclave_process`` in its own session, writes the
:class:`~harness.enclave.EnclaveConfig` as JSON on its stdin and reads one JSON line back:
``{"ok": <run-enclave output>, "preflight": [<finding line>, ...], "timeline": [<line>, ...]}``
once the heartbeat arrived (the preflight's errors and warnings, :mod:`harness.preflight`; the
boot timeline, :mod:`harness.boot_timeline`), or ``{"error": {"code", "message", "details"},
"timeline": [...]}`` (the timeline when the boot got that far). The process then owns the enclave (QEMU, device back ends) and serves a
control socket until the enclave ends: by ``terminate-enclave``, by SIGTERM/SIGINT, or by itself
(the application exited and init rebooted the VM, the kernel panicked, QEMU died;
docs/boot.md#enclave-end), which leaves an ended record (:mod:`harness.ended_enclaves`). The
control socket is served during the boot too (:mod:`harness.boot_control`): a ``terminate`` then
ends the boot, and run-enclave gets E36 saying so.

Control protocol (Unix stream socket, one JSON request line per connection):
``{"op": "describe"}`` -> one JSON line; ``{"op": "terminate"}`` -> ``{"Terminated": true}`` after
everything is released; ``{"op": "console"}`` -> the console's bytes so far (its log file), then
live output until the enclave ends or the client closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
from pathlib import Path

from harness.boot_control import BootControl, read_request
from harness.enclave import Enclave, EnclaveConfig
from harness.errors import ErrorCode, NitroError
from harness.registry import Registry

#: How long the supervisor waits for the monitor thread to release an enclave that ended by
#: itself (it reads the end reason and keeps the console, then stops the back ends: seconds).
MONITOR_WAIT_S = 30.0


def config_from_json(data: dict) -> EnclaveConfig:
    """Rebuild an EnclaveConfig from its JSON form (paths as strings)."""
    data = dict(data)
    data["eif_path"] = Path(data["eif_path"])
    if data.get("pki_dir"):
        data["pki_dir"] = Path(data["pki_dir"])
    return EnclaveConfig(**data)


class Supervisor:
    """Owns one enclave and answers its control socket (see the module doc)."""

    def __init__(self, enclave: Enclave, listener: socket.socket,
                 pending: list[tuple[socket.socket, dict]] | None = None):
        self.enclave = enclave
        self.listener = listener
        self.stop = threading.Event()
        self.pending = pending or []  # requests that came during the boot

    def serve(self) -> None:
        """Serve control requests until the enclave ends or is terminated.

        ``terminate`` is handled on this thread, so the process exits only after the enclave is
        released and the reply sent; ``describe`` and ``console`` get a thread each.
        """
        for conn, request in self.pending:
            threading.Thread(target=self._handle, args=(conn, request), daemon=True).start()
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while not self.stop.is_set() and self.enclave.running:
                for _key, _ in sel.select(timeout=0.5):
                    conn, _ = self.listener.accept()
                    request = read_request(conn)
                    if request is None:
                        continue
                    if request.get("op") == "terminate":
                        with conn:
                            try:
                                self.enclave.terminate()
                                reply = {"Terminated": True}
                            except NitroError as err:  # released, but something kept running
                                reply = _error(int(err.code), err.message, err.details)
                            self.stop.set()
                            with contextlib.suppress(OSError):
                                conn.sendall(json.dumps(reply).encode() + b"\n")
                        return
                    threading.Thread(target=self._handle, args=(conn, request), daemon=True).start()
        finally:
            sel.close()
        if not self.stop.is_set():
            # QEMU is gone by itself: the monitor thread records why and releases the enclave
            # (the kept console and end reason `console` prints afterwards). Without this wait
            # the caller's terminate could come first and take the end for the parent's doing.
            self.enclave.wait_released(MONITOR_WAIT_S)

    def _handle(self, conn: socket.socket, request: dict) -> None:
        with conn:
            conn.settimeout(None)
            op = request.get("op")
            if op == "describe":
                conn.sendall((json.dumps(self.enclave.describe()) + "\n").encode())
            elif op == "console":
                self._stream_console(conn)

    def _stream_console(self, conn: socket.socket) -> None:
        # From the log file, which has every byte: memory holds only the newest text, and a
        # slow client then costs one read's worth of memory, not a copy of the console.
        conn.setblocking(True)
        try:
            console = self.enclave.console
        except NitroError:  # the enclave is gone already
            return
        with contextlib.closing(console.follow_log()) as stream:
            for data in stream:
                try:
                    conn.sendall(data)
                except OSError:
                    return


def _warnings(enclave: Enclave) -> list[str]:
    """What run-enclave prints as warnings: the preflight's errors and warnings, and the layout's
    word that the EIF would not boot on Nitro when the preflight did not already say it."""
    lines = [f.line() for f in enclave.preflight if f.severity != "info"]
    said = any(f.rule == "kernel-cmdline-devices" for f in enclave.preflight)
    if enclave.layout is not None and enclave.layout.nitro_warning and not said:
        lines.append(f"layout: {enclave.layout.nitro_warning}")
    return lines


def _answer(out, payload: dict) -> None:
    with contextlib.suppress(OSError, ValueError):
        out.write(json.dumps(payload) + "\n")
        out.close()


def _error(code: int, message: str, details: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def main() -> int:
    """Entry point of the supervising process; returns its exit status.

    Every failure, set-up included, is answered to run-enclave as an ``{"error": ...}`` line so
    the user sees its one-line reason; nothing but that line is written to the CLI's terminal.
    """
    request = json.loads(sys.stdin.readline())
    result_out = os.fdopen(os.dup(1), "w")
    enclave = None
    listener = None
    boot: BootControl | None = None
    answered = False
    control = log_path = None
    status = 0

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        try:
            # Detach from the CLI's terminal: later output goes to the supervisor's log only.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            registry = Registry()
            log_path = registry.root / f"supervisor-{os.getpid()}.log"
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            control = registry.root / f"control-{os.getpid()}.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(control))
            listener.listen(8)
            boot = BootControl(listener)
            boot.start()
            enclave = Enclave.start(
                config_from_json(request["config"]),
                registry=registry,
                control_socket=str(control),
                accel=request.get("accel"),
                qemu=request.get("qemu"),
                artifacts_dir=Path(request["artifacts_dir"]) if request.get("artifacts_dir") else None,
            )
        except Exception as exc:  # noqa: BLE001 - reported to the CLI as its Exx, never a traceback
            from harness.cli import as_nitro_error

            err = exc if isinstance(exc, NitroError) else as_nitro_error(exc)
            if err is None:
                err = NitroError(ErrorCode.UnspecifiedError, f"{type(exc).__name__}: {exc}")
            answer = _error(err.code.value, err.message, err.details)
            timeline = getattr(exc, "boot_timeline", None)
            if timeline is not None:
                answer["timeline"] = timeline.lines()
            _answer(result_out, answer)
            return err.code.exit_status
        _answer(
            result_out,
            {"ok": enclave.run_info(), "state_dir": str(enclave.state_dir), "control_socket": str(control),
             "preflight": _warnings(enclave), "timeline": enclave.timeline.lines()},
        )
        answered = True
        Supervisor(enclave, listener, boot.stop()).serve()
    except KeyboardInterrupt:
        status = 130
        if boot is not None and boot.terminator is not None and not answered:
            _answer(result_out, _error(
                ErrorCode.EnclaveBootFailure.value,
                "terminate-enclave ended the enclave before its heartbeat arrived"))
            status = ErrorCode.EnclaveBootFailure.exit_status
    finally:
        # A second signal must not interrupt the release.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if enclave is not None:
            enclave.terminate()
        if boot is not None:  # released: now confirm a terminate that came during the boot
            boot.answer_terminate({"Terminated": True})
        if listener is not None:
            listener.close()
        for path in (control, log_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    return status


if __name__ == "__main__":
    sys.exit(main())
