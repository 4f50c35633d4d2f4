"""The device-model interface a vhost-user back end serves (vsock, NSM): :class:`VirtioDevice`.

Device models run on the back end's loop thread and need no locks for their own state;
:meth:`VirtioDevice.run_on_loop` brings a call from any other thread there.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from harness.vhost_user.backend import VhostUserBackend


class VirtioDevice:
    """Base class for a device model served over vhost-user.

    Subclasses set ``device_id`` (virtio device ID, e.g. 19 vsock, 33 NSM), ``num_queues``,
    ``queue_names`` (for messages), ``queue_size`` (largest ring accepted) and
    ``device_features`` (device-specific feature
    bits only; the back end adds VERSION_1, INDIRECT_DESC and PROTOCOL_FEATURES). Callbacks run
    on the back end's loop thread:

    - ``on_start(backend)``: once, when the loop starts (before QEMU connects): register fds.
    - ``on_kick(index)``: the driver kicked queue ``index`` (also once when it becomes ready).
    - ``on_queue_stop(index)``: the front end stopped the ring (GET_VRING_BASE or disconnect).
    - ``on_stop()``: once, when the back end stops; release device resources.

    ``get_config(offset, size)`` answers GET_CONFIG; ``set_config(offset, data)`` SET_CONFIG.
    """

    device_id: int = 0
    num_queues: int = 1
    queue_names: tuple[str, ...] = ()
    queue_size: int = 1024
    device_features: int = 0

    backend: "VhostUserBackend | None" = None

    def get_config(self, offset: int, size: int) -> bytes:
        """Config-space bytes [offset, offset+size); default: zeros."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:
        """Driver write to config space; default: ignored (read-only config)."""

    def on_start(self, backend: "VhostUserBackend") -> None:
        """Loop started; keep ``backend`` for queue access and fd registration."""
        self.backend = backend

    def on_kick(self, queue_index: int) -> None:
        """Queue ``queue_index`` has new available buffers (or just became ready)."""

    def on_queue_stop(self, queue_index: int) -> None:
        """The front end stopped queue ``queue_index``; buffers popped earlier are void."""

    def on_stop(self) -> None:
        """The back end is stopping; release what the device registered."""

    def run_on_loop(self, fn: Callable[[], Any], timeout: float | None = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (or raise its exception).

        Called from any thread. Runs ``fn`` directly when no loop is running or when already
        on the loop thread. Raises TimeoutError if the loop does not run it in ``timeout`` s.
        """
        b = self.backend
        if b is None or not b.running or threading.current_thread() is b._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed back to the caller's thread
                    fut.set_exception(e)

        b.call_soon(job)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("device loop did not answer in time") from None

