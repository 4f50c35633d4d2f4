"""Boot events read from an enclave's console: the kernel's printk times and init's step times.

docs/boot.md#boot-timeline. The Nitro-style kernel prints every line with its own clock
(``CONFIG_PRINTK_TIME``: ``[    1.248032] Run /init as init process``) and the harness's init ends
each of its lines with the guest's boot clock (``nitro-init: loaded /nsm.ko (t=1.400s)``). This
module finds the boot's milestones in those lines: the first kernel line (the kernel runs, so the
decompression is done), the console coming up, the ramdisk unpacked, ``Run /init``, and each init
step up to the heartbeat. It also keeps the host's arrival time of each line end
(:class:`LineClock`), so every guest event can be placed on the host's clock as well.

The console is the guest's, so everything here is bounded: only the first :data:`SCAN_LIMIT`
bytes are looked at, a line counts for at most :data:`MAX_LINE` bytes, at most
:data:`MAX_EVENTS` events are returned, the host times of at most :data:`MAX_TIMED_LINES` line
ends are kept, and a timestamp has at most 6 integer and 9 fractional digits.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass

__all__ = ["SCAN_LIMIT", "MAX_EVENTS", "MAX_LINE", "MAX_TIMED_LINES", "GuestEvent", "LineClock",
           "parse_console"]

#: Bytes of console looked at: the boot's part (hello's whole boot prints about 10 KiB, Debian's
#: cloud kernel about 40 KiB).
SCAN_LIMIT = 128 * 1024
#: Bytes of one line that are looked at; the rest of a longer line is ignored.
MAX_LINE = 512
#: Events returned at most (init prints about ten steps before the heartbeat).
MAX_EVENTS = 64
#: Line ends whose host arrival time is kept at most.
MAX_TIMED_LINES = 4096
#: Characters of a line kept as an event's text.
TEXT_CHARS = 160

_KERNEL = re.compile(rb"\[\s{0,12}(\d{1,6}\.\d{1,9})\] ?(.*)")
_INIT = re.compile(rb"nitro-init: (.*) \(t=(\d{1,6}\.\d{1,9})s\)")
# Kernel messages that mark a boot milestone, in the order they come; each is taken once.
_KERNEL_MILESTONES = (
    ("console_enabled", re.compile(rb"console \[\w+\] enabled")),
    ("initramfs_unpacking", re.compile(rb"Unpacking initramfs|Trying to unpack rootfs image")),
    ("initramfs_unpacked", re.compile(rb"Freeing initrd memory")),
    ("run_init", re.compile(rb"Run \S+ as init process")),
    ("kernel_panic", re.compile(rb"Kernel panic - not syncing")),
)
# The decompressor's last words, printed without a timestamp when it has a serial console
# (earlyprintk); AWS's command line gives it none, so the first kernel line stands for it.
_DECOMPRESSED = re.compile(rb"Booting the kernel")


@dataclass(frozen=True)
class GuestEvent:
    """One boot milestone on the console.

    ``name``: ``decompressed``, ``kernel_started`` (the first timestamped kernel line),
    ``console_enabled``, ``initramfs_unpacking``, ``initramfs_unpacked``, ``run_init``,
    ``kernel_panic``, ``init_step``, ``init_heartbeat`` (init's heartbeat line, the last event
    looked for) or ``init_fatal``; ``guest_s`` the guest's own clock in seconds (None when the
    line has no timestamp); ``end`` the byte offset just past the line in the console;
    ``arrived`` the host's ``time.monotonic()`` when that line end arrived (None when unknown);
    ``text`` the line's message, printable ASCII, at most :data:`TEXT_CHARS` characters.
    """

    name: str
    guest_s: float | None
    end: int
    arrived: float | None
    text: str


class LineClock:
    """The console's first :data:`SCAN_LIMIT` bytes (``head``) with the host's arrival time of
    each line end in them (at most :data:`MAX_TIMED_LINES`) and of the first byte
    (``first_byte_at``); ``size`` counts every byte fed.

    The console's reader calls :meth:`feed` with each chunk as it arrives, in order; another
    thread may take a :meth:`copy` meanwhile (both hold the clock's own lock)."""

    def __init__(self) -> None:
        self.first_byte_at: float | None = None
        self.size = 0
        self.head = b""
        self._chunks: list[bytes] = []
        self._ends: list[int] = []
        self._times: list[float] = []
        self._lock = threading.Lock()

    def feed(self, data: bytes, now: float) -> None:
        """Note that ``data`` arrived at ``now`` (seconds, ``time.monotonic()``)."""
        with self._lock:
            if data and self.first_byte_at is None:
                self.first_byte_at = now
            start, self.size = self.size, self.size + len(data)
            if start >= SCAN_LIMIT:
                return
            self._chunks.append(bytes(data[:SCAN_LIMIT - start]))
            at = data.find(b"\n", 0, SCAN_LIMIT - start)
            while at >= 0 and len(self._ends) < MAX_TIMED_LINES:
                self._ends.append(start + at + 1)
                self._times.append(now)
                at = data.find(b"\n", at + 1, SCAN_LIMIT - start)

    def arrival(self, end: int) -> float | None:
        """When the console had received ``end`` bytes and the line ending there (None when that
        line end was not timed)."""
        i = bisect.bisect_left(self._ends, end)
        return self._times[i] if i < len(self._ends) else None

    def copy(self) -> "LineClock":
        """An independent copy with ``head`` filled in (to read while the console goes on)."""
        other = LineClock()
        with self._lock:
            self.head = self.head + b"".join(self._chunks)
            self._chunks = []
            other.first_byte_at, other.size, other.head = self.first_byte_at, self.size, self.head
            other._ends, other._times = list(self._ends), list(self._times)
        return other


def _text(message: bytes) -> str:
    return "".join(c if " " <= c <= "~" else "?"
                   for c in message[:TEXT_CHARS].decode("ascii", "replace")).strip()


def parse_console(console: bytes, clock: LineClock | None = None) -> list[GuestEvent]:
    """The boot milestones in the first :data:`SCAN_LIMIT` bytes of ``console`` (raw bytes as the
    guest wrote them), in console order; ``clock`` gives their host arrival times.

    Only complete lines count (a line still being written may change). Each kernel milestone is
    taken once; init's lines are taken up to its heartbeat line or a fatal error, whichever comes
    first, and the scan stops there. A kernel that prints no timestamps gives only the
    untimestamped milestones; a console that is not a Linux boot gives none. Never raises.
    """
    head = console[:SCAN_LIMIT]
    events: list[GuestEvent] = []
    seen: set[str] = set()
    pos = 0

    def add(name: str, guest_s: float | None, end: int, message: bytes) -> None:
        events.append(GuestEvent(name, guest_s, end,
                                 clock.arrival(end) if clock is not None else None,
                                 _text(message)))
        seen.add(name)

    while len(events) < MAX_EVENTS:
        nl = head.find(b"\n", pos)
        if nl < 0:
            break
        line, end, pos = head[pos:min(nl, pos + MAX_LINE)].strip(b"\r"), nl + 1, nl + 1
        init = _INIT.search(line)
        if init:
            message = init.group(1)
            name = ("init_heartbeat" if message.startswith(b"heartbeat:")
                    else "init_fatal" if message.startswith(b"fatal:") else "init_step")
            add(name, float(init.group(2)), end, message)
            if name != "init_step":
                break
            continue
        kernel = _KERNEL.match(line)
        if kernel is None:
            if "decompressed" not in seen and _DECOMPRESSED.search(line):
                add("decompressed", None, end, line)
            continue
        guest_s, message = float(kernel.group(1)), kernel.group(2)
        if "kernel_started" not in seen:
            add("kernel_started", guest_s, end, message)
            continue
        for name, pattern in _KERNEL_MILESTONES:
            if name not in seen and pattern.search(message):
                add(name, guest_s, end, message)
                break
    return events
