"""Find the QEMU the harness runs enclaves on, and probe what it can do.

Where QEMU comes from (docs/architecture.md#qemu-build): ``nitro-harness setup --only qemu``
builds Debian's qemu 10.0 source with two patches (``vhost-user-device`` user-creatable; QEMU's own
NSM device waits for its response buffer) and
installs it under ``~/.cache/nitro-harness/qemu-<version>-<patch hash>/``. A user may point
``NITRO_HARNESS_QEMU`` at any other ``qemu-system-x86_64``; :func:`probe_qemu` then says what
that binary lacks. One idea per module:

* :mod:`~harness.qemu.find`: :func:`find_qemu` (with :func:`cache_dir`, :func:`patch_hash`,
  :func:`current_build`) and :func:`find_firmware` (qboot);
* :mod:`~harness.qemu.info`: :class:`QemuInfo`, what one binary offers;
* :mod:`~harness.qemu.probe`: :func:`probe_qemu` and :func:`device_creatable`;
* :mod:`~harness.qemu.probe_cache`: probe results kept in the process and on disk;
* :mod:`~harness.qemu.boot_probe`: :func:`probe_boot` (-> :class:`BootProbe`) runs guest code
  under an accelerator.

Everything is importable from ``harness.qemu``.
"""

from harness.qemu.boot_probe import PROBE_ASM, BootProbe, _probe_rom, probe_boot
from harness.qemu.find import (
    BINARY, PATCH_DIR, QBOOT_ENV, QEMU_AARCH64_ENV, QEMU_ENV, SETUP_HINT, SYSTEM_QBOOT, cache_dir,
    current_build, find_firmware, find_qemu, patch_hash, qemu_env,
)
from harness.qemu.info import QemuInfo
from harness.qemu.probe import REFUSAL, device_creatable, probe_qemu

__all__ = [
    "QemuInfo",
    "BootProbe",
    "cache_dir",
    "find_qemu",
    "current_build",
    "patch_hash",
    "probe_qemu",
    "find_firmware",
    "probe_boot",
    "device_creatable",
    "QEMU_ENV",
    "QEMU_AARCH64_ENV",
    "qemu_env",
    "SETUP_HINT",
    "QBOOT_ENV",
    "BINARY",
    "PATCH_DIR",
    "SYSTEM_QBOOT",
    "REFUSAL",
    "PROBE_ASM",
    "_probe_rom",  # the probe firmware image; tests compare it with PROBE_ASM reassembled
]
