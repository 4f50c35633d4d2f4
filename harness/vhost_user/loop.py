"""The event loop a vhost-user back end runs on its own thread: fd handlers, call_soon, timers.

One ``selectors`` selector (epoll) watches the vhost-user socket, the kick eventfds and any fd a
device registers; a wake eventfd lets other threads interrupt the wait
(:meth:`EventLoop.call_soon`). Everything else is for the loop thread only, so device models
need no locks.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import selectors
import time
from typing import Callable


class _Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (safe from any thread)."""
        self.cancelled = True


class EventLoop:
    """Selector loop with per-fd reader/writer callbacks, a ready queue and timers.

    ``on_error(exc)`` is called on the loop thread with any Exception a callback raises; the
    loop then goes on. :meth:`run` returns once ``stopping`` is true (set it, then
    :meth:`wake`). :meth:`close` releases the selector and the wake eventfd.
    """

    def __init__(self, on_error: Callable[[Exception], None]):
        self.stopping = False
        self._on_error = on_error
        self._sel = selectors.DefaultSelector()
        self._handlers: dict[int, list] = {}  # fd -> [reader, writer, file identity]
        self._ready: collections.deque = collections.deque()
        self._timers: list = []
        self._timer_seq = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add_reader(self._wake_fd, self._on_wake)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (thread-safe)."""
        self._ready.append(fn)
        self.wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        """Run ``fn`` on the loop thread after ``delay`` s; returns a handle with ``cancel()``.

        Call from the loop thread (use call_soon to schedule from elsewhere).
        """
        t = _Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (t.when, next(self._timer_seq), t))
        return t

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop whenever ``fd`` is readable (loop thread only)."""
        self._set_handler(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` for reading (no error if not watched)."""
        self._set_handler(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop whenever ``fd`` is writable (loop thread only)."""
        self._set_handler(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        """Stop watching ``fd`` for writing (no error if not watched)."""
        self._set_handler(fd, 1, None)

    def _set_handler(self, fd: int, slot: int, cb: Callable[[], None] | None) -> None:
        h = self._handlers.get(fd)
        if h is not None and cb is not None and h[2] != _file_identity(fd):
            # The fd was closed behind the loop's back and its number now names another file:
            # the entry's callbacks belong to the closed one. Start afresh.
            del self._handlers[fd]
            self._sel.unregister(fd)
            h = None
        if h is None:
            if cb is None:
                return
            h = [None, None, _file_identity(fd)]
            h[slot] = cb
            self._handlers[fd] = h
            self._sel.register(fd, selectors.EVENT_READ if slot == 0 else selectors.EVENT_WRITE)
            return
        if h[slot] is cb:
            return
        h[slot] = cb
        events = (selectors.EVENT_READ if h[0] else 0) | (selectors.EVENT_WRITE if h[1] else 0)
        if not events:
            del self._handlers[fd]
            self._sel.unregister(fd)
        elif cb is not None:
            # Register anew rather than modify: epoll silently forgets a closed file (one that
            # shares an identity with the new one, like every eventfd), and the selector skips
            # the kernel when the events do not change.
            self._sel.unregister(fd)
            self._sel.register(fd, events)
        else:
            try:
                self._sel.modify(fd, events)
            except OSError:  # closed behind the loop's back: the selector dropped it already
                del self._handlers[fd]

    def wake(self) -> None:
        """Interrupt the loop's wait (thread-safe; a no-op once the loop is closed)."""
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass  # saturated or already closed: the loop is awake or gone

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def run(self) -> None:
        """Dispatch fd events, ready callbacks and due timers until ``stopping`` (loop thread).

        Raises what the selector raises (e.g. when :meth:`close` ran on another thread)."""
        handlers = self._handlers
        ready = self._ready
        timers = self._timers
        on_error = self._on_error
        while not self.stopping:
            timeout = None
            if ready:
                timeout = 0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            events = self._sel.select(timeout)
            for key, mask in events:
                h = handlers.get(key.fd)
                if h is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ and h[0]:
                        h[0]()
                    if mask & selectors.EVENT_WRITE and h[1] and handlers.get(key.fd) is h:
                        h[1]()
                except Exception as e:
                    on_error(e)
            while ready:
                fn = ready.popleft()
                try:
                    fn()
                except Exception as e:
                    on_error(e)
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    t = heapq.heappop(timers)[2]
                    if not t.cancelled:
                        try:
                            t.fn()
                        except Exception as e:
                            on_error(e)

    def close(self) -> None:
        """Forget every handler, pending callback and timer; close the selector and wake fd."""
        for fd in list(self._handlers):
            self._sel.unregister(fd)
        self._handlers.clear()
        self._sel.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
        self._ready.clear()
        self._timers.clear()


def _file_identity(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file ``fd`` refers to now; None if ``fd`` is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino
