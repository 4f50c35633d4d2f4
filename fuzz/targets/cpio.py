"""Fuzz target: the newc cpio reader, on bytes and as check-eif indexes an EIF's ramdisks.

One input is a whole archive. It is read by :func:`harness.cpio.read_cpio` (every record, the
trailer kept) and indexed by :class:`harness.preflight.initramfs.Initramfs` as one ramdisk of a
file, whose lookups then follow the archive's symbolic links (docs/boot.md#archive-format).
Declared errors: ``CpioError`` (the reader); the index records unreadable archives as
problems and raises nothing.
"""

from __future__ import annotations

from harness.cpio import CpioError, read_cpio
from harness.preflight.initramfs import Initramfs

from fuzz.scratch import MemFile

NAME = "cpio"
DECLARED = (CpioError,)
MAX_LEN = 4096

_FILE = MemFile("fuzz-cpio")
#: Paths check-eif looks up (init, the application's shell and command, a relative one).
_LOOKUPS = (("init", ""), ("bin/sh", "rootfs"), ("/usr/bin/env", "rootfs"), ("a/../b/./c", ""))


def one_input(data: bytes) -> None:
    """Read ``data`` as a newc archive, then index it as a ramdisk and look paths up."""
    path = _FILE.holding(data)
    index = Initramfs.load(path, [(0, len(data))])
    for name, root in _LOOKUPS:
        found = index.lookup(name, root)
        if found.node is not None and found.node.is_file:
            index.read(found.node, 64)
    for record in read_cpio(data, with_trailer=True):
        _ = record.is_dir, record.is_symlink, record.is_file
