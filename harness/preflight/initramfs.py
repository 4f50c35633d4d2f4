"""The initramfs an EIF's ramdisks unpack into, as an index to look paths up in.

docs/boot.md#bootstrap-ramdisk, docs/boot.md#customer-ramdisk: the hypervisor loads every ramdisk
back to back and the kernel unpacks each newc archive into one root, a later entry replacing an
earlier one of the same name; init then ``chroot``s into ``/rootfs``. :class:`Initramfs` reads
the archives with :func:`harness.cpio.iter_cpio` (one streaming pass, a file's data never kept)
and remembers for each entry its mode, size, symlink target and where its data lies in the EIF,
so a check reads only the bytes it needs.
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from harness.cpio import HEADER_SIZE, CpioError, iter_cpio

__all__ = ["Node", "Initramfs", "Lookup"]

_MAX_LINKS = 40  # Linux's limit on symbolic links followed in one lookup (ELOOP)


@dataclass(frozen=True)
class Node:
    """One entry: ``name`` (no leading ``/``), ``mode``, ``size``, ``data_offset`` (in the EIF
    file), ``target`` (a symlink's), ``ramdisk`` (the section's index among the ramdisks)."""

    name: str
    mode: int
    size: int
    data_offset: int
    target: str | None
    ramdisk: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def executable(self) -> bool:
        """Any execute bit: init runs everything as root, which needs one of them."""
        return bool(self.mode & 0o111)


@dataclass(frozen=True)
class Lookup:
    """A path looked up: ``node`` (None when it does not exist), ``path`` (where the lookup
    ended, symlinks followed, as seen inside the root), ``problem`` (why it failed, or "")."""

    node: Node | None
    path: str
    problem: str = ""


class _Slice:
    """The ``read`` of a byte range of an open file: what iter_cpio needs of a ramdisk."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        f.seek(start)
        self.f, self.left = f, size

    def read(self, n: int) -> bytes:
        b = self.f.read(min(n, self.left))
        self.left -= len(b)
        return b


_IMPLICIT_DIR = stat.S_IFDIR | 0o755


class Initramfs:
    """The merged ramdisks of one EIF (see the module doc); ``problems`` lists ramdisks that
    could not be read, one line each."""

    def __init__(self, eif_path: Path, nodes: dict[str, Node], problems: list[str]):
        self.eif_path = eif_path
        self.nodes = nodes
        self.problems = problems
        self._dirs = {posixpath.dirname(n) for n in nodes}

    @classmethod
    def load(cls, eif_path: Path, ramdisks: list[tuple[int, int]]) -> "Initramfs":
        """Index the ramdisks given as ``(data offset, size)`` of the EIF at ``eif_path``, in
        table order. A ramdisk that is not an uncompressed newc archive is a ``problem``."""
        nodes: dict[str, Node] = {}
        problems: list[str] = []
        with open(eif_path, "rb") as f:
            for i, (offset, size) in enumerate(ramdisks):
                f.seek(offset)
                if f.read(2) == b"\x1f\x8b":
                    problems.append(f"ramdisk {i} is gzip-compressed (nitro-cli writes plain "
                                    "newc archives): its files were not checked")
                    continue
                try:
                    for r in iter_cpio(_Slice(f, offset, size)):
                        end = r.offset + HEADER_SIZE + r.namesize
                        name = posixpath.normpath(r.name).lstrip("/")
                        target = r.data.decode("utf-8", "surrogateescape") if \
                            stat.S_ISLNK(r.mode) else None
                        nodes[name] = Node(name, r.mode, r.filesize, offset + end + (-end % 4),
                                           target, i)
                except CpioError as e:
                    problems.append(f"ramdisk {i} is not a valid newc archive ({e})")
        return cls(eif_path, nodes, problems)

    def get(self, name: str) -> Node | None:
        """The entry ``name`` (with or without a leading ``/``), not following symlinks; a
        directory only implied by the entries below it counts as one."""
        name = posixpath.normpath("/" + name).lstrip("/")
        node = self.nodes.get(name)
        if node is None and name in self._dirs:
            node = Node(name, _IMPLICIT_DIR, 0, 0, None, -1)
        return node

    def lookup(self, path: str, root: str = "") -> Lookup:
        """Look ``path`` up below ``root`` (``"rootfs"`` for the application's view) the way
        the kernel does after ``chroot``: absolute symlinks restart at ``root``, ``..`` stops
        there, at most 40 links are followed."""
        parts = [p for p in path.split("/") if p and p != "."]
        done: list[str] = []
        links = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            done.append(part)
            node = self.get("/".join([root, *done]) if root else "/".join(done))
            shown = "/" + "/".join(done)
            if node is None:
                return Lookup(None, shown, f"{shown} does not exist")
            if node.target is not None:
                links += 1
                if links > _MAX_LINKS:
                    return Lookup(None, shown, f"{shown}: too many levels of symbolic links")
                done.pop()
                if node.target.startswith("/"):
                    done = []
                parts = [p for p in node.target.split("/") if p and p != "."] + parts
            elif parts and not node.is_dir:
                return Lookup(None, shown, f"{shown} is not a directory")
        shown = "/" + "/".join(done)
        node = self.get("/".join([root, *done]) if root else "/".join(done))
        return Lookup(node, shown, "" if node else f"{shown} does not exist")

    def read_at(self, node: Node):
        """A ``read_at(offset, size)`` over ``node``'s data (reads stop at its end)."""
        def read(offset: int, size: int) -> bytes:
            if offset >= node.size or size <= 0:
                return b""
            with open(self.eif_path, "rb") as f:
                f.seek(node.data_offset + offset)
                return f.read(min(size, node.size - offset))
        return read

    def read(self, node: Node, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of ``node``'s data."""
        return self.read_at(node)(0, limit)
