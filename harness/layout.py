"""The machine layout an EIF's kernel expects: Nitro's (no ACPI) or ACPI discovery.

docs/boot.md#machine-layout: the Nitro hypervisor gives an enclave no PCI and no ACPI and
announces the vsock and NSM virtio-mmio devices with ``virtio_mmio.device=`` entries appended to
the EIF's own command line, so every kernel that boots on Nitro takes command-line devices
(``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` with virtio-mmio built in). Debian's cloud kernel builds
virtio-mmio as a module without that option and finds its devices only through ACPI.

The layout follows from what the kernel can do, read from the bzImage itself
(docs/boot.md#choosing-a-layout): its embedded configuration when it has one (``CONFIG_IKCONFIG``:
a gzip stream between the markers ``IKCFG_ST`` and ``IKCFG_ED`` inside the decompressed
payload), else the built-in module parameter ``virtio_mmio.device`` (its ``__param`` entry's
name, a NUL-terminated ``virtio_mmio.device`` string that only a kernel with virtio-mmio built
in and command-line devices enabled carries). A kernel that takes command-line devices boots the
``nitro`` layout (microvm with ACPI off, where QEMU appends one ``virtio_mmio.device=`` entry per
device, vsock first, NSM second). Only a kernel shown to lack them gets the ``acpi`` layout, and
such an EIF would not boot on Nitro (:attr:`Layout.nitro_warning`). A kernel whose payload
cannot be read is assumed to be a Nitro kernel. An explicit choice overrides the detection.

An aarch64 EIF has one layout, ``virt`` (docs/boot.md#aarch64-machine): QEMU's ``virt``
machine lists its virtio-mmio transports in the device tree it gives the kernel, so there is
nothing to choose.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

from harness.arch import X86_64, Arch
from harness.bzimage import KernelImage, read_kernel_image
from harness.errors import ErrorCode, NitroError

__all__ = ["LAYOUTS", "CmdlineDevices", "Layout", "choose_layout", "cmdline_devices",
           "embedded_config"]

LAYOUTS = ("auto", "nitro", "acpi")
_START, _END = b"IKCFG_ST", b"IKCFG_ED"
#: The built-in parameter's name as the kernel stores it (MODULE_PARAM_PREFIX "virtio_mmio."
#: joined to "device" at compile time), NUL on both sides in the string table.
PARAM_MARKER = b"\0virtio_mmio.device\0"


@dataclass(frozen=True)
class CmdlineDevices:
    """Whether a kernel takes ``virtio_mmio.device=`` entries: ``supported`` True, False (shown
    to lack them) or None (undecided: the payload could not be read); ``evidence`` in words."""

    supported: bool | None
    evidence: str


@dataclass(frozen=True)
class Layout:
    """``name`` is ``"nitro"`` or ``"acpi"`` (x86_64), or ``"virt"`` (aarch64); ``reason`` one
    line; ``devices`` what the kernel was found to support (None for an explicit choice and
    for ``virt``)."""

    name: str
    reason: str
    devices: CmdlineDevices | None = None

    @property
    def acpi(self) -> bool:
        """True when microvm exposes ACPI."""
        return self.name == "acpi"

    @property
    def nitro_warning(self) -> str | None:
        """One line saying the EIF would not boot on Nitro, for a kernel shown to lack
        command-line devices; None otherwise."""
        if self.devices is None or self.devices.supported is not False:
            return None
        return ("this EIF would not boot on Nitro: its kernel cannot take virtio_mmio.device= "
                f"entries ({self.devices.evidence}), so the harness boots it in the ACPI layout")


def _config_from(blob: bytes) -> dict[str, str] | None:
    start = blob.find(_START)
    while start != -1:
        end = blob.find(_END, start)
        if end == -1:
            return None
        try:
            text = gzip.decompress(blob[start + len(_START): end]).decode("utf-8", "replace")
        except (OSError, EOFError, zlib.error):
            start = blob.find(_START, start + 1)
            continue
        config = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, value = line.split("=", 1)
                config[key] = value
        return config
    return None


def embedded_config(kernel: Path | bytes | KernelImage) -> dict[str, str] | None:
    """The kernel's embedded ``.config`` as ``{"CONFIG_X": "y", ...}``, or None without one.

    Accepts a bzImage path, its bytes or its :class:`~harness.bzimage.KernelImage`; looks in
    the decompressed payload.
    """
    image = kernel if isinstance(kernel, KernelImage) else read_kernel_image(kernel)
    return _config_from(image.payload) if image.payload is not None else None


def cmdline_devices(kernel: Path | bytes | KernelImage) -> CmdlineDevices:
    """Decide whether ``kernel`` takes ``virtio_mmio.device=`` entries (see the module doc).

    Decision table (docs/boot.md#choosing-a-layout): embedded config with
    ``CONFIG_VIRTIO_MMIO=y`` and ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`` -> True; embedded
    config otherwise -> False; no config, the parameter in the payload -> True; no config, a
    readable payload without it -> False; no payload -> None.
    """
    image = kernel if isinstance(kernel, KernelImage) else read_kernel_image(kernel)
    if image.payload is None:
        return CmdlineDevices(None, f"cannot read the kernel's payload: {image.payload_note}")
    config = _config_from(image.payload)
    if config is not None:
        mmio = config.get("CONFIG_VIRTIO_MMIO")
        if mmio != "y":
            what = "a module" if mmio == "m" else "not built"
            return CmdlineDevices(False, f"embedded config: CONFIG_VIRTIO_MMIO is {what}")
        if config.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") != "y":
            return CmdlineDevices(False, "embedded config: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES "
                                         "is not set")
        return CmdlineDevices(True, "embedded config: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y")
    if PARAM_MARKER in image.payload:
        return CmdlineDevices(True, "built-in parameter virtio_mmio.device")
    return CmdlineDevices(False, "no embedded config and no built-in virtio_mmio.device "
                                 "parameter")


def choose_layout(kernel: Path | bytes | KernelImage, requested: str = "auto",
                  arch: Arch = X86_64) -> Layout:
    """Pick the machine layout for ``kernel`` of an ``arch`` EIF (see the module doc and
    :func:`cmdline_devices`).

    Raises NitroError E03 for a ``requested`` value outside :data:`LAYOUTS`, and for an
    explicit ``nitro`` or ``acpi`` asked of an aarch64 EIF (those are x86_64 machines).
    """
    if requested not in LAYOUTS:
        raise NitroError(ErrorCode.InvalidArgument, f"layout {requested!r}: must be one of {LAYOUTS}")
    if arch != X86_64:
        if requested != "auto":
            raise NitroError(ErrorCode.InvalidArgument,
                             f"layout {requested!r}: an {arch.name} EIF boots on the virt "
                             "machine, whose device tree lists its devices; the layouts are "
                             "for x86_64 EIFs (leave it auto)")
        return Layout("virt", f"an {arch.name} EIF: the virt machine's device tree lists the "
                              "virtio-mmio devices")
    if requested != "auto":
        return Layout(requested, "chosen explicitly")
    devices = cmdline_devices(kernel)
    if devices.supported is False:
        return Layout("acpi", f"the kernel lacks command-line devices ({devices.evidence}): "
                              "ACPI discovery", devices)
    if devices.supported is None:
        return Layout("nitro", f"assumed a Nitro kernel ({devices.evidence}); pass --layout "
                               "acpi if it finds no devices", devices)
    return Layout("nitro", f"the kernel takes virtio_mmio.device= entries ({devices.evidence}): "
                           "Nitro layout, ACPI off", devices)
