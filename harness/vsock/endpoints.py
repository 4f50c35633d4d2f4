"""The parent's vsock endpoints: ports the guest connects to, the heartbeat, and connecting out.

Parent endpoints are real sockets: the device keeps one end of a ``socket.socketpair()`` and
pumps it on the back end's loop thread; user code gets the other end.

- :class:`VsockListener`: a parent port (CID 3) the guest connects to.
- :class:`HeartbeatListener`: the Nitro heartbeat (docs/vsock.md#heartbeat: 0xB7 each way).
- :func:`connect_parent`: the parent connects to a guest port.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import TYPE_CHECKING

from harness.vsock.packet import DEFAULT_BACKLOG, HEARTBEAT_BYTE, HEARTBEAT_PORT

if TYPE_CHECKING:
    from harness.vsock.device import VsockDevice


class VsockListener:
    """A parent port the guest can connect to (CID 3, ``port``).

    ``accept(timeout)`` returns a connected, blocking ``socket.socket`` (raises TimeoutError
    after ``timeout`` s); ``close()`` stops listening (later REQUESTs get RST) and closes
    connections nobody accepted. At most ``backlog`` connections wait to be accepted; further
    REQUESTs get RST (docs/vsock.md#bounds). Usable as a context manager.
    """

    def __init__(self, device: "VsockDevice", port: int, backlog: int = DEFAULT_BACKLOG):
        self.device = device
        self.port = port
        self.backlog = backlog
        self.closed = False
        self._q: queue.Queue[socket.socket] = queue.Queue()

    def admits(self) -> bool:
        """Loop thread: True if one more guest connection may wait to be accepted.

        Linux's virtio_transport_recv_listen answers RST when the listener's accept queue is
        full (sk_acceptq_is_full), and so does the harness (docs/vsock.md#bounds)."""
        return not self.closed and self._q.qsize() < self.backlog

    def _deliver(self, user_sock: socket.socket) -> None:
        """Loop thread: a guest connection was accepted; hand the user's end over."""
        self._q.put(user_sock)

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Next guest connection to this port (blocking socket); TimeoutError if none in time."""
        if self.closed:
            raise OSError(f"vsock listener on port {self.port} is closed")
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no guest connection to vsock port {self.port} within "
                               f"{timeout} s") from None

    def close(self) -> None:
        """Stop listening; close unaccepted connections (idempotent)."""
        if self.closed:
            return
        self.device.run_on_loop(lambda: self.device._table.unlisten(self))

    def _drain(self) -> None:
        self.closed = True
        while True:
            try:
                self._q.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> "VsockListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HeartbeatListener(VsockListener):
    """The parent's heartbeat endpoint (docs/vsock.md#heartbeat): read one 0xB7, answer one 0xB7.

    Served on the device's loop. ``wait(timeout) -> bool`` is true once the heartbeat was
    read and answered; ``received_at`` is its ``time.monotonic()`` and ``received_wall`` its
    ``time.time()``. ``wrong_byte`` holds the first byte if a guest sent something else
    (init would then fail its own check).
    """

    def __init__(self, device: "VsockDevice", port: int = HEARTBEAT_PORT):
        super().__init__(device, port)
        self._event = threading.Event()
        self.received_at: float | None = None
        self.received_wall: float | None = None
        self.wrong_byte: int | None = None
        self.count = 0
        self.taken = False  # the one heartbeat connection arrived
        self._socks: list[socket.socket] = []

    def admits(self) -> bool:
        """Loop thread: True until the first connection: the heartbeat is one connection from
        init at boot (docs/vsock.md#heartbeat), so later REQUESTs get RST
        (docs/vsock.md#bounds)."""
        return not self.closed and not self.taken

    def _deliver(self, user_sock: socket.socket) -> None:
        self.taken = True
        user_sock.setblocking(False)
        self._socks.append(user_sock)
        backend = self.device.backend
        answered = [False]

        def on_readable() -> None:
            try:
                data = user_sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data and not answered[0]:
                answered[0] = True
                if data[0] == HEARTBEAT_BYTE:
                    try:
                        user_sock.send(bytes([HEARTBEAT_BYTE]))
                    except OSError:
                        pass
                    self.count += 1
                    if self.received_at is None:
                        self.received_at = time.monotonic()
                        self.received_wall = time.time()
                    self._event.set()
                else:
                    self.wrong_byte = data[0]
            if not data:  # the guest closed: done with this connection
                backend.remove_reader(user_sock.fileno())
                self._socks.remove(user_sock)
                user_sock.close()

        backend.add_reader(user_sock.fileno(), on_readable)

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Not available: heartbeat connections are served by the device itself."""
        raise OSError("the heartbeat listener answers connections itself; use wait()")

    def wait(self, timeout: float | None = None) -> bool:
        """True once the heartbeat byte was received and answered, False on timeout."""
        return self._event.wait(timeout)

    def _drain(self) -> None:
        super()._drain()
        backend = self.device.backend
        for s in self._socks:
            if backend is not None and s.fileno() >= 0:
                backend.remove_reader(s.fileno())
            s.close()
        self._socks.clear()


def connect_parent(device: "VsockDevice", port: int, timeout: float) -> socket.socket:
    """The parent connects to the guest's ``port`` through ``device``: a connected blocking
    socket (any thread but the loop's; :meth:`VsockDevice.connect` documents it).

    Raises ConnectionRefusedError if the guest answers RST (nobody listens),
    TimeoutError if it does not answer in ``timeout`` s (the attempt is then reset).
    """
    table = device._table
    done = threading.Event()
    result: list = []

    def on_result(err: BaseException | None, user: socket.socket | None = None) -> None:
        result.append((err, user))
        done.set()

    key_box: list = []
    device.run_on_loop(lambda: key_box.append(table.start_connect(port, None, on_result)))
    if not done.wait(timeout):
        def abort() -> None:
            conn = table.conns.get(key_box[0]) if key_box else None
            if conn is not None and conn.state == "connecting":
                cb, conn.on_result = conn.on_result, None
                table.reset(conn, send_rst=True)  # the guest forgets the attempt
                if cb is not None:
                    cb(TimeoutError(f"guest CID {device.guest_cid} did not answer a "
                                    f"connection to port {port} within {timeout} s"))
        device.run_on_loop(abort)
    err, user = result[0]
    if err is not None:
        raise err
    return user
