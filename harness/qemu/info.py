"""What one QEMU binary offers: :class:`QemuInfo`, as :func:`harness.qemu.probe_qemu` found it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QemuInfo:
    """What one QEMU binary offers, as :func:`probe_qemu` found it.

    ``path``: the binary; ``version``: ``(major, minor, micro)``; ``version_text``: the first line
    of ``-version``; ``machines``: names from ``-machine help`` (aliases included); ``devices``:
    names from ``-device help``; ``accelerators``: from ``-accel help``;
    ``vhost_user_device_creatable``: creating ``vhost-user-device`` passed QEMU's user-creatable
    check (only creating it tells: docs/vhost-user.md#generic-device);
    ``vhost_user_device_detail``: what QEMU said when asked to create it; ``build_info``: the
    ``build-info.json`` that build-qemu.sh writes beside its builds, or ``None`` for other
    binaries.
    """

    path: Path
    version: tuple[int, int, int]
    version_text: str
    machines: frozenset[str]
    devices: frozenset[str]
    accelerators: frozenset[str]
    vhost_user_device_creatable: bool
    vhost_user_device_detail: str
    build_info: dict[str, Any] | None = field(default=None, compare=False)
    data_dirs: tuple[Path, ...] = ()

    def data_file(self, name: str) -> Path | None:
        """The first ``name`` (e.g. ``"linuxboot_dma.bin"``) in :attr:`data_dirs`, or None."""
        for directory in self.data_dirs:
            candidate = directory / name
            if candidate.is_file():
                return candidate
        return None

    @property
    def kernel_loader(self) -> Path | None:
        """``linuxboot_dma.bin``, the option ROM microvm's ``-kernel`` boot needs (QEMU
        fails with "Failed to open file linuxboot_dma.bin" without it), if QEMU can find it."""
        return self.data_file("linuxboot_dma.bin")

    @property
    def has_microvm(self) -> bool:
        """The ``microvm`` machine exists (the harness boots enclaves on it)."""
        return "microvm" in self.machines

    @property
    def has_virt(self) -> bool:
        """The ``virt`` machine exists (aarch64 enclaves boot on it:
        docs/boot.md#aarch64-machine)."""
        return "virt" in self.machines

    @property
    def has_nitro_enclave(self) -> bool:
        """QEMU's own ``nitro-enclave`` machine exists (QEMU >= 9.2 with libcbor+gnutls)."""
        return "nitro-enclave" in self.machines

    @property
    def vhost_user_device(self) -> bool:
        """Alias of :attr:`vhost_user_device_creatable` (the harness NSM can be attached)."""
        return self.vhost_user_device_creatable

    @property
    def has_vhost_user_device(self) -> bool:
        """``vhost-user-device`` is compiled in (creatable or not)."""
        return "vhost-user-device" in self.devices

    @property
    def has_vhost_user_vsock_device(self) -> bool:
        """``vhost-user-vsock-device`` (virtio-mmio vsock served over vhost-user) exists."""
        return "vhost-user-vsock-device" in self.devices

    @property
    def has_virtio_nsm_device(self) -> bool:
        """QEMU's built-in ``virtio-nsm-device`` exists (reference only; the harness serves
        its own NSM over vhost-user-device)."""
        return "virtio-nsm-device" in self.devices

    @property
    def fit_for_enclaves(self) -> bool:
        """Everything the harness needs: microvm, vhost-user-vsock-device and a creatable
        vhost-user-device (the NSM), plus the tcg accelerator that works everywhere."""
        return (
            self.has_microvm
            and self.has_vhost_user_vsock_device
            and self.vhost_user_device_creatable
            and "tcg" in self.accelerators
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (sorted lists for sets), with the derived flags."""
        return {
            "path": str(self.path),
            "version": ".".join(map(str, self.version)),
            "version_text": self.version_text,
            "machines": {
                "microvm": self.has_microvm,
                "nitro-enclave": self.has_nitro_enclave,
            },
            "devices": {
                "vhost-user-device": {
                    "present": self.has_vhost_user_device,
                    "creatable": self.vhost_user_device_creatable,
                    "detail": self.vhost_user_device_detail,
                },
                "vhost-user-vsock-device": self.has_vhost_user_vsock_device,
                "virtio-nsm-device": self.has_virtio_nsm_device,
            },
            "accelerators": sorted(self.accelerators),
            "fit_for_enclaves": self.fit_for_enclaves,
            "data_dirs": [str(d) for d in self.data_dirs],
            "kernel_loader": str(self.kernel_loader) if self.kernel_loader else None,
            "build_info": self.build_info,
        }


def _read_build_info(path: Path) -> dict[str, Any] | None:
    """``<prefix>/build-info.json`` written by build-qemu.sh, if this is such a build."""
    info = path.resolve().parent.parent / "build-info.json"
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
