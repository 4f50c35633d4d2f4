"""Enclave Image Files: read (as the hypervisor does), measure, write, sign, verify, unpack.

SPEC 1 is the byte layout, SPEC 2 the measurements. Two readers exist in the wild and this
module implements both views of a file:

* the hypervisor's (and QEMU's): follow the section table in the 548-byte header;
* nitro-cli's: walk sections sequentially from byte 548, ignoring the table.

:func:`read_eif` follows the table, validates every structural rule, computes the CRC in table
order and reports, in :attr:`Eif.sequential_notes`, where nitro-cli's walk would read the file
differently (gaps, trailing bytes, a different order). :func:`measure_eif` computes PCR0/1/2/8
and :func:`measure_and_check` also the CRC, in one streaming read with flat memory. :func:`write_eif` writes sections in
nitro-cli's order; :func:`sign_eif` (re-)signs; :func:`verify_eif_signature` checks a signature;
:func:`extract_boot_files` produces the kernel, command line and initrd QEMU boots.

Every user-facing failure is ``NitroError(E35 EifParsingError, "<file>: <field>: <rule>")``
(E48 for building, E59 for signature checking, E60 for signing).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import hashlib
import json
import mmap
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import cbor2

from harness.errors import ErrorCode, NitroError
from harness.pcr import ZERO_PCR, Measurements, ext, pcr_for_certificate_der

try:  # zlib-ng's crc32 uses carry-less multiplication: ~5x stock zlib; same CRC-32.
    from zlib_ng import zlib_ng as _crc_impl  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _crc_impl = zlib

_crc32: Callable[[Any, int], int] = _crc_impl.crc32

# --- layout (SPEC 1) ---------------------------------------------------------------------

EIF_MAGIC = b".eif"
HEADER_SIZE = 548
#: The CRC covers header bytes [0, 544): all but the CRC itself (the unused word is included).
HEADER_CRC_SPAN = 544
SECTION_HEADER_SIZE = 12
MAX_SECTIONS = 32
#: Version nitro-cli writes today (v4 made metadata mandatory).
CURRENT_VERSION = 4
#: Versions this reader understands (v2 first public, v3 signature, v4 metadata).
KNOWN_VERSIONS = (2, 3, 4)
FLAG_AARCH64 = 0x1
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2

_HEADER = struct.Struct(">4sHHQQHH32Q32QII")
_SECTION = struct.Struct(">HHQ")
assert _HEADER.size == HEADER_SIZE and _SECTION.size == SECTION_HEADER_SIZE

#: Streaming chunk: large enough that hashlib/zlib release the GIL and per-call overhead
#: vanishes, small enough that memory stays flat (one window of this size per reading thread).
CHUNK_SIZE = 2 << 20

#: ``BuildTool`` written into the metadata (nitro-cli writes its own name there).
BUILD_TOOL = "nitro-harness"


class SectionType(enum.IntEnum):
    """EIF section types (SPEC 1); 0 and >= 6 are invalid."""

    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


def _fail(path: Path | str, field_: str, rule: str,
          code: ErrorCode = ErrorCode.EifParsingError) -> NitroError:
    return NitroError(code, f"{path}: {field_}: {rule}")


@dataclass(frozen=True)
class EifHeader:
    """The 548-byte EIF header (SPEC 1), integers as Python ints, ``offsets``/``sizes`` 32 each."""

    magic: bytes = EIF_MAGIC
    version: int = CURRENT_VERSION
    flags: int = 0
    default_mem: int = DEFAULT_MEM
    default_cpus: int = DEFAULT_CPUS
    reserved: int = 0
    num_sections: int = 0
    offsets: tuple[int, ...] = (0,) * MAX_SECTIONS
    sizes: tuple[int, ...] = (0,) * MAX_SECTIONS
    unused: int = 0
    crc32: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "EifHeader":
        """Parse 548 bytes (big-endian, no padding)."""
        v = _HEADER.unpack(raw)
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], v[6], tuple(v[7:39]), tuple(v[39:71]),
                   v[71], v[72])

    def pack(self) -> bytes:
        """Serialise to 548 bytes."""
        return _HEADER.pack(self.magic, self.version, self.flags, self.default_mem,
                            self.default_cpus, self.reserved, self.num_sections, *self.offsets,
                            *self.sizes, self.unused, self.crc32)


@dataclass(frozen=True)
class Section:
    """One section as the table describes it: slot ``index``, ``type``, header ``offset``, data ``size``."""

    index: int
    type: SectionType
    flags: int
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        """File offset of the section's data (after its 12-byte header)."""
        return self.offset + SECTION_HEADER_SIZE

    @property
    def end(self) -> int:
        """File offset one past the section's last data byte."""
        return self.data_offset + self.size

    def header_bytes(self) -> bytes:
        """The 12-byte section header as stored."""
        return _SECTION.pack(int(self.type), self.flags, self.size)


@dataclass
class Eif:
    """A parsed, validated EIF (section-table view) plus what nitro-cli's view would see.

    ``sections`` are in table order. ``crc_computed`` is the table-order CRC (SPEC 1) when it
    was checked, else None; ``sequential_notes`` lists, in words, where nitro-cli's sequential
    reader disagrees with the table (empty for every file nitro-cli itself writes);
    ``sequential_crc`` is the CRC nitro-cli would compute (None if its walk fails or was not
    needed because the views agree, in which case it equals ``crc_computed``).
    """

    path: Path
    file_size: int
    header: EifHeader
    sections: list[Section]
    crc_computed: int | None = None
    sequential_crc: int | None = None
    sequential_notes: list[str] = field(default_factory=list)
    metadata: dict | None = None
    signature_raw: bytes | None = None

    @property
    def version(self) -> int:
        """Header version (4 for current nitro-cli)."""
        return self.header.version

    @property
    def crc_ok(self) -> bool | None:
        """True/False when the CRC was checked, None when not."""
        if self.crc_computed is None:
            return None
        return self.crc_computed == self.header.crc32

    def of_type(self, t: SectionType) -> list[Section]:
        """Sections of one type, in table order."""
        return [s for s in self.sections if s.type == t]

    @property
    def kernel(self) -> Section:
        """The kernel section."""
        return self.of_type(SectionType.KERNEL)[0]

    @property
    def cmdline_section(self) -> Section:
        """The cmdline section."""
        return self.of_type(SectionType.CMDLINE)[0]

    @property
    def ramdisks(self) -> list[Section]:
        """Ramdisk sections in table order (bootstrap first)."""
        return self.of_type(SectionType.RAMDISK)

    @property
    def is_signed(self) -> bool:
        """True when a signature section is present."""
        return self.signature_raw is not None

    def read_section(self, section: Section) -> bytes:
        """Return a section's data (use only for small sections)."""
        with open(self.path, "rb") as f:
            f.seek(section.data_offset)
            return f.read(section.size)

    @property
    def cmdline(self) -> str:
        """The kernel command line (SPEC 1: trimmed bytes, no trailing NUL)."""
        raw = self.read_section(self.cmdline_section)
        try:
            return raw.decode("utf-8").rstrip("\0").strip()
        except UnicodeDecodeError:
            raise _fail(self.path, "cmdline", "is not valid UTF-8") from None


# --- reading -----------------------------------------------------------------------------


def _parse_layout(path: Path, f: BinaryIO, file_size: int) -> tuple[EifHeader, list[Section]]:
    """Parse the header and section headers, enforcing every structural rule of SPEC 1."""
    if file_size < HEADER_SIZE:
        raise _fail(path, "header", f"truncated: file has {file_size} bytes, the EIF header "
                                    f"needs {HEADER_SIZE}")
    f.seek(0)
    hdr = EifHeader.unpack(f.read(HEADER_SIZE))
    if hdr.magic != EIF_MAGIC:
        raise _fail(path, "magic", f"{hdr.magic.hex()} is not 2e656966 ('.eif')")
    if hdr.version not in KNOWN_VERSIONS:
        raise _fail(path, "version", f"{hdr.version} is not a known EIF version "
                                     f"({', '.join(map(str, KNOWN_VERSIONS))})")
    if hdr.flags & ~FLAG_AARCH64:
        raise _fail(path, "flags", f"0x{hdr.flags:04x} has bits other than bit 0 (aarch64) set")
    if hdr.num_sections == 0:
        raise _fail(path, "num_sections", "is 0; an EIF needs kernel, cmdline and a ramdisk")
    if hdr.num_sections > MAX_SECTIONS:
        raise _fail(path, "num_sections", f"{hdr.num_sections} exceeds the maximum of "
                                          f"{MAX_SECTIONS} sections")
    for i in range(hdr.num_sections, MAX_SECTIONS):
        if hdr.offsets[i] or hdr.sizes[i]:
            raise _fail(path, f"section_offsets[{i}]/section_sizes[{i}]",
                        f"unused slot (num_sections={hdr.num_sections}) must be 0")
    sections: list[Section] = []
    for i in range(hdr.num_sections):
        off, size = hdr.offsets[i], hdr.sizes[i]
        where = f"section {i}"
        if off < HEADER_SIZE:
            raise _fail(path, f"{where} offset", f"{off} lies inside the {HEADER_SIZE}-byte "
                                                 "header")
        if off + SECTION_HEADER_SIZE > file_size:
            raise _fail(path, f"{where} offset", f"section header at {off} overruns the file "
                                                 f"({file_size} bytes)")
        f.seek(off)
        stype, sflags, ssize = _SECTION.unpack(f.read(SECTION_HEADER_SIZE))
        try:
            t = SectionType(stype)
        except ValueError:
            raise _fail(path, f"{where} type", f"unknown section type {stype} at offset {off} "
                                               "(valid: 1-5)") from None
        if sflags != 0:
            raise _fail(path, f"{where} flags", f"0x{sflags:04x} must be 0")
        if ssize != size:
            raise _fail(path, f"{where} size", f"table says {size} bytes but the section "
                                               f"header says {ssize}")
        if off + SECTION_HEADER_SIZE + size > file_size:
            raise _fail(path, f"{where} ({t.name.lower()}) size",
                        f"{size} bytes at offset {off + SECTION_HEADER_SIZE} overrun the file "
                        f"({file_size} bytes)")
        sections.append(Section(i, t, sflags, off, size))
    by_offset = sorted(sections, key=lambda s: s.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.offset < a.end:
            raise _fail(path, f"section {b.index} offset",
                        f"overlaps section {a.index} (bytes {a.offset}-{a.end - 1})")
    counts = {t: sum(1 for s in sections if s.type == t) for t in SectionType}
    if counts[SectionType.KERNEL] != 1:
        raise _fail(path, "sections", f"{counts[SectionType.KERNEL]} kernel sections; exactly "
                                      "one is required")
    if counts[SectionType.CMDLINE] != 1:
        raise _fail(path, "sections", f"{counts[SectionType.CMDLINE]} cmdline sections; exactly "
                                      "one is required")
    if counts[SectionType.RAMDISK] < 1:
        raise _fail(path, "sections", "no ramdisk section; at least one is required")
    if counts[SectionType.SIGNATURE] > 1:
        raise _fail(path, "sections", "more than one signature section")
    if counts[SectionType.METADATA] > 1:
        raise _fail(path, "sections", "more than one metadata section")
    return hdr, sections


def _sequential_walk(f: BinaryIO, file_size: int) -> tuple[list[tuple[int, int, int]], str | None]:
    """Walk sections from byte 548 the way nitro-cli's reader does (headers only).

    Returns ``([(offset, type, size), ...], error)``; ``error`` is what would stop nitro-cli
    (an invalid type, a size past the end), else None. A tail shorter than 12 bytes ends the
    walk silently, as it does in nitro-cli.
    """
    out: list[tuple[int, int, int]] = []
    pos = HEADER_SIZE
    while pos + SECTION_HEADER_SIZE <= file_size:
        f.seek(pos)
        stype, _flags, size = _SECTION.unpack(f.read(SECTION_HEADER_SIZE))
        if stype not in (1, 2, 3, 4, 5):
            return out, f"invalid section type {stype} at offset {pos}"
        if pos + SECTION_HEADER_SIZE + size > file_size:
            return out, f"section of {size} bytes at offset {pos} runs past the end"
        out.append((pos, stype, size))
        pos += SECTION_HEADER_SIZE + size
    if pos != file_size:
        return out, None  # nitro-cli stops at a short tail without complaint
    return out, None


def _compare_views(sections: list[Section], walk: list[tuple[int, int, int]],
                   walk_error: str | None, file_size: int) -> list[str]:
    """Describe, in words, where nitro-cli's sequential view differs from the table's."""
    notes: list[str] = []
    table = [(s.offset, int(s.type), s.size) for s in sorted(sections, key=lambda s: s.offset)]
    if walk_error:
        notes.append(f"nitro-cli's sequential reader would fail: {walk_error}")
    if walk != table:
        walked = {w[0] for w in walk}
        for s in sorted(sections, key=lambda s: s.offset):
            if s.offset not in walked:
                notes.append(f"section {s.index} ({s.type.name.lower()}) at offset {s.offset} "
                             "is not where the sequential reader looks (gap or misalignment)")
        tab = {t[0] for t in table}
        for w in walk:
            if w[0] not in tab:
                notes.append(f"sequential reader would see a {SectionType(w[1]).name.lower()} "
                             f"section of {w[2]} bytes at offset {w[0]} that the table does "
                             "not list")
    last_end = max(s.end for s in sections)
    if last_end < file_size:
        notes.append(f"{file_size - last_end} trailing bytes after the last section "
                     f"(offset {last_end})")
    file_order = [s.index for s in sorted(sections, key=lambda s: s.offset)]
    if file_order != [s.index for s in sections]:
        notes.append(f"table order {[s.index for s in sections]} differs from file order "
                     f"{file_order}: nitro-cli measures in file order")
    return notes


@contextlib.contextmanager
def _parsed(path: Path | str):
    """Open an EIF, parse and check its layout, compare nitro-cli's sequential view and load
    the small sections; yields ``(file, eif, walk, walk_error)`` with the file still open.
    Raises NitroError E19 when it cannot be opened, E35 for a violated rule."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{path}: open: {e.strerror or e}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        hdr, sections = _parse_layout(path, f, file_size)
        eif = Eif(path, file_size, hdr, sections)
        walk, walk_err = _sequential_walk(f, file_size)
        eif.sequential_notes = _compare_views(sections, walk, walk_err, file_size)
        _load_small_sections(eif, f)
        yield f, eif, walk, walk_err


def read_eif(path: Path | str, *, check_crc: bool = True) -> Eif:
    """Parse and validate an EIF the way the hypervisor does (following the section table).

    Checks (SPEC 1): size >= 548, magic, known version, header flags (bit 0 only), 1 <=
    num_sections <= 32, unused slots zero, every section header inside the file with a valid
    type (1-5), flags 0, size equal to the table's, data inside the file, no overlaps, exactly
    one kernel and one cmdline, at least one ramdisk, at most one signature and one metadata
    section, metadata a JSON object, signature section decodable CBOR. With ``check_crc`` the
    whole file is read once to compute the table-order CRC (a mismatch is reported through
    :attr:`Eif.crc_ok`, not raised). Differences with nitro-cli's sequential reading are in
    :attr:`Eif.sequential_notes`, and when they exist ``sequential_crc`` holds the CRC nitro-cli
    would compute.

    Raises ``NitroError(E35)`` "<file>: <field>: <rule>" for any violated rule, E19 when the
    file cannot be opened.
    """
    with _parsed(path) as (f, eif, walk, walk_err):
        if check_crc:
            eif.crc_computed = _crc_table_order(f, eif.header, eif.sections)
            if eif.sequential_notes:
                eif.sequential_crc = None if walk_err else _crc_walk(f, eif.header, walk)
    return eif


#: Upper bounds for the sections read into memory: metadata is a few KiB in practice
#: (custom metadata <= 4096 bytes plus docker inspect), a signature well under 16 KiB.
MAX_METADATA_SIZE = 16 << 20
MAX_SIGNATURE_SIZE = 1 << 20


def _load_small_sections(eif: Eif, f: BinaryIO) -> None:
    """Read and decode metadata and signature sections (both small), validating them."""
    for s in eif.sections:
        limit = {SectionType.METADATA: MAX_METADATA_SIZE,
                 SectionType.SIGNATURE: MAX_SIGNATURE_SIZE}.get(s.type)
        if limit is not None and s.size > limit:
            raise _fail(eif.path, f"section {s.index} ({s.type.name.lower()}) size",
                        f"{s.size} bytes exceeds the {limit}-byte limit for this section type")
    for s in eif.of_type(SectionType.METADATA):
        f.seek(s.data_offset)
        raw = f.read(s.size)
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(eif.path, "metadata", f"is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise _fail(eif.path, "metadata", "must be a JSON object")
        eif.metadata = meta
    for s in eif.of_type(SectionType.SIGNATURE):
        f.seek(s.data_offset)
        eif.signature_raw = f.read(s.size)
        _decode_signature_section(eif.path, eif.signature_raw)  # validates the structure


def _crc_table_order(f: BinaryIO, hdr: EifHeader, sections: Sequence[Section]) -> int:
    """CRC-32 over header[0:544] then each section's header and data in table order (SPEC 1)."""
    crc = _crc32(hdr.pack()[:HEADER_CRC_SPAN], 0)
    buf = bytearray(CHUNK_SIZE)
    mv = memoryview(buf)
    for s in sections:
        crc = _crc32(s.header_bytes(), crc)
        f.seek(s.data_offset)
        left = s.size
        while left:
            n = f.readinto(mv[: min(CHUNK_SIZE, left)])
            if not n:
                raise OSError("file shrank while reading")
            crc = _crc32(mv[:n], crc)
            left -= n
    return crc


def _crc_walk(f: BinaryIO, hdr: EifHeader, walk: list[tuple[int, int, int]]) -> int:
    """The CRC nitro-cli's sequential reader computes: header then walked sections in file order."""
    crc = _crc32(hdr.pack()[:HEADER_CRC_SPAN], 0)
    for off, _t, size in walk:
        f.seek(off)
        left = SECTION_HEADER_SIZE + size
        while left:
            b = f.read(min(CHUNK_SIZE, left))
            if not b:
                raise OSError("file shrank while reading")
            crc = _crc32(b, crc)
            left -= len(b)
    return crc


def eif_metadata(path: Path | str) -> dict | None:
    """Return the EIF's metadata JSON object, or None when it has no metadata section.

    Reads only headers and the metadata section. Raises ``NitroError(E35)`` as
    :func:`read_eif` does.
    """
    return read_eif(path, check_crc=False).metadata


# --- measuring ---------------------------------------------------------------------------


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


_MEASURED = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK)


class _Pcrs:
    """SPEC 2 hash chains fed in reading order, as QEMU's loader and nitro-cli's reader do.

    Readers walk sections in their order (the hypervisor and QEMU: table order) and feed
    kernel, cmdline and every ramdisk to the PCR0 chain, kernel, cmdline and the first ramdisk
    to the PCR1 chain, and every later ramdisk to the PCR2 chain. When kernel, cmdline and the
    first ramdisk all come before any later ramdisk (always so in nitro-cli's layout), PCR1's
    input is a prefix of PCR0's and its state is a copy of PCR0's taken once (SPEC 2: "one
    pass with a copied hasher state"); otherwise a separate PCR1 chain is kept.
    ``roles`` gives, per measured section in reading order, ``"boot"`` or ``"app"``.
    """

    def __init__(self, types: Sequence[SectionType]):
        measured = [t for t in types if t in _MEASURED]
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

    SPEC 2: PCR0's and PCR2's chains both cover every ramdisk after the first, so that data
    is hashed twice; hashlib releases the GIL, so the two SHA-384 chains run on two cores.
    This thread reads the measured sections and feeds PCR0 (and PCR1); a second thread reads
    the whole file in table order on its own, feeds PCR2 with the application ramdisks and
    runs the CRC over each slice right after hashing it, while the slice is still in cache.
    That balances the two: PCR0's chain also covers kernel, cmdline and bootstrap ramdisk.
    """
    sections = eif.sections
    pcrs = _Pcrs([s.type for s in sections])
    roles = iter(pcrs.roles)
    plan = [(s, next(roles) if s.type in _MEASURED else None) for s in sections]
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
            c = _crc32(eif.header.pack()[:HEADER_CRC_SPAN], 0) if with_crc else None
            for s, role in plan:
                if c is not None:
                    c = _crc32(s.header_bytes(), c)
                if role != "app" and c is None:
                    continue
                for piece in reader.slices(s.data_offset, s.size, stop):
                    if role == "app":
                        pcrs.h2.update(piece)
                    if c is not None:
                        c = _crc32(piece, c)
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
        raise _fail(path, where, f"read failed: {e}") from None
    pcr8 = None
    if eif.signature_raw is not None:
        cert_pem, _cose = _decode_signature_section(path, eif.signature_raw)
        pcr8 = pcr_for_certificate_der(_first_cert_der(path, cert_pem))
    return pcrs.result(pcr8), lane_result[0] if lane_result else None


def measure_eif(path: Path | str) -> Measurements:
    """Return PCR0, PCR1, PCR2 (and PCR8 when signed) of an EIF in one streaming read.

    SPEC 2: PCR0 = ext(SHA384(kernel || cmdline || ramdisks)), PCR1 = ext(SHA384(kernel ||
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
    with _parsed(path) as (f, eif, walk, walk_err):
        m, crc = _measure_open(Path(path), f, eif, with_crc=with_crc)
        eif.crc_computed = crc
        if with_crc and eif.sequential_notes:
            eif.sequential_crc = None if walk_err else _crc_walk(f, eif.header, walk)
        if not walk_err:
            table = [(int(s.type), s.data_offset, s.size) for s in eif.sections if s.type in _MEASURED]
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
    pcrs = _Pcrs([SectionType(t) for t, _, _ in ranges])
    if "boot" not in pcrs.roles or not any(t == 3 for t, _, _ in ranges):
        return Measurements(ZERO_PCR, ZERO_PCR, ZERO_PCR)  # nitro-cli would find no image
    for t, off, size in ranges:
        feed = pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot
        for b in _chunks(_FileRange(f, off, size), size, ErrorCode.EifParsingError, "section"):
            feed(b)
        pcrs.end_section()
    return pcrs.result()


# --- metadata (SPEC 1) -------------------------------------------------------------------


def _sorted_json(value: Any) -> Any:
    """Recursively sort object keys (serde_json's default map type orders keys)."""
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


def build_metadata(*, image_name: str, image_version: str = "1.0",
                   build_time: _dt.datetime | str | None = None, kernel_version: str = "unknown",
                   docker_info: dict | None = None, custom_metadata: dict | None = None,
                   build_tool: str = BUILD_TOOL, build_tool_version: str | None = None,
                   operating_system: str = "linux") -> dict:
    """Return the metadata object nitro-cli writes (SPEC 1), keys in nitro-cli's order.

    ``build_time`` defaults to now (UTC) in RFC 3339; ``docker_info`` is a ``docker inspect``
    object or None; ``custom_metadata`` is the user's JSON object or None. Nested objects
    are key-sorted, as serde_json emits them.
    """
    if build_tool_version is None:
        from harness import __version__ as build_tool_version  # noqa: N813
    if build_time is None:
        build_time = _dt.datetime.now(_dt.timezone.utc)
    if isinstance(build_time, _dt.datetime):
        build_time = build_time.isoformat()
    return {
        "ImageName": image_name,
        "ImageVersion": image_version,
        "BuildMetadata": {
            "BuildTime": build_time,
            "BuildTool": build_tool,
            "BuildToolVersion": build_tool_version,
            "OperatingSystem": operating_system,
            "KernelVersion": kernel_version,
        },
        "DockerInfo": _sorted_json(docker_info) if docker_info is not None else None,
        "CustomMetadata": _sorted_json(custom_metadata) if custom_metadata is not None else None,
    }


def encode_metadata(metadata: dict) -> bytes:
    """Compact JSON bytes of a metadata object (no spaces, UTF-8, key order preserved)."""
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- signing (SPEC 1) --------------------------------------------------------------------

#: COSE algorithm per EC curve: (COSE alg id, hash, coordinate size in bytes).
_COSE_ALGS = {"secp256r1": (-7, "SHA256", 32), "secp384r1": (-35, "SHA384", 48),
              "secp521r1": (-36, "SHA512", 66)}


def _decode_signature_section(path: Path, raw: bytes) -> tuple[bytes, bytes]:
    """Decode the signature section into (certificate PEM bytes, COSE_Sign1 bytes) (SPEC 1)."""
    try:
        obj = cbor2.loads(raw)
    except Exception as e:  # noqa: BLE001 - cbor2 raises several types
        raise _fail(path, "signature", f"is not valid CBOR ({e})") from None
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], dict):
        raise _fail(path, "signature", "must be a CBOR array of PCR signature maps")
    first = obj[0]

    def as_bytes(key: str) -> bytes:
        v = first.get(key)
        if isinstance(v, list) and all(isinstance(x, int) and 0 <= x <= 255 for x in v):
            return bytes(v)
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        raise _fail(path, f"signature.{key}", "must be an array of byte values")

    return as_bytes("signing_certificate"), as_bytes("signature")


def _first_cert_der(path: Path | str, pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise _fail(path, "signing_certificate", f"is not a PEM certificate ({e})") from None
    return certs[0].public_bytes(Encoding.DER)


def pcr0_payload(pcr0: bytes) -> bytes:
    """Canonical signed payload: CBOR {"register_index": 0, "register_value": [48 uints]}."""
    return cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


@dataclass(frozen=True)
class Signer:
    """A signing identity: certificate PEM bytes and private key PEM bytes (EC P-256/384/521)."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, cert_path: Path | str, key_path: Path | str) -> "Signer":
        """Load both PEM files; raises ``NitroError(E60)`` naming a missing/unreadable file."""
        out = []
        for p in (cert_path, key_path):
            try:
                out.append(Path(p).read_bytes())
            except OSError as e:
                raise NitroError(ErrorCode.EIFSigningError,
                                 f"{p}: open: {e.strerror or e}") from None
        return cls(out[0], out[1])

    def _load(self, where: str = "signing key"):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: cannot load PEM ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: {type(key).__name__.lstrip('_')} is not an "
                             "EC key; only EC P-256, P-384 and P-521 keys can sign an EIF")
        if key.curve.name not in _COSE_ALGS:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: curve {key.curve.name} is not P-256, P-384 "
                             "or P-521")
        try:
            cert = x509.load_pem_x509_certificates(self.cert_pem)[0]
        except ValueError as e:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: signing certificate: not a PEM certificate ({e})") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: signing certificate: does not match the private key")
        return key, cert

    def sign_pcr0(self, pcr0: bytes, where: str = "signing key") -> bytes:
        """Return the signature section bytes for ``pcr0`` (SPEC 1 structure).

        COSE_Sign1 untagged: [bstr({1: alg}), {}, bstr(payload), r||s]; the section is a CBOR
        array of one map whose values are arrays of byte values. Raises ``NitroError(E60)``.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        key, _cert = self._load(where)
        alg, hname, size = _COSE_ALGS[key.curve.name]
        protected = cbor2.dumps({1: alg})
        payload = pcr0_payload(pcr0)
        der = key.sign(_sig_structure(protected, payload), ec.ECDSA(getattr(hashes, hname)()))
        r, s = decode_dss_signature(der)
        cose = cbor2.dumps([protected, {}, payload, r.to_bytes(size, "big") +
                            s.to_bytes(size, "big")])
        return cbor2.dumps([{"signing_certificate": list(self.cert_pem),
                             "signature": list(cose)}])


@dataclass(frozen=True)
class SignatureCheck:
    """Result of checking an EIF signature: ``ok``, a one-line ``reason``, and the certificate."""

    ok: bool
    reason: str
    certificate: Any = None  # cryptography.x509.Certificate


def verify_eif_signature(path: Path | str, cert_pem: bytes | None = None, *,
                         at: _dt.datetime | None = None,
                         measurements: Measurements | None = None) -> SignatureCheck:
    """Check an EIF's signature (SPEC 1); never raises for a bad signature, reports it.

    Checks: the section decodes; the certificate (from the EIF, or ``cert_pem`` to pin a
    given one, which must then equal the embedded one) is valid at ``at`` (default now);
    its key is EC P-256/384/521 and matches the COSE algorithm; the COSE_Sign1 has protected
    header exactly {1: alg}, empty unprotected header, a valid ECDSA signature over the
    Sig_structure; the payload is byte-equal to the canonical {"register_index": 0,
    "register_value": PCR0} of the image as measured. ``measurements`` avoids re-measuring.
    Raises ``NitroError(E35)`` only when the file is not a valid EIF, E59 when unsigned.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    path = Path(path)
    if measurements is None:
        measurements = measure_eif(path)
    eif = read_eif(path, check_crc=False)
    if eif.signature_raw is None:
        raise NitroError(ErrorCode.EIFSignatureCheckerError, f"{path}: signature: EIF is not signed")
    emb_pem, cose_raw = _decode_signature_section(path, eif.signature_raw)
    try:
        cert = x509.load_pem_x509_certificates(emb_pem)[0]
    except ValueError as e:
        return SignatureCheck(False, f"embedded certificate does not parse ({e})")
    if cert_pem is not None:
        try:
            pinned = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError as e:
            return SignatureCheck(False, f"given certificate does not parse ({e})", cert)
        if pinned != cert:
            return SignatureCheck(False, "embedded certificate differs from the given one", cert)
    now = at or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.timezone.utc)
    try:
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception as e:  # noqa: BLE001 - lazily decoded fields raise assorted errors
        return SignatureCheck(False, f"certificate validity does not decode ({e})", cert)
    if not nb <= now <= na:
        return SignatureCheck(False, f"certificate not valid at {now.isoformat()} "
                                     f"(valid {nb.isoformat()} to {na.isoformat()})", cert)
    try:
        pub = cert.public_key()
    except Exception as e:  # noqa: BLE001 - cryptography parses the key lazily
        return SignatureCheck(False, f"certificate public key does not parse ({e})", cert)
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in _COSE_ALGS:
        return SignatureCheck(False, "certificate key is not EC P-256/P-384/P-521", cert)
    alg, hname, size = _COSE_ALGS[pub.curve.name]
    try:
        cose = cbor2.loads(cose_raw)
    except Exception as e:  # noqa: BLE001
        return SignatureCheck(False, f"COSE_Sign1 is not CBOR ({e})", cert)
    if isinstance(cose, cbor2.CBORTag) and cose.tag == 18:
        cose = cose.value
    if not (isinstance(cose, list) and len(cose) == 4 and isinstance(cose[0], bytes)
            and isinstance(cose[2], bytes) and isinstance(cose[3], bytes)):
        return SignatureCheck(False, "COSE_Sign1 is not [bstr, map, bstr, bstr]", cert)
    protected, unprotected, payload, sig = cose
    if protected != cbor2.dumps({1: alg}):
        return SignatureCheck(False, f"protected header {protected.hex()} is not {{1: {alg}}} "
                                     f"for {pub.curve.name}", cert)
    if unprotected != {}:
        return SignatureCheck(False, "unprotected header is not empty", cert)
    if len(sig) != 2 * size:
        return SignatureCheck(False, f"signature is {len(sig)} bytes, expected {2 * size}", cert)
    r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
    try:
        pub.verify(encode_dss_signature(r, s), _sig_structure(protected, payload),
                   ec.ECDSA(getattr(hashes, hname)()))
    except InvalidSignature:
        return SignatureCheck(False, "ECDSA signature does not verify", cert)
    if payload != pcr0_payload(measurements.pcr0):
        return SignatureCheck(False, "signed payload is not the canonical encoding of this "
                                     "image's PCR0", cert)
    return SignatureCheck(True, "signature valid over PCR0", cert)


# --- writing -----------------------------------------------------------------------------


class _AtomicOutput:
    """Write to ``.<name>.tmp<pid>`` beside ``path`` and rename on success; unlink on failure."""

    def __init__(self, path: Path, code: ErrorCode):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.code = code

    def __enter__(self) -> BinaryIO:
        try:
            self.f = open(self.tmp, "w+b")
        except OSError as e:
            raise NitroError(self.code, f"{self.path}: create: {e.strerror or e}") from None
        return self.f

    def __exit__(self, et, ev, tb) -> None:
        try:
            self.f.close()
            if et is None:
                os.replace(self.tmp, self.path)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise NitroError(self.code, f"{self.path}: write: {e.strerror or e}") from None
        if et is not None:
            self.tmp.unlink(missing_ok=True)
            if issubclass(et, OSError):  # e.g. disk full: one line naming the output
                raise NitroError(self.code, f"{self.path}: write: {ev.strerror or ev}") from None


@dataclass
class _FileRange:
    """A byte range of an open file, used as a section source when copying between EIFs."""

    f: BinaryIO
    offset: int
    size: int


def _source_size(src: Any, what: str, code: ErrorCode) -> int:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    if isinstance(src, _FileRange):
        return src.size
    try:
        return Path(src).stat().st_size
    except OSError as e:
        raise NitroError(code, f"{src}: {what}: {e.strerror or e}") from None


def _chunks(src: Any, size: int, code: ErrorCode, what: str) -> Iterable[bytes]:
    """Yield a source's bytes in chunks; exactly ``size`` bytes or an error."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        yield bytes(src)
        return
    if isinstance(src, _FileRange):
        f, close = src.f, False
        f.seek(src.offset)
    else:
        try:
            f, close = open(src, "rb"), True
        except OSError as e:
            raise NitroError(code, f"{src}: {what}: {e.strerror or e}") from None
    try:
        left = size
        while left:
            b = f.read(min(CHUNK_SIZE, left))
            if not b:
                raise NitroError(code, f"{src}: {what}: shrank while being read")
            left -= len(b)
            yield b
    finally:
        if close:
            f.close()


def _write_sections(out: BinaryIO, items: list[tuple[SectionType, Any]], code: ErrorCode, *,
                    signer: Signer | None = None, base: EifHeader | None = None
                    ) -> tuple[Measurements, EifHeader]:
    """Write a complete EIF to ``out``: sections of ``items`` back to back, then the signature.

    Measures while writing (PCR0/1/2 in section order, as a table reader measures) so signing
    needs no second read of the inputs. The header (version,
    flags, default memory/CPUs taken from ``base``) is written last with the CRC, which is
    computed over the written bytes (page-cache hot). Raises ``NitroError(code)``.
    """
    base = base or EifHeader()
    if len(items) + (1 if signer else 0) > MAX_SECTIONS:
        raise NitroError(code, f"{out.name}: sections: more than {MAX_SECTIONS} sections")
    if not any(t == SectionType.RAMDISK for t, _ in items):
        raise NitroError(code, f"{out.name}: ramdisks: at least one ramdisk is required")
    pcrs = _Pcrs([t for t, _ in items])
    out.write(b"\0" * HEADER_SIZE)
    offsets: list[int] = []
    sizes: list[int] = []
    pos = HEADER_SIZE
    for t, src in items:
        what = t.name.lower()
        size = _source_size(src, what, code)
        offsets.append(pos)
        sizes.append(size)
        out.write(_SECTION.pack(int(t), 0, size))
        measured = t in _MEASURED
        feed = (pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot) if measured else None
        for b in _chunks(src, size, code, what):
            out.write(b)
            if feed is not None:
                feed(b)
        if measured:
            pcrs.end_section()
        pos += SECTION_HEADER_SIZE + size
    unsigned = pcrs.result()
    pcr0 = unsigned.pcr0
    pcr8 = None
    version = base.version
    if signer is not None:
        sig = signer.sign_pcr0(pcr0)
        offsets.append(pos)
        sizes.append(len(sig))
        out.write(_SECTION.pack(int(SectionType.SIGNATURE), 0, len(sig)))
        out.write(sig)
        pcr8 = pcr_for_certificate_der(_first_cert_der("signing certificate", signer.cert_pem))
        version = max(version, 3)  # v3 introduced the signature section
    n = len(offsets)
    hdr = EifHeader(version=version, flags=base.flags, default_mem=base.default_mem,
                    default_cpus=base.default_cpus, num_sections=n,
                    offsets=tuple(offsets) + (0,) * (MAX_SECTIONS - n),
                    sizes=tuple(sizes) + (0,) * (MAX_SECTIONS - n))
    # The file is gapless, so the table-order CRC is crc32(header[0:544] + file[548:]).
    out.flush()
    crc = _crc32(hdr.pack()[:HEADER_CRC_SPAN], 0)
    out.seek(HEADER_SIZE)
    while b := out.read(CHUNK_SIZE):
        crc = _crc32(b, crc)
    hdr = EifHeader(**{**hdr.__dict__, "crc32": crc})
    out.seek(0)
    out.write(hdr.pack())
    out.flush()
    return Measurements(pcr0, unsigned.pcr1, unsigned.pcr2, pcr8), hdr


def write_eif(out_path: Path | str, kernel: Path | str | bytes, cmdline: str,
              ramdisks: Sequence[Path | str | bytes], metadata: dict | None,
              signer: Signer | None = None, *, aarch64: bool = False) -> Measurements:
    """Write an EIF in nitro-cli's order and return its measurements (SPEC 1, SPEC 2).

    Order: kernel, cmdline (stripped, no NUL), metadata (compact JSON, when given), ramdisks
    in order (bootstrap first), then the signature when ``signer`` is given. Header: version
    4, flags 0 (bit 0 with ``aarch64``), default memory 1 GiB, 2 CPUs, CRC over header and
    sections. Sources are paths (streamed) or bytes. The file appears atomically (temporary
    name, then rename). Raises ``NitroError(E48)`` for unreadable inputs or no ramdisk,
    ``NitroError(E60)`` for a bad signing key (RSA, wrong curve, mismatching certificate).
    """
    out_path = Path(out_path)
    if not ramdisks:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{out_path}: ramdisks: at least one ramdisk is required")
    if signer is not None:
        signer._load(f"{out_path}")  # fail before writing anything
    items: list[tuple[SectionType, Any]] = [
        (SectionType.KERNEL, kernel),
        (SectionType.CMDLINE, cmdline.strip().rstrip("\0").encode("utf-8")),
    ]
    if metadata is not None:
        items.append((SectionType.METADATA, encode_metadata(metadata)))
    items += [(SectionType.RAMDISK, r) for r in ramdisks]
    with _AtomicOutput(out_path, ErrorCode.EifBuildingError) as out:
        m, _hdr = _write_sections(out, items, ErrorCode.EifBuildingError, signer=signer,
                                  base=EifHeader(flags=FLAG_AARCH64 if aarch64 else 0))
    return m


def sign_eif(in_path: Path | str, out_path: Path | str, cert_pem: bytes | Path | str,
             key_pem: bytes | Path | str) -> Measurements:
    """(Re-)sign an EIF: copy every section except an old signature, append a new one (SPEC 1).

    ``cert_pem``/``key_pem`` are PEM bytes or paths to PEM files. Sections keep their table
    order and are packed without gaps; the header is rewritten with the new table and CRC.
    ``in_path`` may equal ``out_path`` (the result replaces it atomically). Returns the
    measurements including PCR8. Raises ``NitroError(E35)`` for an invalid or corrupt input
    EIF, ``NitroError(E60)`` for a bad key or certificate (RSA key, unknown curve, mismatch).
    """
    in_path, out_path = Path(in_path), Path(out_path)

    def load(v: bytes | Path | str) -> bytes:
        if isinstance(v, bytes):
            return v
        try:
            return Path(v).read_bytes()
        except OSError as e:
            raise NitroError(ErrorCode.EIFSigningError, f"{v}: open: {e.strerror or e}") from None

    signer = Signer(load(cert_pem), load(key_pem))
    signer._load(str(key_pem) if not isinstance(key_pem, bytes) else "signing key")
    eif = read_eif(in_path, check_crc=True)
    if eif.crc_ok is False:
        raise _fail(in_path, "crc32", f"stored 0x{eif.header.crc32:08x} != computed "
                                      f"0x{eif.crc_computed:08x}; refusing to sign a corrupt EIF")
    keep = [s for s in eif.sections if s.type != SectionType.SIGNATURE]
    with open(in_path, "rb") as src, _AtomicOutput(out_path, ErrorCode.EIFSigningError) as out:
        items = [(s.type, _FileRange(src, s.data_offset, s.size)) for s in keep]
        m, _ = _write_sections(out, items, ErrorCode.EIFSigningError, signer=signer,
                               base=eif.header)
    return m


# --- boot files --------------------------------------------------------------------------


@dataclass(frozen=True)
class BootFiles:
    """What QEMU boots: ``kernel`` file, ``cmdline`` string, ``initrd`` file (all ramdisks
    concatenated in table order, as the hypervisor loads them), and the EIF's measurements."""

    kernel: Path
    cmdline: str
    initrd: Path
    measurements: Measurements | None = None


def extract_boot_files(eif_path: Path | str, dest_dir: Path | str) -> BootFiles:
    """Validate an EIF as the hypervisor/QEMU would and write ``kernel`` and ``initrd`` files.

    Rules beyond :func:`read_eif` (QEMU's nitro-enclave loader, SPEC 1): version >= 4, header
    flags 0 (an aarch64 image cannot boot on x86_64), matching CRC. Writes
    ``dest_dir/kernel`` and ``dest_dir/initrd`` (every ramdisk concatenated in table order)
    atomically, computing the CRC and PCR0/1/2/8 in the same read. Raises ``NitroError(E35)``
    (nothing is left in ``dest_dir`` then).
    """
    eif_path, dest = Path(eif_path), Path(dest_dir)
    eif = read_eif(eif_path, check_crc=False)
    if eif.version < 4:
        raise _fail(eif_path, "version", f"{eif.version} < 4: the hypervisor boots only v4 images")
    if eif.header.flags != 0:
        raise _fail(eif_path, "flags", f"0x{eif.header.flags:04x}: an aarch64 image cannot boot "
                                       "on x86_64")
    dest.mkdir(parents=True, exist_ok=True)
    kpath, ipath = dest / "kernel", dest / "initrd"
    pcrs = _Pcrs([s.type for s in eif.sections])  # measured in table order, as QEMU does
    cmd_raw = b""
    with open(eif_path, "rb") as f, \
            _AtomicOutput(kpath, ErrorCode.EifParsingError) as kf, \
            _AtomicOutput(ipath, ErrorCode.EifParsingError) as rf:
        crc = _crc32(eif.header.pack()[:HEADER_CRC_SPAN], 0)
        for s in eif.sections:
            crc = _crc32(s.header_bytes(), crc)
            sink = {SectionType.KERNEL: kf.write, SectionType.RAMDISK: rf.write}.get(s.type)
            measured = s.type in _MEASURED
            feed = (pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot) if measured \
                else None
            for b in _chunks(_FileRange(f, s.data_offset, s.size), s.size,
                             ErrorCode.EifParsingError, f"section {s.index}"):
                crc = _crc32(b, crc)
                if sink is not None:
                    sink(b)
                if s.type == SectionType.CMDLINE:
                    cmd_raw += b
                if feed is not None:
                    feed(b)
            if measured:
                pcrs.end_section()
        if crc != eif.header.crc32:
            raise _fail(eif_path, "crc32", f"stored 0x{eif.header.crc32:08x} != computed "
                                           f"0x{crc:08x}: the image is corrupt")
        try:
            cmdline = cmd_raw.decode("utf-8").rstrip("\0").strip()
        except UnicodeDecodeError:
            raise _fail(eif_path, "cmdline", "is not valid UTF-8") from None
    pcr8 = None
    if eif.signature_raw is not None:
        pem, _ = _decode_signature_section(eif_path, eif.signature_raw)
        pcr8 = pcr_for_certificate_der(_first_cert_der(eif_path, pem))
    return BootFiles(kpath, cmdline, ipath, pcrs.result(pcr8))


def kernel_version_of(kernel: Path | str) -> str | None:
    """Return the version string embedded in an x86 bzImage (setup header), or None.

    The boot protocol puts a pointer at 0x20E to a NUL-terminated string at 0x200 + pointer
    (Documentation/x86/boot.rst); only its first word (e.g. ``6.12.38+deb13-cloud-amd64``)
    is returned.
    """
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr = struct.unpack_from("<H", head, 0x20E)[0]
    start = 0x200 + ptr
    if not ptr or start >= len(head):
        return None
    end = head.find(b"\0", start, start + 256)
    text = head[start:end if end > 0 else start + 256].decode("ascii", "replace").strip()
    return text.split()[0] if text else None
