"""The hybrid-vsock Unix bridge of one vsock device (docs/vsock.md#unix-bridge).

A parent program connects to the bridge's Unix socket ``path``, writes ``CONNECT <port>\\n``,
reads ``OK <local port>\\n`` and then exchanges raw bytes with the guest's ``port`` (the
connection is closed if the guest refuses). A guest connection to parent port P with no Python
listener on P is connected to the Unix socket ``<path>_<P>`` if it exists.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from harness.errors import ErrorCode, NitroError

if TYPE_CHECKING:
    from harness.vsock.device import VsockDevice


class UnixBridge:
    """The bridge's listening socket at ``path`` and its clients that have not sent their
    CONNECT line yet; callbacks run on ``device``'s loop thread.

    Raises NitroError(FileOperationFailure) if ``path`` cannot be bound.
    """

    def __init__(self, device: "VsockDevice", path: str):
        self.device = device
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}
        self.closed = False
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.sock.bind(path)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"vsock Unix bridge {path}: cannot listen: {e.strerror or e}") \
                from None

    def start(self, backend) -> None:
        """Accept parent programs on ``backend``'s loop (loop thread)."""
        backend.add_reader(self.sock.fileno(), self._accept)

    def connect_target(self, port: int) -> socket.socket | None:
        """A non-blocking socket connected to ``<path>_<port>`` for a guest connection to parent
        port ``port``; None if nothing listens there."""
        target = f"{self.path}_{port}"
        if os.path.exists(target):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(target)
                return s
            except OSError:
                s.close()
        return None

    def close(self) -> None:
        """Close the listening socket and clients still owing their CONNECT line; unlink."""
        self.closed = True
        backend = self.device.backend
        for s, _ in self.pending.values():
            if backend is not None:
                backend.remove_reader(s.fileno())
            s.close()
        self.pending.clear()
        if backend is not None:
            backend.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        if self.closed:
            return
        try:
            s, _ = self.sock.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        buf = bytearray()
        self.pending[s.fileno()] = (s, buf)
        self.device.backend.add_reader(s.fileno(), lambda: self._read_line(s, buf))

    def _read_line(self, s: socket.socket, buf: bytearray) -> None:
        dev = self.device
        table, pump = dev._table, dev._pump
        try:
            data = s.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        fd = s.fileno()
        if data:
            buf += data
            if b"\n" not in buf:
                if len(buf) < 64:
                    return
                data = b""  # no line in 64 bytes: not the convention
        dev.backend.remove_reader(fd)
        self.pending.pop(fd, None)
        line, _, rest = bytes(buf).partition(b"\n")
        parts = line.split()
        if not data and b"\n" not in buf or len(parts) != 2 or parts[0] != b"CONNECT" \
                or not parts[1].isdigit() or int(parts[1]) > 0xFFFFFFFF:
            s.close()
            return
        port = int(parts[1])
        box: list = []

        def on_result(err: BaseException | None, _user: socket.socket | None) -> None:
            if err is not None:
                return  # the connection's reset closes the client socket: the parent sees EOF
            conn = table.conns.get(box[0])
            try:
                s.send(b"OK %d\n" % conn.local_port)
            except OSError:
                table.reset(conn, send_rst=True)
                return
            pump.update_reader(conn)
            if conn.pre_data:  # bytes the client sent right after its CONNECT line
                dev.backend.call_soon(
                    lambda: pump.on_parent_readable(conn) if conn.sock is not None else None)

        box.append(table.start_connect(port, s, on_result))
        conn = table.conns[box[0]]
        conn.pre_data = rest
        conn.timer = dev.backend.call_later(
            10.0, lambda: table.reset(conn, send_rst=True, err=TimeoutError("no answer"))
            if conn.state == "connecting" and table.conns.get(box[0]) is conn else None)
