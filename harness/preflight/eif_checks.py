"""Preflight checks of the EIF as a file and of how it is run: header and sections, CRC,
signature, architecture flag, memory (nitro-cli's 4x rule), debug mode.

docs/eif-format.md#validation, docs/eif-format.md#crc, docs/eif-format.md#signature-section,
docs/nitro-cli.md#validation-rules (memory), docs/attestation.md#debug-mode.
"""

from __future__ import annotations

import math
from typing import Any

from harness import eif as eif_mod
from harness.allocator import MIN_MEMORY_MIB
from harness.arch import from_eif_flags
from harness.errors import ErrorCode, NitroError
from harness.preflight.findings import Finding, error, info, warning

__all__ = ["read_and_check", "signature_findings", "memory_findings", "debug_findings",
           "minimum_memory_mib"]

E35 = ErrorCode.EifParsingError


def read_and_check(path) -> tuple[Any, Any, list[Finding]]:
    """Parse, measure and CRC-check the EIF at ``path``; return ``(measurements, eif,
    findings)``, with ``eif`` None when the file is not a valid EIF (then the one finding says
    why). Raises NitroError E19 only when the file cannot be opened."""
    try:
        measurements, parsed = eif_mod.measure_and_check(path)
    except NitroError as err:
        if err.code == ErrorCode.FileOperationFailure:
            raise
        return None, None, [error("eif-structure", err.message,
                                  "rebuild the EIF (nitro-cli build-enclave or "
                                  "nitro-harness build-enclave)", E35)]
    return measurements, parsed, structure_findings(parsed)


def structure_findings(parsed: Any) -> list[Finding]:
    """CRC, version and nitro-cli's sequential view of a parsed EIF (the architecture flag is
    checked against the kernel: :func:`arch_findings`)."""
    out = []
    if parsed.crc_ok is False:
        out.append(error("eif-crc", f"{parsed.path}: crc32: stored 0x{parsed.header.crc32:08x} "
                         f"!= computed 0x{parsed.crc_computed:08x}: the Nitro hypervisor "
                         "refuses the image", "rebuild or re-copy the EIF (it is corrupt)", E35))
    if parsed.version < 4:
        out.append(error("eif-version", f"{parsed.path}: version {parsed.version}: the "
                         "hypervisor boots only version 4 images",
                         "rebuild with a current nitro-cli", E35))
    for note in parsed.sequential_notes:
        out.append(warning("eif-sequential", f"{parsed.path}: {note}",
                           "rebuild with nitro-cli or nitro-harness build-enclave"))
    return out


def arch_findings(parsed: Any, kernel: Any) -> list[Finding]:
    """The header's architecture flag (bit 0: aarch64, docs/eif-format.md#header) must name the
    architecture of the kernel section (a bzImage is x86_64, an ``Image`` aarch64): the
    hypervisor boots the kernel for the parent's architecture only."""
    arch = from_eif_flags(parsed.header.flags)
    if kernel.arch in (arch.name, "unknown"):
        return []
    return [error("eif-arch", f"{parsed.path}: flags 0x{parsed.header.flags:04x}: an "
                  f"{arch.name} image, but its kernel section is {kernel.arch} "
                  f"({kernel.format})", "build the EIF from blobs of one architecture "
                  "(build-enclave sets the flag from the kernel blob)", E35)]


def signature_findings(path, parsed: Any, measurements: Any) -> list[Finding]:
    """A signed EIF's signature must check out (E59); an unsigned one is noted (no PCR8)."""
    if not parsed.is_signed:
        return [info("eif-signature", "unsigned: attestation documents carry no PCR8, "
                     "so KMS policies cannot pin the signer",
                     "sign it (build-enclave --signing-certificate/--private-key, or sign-eif) "
                     "if policies should name PCR8")]
    check = eif_mod.verify_eif_signature(path, measurements=measurements)
    if check.ok:
        return []
    return [error("eif-signature", f"{path}: signature: {check.reason}",
                  "re-sign it with sign-eif and a valid certificate",
                  ErrorCode.EIFSignatureCheckerError)]


def minimum_memory_mib(eif_size: int) -> int:
    """nitro-cli's smallest ``--memory`` for an EIF of ``eif_size`` bytes: 4 x its size in
    MiB, rounded up, and at least 64 MiB (docs/nitro-cli.md#validation-rules)."""
    return max(MIN_MEMORY_MIB, math.ceil(4 * eif_size / (1 << 20)))


def memory_findings(path, eif_size: int, memory_mib: int | None) -> list[Finding]:
    """With ``memory_mib``: an error (E26) below nitro-cli's minimum; without: the minimum."""
    minimum = minimum_memory_mib(eif_size)
    if memory_mib is None:
        return [info("memory", f"run-enclave needs --memory {minimum} or more "
                     f"(4 x the EIF's {eif_size} bytes, at least {MIN_MEMORY_MIB} MiB)")]
    if memory_mib < minimum:
        return [error("memory", f"--memory {memory_mib} MiB is below the {minimum} MiB an EIF "
                      f"of {eif_size} bytes needs (4 x its size, at least {MIN_MEMORY_MIB} MiB)",
                      f"--memory {minimum} or more", ErrorCode.InsufficientMemoryRequested)]
    return []


def debug_findings(debug_mode: bool | None) -> list[Finding]:
    """What debug mode means for attestation (docs/attestation.md#debug-mode): for a debug-mode
    run (True), for a run that is not (False: nothing), or in general (None)."""
    if debug_mode is False:
        return []
    if debug_mode:
        return [info("debug-mode", "debug mode: attestation documents carry PCR0, PCR1, PCR2 and "
                     "PCR8 as zeros, so KMS keys whose policy names those PCRs refuse them",
                     "run without --debug-mode to test attestation-gated KMS calls")]
    return [info("debug-mode", "with --debug-mode the enclave has a console, but its "
                 "attestation documents carry PCR0, PCR1, PCR2 and PCR8 as zeros")]
