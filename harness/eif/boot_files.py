"""What QEMU boots from an EIF: the kernel, its command line and one initrd (docs/boot.md).

The hypervisor loads every ramdisk of the image back to back as one initrd; QEMU's
``nitro-enclave`` machine does the same from the files :func:`extract_boot_files` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.arch import X86_64, Arch, from_eif_flags
from harness.eif.format import (
    MEASURED, SectionType, crc32, decode_cmdline, decode_signature_section, fail, first_cert_der,
)
from harness.eif.measurement import PcrChains
from harness.eif.reader import read_eif
from harness.eif.sources import FileRange, chunks
from harness.eif.writer import output_file
from harness.errors import ErrorCode
from harness.pcr import Measurements, pcr_for_certificate_der


@dataclass(frozen=True)
class BootFiles:
    """What QEMU boots: ``kernel`` file, ``cmdline`` string, ``initrd`` file (all ramdisks
    concatenated in table order, as the hypervisor loads them), the EIF's measurements and
    its architecture (:class:`harness.arch.Arch`, from the header's flags)."""

    kernel: Path
    cmdline: str
    initrd: Path
    measurements: Measurements | None = None
    arch: Arch = X86_64


def check_bootable(eif_path: Path, eif: Any) -> None:
    """Raise ``NitroError(E35)`` when the parsed EIF ``eif`` is one the hypervisor refuses to
    boot (docs/eif-format.md): version below 4. Either architecture flag boots, each on its
    own machine (docs/boot.md#aarch64-machine); the reader has refused other flag bits."""
    if eif.version < 4:
        raise fail(eif_path, "version", f"{eif.version} < 4: the hypervisor boots only v4 images")


def extract_boot_files(eif_path: Path | str, dest_dir: Path | str) -> BootFiles:
    """Validate an EIF as the hypervisor/QEMU would and write ``kernel`` and ``initrd`` files.

    Rules beyond :func:`read_eif` (QEMU's nitro-enclave loader, docs/eif-format.md): version
    >= 4, matching CRC. Writes
    ``dest_dir/kernel`` and ``dest_dir/initrd`` (every ramdisk concatenated in table order)
    atomically (harness.atomic_file, without fsync: they are rebuilt for every boot),
    computing the CRC and PCR0/1/2/8 in the same read. Raises ``NitroError(E35)`` (nothing is
    left in ``dest_dir`` then).
    """
    eif_path, dest = Path(eif_path), Path(dest_dir)
    eif = read_eif(eif_path, check_crc=False)
    check_bootable(eif_path, eif)
    dest.mkdir(parents=True, exist_ok=True)
    kpath, ipath = dest / "kernel", dest / "initrd"
    pcrs = PcrChains([s.type for s in eif.sections])  # measured in table order, as QEMU does
    cmd_raw = b""
    with open(eif_path, "rb") as f, \
            output_file(kpath, ErrorCode.EifParsingError, fsync=False) as kf, \
            output_file(ipath, ErrorCode.EifParsingError, fsync=False) as rf:
        crc = eif.header.crc_start()
        for s in eif.sections:
            crc = crc32(s.header_bytes(), crc)
            sink = {SectionType.KERNEL: kf.write, SectionType.RAMDISK: rf.write}.get(s.type)
            measured = s.type in MEASURED
            feed = (pcrs.feed_app if pcrs.role() == "app" else pcrs.feed_boot) if measured \
                else None
            for b in chunks(FileRange(f, s.data_offset, s.size), s.size,
                            ErrorCode.EifParsingError, f"section {s.index}"):
                crc = crc32(b, crc)
                if sink is not None:
                    sink(b)
                if s.type == SectionType.CMDLINE:
                    cmd_raw += b
                if feed is not None:
                    feed(b)
            if measured:
                pcrs.end_section()
        if crc != eif.header.crc32:
            raise fail(eif_path, "crc32", f"stored 0x{eif.header.crc32:08x} != computed "
                                          f"0x{crc:08x}: the image is corrupt")
        cmdline = decode_cmdline(eif_path, cmd_raw)
    pcr8 = None
    if eif.signature_raw is not None:
        pem, _ = decode_signature_section(eif_path, eif.signature_raw)
        pcr8 = pcr_for_certificate_der(first_cert_der(eif_path, pem))
    return BootFiles(kpath, cmdline, ipath, pcrs.result(pcr8), from_eif_flags(eif.header.flags))


def kernel_version_of(kernel: Path | str) -> str | None:
    """Return the version string embedded in an x86 bzImage (setup header), or None.

    The boot protocol puts a pointer at 0x20E to a NUL-terminated string at 0x200 + pointer
    (Documentation/x86/boot.rst); only its first word (e.g. ``6.12.38+deb13-cloud-amd64``)
    is returned.
    """
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    from harness.bzimage import setup_header_version

    text = setup_header_version(head)
    return text.split()[0] if text else None
