"""Reading an EIF as the hypervisor does, and saying where nitro-cli would read it differently.

Two readers exist in the wild (docs/eif-format.md):

* the hypervisor's (and QEMU's): follow the section table in the 548-byte header;
* nitro-cli's: walk sections sequentially from byte 548, ignoring the table.

:func:`read_eif` follows the table, validates every structural rule, computes the CRC in table
order and reports, in :attr:`Eif.sequential_notes`, where nitro-cli's walk would read the file
differently (gaps, trailing bytes, a different order).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Sequence

from harness import bounded_json
from harness.eif.format import (
    CHUNK_SIZE, EIF_MAGIC, FLAG_AARCH64, HEADER_SIZE, KNOWN_VERSIONS, MAX_SECTIONS,
    SECTION_HEADER_SIZE, SECTION_STRUCT, Eif, EifHeader, Section, SectionType, crc32,
    decode_signature_section, fail,
)
from harness.errors import ErrorCode, NitroError

#: Upper bounds for the sections read into memory: metadata is a few KiB in practice
#: (custom metadata <= 4096 bytes plus docker inspect), a signature well under 16 KiB.
MAX_METADATA_SIZE = 16 << 20
MAX_SIGNATURE_SIZE = 1 << 20

#: One step of nitro-cli's sequential walk: ``(section header offset, type, data size)``.
Walked = tuple[int, int, int]


def _parse_layout(path: Path, f: BinaryIO, file_size: int) -> tuple[EifHeader, list[Section]]:
    """Parse the header and section headers, enforcing every structural rule of
    docs/eif-format.md."""
    if file_size < HEADER_SIZE:
        raise fail(path, "header", f"truncated: file has {file_size} bytes, the EIF header "
                                   f"needs {HEADER_SIZE}")
    f.seek(0)
    hdr = EifHeader.unpack(f.read(HEADER_SIZE))
    if hdr.magic != EIF_MAGIC:
        raise fail(path, "magic", f"{hdr.magic.hex()} is not 2e656966 ('.eif')")
    if hdr.version not in KNOWN_VERSIONS:
        raise fail(path, "version", f"{hdr.version} is not a known EIF version "
                                    f"({', '.join(map(str, KNOWN_VERSIONS))})")
    if hdr.flags & ~FLAG_AARCH64:
        raise fail(path, "flags", f"0x{hdr.flags:04x} has bits other than bit 0 (aarch64) set")
    if hdr.num_sections == 0:
        raise fail(path, "num_sections", "is 0; an EIF needs kernel, cmdline and a ramdisk")
    if hdr.num_sections > MAX_SECTIONS:
        raise fail(path, "num_sections", f"{hdr.num_sections} exceeds the maximum of "
                                         f"{MAX_SECTIONS} sections")
    for i in range(hdr.num_sections, MAX_SECTIONS):
        if hdr.offsets[i] or hdr.sizes[i]:
            raise fail(path, f"section_offsets[{i}]/section_sizes[{i}]",
                       f"unused slot (num_sections={hdr.num_sections}) must be 0")
    sections = [_parse_section(path, f, file_size, i, hdr.offsets[i], hdr.sizes[i])
                for i in range(hdr.num_sections)]
    by_offset = sorted(sections, key=lambda s: s.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.offset < a.end:
            raise fail(path, f"section {b.index} offset",
                       f"overlaps section {a.index} (bytes {a.offset}-{a.end - 1})")
    counts = {t: sum(1 for s in sections if s.type == t) for t in SectionType}
    if counts[SectionType.KERNEL] != 1:
        raise fail(path, "sections", f"{counts[SectionType.KERNEL]} kernel sections; exactly "
                                     "one is required")
    if counts[SectionType.CMDLINE] != 1:
        raise fail(path, "sections", f"{counts[SectionType.CMDLINE]} cmdline sections; exactly "
                                     "one is required")
    if counts[SectionType.RAMDISK] < 1:
        raise fail(path, "sections", "no ramdisk section; at least one is required")
    if counts[SectionType.SIGNATURE] > 1:
        raise fail(path, "sections", "more than one signature section")
    if counts[SectionType.METADATA] > 1:
        raise fail(path, "sections", "more than one metadata section")
    return hdr, sections


def _parse_section(path: Path, f: BinaryIO, file_size: int, i: int, off: int,
                   size: int) -> Section:
    """Read and check the header of table slot ``i`` (``off``, ``size`` from the table)."""
    where = f"section {i}"
    if off < HEADER_SIZE:
        raise fail(path, f"{where} offset", f"{off} lies inside the {HEADER_SIZE}-byte header")
    if off + SECTION_HEADER_SIZE > file_size:
        raise fail(path, f"{where} offset", f"section header at {off} overruns the file "
                                            f"({file_size} bytes)")
    f.seek(off)
    stype, sflags, ssize = SECTION_STRUCT.unpack(f.read(SECTION_HEADER_SIZE))
    try:
        t = SectionType(stype)
    except ValueError:
        raise fail(path, f"{where} type", f"unknown section type {stype} at offset {off} "
                                          "(valid: 1-5)") from None
    if sflags != 0:
        raise fail(path, f"{where} flags", f"0x{sflags:04x} must be 0")
    if ssize != size:
        raise fail(path, f"{where} size", f"table says {size} bytes but the section "
                                          f"header says {ssize}")
    if off + SECTION_HEADER_SIZE + size > file_size:
        raise fail(path, f"{where} ({t.name.lower()}) size",
                   f"{size} bytes at offset {off + SECTION_HEADER_SIZE} overrun the file "
                   f"({file_size} bytes)")
    return Section(i, t, sflags, off, size)


def _sequential_walk(f: BinaryIO, file_size: int) -> tuple[list[Walked], str | None]:
    """Walk sections from byte 548 the way nitro-cli's reader does (headers only).

    Returns ``([(offset, type, size), ...], error)``; ``error`` is what would stop nitro-cli
    (an invalid type, a size past the end), else None. A tail shorter than 12 bytes ends the
    walk silently, as it does in nitro-cli.
    """
    out: list[Walked] = []
    pos = HEADER_SIZE
    while pos + SECTION_HEADER_SIZE <= file_size:
        f.seek(pos)
        stype, _flags, size = SECTION_STRUCT.unpack(f.read(SECTION_HEADER_SIZE))
        if stype not in (1, 2, 3, 4, 5):
            return out, f"invalid section type {stype} at offset {pos}"
        if pos + SECTION_HEADER_SIZE + size > file_size:
            return out, f"section of {size} bytes at offset {pos} runs past the end"
        out.append((pos, stype, size))
        pos += SECTION_HEADER_SIZE + size
    return out, None  # nitro-cli stops at a short tail without complaint


def _compare_views(sections: list[Section], walk: list[Walked], walk_error: str | None,
                   file_size: int) -> list[str]:
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
def parsed(path: Path | str):
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

    Checks (docs/eif-format.md): size >= 548, magic, known version, header flags (bit 0
    only), 1 <= num_sections <= 32, unused slots zero, every section header inside the file
    with a valid type (1-5), flags 0, size equal to the table's, data inside the file, no
    overlaps, exactly one kernel and one cmdline, at least one ramdisk, at most one signature
    and one metadata section, metadata a JSON object, signature section decodable CBOR. With
    ``check_crc`` the whole file is read once to compute the table-order CRC (a mismatch is
    reported through :attr:`Eif.crc_ok`, not raised). Differences with nitro-cli's
    sequential reading are in :attr:`Eif.sequential_notes`, and when they exist
    ``sequential_crc`` holds the CRC nitro-cli would compute.

    Raises ``NitroError(E35)`` "<file>: <field>: <rule>" for any violated rule, E19 when the
    file cannot be opened.
    """
    with parsed(path) as (f, eif, walk, walk_err):
        if check_crc:
            eif.crc_computed = _crc_table_order(f, eif.header, eif.sections)
            if eif.sequential_notes:
                eif.sequential_crc = None if walk_err else crc_walk(f, eif.header, walk)
    return eif


def _load_small_sections(eif: Eif, f: BinaryIO) -> None:
    """Read and decode metadata and signature sections (both small), validating them."""
    for s in eif.sections:
        limit = {SectionType.METADATA: MAX_METADATA_SIZE,
                 SectionType.SIGNATURE: MAX_SIGNATURE_SIZE}.get(s.type)
        if limit is not None and s.size > limit:
            raise fail(eif.path, f"section {s.index} ({s.type.name.lower()}) size",
                       f"{s.size} bytes exceeds the {limit}-byte limit for this section type")
    for s in eif.of_type(SectionType.METADATA):
        f.seek(s.data_offset)
        raw = f.read(s.size)
        try:
            meta = bounded_json.loads(raw)
        except ValueError as e:  # syntax, encoding, or nesting past serde_json's limit
            raise fail(eif.path, "metadata", f"is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise fail(eif.path, "metadata", "must be a JSON object")
        eif.metadata = meta
    for s in eif.of_type(SectionType.SIGNATURE):
        f.seek(s.data_offset)
        eif.signature_raw = f.read(s.size)
        decode_signature_section(eif.path, eif.signature_raw)  # validates the structure


def _crc_table_order(f: BinaryIO, hdr: EifHeader, sections: Sequence[Section]) -> int:
    """CRC-32 over header[0:544] then each section's header and data in table order
    (docs/eif-format.md)."""
    crc = hdr.crc_start()
    buf = bytearray(CHUNK_SIZE)
    mv = memoryview(buf)
    for s in sections:
        crc = crc32(s.header_bytes(), crc)
        f.seek(s.data_offset)
        left = s.size
        while left:
            n = f.readinto(mv[: min(CHUNK_SIZE, left)])
            if not n:
                raise OSError("file shrank while reading")
            crc = crc32(mv[:n], crc)
            left -= n
    return crc


def crc_walk(f: BinaryIO, hdr: EifHeader, walk: list[Walked]) -> int:
    """The CRC nitro-cli's sequential reader computes: header then walked sections in file
    order. OSError when the file shrank while reading."""
    crc = hdr.crc_start()
    for off, _t, size in walk:
        f.seek(off)
        left = SECTION_HEADER_SIZE + size
        while left:
            b = f.read(min(CHUNK_SIZE, left))
            if not b:
                raise OSError("file shrank while reading")
            crc = crc32(b, crc)
            left -= len(b)
    return crc


def eif_metadata(path: Path | str) -> dict | None:
    """Return the EIF's metadata JSON object, or None when it has no metadata section.

    Reads only headers and the metadata section. Raises ``NitroError(E35)`` as
    :func:`read_eif` does.
    """
    return read_eif(path, check_crc=False).metadata
