"""The machine layout an EIF's kernel expects: Nitro's (no ACPI) or ACPI discovery.

docs/boot.md#machine-layout: AWS's enclave kernels run on a machine without PCI or ACPI; the Nitro
hypervisor announces the vsock and NSM virtio-mmio devices with ``virtio_mmio.device=`` entries
appended to the EIF's own command line. Such kernels are built with
``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``. Debian's cloud kernel lacks that option and finds
virtio-mmio devices only through ACPI.

The harness reads the kernel's embedded configuration (``CONFIG_IKCONFIG``: a gzip stream
between the markers ``IKCFG_ST`` and ``IKCFG_ED`` inside the bzImage's compressed payload)
when it has one: with command-line devices it boots the ``nitro`` layout (microvm with ACPI off,
where QEMU appends one ``virtio_mmio.device=`` entry per device, vsock first, NSM second); a
kernel without them, or without an embedded configuration, gets the ``acpi`` layout. An explicit
choice overrides the detection.
"""

from __future__ import annotations

import gzip
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ErrorCode, NitroError

LAYOUTS = ("auto", "nitro", "acpi")
_START, _END = b"IKCFG_ST", b"IKCFG_ED"
# Payload compressions a bzImage may use, by their magic: the ones Python reads itself.
_GZIP_MAGIC = b"\x1f\x8b\x08"
_XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class Layout:
    """``name`` is ``"nitro"`` or ``"acpi"``; ``acpi`` whether microvm exposes ACPI; ``reason``."""

    name: str
    reason: str

    @property
    def acpi(self) -> bool:
        return self.name == "acpi"


def _payloads(image: bytes):
    """Yield decompressed candidates for the vmlinux inside a bzImage (gzip and xz payloads)."""
    pos = image.find(_GZIP_MAGIC)
    while pos != -1:
        try:
            yield zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(image[pos:])
            return
        except zlib.error:
            pos = image.find(_GZIP_MAGIC, pos + 1)
    pos = image.find(_XZ_MAGIC)
    if pos != -1:
        try:
            yield lzma.LZMADecompressor().decompress(image[pos:])
        except lzma.LZMAError:
            return


def embedded_config(kernel: Path | bytes) -> dict[str, str] | None:
    """The kernel's embedded ``.config`` as ``{"CONFIG_X": "y", ...}``, or None without one.

    Accepts a bzImage path or its bytes; looks in the image itself and in its gzip or xz payload.
    """
    image = kernel if isinstance(kernel, bytes) else Path(kernel).read_bytes()
    for blob in [image, *_payloads(image)]:
        start = blob.find(_START)
        if start == -1:
            continue
        end = blob.find(_END, start)
        if end == -1:
            continue
        try:
            text = gzip.decompress(blob[start + len(_START) : end]).decode("utf-8", "replace")
        except (OSError, EOFError, zlib.error):
            continue
        config = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, value = line.split("=", 1)
                config[key] = value
        return config
    return None


def choose_layout(kernel: Path, requested: str = "auto") -> Layout:
    """Pick the machine layout for ``kernel`` (see the module doc).

    Raises NitroError E03 for a ``requested`` value outside :data:`LAYOUTS`.
    """
    if requested not in LAYOUTS:
        raise NitroError(ErrorCode.InvalidArgument, f"layout {requested!r}: must be one of {LAYOUTS}")
    if requested != "auto":
        return Layout(requested, "chosen explicitly")
    config = embedded_config(kernel)
    if config is None:
        return Layout("acpi", "the kernel has no embedded configuration (assumed to need ACPI)")
    if config.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == "y":
        return Layout("nitro", "the kernel takes virtio_mmio.device= entries (Nitro layout, ACPI off)")
    return Layout("acpi", "the kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (ACPI discovery)")
