"""Fuzz target: the docker save / OCI image-layout loader, as build-enclave runs it.

One input is an image tarball (layers inside it as plain or gzip tar). Before loading, the
header checksum of every 512-byte block that carries the ustar magic is recomputed, so mutated
names, sizes and types reach the loader instead of stopping at tarfile's checksum test (the
layers' blocks are 512-aligned inside the outer archive, so theirs are repaired too). Then
:func:`harness.images.docker_archive.load_docker_archive`, the image's command, environment and
``docker inspect`` object, the EIF metadata made from it and the customer ramdisk written from
the layers (docs/boot.md#customer-ramdisk). Declared errors: ``NitroError`` (E48 naming the
archive and field, E19 for an unreadable file).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.eif.metadata import build_metadata, encode_metadata
from harness.errors import NitroError
from harness.images.docker_archive import load_docker_archive
from harness.images.ramdisk import build_customer_ramdisk

from fuzz.scratch import MemFile

NAME = "docker_archive"
DECLARED = (NitroError,)
#: A docker save archive with one small layer is 4-6 KiB once its zero padding is cut.
MAX_LEN = 16384

_FILE = MemFile("fuzz-docker-archive")
#: Where each input's layer files and ramdisk go (removed after the input): memory when the
#: machine has /dev/shm.
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
_BLOCK = 512


def repair_checksums(data: bytes) -> bytes:
    """``data`` with the checksum field (bytes 148-155) of every 512-aligned ustar header
    recomputed as tar defines it: the sum of the header's bytes with the field read as
    spaces, six octal digits, NUL, space."""
    out = bytearray(data)
    for start in range(0, len(out) - _BLOCK + 1, _BLOCK):
        block = out[start:start + _BLOCK]
        if block[257:262] != b"ustar":
            continue
        total = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        out[start + 148:start + 156] = b"%06o\0 " % total
    return bytes(out)


def one_input(data: bytes) -> None:
    """Load ``data`` as an image tarball and build the customer ramdisk from it."""
    path = _FILE.holding(repair_checksums(data))
    with tempfile.TemporaryDirectory(prefix="nitro-fuzz-docker-", dir=_SCRATCH) as tmp:
        work = Path(tmp)
        archive, rootfs = load_docker_archive(path, work / "files")
        cmd, env = archive.cmd, archive.env
        name = archive.repo_tags[0] if archive.repo_tags else "fuzz"
        encode_metadata(build_metadata(image_name=name, build_time="2025-01-01T00:00:00+00:00",
                                       docker_info=archive.docker_info()))
        build_customer_ramdisk(work / "customer.cpio", rootfs, cmd, env)
