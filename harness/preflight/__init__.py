"""Preflight: will this EIF boot, and boot as on Nitro? (docs/nitro-cli.md#check-eif)

``nitro-harness check-eif`` runs :func:`check_eif` and prints one line per
:class:`~harness.preflight.findings.Finding`; :class:`harness.enclave.Enclave` runs the same
checks before every boot, and run-enclave prints them as warnings. The checks, in order:

* the file (:mod:`~harness.preflight.eif_checks`): header and sections, CRC, version and
  architecture flag, nitro-cli's sequential view, the signature;
* the kernel (:mod:`~harness.preflight.kernel_checks`): a 64-bit bzImage that takes
  ``virtio_mmio.device=`` entries, and an ``nsm.ko`` built for it;
* init and the application (:mod:`~harness.preflight.image_checks`): ``/init`` static and
  executable, ``/cmd`` and ``/env`` present, the command resolvable in ``/rootfs`` the way init
  resolves it, executable, with its interpreter;
* how it is run: memory (nitro-cli's 4x rule) and debug mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.arch import from_eif_flags
from harness.bzimage import KernelImage, read_kernel_image
from harness.eif import SectionType, read_eif
from harness.preflight import eif_checks
from harness.preflight.findings import ERROR, INFO, WARNING, Finding, counts, first_error
from harness.preflight.image_checks import command_findings, init_findings
from harness.preflight.initramfs import Initramfs
from harness.preflight.kernel_checks import kernel_findings, nsm_findings

__all__ = ["ERROR", "INFO", "WARNING", "Finding", "check_eif", "counts", "first_error"]


def _kernel_of(parsed: Any) -> KernelImage:
    section = parsed.of_type(SectionType.KERNEL)[0]
    return read_kernel_image(parsed.read_section(section))


def check_eif(path: Path | str, *, memory_mib: int | None = None,
              debug_mode: bool | None = None, kernel: KernelImage | None = None,
              measurements: Any = None) -> list[Finding]:
    """Every preflight finding for the EIF at ``path``, in check order.

    ``memory_mib`` and ``debug_mode`` are the run's settings (None: not known, the memory
    minimum and debug mode's consequences are then given as information). ``kernel`` is the
    already read kernel and ``measurements`` the already checked measurements of an enclave
    about to boot: with ``measurements`` the file is trusted to have passed the structure and
    CRC checks (:func:`harness.enclave_boot.check_eif`) and is not read whole again.

    Raises NitroError E19 when the file cannot be opened; every problem of the image itself is
    a finding.
    """
    path = Path(path)
    if measurements is None:
        measurements, parsed, found = eif_checks.read_and_check(path)
        if parsed is None:
            return found
    else:
        parsed, found = read_eif(path, check_crc=False), []
        found += eif_checks.structure_findings(parsed)
    found += eif_checks.signature_findings(path, parsed, measurements)
    kernel = kernel or _kernel_of(parsed)
    found += eif_checks.arch_findings(parsed, kernel)
    eif_arch = from_eif_flags(parsed.header.flags)
    found += kernel_findings(kernel, eif_arch)
    arch = kernel.arch if kernel.arch != "unknown" else eif_arch.name
    ramfs = Initramfs.load(path, [(s.data_offset, s.size) for s in parsed.ramdisks])
    found += init_findings(ramfs, arch)
    found += nsm_findings(kernel, ramfs)
    found += command_findings(ramfs, arch, parsed.metadata)
    found += eif_checks.memory_findings(path, parsed.file_size, memory_mib)
    found += eif_checks.debug_findings(debug_mode)
    return found
