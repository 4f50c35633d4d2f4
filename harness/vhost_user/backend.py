"""The vhost-user back end: one Unix socket, one QEMU front end, one device model.

docs/vhost-user.md is the contract. :class:`VhostUserBackend` owns the listening socket and the
front end's connection, reads messages (:func:`~harness.vhost_user.protocol.read_message`) and
hands them to :mod:`harness.vhost_user.dispatch`, keeps the rings and guest memory the messages
set up, and stops and tears all of that down, even when a device callback never returns. The
loop it runs on is :class:`~harness.vhost_user.loop.EventLoop`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import sys
import threading
import time
from typing import Callable

from harness.errors import ErrorCode, NitroError
from harness.vhost_user.device import VirtioDevice
from harness.vhost_user.dispatch import dispatch
from harness.vhost_user.loop import EventLoop
from harness.vhost_user.memory import MemoryRegion, MemoryTable
from harness.vhost_user.protocol import (
    FLAG_REPLY,
    MSG_HEADER,
    REQUEST_NAMES,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    ProtocolFeature,
    VhostUserError,
    close_quiet,
    read_message,
)
from harness.vhost_user.virtqueue import VirtQueue


class VhostUserBackend:
    """Serves one :class:`VirtioDevice` to one QEMU over a vhost-user Unix socket.

    The socket is bound and listening when the constructor returns, so QEMU (the client,
    ``-chardev socket,path=socket_path``) can start right after. ``start()`` runs the loop on
    its own thread; ``stop()`` (idempotent) joins it, calls ``device.on_stop()``, closes every
    fd, unmaps guest RAM and unlinks the socket. Only one front-end connection is served;
    reconnection is not supported (docs/vhost-user.md#roles).

    ``offer_config``: offer the CONFIG protocol feature (vsock: yes; NSM on vhost-user-device: no,
    docs/vhost-user.md#features). ``trace``: called on the loop thread with a dict per vhost-user
    message (``{"t", "dir", "request", "name", "flags", "size", "fds", ...}``).

    ``error`` is None, or one line saying why serving ended abnormally (QEMU disconnected with
    rings running, a malformed message or ring, a device callback raising). ``disconnected``
    is set when the front end's connection ends for any reason. ``times``: ``time.monotonic()``
    when QEMU ``connected``, sent its first message (``handshake``) and started every ring (``rings``).

    ``call_soon``, ``call_later``, ``add_reader``/``remove_reader`` and
    ``add_writer``/``remove_writer`` are the loop's (:class:`~harness.vhost_user.loop.EventLoop`).

    Raises NitroError(FileOperationFailure) if the socket cannot be bound.
    """

    def __init__(self, socket_path: str | os.PathLike, device: VirtioDevice, *,
                 offer_config: bool = True, trace: Callable[[dict], None] | None = None,
                 reply_ack: bool = True):
        self.socket_path = os.fspath(socket_path)
        self.device = device
        self.offer_config = offer_config
        self.trace = trace
        self.error: str | None = None
        #: The last malformed chains refused (one line each, newest last; bounded,
        #: docs/vhost-user.md#bounds). Refusals do not end the device: ``error`` stays None.
        self.refusals: collections.deque[str] = collections.deque(maxlen=16)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.times: dict[str, float] = {}
        self.queues = [VirtQueue(self, i, device.queue_size) for i in range(device.num_queues)]
        self.memory: MemoryTable | None = None
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.protocol_features = (1 << ProtocolFeature.MQ)
        if reply_ack:
            self.protocol_features |= 1 << ProtocolFeature.REPLY_ACK
        if offer_config:
            self.protocol_features |= 1 << ProtocolFeature.CONFIG
        self.features = (device.device_features | VHOST_USER_F_PROTOCOL_FEATURES
                         | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC)
        self.messages = 0
        self._pinned: list[MemoryRegion] = []
        self._loop = loop = EventLoop(self._callback_failed)
        # The loop's scheduling and fd API is the back end's: device models call these.
        self.call_soon, self.call_later = loop.call_soon, loop.call_later
        self.add_reader, self.remove_reader = loop.add_reader, loop.remove_reader
        self.add_writer, self.remove_writer = loop.add_writer, loop.remove_writer
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._conn: socket.socket | None = None
        try:
            self._listener = listen_unix(self.socket_path)
        except NitroError:
            loop.close()
            raise
        self._bound = True
        self.add_reader(self._listener.fileno(), self._on_accept)

    # -- public API ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the loop thread (calls ``device.on_start(self)`` on it first)."""
        if self._thread is not None or self._stopped:
            raise VhostUserError("vhost-user back end already started or stopped")
        self._thread = threading.Thread(target=self._run, name=f"vhost-user:{self.socket_path}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent): join the loop, ``on_stop``, close fds, unmap, unlink."""
        with self._lock:
            if self._stopped:
                return
            self._loop.stopping = True
        t = self._thread
        if t is not None and t.is_alive():
            self._loop.wake()
            if threading.current_thread() is t:
                return  # the loop thread tears down when it exits
            t.join(timeout)
            if not t.is_alive():
                return
            # The loop is stuck in a callback. Release everything anyway (its fds, sockets and
            # guest memory), so nothing leaks, and say what is still running.
            where = _thread_location(t)
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # unblocks a recv/send on the connection
            t.join(1.0)
            if t.is_alive():
                self._teardown()
            raise VhostUserError(
                f"vhost-user loop for {self.socket_path} did not stop in {timeout:g} s (thread "
                f"{t.name} still running in {where}); its sockets and guest memory were released")
        self._teardown()

    @property
    def native_id(self) -> int | None:
        """Kernel thread id of the loop thread (for CPU placement), None before :meth:`start`."""
        return self._thread.native_id if self._thread is not None else None

    def note_refusal(self, line: str) -> None:
        """Record a refused chain (loop thread; :meth:`VirtQueue.pop` calls it)."""
        self.refusals.append(line)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until QEMU connected (True) or ``timeout`` seconds passed (False)."""
        return self.connected.wait(timeout)

    # -- loop ---------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def _run(self) -> None:
        try:
            try:
                self.device.on_start(self)
            except Exception as e:
                self._fail(f"device {type(self.device).__name__}.on_start failed: {e}")
                return
            self._loop.run()
        except Exception as e:  # e.g. the selector closed by a forced stop: end quietly
            self._fail(f"vhost-user loop for {self.socket_path} ended: {type(e).__name__}: {e}")
        finally:
            self._teardown()

    def _callback_failed(self, e: Exception) -> None:
        if isinstance(e, VhostUserError):
            self._fail(e.message)
            self._drop_connection()
        else:
            self._fail(f"device {type(self.device).__name__} failed: "
                       f"{type(e).__name__}: {e}")

    def _teardown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._loop.stopping = True
        if self._thread is not None:
            try:
                self._stop_rings()
                self.device.on_stop()
            except Exception as e:
                self._fail(f"device {type(self.device).__name__}.on_stop failed: {e}")
        self._drop_connection(teardown=True)
        self._loop.close()
        self._listener.close()
        if self._bound:
            self._bound = False
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self._unmap()
        if self._pinned:
            import gc
            gc.collect()  # views dropped by the device without release()
            self._pinned = [r for r in self._pinned if not r.close()]
        self.disconnected.set()

    # -- connection ---------------------------------------------------------------------

    def _on_accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._conn is not None or self.disconnected.is_set():
            conn.close()  # one front end per back end; no reconnection
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a message's payload follows its header at once
        self._conn = conn
        self.times["connected"] = time.monotonic()
        self.add_reader(conn.fileno(), self._on_message)
        self.connected.set()

    def _drop_connection(self, teardown: bool = False) -> None:
        """End the front-end connection and stop the rings (used on error and disconnect)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self.remove_reader(conn.fileno())
            conn.close()
            if not teardown:
                try:
                    self._stop_rings()
                except Exception as e:
                    self._fail(f"device {type(self.device).__name__}.on_queue_stop failed: {e}")
        if not teardown:
            self.disconnected.set()

    def _on_message(self) -> None:
        conn = self._conn
        if conn is None:
            return
        fds: list[int] = []
        try:
            msg = read_message(conn, fds)
            if msg is None:
                self._on_disconnect()
                return
            req, flags, payload = msg
            self.messages += 1
            if self.trace is not None:
                size = len(payload)
                self.trace({"t": time.monotonic(), "dir": "in", "request": req,
                            "name": REQUEST_NAMES[req], "flags": flags, "size": size,
                            "fds": len(fds), "payload": payload.hex() if size <= 64 else None})
            dispatch(self, req, flags, payload, fds)
        except VhostUserError as e:
            for fd in fds:
                close_quiet(fd)
            self._fail(e.message)
            self._drop_connection()
        except (ConnectionError, socket.timeout, OSError) as e:
            for fd in fds:
                close_quiet(fd)
            if isinstance(e, socket.timeout):
                self._fail("malformed vhost-user message: payload did not arrive within 5 s")
            else:
                self._fail(f"vhost-user connection failed: {e}")
            self._drop_connection()

    def _on_disconnect(self) -> None:
        running = any(q.started for q in self.queues)
        if running and not self._loop.stopping:
            # End of file is all the back end sees: QEMU exited or was killed, or the
            # connection itself was closed.
            self._fail("the vhost-user connection closed while the device's rings were running "
                       "(QEMU exited or was killed, or the connection was shut down)")
        self._drop_connection()

    def _reply(self, req: int, payload: bytes) -> None:
        msg = MSG_HEADER.pack(req, VERSION | FLAG_REPLY, len(payload)) + payload
        if self.trace is not None:
            self.trace({"t": time.monotonic(), "dir": "out", "request": req,
                        "name": REQUEST_NAMES.get(req, str(req)), "flags": VERSION | FLAG_REPLY,
                        "size": len(payload), "fds": 0,
                        "payload": payload.hex() if len(payload) <= 64 else None})
        self._conn.sendall(msg)

    # -- rings and guest memory -----------------------------------------------------------

    def _stop_rings(self) -> None:
        for q in self.queues:
            was = q.started
            self._stop_queue(q)
            q.reset_ownership("rings stopped")
            if was:
                self.device.on_queue_stop(q.index)
        for q in self.queues:
            for attr in ("call_fd", "err_fd"):
                fd = getattr(q, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(q, attr, None)

    def _stop_queue(self, q: VirtQueue) -> None:
        if q.kick_fd is not None:
            self.remove_reader(q.kick_fd)
            os.close(q.kick_fd)
            q.kick_fd = None
        q.started = False

    def _on_kick(self, q: VirtQueue, drain: bool = True) -> None:
        if drain and q.kick_fd is not None:
            try:
                os.eventfd_read(q.kick_fd)
            except BlockingIOError:
                pass
        if q.ready:
            self.device.on_kick(q.index)

    def _unmap(self) -> None:
        for q in self.queues:
            q.unmap()  # first: the rings' views would pin the regions
        if self.memory is not None:
            self._pinned.extend(self.memory.close())
            self.memory = None


def _thread_location(t: threading.Thread) -> str:
    """Where thread ``t`` runs now (``file:line in function``), for a stuck-loop message."""
    frame = sys._current_frames().get(t.ident or -1)
    if frame is None:
        return "an unknown place"
    stdlib = os.path.dirname(os.__file__)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(stdlib):
        frame = frame.f_back  # the caller blocked in threading/socket is the useful place
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def listen_unix(path: str) -> socket.socket:
    """A non-blocking Unix stream socket listening at ``path`` for QEMU's one connection (a
    stale socket file from a dead run is replaced). Raises NitroError(FileOperationFailure)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path):
            os.unlink(path)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
    except OSError as e:
        listener.close()
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"vhost-user socket {path}: cannot listen: {e.strerror or e}") from None
    return listener
