"""Folders in nitro-cli's blob layout and small root filesystems, for build-enclave's unit tests
(no real kernel: the bzImage is random bytes with a setup header and a version string)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

#: The version string the fake bzImage carries (its setup header points at it).
FAKE_KERNEL_VERSION = b"6.12.9-harness (builder@ci) #1 SMP"


def fake_blobs(dest: Path, cmdline: str = "reboot=k panic=30 pci=off nomodules console=ttyS0") -> Path:
    """``dest`` with ``bzImage`` (a setup header ``HdrS`` and :data:`FAKE_KERNEL_VERSION`),
    ``cmdline``, ``init`` and ``nsm.ko`` (ELF-looking random bytes)."""
    dest.mkdir(parents=True)
    kernel = bytearray(os.urandom(20000))
    kernel[0x202:0x206] = b"HdrS"
    kernel[0x20E:0x210] = struct.pack("<H", 0x1000)
    kernel[0x1200:0x1200 + len(FAKE_KERNEL_VERSION) + 1] = FAKE_KERNEL_VERSION + b"\0"
    (dest / "bzImage").write_bytes(bytes(kernel))
    (dest / "cmdline").write_text(cmdline + "\n")
    (dest / "init").write_bytes(b"\x7fELF" + os.urandom(3000))
    (dest / "nsm.ko").write_bytes(b"\x7fELF-nsm" + os.urandom(500))
    return dest


def small_rootfs(dest: Path, *, hostname: bool = True) -> Path:
    """``dest`` with an executable ``/bin/hello`` script and, with ``hostname``, ``/etc/hostname``."""
    (dest / "bin").mkdir(parents=True)
    (dest / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    os.chmod(dest / "bin" / "hello", 0o755)
    if hostname:
        (dest / "etc").mkdir()
        (dest / "etc" / "hostname").write_text("dev-box\n")
    return dest
