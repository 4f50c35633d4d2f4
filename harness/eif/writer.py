"""Writing an EIF in nitro-cli's order, measuring while writing, CRC last (docs/eif-format.md).

Sections go back to back from byte 548 (kernel, cmdline, metadata, ramdisks, signature), so
the table view and nitro-cli's sequential view of the result agree. The header is written
last, with the CRC computed over the bytes just written (still in the page cache).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Sequence

from harness.atomic_file import open_atomically
from harness.eif.format import (
    CHUNK_SIZE, FLAG_AARCH64, HEADER_SIZE, MAX_SECTIONS, MEASURED, SECTION_HEADER_SIZE,
    SECTION_STRUCT, EifHeader, SectionType, crc32, first_cert_der,
)
from harness.eif.measurement import PcrChains
from harness.eif.metadata import encode_metadata
from harness.eif.sources import chunks, source_size
from harness.errors import ErrorCode, NitroError
from harness.pcr import Measurements, pcr_for_certificate_der

if TYPE_CHECKING:
    from harness.eif.signing import Signer


@contextlib.contextmanager
def output_file(path: Path | str, code: ErrorCode, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """An EIF output that appears at ``path`` only when complete (harness.atomic_file); on any
    error nothing is left behind. I/O failures (no such folder, disk full) become one line,
    ``NitroError(code, "<path>: create|write: <reason>")``; other errors propagate."""
    stack = contextlib.ExitStack()
    try:
        out = stack.enter_context(open_atomically(path, fsync=fsync))
    except OSError as e:
        raise NitroError(code, f"{path}: create: {e.strerror or e}") from None
    try:
        with stack:
            yield out
    except OSError as e:
        raise NitroError(code, f"{path}: write: {e.strerror or e}") from None


def write_sections(out: BinaryIO, where: Path, items: list[tuple[SectionType, Any]],
                   code: ErrorCode, *, signer: Signer | None = None,
                   base: EifHeader | None = None) -> tuple[Measurements, EifHeader]:
    """Write a complete EIF to ``out`` (to become ``where``, named in errors): sections of
    ``items`` back to back, then the signature.

    ``items`` are ``(type, source)`` with sources as :mod:`harness.eif.sources` reads them.
    Measures while writing (PCR0/1/2 in section order, as a table reader measures) so signing
    needs no second read of the inputs. The header (version, flags, default memory/CPUs taken
    from ``base``) is written last with the CRC, which is computed over the written bytes
    (page-cache hot). Raises ``NitroError(code)``.
    """
    base = base or EifHeader()
    if len(items) + (1 if signer else 0) > MAX_SECTIONS:
        raise NitroError(code, f"{where}: sections: more than {MAX_SECTIONS} sections")
    if not any(t == SectionType.RAMDISK for t, _ in items):
        raise NitroError(code, f"{where}: ramdisks: at least one ramdisk is required")
    pcrs = PcrChains([t for t, _ in items])
    out.write(b"\0" * HEADER_SIZE)
    offsets: list[int] = []
    sizes: list[int] = []
    pos = HEADER_SIZE
    for t, src in items:
        what = t.name.lower()
        size = source_size(src, what, code)
        offsets.append(pos)
        sizes.append(size)
        out.write(SECTION_STRUCT.pack(int(t), 0, size))
        measured = t in MEASURED
        feed = (pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot) if measured else None
        for b in chunks(src, size, code, what):
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
        out.write(SECTION_STRUCT.pack(int(SectionType.SIGNATURE), 0, len(sig)))
        out.write(sig)
        pcr8 = pcr_for_certificate_der(first_cert_der("signing certificate", signer.cert_pem))
        version = max(version, 3)  # v3 introduced the signature section
    n = len(offsets)
    hdr = EifHeader(version=version, flags=base.flags, default_mem=base.default_mem,
                    default_cpus=base.default_cpus, num_sections=n,
                    offsets=tuple(offsets) + (0,) * (MAX_SECTIONS - n),
                    sizes=tuple(sizes) + (0,) * (MAX_SECTIONS - n))
    # The file is gapless, so the table-order CRC is crc32(header[0:544] + file[548:]).
    out.flush()
    crc = hdr.crc_start()
    out.seek(HEADER_SIZE)
    while b := out.read(CHUNK_SIZE):
        crc = crc32(b, crc)
    hdr = EifHeader(**{**hdr.__dict__, "crc32": crc})
    out.seek(0)
    out.write(hdr.pack())
    out.flush()
    return Measurements(pcr0, unsigned.pcr1, unsigned.pcr2, pcr8), hdr


def write_eif(out_path: Path | str, kernel: Path | str | bytes, cmdline: str,
              ramdisks: Sequence[Path | str | bytes], metadata: dict | None,
              signer: Signer | None = None, *, aarch64: bool = False) -> Measurements:
    """Write an EIF in nitro-cli's order and return its measurements (docs/eif-format.md,
    docs/pcrs.md).

    Order: kernel, cmdline (stripped, no NUL), metadata (compact JSON, when given), ramdisks
    in order (bootstrap first), then the signature when ``signer`` is given. Header: version
    4, flags 0 (bit 0 with ``aarch64``), default memory 1 GiB, 2 CPUs, CRC over header and
    sections. Sources are paths (streamed) or bytes. The file appears atomically
    (harness.atomic_file: temporary name, fsync, rename). Raises ``NitroError(E48)`` for
    unreadable inputs or no ramdisk, ``NitroError(E60)`` for a bad signing key (RSA, wrong
    curve, mismatching certificate).
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
    with output_file(out_path, ErrorCode.EifBuildingError) as out:
        m, _hdr = write_sections(out, out_path, items, ErrorCode.EifBuildingError,
                                 signer=signer,
                                 base=EifHeader(flags=FLAG_AARCH64 if aarch64 else 0))
    return m
