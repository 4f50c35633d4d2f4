"""Measuring an EIF: PCR0, PCR1, PCR2 (and PCR8) and, in the same read, the CRC (docs/pcrs.md).

:func:`measure_eif` computes PCR0/1/2/8 and :func:`measure_and_check` also the CRC, in one
streaming read with flat memory: two threads, each reading its own windows of the file, run
the two SHA-384 chains that cover the application ramdisks (PCR0's and PCR2's) on two cores,
and the CRC rides on the second one while each slice is still in cache.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from harness.eif.format import (
    CHUNK_SIZE, MEASURED, SECTION_HEADER_SIZE, Eif, Section, SectionType, crc32,
    decode_signature_section, fail, first_cert_der,
)
from harness.eif.reader import crc_walk, parsed
from harness.eif.sources import FileRange, chunks
from harness.errors import ErrorCode
from harness.pcr import ZERO_PCR, Measurements, ext, pcr_for_certificate_der


class _Window:
    """Reads ``[offset, offset+size)`` of a file window by window, for one thread.

    Each window (``CHUNK_SIZE``) is mapped read-only with MAP_POPULATE (no copy out of the
    page cache) or, where the file cannot be mapped (some FUSE and network file systems) or
    ``NITRO_HARNESS_EIF_NO_MMAP=1``, read with ``preadv`` into this reader's own buffer, so
    two threads can read the same file at once without sharing a file position. One window
    (and at most one buffer) per reader is alive, so memory stays flat whatever the file size.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.use_mmap = _MMAP_FLAGS != 0 and os.environ.get("NITRO_HARNESS_EIF_NO_MMAP") != "1"
        self.buf: bytearray | None = None

    def slices(self, offset: int, size: int, stop: threading.Event):
        """Yield memoryviews of at most ``_SLICE`` bytes covering the range, in order.

        Raises OSError when the file is shorter than the range; stops early once ``stop``
        is set (the other reader failed or the user interrupted)."""
        pos, end = offset, offset + size
        while pos < end and not stop.is_set():
            n = min(CHUNK_SIZE, end - pos)
            window: Any = None
            if self.use_mmap:
                base = pos - pos % mmap.ALLOCATIONGRANULARITY
                try:
                    window = mmap.mmap(self.fd, pos + n - base, flags=_MMAP_FLAGS,
                                       prot=mmap.PROT_READ, offset=base)
                except (OSError, ValueError):
                    self.use_mmap = False  # not mappable: read instead
            if window is None:
                if self.buf is None:
                    self.buf = bytearray(CHUNK_SIZE)
                base = pos
                got = 0
                with memoryview(self.buf) as view:
                    while got < n:  # network and FUSE file systems may return less
                        step = os.preadv(self.fd, [view[got:n]], pos + got)
                        if step == 0:
                            raise OSError(f"file shrank while reading at offset {pos + got}")
                        got += step
                window = self.buf
            try:
                with memoryview(window) as whole:
                    for at in range(pos - base, pos - base + n, _SLICE):
                        with whole[at:min(at + _SLICE, pos - base + n)] as piece:
                            yield piece
            finally:
                if window is not self.buf:
                    window.close()
            pos += n


#: Hashed and CRC-checked slice: small enough to stay in the core's L2 between the SHA-384
#: pass and the CRC pass (so the CRC costs almost nothing), large enough that hashlib and
#: zlib-ng release the GIL and per-call overhead vanishes.
_SLICE = 256 << 10

_MMAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class PcrChains:
    """The hash chains of docs/pcrs.md, fed in reading order, as QEMU's loader and nitro-cli's
    reader do.

    Readers walk sections in their order (the hypervisor and QEMU: table order) and feed
    kernel, cmdline and every ramdisk to the PCR0 chain, kernel, cmdline and the first ramdisk
    to the PCR1 chain, and every later ramdisk to the PCR2 chain. When kernel, cmdline and the
    first ramdisk all come before any later ramdisk (always so in nitro-cli's layout), PCR1's
    input is a prefix of PCR0's and its state is a copy of PCR0's taken once (one pass with a
    copied hasher state); otherwise a separate PCR1 chain is kept.
    ``roles`` gives, per measured section in reading order, ``"boot"`` or ``"app"``.
    """

    def __init__(self, types: Sequence[SectionType]):
        measured = [t for t in types if t in MEASURED]
        self.roles: list[str] = []
        seen_ramdisk = False
        for t in measured:
            if t == SectionType.RAMDISK and seen_ramdisk:
                self.roles.append("app")
            else:
                self.roles.append("boot")
                seen_ramdisk = seen_ramdisk or t == SectionType.RAMDISK
        boot_at = [i for i, r in enumerate(self.roles) if r == "boot"]
        first_app = self.roles.index("app") if "app" in self.roles else len(self.roles)
        self.prefix = bool(boot_at) and max(boot_at) < first_app
        self._last_boot = max(boot_at) if boot_at else -1
        self.h0 = hashlib.sha384()
        self.h2 = hashlib.sha384()
        self.h1 = None if self.prefix else hashlib.sha384()
        self._h1_digest: bytes | None = None
        self._pos = 0

    def role(self) -> str:
        """Role of the next measured section ("boot" or "app")."""
        return self.roles[self._pos]

    def feed_boot(self, data: Any) -> None:
        """Feed a chunk of a boot section (kernel, cmdline, first ramdisk)."""
        self.h0.update(data)
        if self.h1 is not None:
            self.h1.update(data)

    def feed_app(self, data: Any) -> None:
        """Feed a chunk of a later ramdisk on this thread (the writer's path)."""
        self.h0.update(data)
        self.h2.update(data)

    def end_section(self) -> None:
        """Mark the current measured section complete."""
        if self.prefix and self._pos == self._last_boot:
            self._h1_digest = self.h0.copy().digest()
        self._pos += 1

    def result(self, pcr8: bytes | None = None) -> Measurements:
        """The measurements, once every measured section was fed."""
        h1 = self._h1_digest if self.prefix else self.h1.digest()  # type: ignore[union-attr]
        assert h1 is not None
        return Measurements(ext(self.h0.digest()), ext(h1), ext(self.h2.digest()), pcr8)


def _measure_open(path: Path, f: BinaryIO, eif: Eif, *,
                  with_crc: bool) -> tuple[Measurements, int | None]:
    """One streaming read in table order: PCR0/1/2 (and PCR8) plus, optionally, the CRC.

    docs/pcrs.md: PCR0's and PCR2's chains both cover every ramdisk after the first, so that
    data is hashed twice; hashlib releases the GIL, so the two SHA-384 chains run on two cores.
    This thread reads the measured sections and feeds PCR0 (and PCR1); a second thread reads
    the whole file in table order on its own, feeds PCR2 with the application ramdisks and
    runs the CRC over each slice right after hashing it, while the slice is still in cache.
    That balances the two: PCR0's chain also covers kernel, cmdline and bootstrap ramdisk.
    """
    sections = eif.sections
    pcrs = PcrChains([s.type for s in sections])
    roles = iter(pcrs.roles)
    plan = [(s, next(roles) if s.type in MEASURED else None) for s in sections]
    stop = threading.Event()
    errors: list[tuple[Section | None, BaseException]] = []
    lane_result: list[int | None] = []  # the CRC (or None), appended as the lane's last act

    # The lane reads through its own descriptor and closes it itself: after a Ctrl-C the
    # caller may close ``f`` while the lane finishes its last window.
    lane_fd = os.dup(f.fileno())

    def crc_and_pcr2_lane() -> None:
        s: Section | None = None
        try:
            reader = _Window(lane_fd)
            c = eif.header.crc_start() if with_crc else None
            for s, role in plan:
                if c is not None:
                    c = crc32(s.header_bytes(), c)
                if role != "app" and c is None:
                    continue
                for piece in reader.slices(s.data_offset, s.size, stop):
                    if role == "app":
                        pcrs.h2.update(piece)
                    if c is not None:
                        c = crc32(piece, c)
            if not stop.is_set():
                lane_result.append(c)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append((s, e))
            stop.set()
        finally:
            os.close(lane_fd)

    needed = with_crc or "app" in pcrs.roles
    lane = threading.Thread(target=crc_and_pcr2_lane, daemon=True, name="eif-crc-pcr2")
    started = finished = False
    try:
        if needed:
            lane.start()
            started = True
        reader = _Window(f.fileno())
        for s, role in plan:
            if role is None:
                continue
            # Boot sections feed PCR1 too when it has its own chain (unusual table orders).
            feeds = [pcrs.h0, pcrs.h1] if role == "boot" and pcrs.h1 is not None else [pcrs.h0]
            try:
                for piece in reader.slices(s.data_offset, s.size, stop):
                    for h in feeds:
                        h.update(piece)
            except OSError as e:
                errors.append((s, e))
                stop.set()
                break
            pcrs.end_section()  # takes PCR1's copy of PCR0 after the last boot section
        finished = True
    finally:
        if not finished:
            stop.set()  # Ctrl-C or an unexpected error: the lane stops at its next window
        if not started:
            os.close(lane_fd)
        if started:
            try:
                lane.join()
            except BaseException:
                stop.set()
                raise
    if not errors and (stop.is_set() or (needed and not lane_result)):
        # A stopped lane measured only part of the file: never return that as a result.
        errors.append((None, RuntimeError("the measuring pass stopped before the end")))
    if errors:
        s, e = errors[0]
        if not isinstance(e, OSError):
            raise e
        where = f"section {s.index}" if s is not None else "header"
        raise fail(path, where, f"read failed: {e}") from None
    pcr8 = None
    if eif.signature_raw is not None:
        cert_pem, _cose = decode_signature_section(path, eif.signature_raw)
        pcr8 = pcr_for_certificate_der(first_cert_der(path, cert_pem))
    return pcrs.result(pcr8), lane_result[0] if lane_result else None


def measure_eif(path: Path | str) -> Measurements:
    """Return PCR0, PCR1, PCR2 (and PCR8 when signed) of an EIF in one streaming read.

    docs/pcrs.md: PCR0 = ext(SHA384(kernel || cmdline || ramdisks)), PCR1 = ext(SHA384(kernel ||
    cmdline || ramdisk 0)), PCR2 = ext(SHA384(ramdisks after the first)), PCR8 =
    ext(SHA384(DER of the signing certificate)); sections are hashed in table order, as
    QEMU's loader does (which is the order above for every EIF nitro-cli writes). The PCR1
    state is a copy of PCR0's after ramdisk 0; PCR0's and PCR2's chains over the application
    ramdisks run on two threads, each reading its own 2 MiB windows, so memory stays flat
    (one window per thread) whatever the file size.
    Raises ``NitroError(E35)`` for an invalid EIF.
    """
    m, _ = measure_and_check(path, with_crc=False)
    return m


def measure_and_check(path: Path | str, *, with_crc: bool = True) -> tuple[Measurements, Eif]:
    """Validate, measure and (with ``with_crc``) CRC-check an EIF in one streaming read.

    Returns ``(measurements, eif)`` where ``eif.crc_computed`` is set when ``with_crc``. This
    is what ``describe-eif`` uses. Raises ``NitroError(E35)`` for an invalid EIF.
    """
    with parsed(path) as (f, eif, walk, walk_err):
        m, crc = _measure_open(Path(path), f, eif, with_crc=with_crc)
        eif.crc_computed = crc
        if with_crc and eif.sequential_notes:
            eif.sequential_crc = None if walk_err else crc_walk(f, eif.header, walk)
        if not walk_err:
            table = [(int(s.type), s.data_offset, s.size) for s in eif.sections if s.type in MEASURED]
            seq = [(t, off + SECTION_HEADER_SIZE, size) for off, t, size in walk
                   if t in (1, 2, 3)]
            if seq != table:
                # nitro-cli measures what its walk finds, in file order: say what it would print.
                seen = _measure_ranges(f, seq)
                if seen != m:
                    eif.sequential_notes.append(
                        f"nitro-cli would report different PCRs: PCR0 {seen.pcr0.hex()}, PCR1 "
                        f"{seen.pcr1.hex()}, PCR2 {seen.pcr2.hex()}")
    return m, eif


def _measure_ranges(f: BinaryIO, ranges: list[tuple[int, int, int]]) -> Measurements:
    """PCR0/1/2 over ``(type, data offset, size)`` ranges in the given order (one thread)."""
    pcrs = PcrChains([SectionType(t) for t, _, _ in ranges])
    if "boot" not in pcrs.roles or not any(t == 3 for t, _, _ in ranges):
        return Measurements(ZERO_PCR, ZERO_PCR, ZERO_PCR)  # nitro-cli would find no image
    for t, off, size in ranges:
        feed = pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot
        for b in chunks(FileRange(f, off, size), size, ErrorCode.EifParsingError, "section"):
            feed(b)
        pcrs.end_section()
    return pcrs.result()
