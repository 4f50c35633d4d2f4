"""The enclave process's control socket while its enclave boots.

``run-enclave`` returns only after the heartbeat, and under TCG on a loaded host a boot can take
a minute; a ``terminate-enclave`` sent meanwhile must end the boot at once, not wait for the
heartbeat (and time out on the way). Until the boot is over, :class:`BootControl` accepts the
control socket's connections on a thread: ``terminate`` interrupts the boot (SIGTERM to the
process, whose handler ends the start the way Ctrl-C does, releasing everything taken) and its
connection is answered once everything is released; any other request waits for the enclave to
run and is then served as usual (docs/nitro-cli.md#terminate-enclave).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import threading

__all__ = ["BootControl"]


class BootControl:
    """Serves ``listener`` (the control socket, listening) while the enclave boots.

    :meth:`start` starts the thread; :meth:`stop` ends it and returns the ``(connection,
    request)`` pairs that wait for the running enclave. ``terminator`` is the connection of the
    ``terminate`` request that interrupted the boot (None when none came); the caller answers it
    after the release (:meth:`answer_terminate`).
    """

    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.terminator: socket.socket | None = None
        self._pending: list[tuple[socket.socket, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="boot-control", daemon=True)

    def start(self) -> None:
        """Start answering the control socket."""
        self._thread.start()

    def stop(self) -> list[tuple[socket.socket, dict]]:
        """Stop answering (idempotent) and return the requests waiting for the running enclave."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        pending, self._pending = self._pending, []
        return pending

    def answer_terminate(self, reply: dict) -> None:
        """Send ``reply`` to the terminate request that interrupted the boot, if one did; close
        the connections still waiting (their enclave never ran)."""
        for conn, _ in self.stop():
            with contextlib.suppress(OSError):
                conn.close()
        conn, self.terminator = self.terminator, None
        if conn is not None:
            with conn, contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for _key, _ in sel.select(timeout=0.2):
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    self._take(conn)
        finally:
            sel.close()

    def _take(self, conn: socket.socket) -> None:
        request = read_request(conn)
        if request is None:
            return
        if request.get("op") == "terminate" and self.terminator is None:
            self.terminator = conn
            self._stop.set()
            # The boot runs on the main thread: interrupt it as SIGTERM does (the handler raises
            # KeyboardInterrupt there, and the start releases what it took).
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._pending.append((conn, request))


def read_request(conn: socket.socket) -> dict | None:
    """One control request: the JSON object on ``conn``'s first line (a client sends it at once:
    10 s). None, with ``conn`` closed, for anything else: garbage must not end the enclave."""
    conn.settimeout(10)
    try:
        request = json.loads(conn.makefile("r").readline() or "{}")
    except (OSError, ValueError):
        request = None
    if not isinstance(request, dict):
        conn.close()
        return None
    return request
