"""Enclave Image Files: read (as the hypervisor does), measure, write, sign, verify, unpack.

docs/eif-format.md is the byte layout, docs/pcrs.md the measurements. One idea per module:

* :mod:`~harness.eif.format`: header and section layout, constants, section types, the
  parsed :class:`Eif`;
* :mod:`~harness.eif.reader`: :func:`read_eif` follows the section table (the hypervisor's and
  QEMU's view), checks every structural rule and the CRC, and says where nitro-cli's
  sequential walk from byte 548 would read the file differently;
* :mod:`~harness.eif.measurement`: :func:`measure_eif` (PCR0/1/2/8) and
  :func:`measure_and_check` (also the CRC) in one streaming read with flat memory;
* :mod:`~harness.eif.writer`: :func:`write_eif` writes sections in nitro-cli's order;
* :mod:`~harness.eif.signing`: :func:`sign_eif` (re-)signs, :func:`verify_eif_signature`
  checks a signature;
* :mod:`~harness.eif.metadata`: the metadata section nitro-cli writes;
* :mod:`~harness.eif.boot_files`: :func:`extract_boot_files` produces the kernel, command line
  and initrd QEMU boots.

Everything is importable from ``harness.eif``. Every user-facing failure is
``NitroError(E35 EifParsingError, "<file>: <field>: <rule>")`` (E48 for building, E59 for
signature checking, E60 for signing).
"""

from harness.eif.boot_files import BootFiles, extract_boot_files, kernel_version_of
from harness.eif.format import (
    CHUNK_SIZE, CURRENT_VERSION, DEFAULT_CPUS, DEFAULT_MEM, EIF_MAGIC, FLAG_AARCH64,
    HEADER_CRC_SPAN, HEADER_SIZE, KNOWN_VERSIONS, MAX_SECTIONS, SECTION_HEADER_SIZE, Eif,
    EifHeader, Section, SectionType,
)
from harness.eif.format import first_cert_der as _first_cert_der  # the CLI's `pcr` command
from harness.eif.measurement import measure_and_check, measure_eif
from harness.eif.metadata import BUILD_TOOL, build_metadata, encode_metadata
from harness.eif.reader import MAX_METADATA_SIZE, MAX_SIGNATURE_SIZE, eif_metadata, read_eif
from harness.eif.signing import (
    SignatureCheck, Signer, pcr0_payload, sign_eif, verify_eif_signature,
)
from harness.eif.writer import write_eif

__all__ = [
    "BUILD_TOOL", "CHUNK_SIZE", "CURRENT_VERSION", "DEFAULT_CPUS", "DEFAULT_MEM", "EIF_MAGIC",
    "FLAG_AARCH64", "HEADER_CRC_SPAN", "HEADER_SIZE", "KNOWN_VERSIONS", "MAX_METADATA_SIZE",
    "MAX_SECTIONS", "MAX_SIGNATURE_SIZE", "SECTION_HEADER_SIZE", "BootFiles", "Eif",
    "EifHeader", "Section", "SectionType", "SignatureCheck", "Signer", "build_metadata",
    "eif_metadata", "encode_metadata", "extract_boot_files", "kernel_version_of",
    "measure_and_check", "measure_eif", "pcr0_payload", "read_eif", "sign_eif",
    "verify_eif_signature", "write_eif",
]
