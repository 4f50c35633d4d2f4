"""Boot files extracted once per EIF content and reused by later boots (docs/boot.md#boot-files).

Booting an EIF needs its kernel, command line and concatenated ramdisks as files for QEMU
(:func:`harness.eif.boot_files.extract_boot_files`), which costs a second read of the whole EIF
after the one that measured it. :func:`cached_boot_files` keeps them in a cache folder named by
the EIF's content, so every later boot of the same content (the same EIF, or a copy of it) finds
them there. The content is named by its measurements (PCR0 covers the kernel, the command line
and every ramdisk, PCR1 and PCR2 split them) and the sections' types and sizes in table order,
which fix where one section ends and the next begins (the PCRs hash the sections' bytes end to
end). An entry is written into a temporary folder and renamed into place whole, so a reader sees
a complete entry or none, whatever other processes do at the same time. The cache keeps the
:data:`KEEP` most recently used entries, and never removes an entry used in the last
:data:`IDLE_S` seconds (a QEMU starting may be reading it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from harness.arch import from_eif_flags
from harness.eif.boot_files import BootFiles, check_bootable, extract_boot_files
from harness.eif.reader import read_eif
from harness.pcr import Measurements

__all__ = ["KEEP", "IDLE_S", "content_key", "cached_boot_files"]

#: Entries kept beyond those used recently.
KEEP = 8
#: An entry used this recently (seconds) is never removed.
IDLE_S = 600.0
_COMPLETE = ".complete"
_TMP_PREFIX = ".tmp-"


def content_key(sections: list, measurements: Measurements) -> str:
    """The cache name of an EIF's boot content: 32 hex digits of SHA-256 over its PCR0, PCR1 and
    PCR2 and each section's type and size in table order (``sections``: the parsed EIF's)."""
    digest = hashlib.sha256(b"nitro-harness boot files 1\0")
    digest.update(measurements.pcr0 + measurements.pcr1 + measurements.pcr2)
    for section in sections:
        digest.update(struct.pack("<HQ", int(section.type), section.size))
    return digest.hexdigest()[:32]


def cached_boot_files(eif_path: Path | str, measurements: Measurements, cache_dir: Path,
                      fallback_dir: Path) -> BootFiles:
    """The boot files of the EIF at ``eif_path``, already measured (``measurements``) and
    CRC-checked: from ``cache_dir`` when an earlier boot left them there, else extracted into it.

    Where the cache cannot be written, they are extracted into ``fallback_dir`` instead. The
    returned files must not be written to. Raises NitroError E35 for an EIF the hypervisor
    would not boot (version below 4), whether or not it is cached, and as
    :func:`extract_boot_files` does.
    """
    eif_path = Path(eif_path)
    eif = read_eif(eif_path, check_crc=False)
    check_bootable(eif_path, eif)
    entry = Path(cache_dir) / content_key(eif.sections, measurements)
    if (entry / _COMPLETE).is_file():
        try:
            cmdline = (entry / "cmdline").read_text()
            os.utime(entry)  # used now: kept by the eviction below for a while
        except OSError:
            pass  # removed meanwhile: extract again below
        else:
            return BootFiles(entry / "kernel", cmdline, entry / "initrd", measurements,
                             from_eif_flags(eif.header.flags))
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=cache_dir))
    except OSError:
        return extract_boot_files(eif_path, fallback_dir)
    try:
        boot = extract_boot_files(eif_path, work)
        (work / "cmdline").write_text(boot.cmdline)
        (work / _COMPLETE).touch()
        try:
            os.rename(work, entry)
        except OSError:  # another boot put the same entry in place first: use that one
            shutil.rmtree(work, ignore_errors=True)
            if not (entry / _COMPLETE).is_file():
                return extract_boot_files(eif_path, fallback_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _evict(Path(cache_dir))
    return BootFiles(entry / "kernel", boot.cmdline, entry / "initrd", boot.measurements,
                     boot.arch)


def _evict(cache_dir: Path) -> None:
    """Remove the entries beyond the :data:`KEEP` most recently used ones, and temporary folders
    of extractions that died, each only when unused for :data:`IDLE_S` seconds."""
    now = time.time()
    aged: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for path in cache_dir.iterdir():
            with contextlib.suppress(OSError):
                aged.append((path.stat().st_mtime, path))
    aged.sort(reverse=True)
    entries = [(t, p) for t, p in aged if not p.name.startswith(_TMP_PREFIX)]
    temporary = [(t, p) for t, p in aged if p.name.startswith(_TMP_PREFIX)]
    for used, path in entries[KEEP:] + temporary:
        if now - used > IDLE_S:
            shutil.rmtree(path, ignore_errors=True)
