"""The EIF byte layout: header, section headers, section types, constants (docs/eif-format.md).

An EIF is a 548-byte big-endian header (magic ``.eif``, version, flags, default memory and
CPUs, a table of up to 32 section offsets and sizes, a CRC-32) followed by sections, each a
12-byte header (type, flags, size) and its data. :class:`Eif` is a parsed file: the header, its
sections in table order and the small sections already decoded. The signature section's
content (a CBOR array holding the signing certificate and a COSE_Sign1) is decoded here too,
since reading, measuring and verifying all need it.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cbor2

from harness.arch import FLAG_AARCH64 as _FLAG_AARCH64
from harness.errors import ErrorCode, NitroError

try:  # zlib-ng's crc32 uses carry-less multiplication: ~5x stock zlib; same CRC-32.
    from zlib_ng import zlib_ng as _crc_impl  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _crc_impl = zlib

#: ``crc32(data, running_crc)``: the EIF's CRC-32 (the zlib polynomial), fastest available.
crc32: Callable[[Any, int], int] = _crc_impl.crc32

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
#: Header flags bit 0: an aarch64 image (harness.arch, docs/eif-format.md#header).
FLAG_AARCH64 = _FLAG_AARCH64
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2

HEADER_STRUCT = struct.Struct(">4sHHQQHH32Q32QII")
SECTION_STRUCT = struct.Struct(">HHQ")
assert HEADER_STRUCT.size == HEADER_SIZE and SECTION_STRUCT.size == SECTION_HEADER_SIZE

#: Streaming chunk: large enough that hashlib/zlib release the GIL and per-call overhead
#: vanishes, small enough that memory stays flat (one window of this size per reading thread).
CHUNK_SIZE = 2 << 20


class SectionType(enum.IntEnum):
    """EIF section types (docs/eif-format.md); 0 and >= 6 are invalid."""

    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


#: The section types PCR0/1/2 cover (docs/pcrs.md); signature and metadata are not measured.
MEASURED = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK)


def fail(path: Path | str, field_: str, rule: str,
         code: ErrorCode = ErrorCode.EifParsingError) -> NitroError:
    """The one-line error every EIF rule raises: ``NitroError(code, "<file>: <field>: <rule>")``."""
    return NitroError(code, f"{path}: {field_}: {rule}")


@dataclass(frozen=True)
class EifHeader:
    """The 548-byte EIF header (docs/eif-format.md), integers as Python ints,
    ``offsets``/``sizes`` 32 each."""

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
        v = HEADER_STRUCT.unpack(raw)
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], v[6], tuple(v[7:39]), tuple(v[39:71]),
                   v[71], v[72])

    def pack(self) -> bytes:
        """Serialise to 548 bytes."""
        return HEADER_STRUCT.pack(self.magic, self.version, self.flags, self.default_mem,
                                  self.default_cpus, self.reserved, self.num_sections,
                                  *self.offsets, *self.sizes, self.unused, self.crc32)

    def crc_start(self) -> int:
        """The CRC-32 of header bytes [0, 544), where every EIF CRC starts (docs/eif-format.md)."""
        return crc32(self.pack()[:HEADER_CRC_SPAN], 0)


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
        return SECTION_STRUCT.pack(int(self.type), self.flags, self.size)


@dataclass
class Eif:
    """A parsed, validated EIF (section-table view) plus what nitro-cli's view would see.

    ``sections`` are in table order. ``crc_computed`` is the table-order CRC
    (docs/eif-format.md) when it was checked, else None; ``sequential_notes`` lists, in words,
    where nitro-cli's sequential reader disagrees with the table (empty for every file
    nitro-cli itself writes); ``sequential_crc`` is the CRC nitro-cli would compute (None if
    its walk fails or was not needed because the views agree, in which case it equals
    ``crc_computed``).
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
        """The kernel command line (docs/eif-format.md: trimmed bytes, no trailing NUL)."""
        return decode_cmdline(self.path, self.read_section(self.cmdline_section))


def decode_cmdline(path: Path | str, raw: bytes) -> str:
    """The cmdline section's bytes as the kernel sees them: UTF-8, trailing NULs and spaces
    dropped (docs/eif-format.md). Raises ``NitroError(E35)`` for invalid UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\0").strip()
    except UnicodeDecodeError:
        raise fail(path, "cmdline", "is not valid UTF-8") from None


# --- the signature section ----------------------------------------------------------------


def decode_signature_section(path: Path | str, raw: bytes) -> tuple[bytes, bytes]:
    """Decode the signature section into (certificate PEM bytes, COSE_Sign1 bytes).

    docs/eif-format.md: a CBOR array of PCR signature maps whose first map holds
    ``signing_certificate`` and ``signature``, each an array of byte values (a byte string is
    accepted too). Raises ``NitroError(E35)`` naming the field that does not fit.
    """
    try:
        obj = cbor2.loads(raw)
    except Exception as e:  # noqa: BLE001 - cbor2 raises several types
        raise fail(path, "signature", f"is not valid CBOR ({e})") from None
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], dict):
        raise fail(path, "signature", "must be a CBOR array of PCR signature maps")
    first = obj[0]

    def as_bytes(key: str) -> bytes:
        v = first.get(key)
        if isinstance(v, list) and all(isinstance(x, int) and 0 <= x <= 255 for x in v):
            return bytes(v)
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        raise fail(path, f"signature.{key}", "must be an array of byte values")

    return as_bytes("signing_certificate"), as_bytes("signature")


def encode_signature_section(cert_pem: bytes, cose_sign1: bytes) -> bytes:
    """The signature section nitro-cli writes: a CBOR array of one map whose
    ``signing_certificate`` and ``signature`` are arrays of byte values (docs/eif-format.md)."""
    return cbor2.dumps([{"signing_certificate": list(cert_pem), "signature": list(cose_sign1)}])


def first_cert_der(path: Path | str, pem: bytes) -> bytes:
    """DER of the first certificate in ``pem`` (what PCR8 hashes, docs/pcrs.md).

    Raises ``NitroError(E35)`` "<path>: signing_certificate: is not a PEM certificate"."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise fail(path, "signing_certificate", f"is not a PEM certificate ({e})") from None
    return certs[0].public_bytes(Encoding.DER)
