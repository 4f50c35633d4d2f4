"""What a kernel image says about itself: format, architecture, version, and its vmlinux payload.

docs/boot.md#enclave-kernels. An x86_64 EIF carries a bzImage: a real-mode setup header
(Documentation/arch/x86/boot.rst: ``HdrS`` at 0x202, the version string pointer at 0x20E,
``xloadflags`` at 0x236 with bit 0 set for a 64-bit kernel, ``payload_offset`` and
``payload_length`` at 0x248 and 0x24C, counted from the protected-mode code that starts after
``setup_sects + 1`` sectors of 512 bytes) and the compressed vmlinux. An aarch64 EIF carries an
``Image`` (``ARM\\x64`` at 0x38).

The payload is decompressed with Python's own modules for gzip, bzip2, lzma and xz, with
``compression.zstd`` (Python 3.14) or the ``zstandard`` package for zstd (Debian's and Ubuntu's
kernels), with the ``lz4`` package for LZ4 (the harness's own kernel), and with the ``zstd`` or
``lzop`` command when the module is missing. A
payload none of them reads leaves :attr:`KernelImage.payload` None, with the reason in
:attr:`KernelImage.payload_note`; nothing here raises for a malformed image.
"""

from __future__ import annotations

import bz2
import lzma
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KernelImage", "read_kernel_image", "COMPRESSIONS"]

#: Payload compressions by their magic bytes (Linux's arch/x86/boot/compressed/Makefile).
COMPRESSIONS = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
)
# Commands that read a payload when Python has no module for it; the kernel appends the
# uncompressed size (4 bytes) to the payload, which these refuse as trailing garbage.
_TOOLS = {"zstd": ["zstd", "-dcq"], "lzo": ["lzop", "-dcq"]}
_ARM64_MAGIC = b"ARM\x64"
_XLF_KERNEL_64 = 0x1


@dataclass(frozen=True)
class KernelImage:
    """A kernel image's facts.

    ``format`` is ``"bzImage"``, ``"Image"`` (arm64), ``"ELF"`` (a bare vmlinux) or
    ``"unknown"``; ``arch`` ``"x86_64"``, ``"i386"`` (a bzImage without the 64-bit entry),
    ``"aarch64"`` or ``"unknown"``; ``version`` the setup header's version string (``6.12.118-...
    (builder@host) #1 SMP ...``) or None; ``protocol`` the boot protocol (``0x20f``) or 0;
    ``compression`` the payload's (``"gzip"``, ``"zstd"``, ...) or None; ``payload`` the
    decompressed vmlinux or None, ``payload_note`` why it is None.
    """

    format: str
    arch: str
    version: str | None
    protocol: int
    compression: str | None
    payload: bytes | None
    payload_note: str = ""

    @property
    def release(self) -> str | None:
        """``uname -r`` of the kernel: the version string's first word (``6.12.118-nitro-harness``)."""
        return self.version.split()[0] if self.version else None

    def vermagic(self) -> str | None:
        """The kernel's module version magic (``"6.12.118-nitro-harness SMP mod_unload "``): the
        NUL-terminated string in the payload that starts with the release and a space, which
        the kernel compares with each module's ``vermagic=`` (kernel/module/version.c). None
        without a payload or release."""
        if self.payload is None or not self.release:
            return None
        m = re.search(rb"\0(" + re.escape(self.release.encode()) + rb" [ -~]*?)\0", self.payload)
        return m.group(1).decode("ascii") if m else None


def setup_header_version(image: bytes) -> str | None:
    """The version string an x86 bzImage's setup header points to (the boot protocol keeps a
    pointer at 0x20E to a NUL-terminated string at 0x200 + pointer), or None. ``image``: at least
    the bzImage's first 0x210 bytes (the string lies within its first 64 KiB)."""
    if len(image) < 0x210:
        return None
    ptr = struct.unpack_from("<H", image, 0x20E)[0]
    start = 0x200 + ptr
    if not ptr or start >= len(image):
        return None
    end = image.find(b"\0", start, start + 256)
    text = image[start:end if end > 0 else start + 256].decode("ascii", "replace").strip()
    return text or None


#: The LZ4 frame Linux compresses kernels with: the legacy format (lib/decompress_unlz4.c),
#: a magic then blocks of a 32-bit little-endian compressed size and the block, each block at
#: most 8 MiB once decompressed.
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
#: The most a kernel payload may decompress to here (a real vmlinux is 10-60 MiB): a guard
#: against an EIF whose kernel section is a decompression bomb.
MAX_PAYLOAD = 256 << 20


def _unlz4_legacy(data: bytes) -> bytes:
    """Decompress a Linux legacy-format LZ4 stream (``lz4 -l``, what ``CONFIG_KERNEL_LZ4``
    makes) with the ``lz4`` package's block decoder. The 4-byte size the kernel appends after
    the last block ends the stream. Raises ValueError for a corrupt stream or one over
    :data:`MAX_PAYLOAD`."""
    import lz4.block

    out, pos, total = [], 4, 0
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == _LZ4_LEGACY_MAGIC:  # concatenated streams each start with the magic
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break  # the kernel's appended size, or the end
        try:
            block = lz4.block.decompress(data[pos + 4:pos + 4 + size],
                                         uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"block at byte {pos}: {e}") from None
        total += len(block)
        if total > MAX_PAYLOAD:
            raise ValueError(f"decompresses to more than {MAX_PAYLOAD >> 20} MiB")
        out.append(block)
        pos += 4 + size
    if not out:
        raise ValueError("no LZ4 block")
    return b"".join(out)


def _decompress_with_module(kind: str, data: bytes) -> bytes | None:
    """Decompress one stream with Python's modules; None when no module reads ``kind``.
    Raises the module's error for a corrupt stream. Trailing bytes are ignored."""
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "lz4":
        return _unlz4_legacy(data)
    if kind == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
            return zstd.ZstdDecompressor().decompress(data)
        except ImportError:
            pass
        try:
            import zstandard
        except ImportError:
            return None
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return None


def _decompress_with_tool(kind: str, data: bytes) -> bytes | None:
    """Decompress with the command for ``kind``; None when it is not installed or fails."""
    cmd = _TOOLS.get(kind)
    if cmd is None or shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, input=data[:-4], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


def _decompress(kind: str, data: bytes) -> tuple[bytes | None, str]:
    try:
        out = _decompress_with_module(kind, data)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        return None, f"the {kind} payload does not decompress ({e})"
    except Exception as e:  # noqa: BLE001 - zstandard's ZstdError has no common base to name
        return None, f"the {kind} payload does not decompress ({e})"
    if out is None:
        out = _decompress_with_tool(kind, data)
    if not out:
        tool = _TOOLS.get(kind, [kind])[0]
        hint = " (pip install zstandard, or install the zstd command)" if kind == "zstd" else \
            f" (install the {tool} command)"
        return None, f"no decompressor for its {kind} payload{hint}"
    return out, ""


def _declared_payload(image: bytes) -> tuple[str | None, bytes]:
    """The payload the setup header points at (protocol >= 2.08) and its compression."""
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = image[start:start + length] if length else b""
    for kind, magic in COMPRESSIONS:
        if data.startswith(magic):
            return kind, data
    return None, b""


def _scanned_payload(image: bytes) -> tuple[str | None, bytes | None, str]:
    """The first stream after the setup code that decompresses, for headers whose payload
    fields are unusable (old protocols, hand-made test images)."""
    found = []
    for kind, magic in COMPRESSIONS[:3]:  # magics long enough not to match by chance
        pos = image.find(magic, 0x200)
        while pos != -1:
            found.append((pos, kind))
            pos = image.find(magic, pos + 1)
    for pos, kind in sorted(found):
        out, note = _decompress(kind, image[pos:])
        if out:
            return kind, out, ""
    return None, None, "no compressed payload found in the bzImage"


def _bzimage(image: bytes) -> KernelImage:
    protocol = struct.unpack_from("<H", image, 0x206)[0]
    bits64 = protocol >= 0x20C and struct.unpack_from("<H", image, 0x236)[0] & _XLF_KERNEL_64
    arch = "x86_64" if bits64 else "i386"
    version = setup_header_version(image)
    kind, data = _declared_payload(image) if protocol >= 0x208 else (None, b"")
    if kind is not None:
        payload, note = _decompress(kind, data)
    else:
        kind, payload, note = _scanned_payload(image)
    return KernelImage("bzImage", arch, version, protocol, kind, payload, note)


def read_kernel_image(kernel: Path | str | bytes) -> KernelImage:
    """Read a kernel image (a path or its bytes) and decompress its payload.

    Never raises for a malformed image (an unreadable file raises OSError): what could not be
    learnt is None or ``"unknown"``, and ``payload_note`` says why there is no payload.
    """
    image = kernel if isinstance(kernel, bytes) else Path(kernel).read_bytes()
    if len(image) >= 0x250 and image[0x202:0x206] == b"HdrS":
        return _bzimage(image)
    if image[0x38:0x3C] == _ARM64_MAGIC:
        return KernelImage("Image", "aarch64", None, 0, None, None, "an arm64 Image")
    if image[:4] == b"\x7fELF":
        machine = struct.unpack_from("<H", image, 18)[0] if len(image) >= 20 else 0
        arch = {62: "x86_64", 183: "aarch64", 3: "i386"}.get(machine, "unknown")
        return KernelImage("ELF", arch, None, 0, None, image, "")
    return KernelImage("unknown", "unknown", None, 0, None, None, "not a kernel image")
