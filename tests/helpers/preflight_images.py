"""EIFs for the preflight checks: a good image and one broken variant per rule, built with
:func:`harness.eif.write_eif` and :mod:`harness.cpio` (no build, no QEMU).

The kernel is hello's (the harness's Nitro-style kernel, ``{cache}/kernel-current``) when the
cache has it, else a hand-made bzImage of the same shape (:mod:`helpers.kernels`); programs are
minimal ELF files (an ELF header and program headers, optionally ``PT_INTERP``): the checks read
headers, never run anything.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

from harness import cpio, eif
from helpers.kernels import FAKE_VERMAGIC, cached_kernel, cached_nsm_ko, fake_bzimage, vmlinux

X86_64, AARCH64 = 62, 183
LD_SO = "/lib64/ld-linux-x86-64.so.2"


def elf_program(interp: str | None = None, machine: int = X86_64) -> bytes:
    """A minimal 64-bit little-endian ELF executable: a PT_LOAD and, with ``interp``, a
    PT_INTERP naming it (a dynamically linked program)."""
    phnum = 2 if interp else 1
    phoff = 64
    interp_off = phoff + 56 * phnum
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0x401000, phoff, 0, 0, 64, 56, phnum,
                          64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 4096, 4096, 4096)
    tail = b""
    if interp:
        raw = interp.encode() + b"\0"
        phdrs = struct.pack("<IIQQQQQQ", 3, 4, interp_off, 0, 0, len(raw), len(raw), 1) + phdrs
        tail = raw
    return header + phdrs + tail + b"\0" * 64


def kernel_module(vermagic: str) -> bytes:
    """A stand-in ``nsm.ko``: an ELF header and a ``.modinfo`` with ``vermagic=``."""
    return elf_program() + b"\0vermagic=" + vermagic.encode() + b"\0name=nsm\0"


def hello_kernel() -> tuple[bytes, bytes]:
    """``(bzImage, nsm.ko)``: hello's kernel and its module from the cache, else hand-made ones."""
    kernel, nsm = cached_kernel("nitro"), cached_nsm_ko("nitro")
    if kernel is not None and nsm is not None:
        return kernel.read_bytes(), nsm.read_bytes()
    return fake_bzimage(vmlinux(None, param=True)), kernel_module(FAKE_VERMAGIC)


@dataclass
class Image:
    """What goes into one test EIF; :meth:`write` makes it. ``rootfs`` maps names to
    entries (None removes one), ``init``, ``nsm_ko``, ``cmd``, ``env`` None leave the file out."""

    kernel: bytes
    nsm_ko: bytes | None
    init: bytes | None = field(default_factory=elf_program)
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/app", "--serve"])
    env: list[str] | None = field(default_factory=lambda: ["PATH=/usr/bin:/bin"])
    rootfs: dict[str, cpio.Entry | None] = field(default_factory=dict)
    metadata: dict | None = None
    aarch64: bool = False  # the EIF header's architecture flag

    @classmethod
    def good(cls) -> "Image":
        kernel, nsm = hello_kernel()
        image = cls(kernel, nsm)
        image.rootfs = {
            "bin/app": cpio.Entry.file("bin/app", elf_program(LD_SO), mode=0o755),
            "bin/sh": cpio.Entry.file("bin/sh", elf_program(), mode=0o755),
            "usr/bin/env": cpio.Entry.file("usr/bin/env", elf_program(), mode=0o755),
            "usr/bin/python3": cpio.Entry.file("usr/bin/python3", elf_program(LD_SO), mode=0o755),
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": cpio.Entry.file(
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", elf_program(), mode=0o755),
            "lib64/ld-linux-x86-64.so.2": cpio.Entry.symlink(
                "lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            "app/run.py": cpio.Entry.file("app/run.py", b"#!/usr/bin/env python3\nprint(1)\n",
                                          mode=0o755),
        }
        return image

    def _ramdisk(self, entries) -> bytes:
        out = io.BytesIO()
        cpio.write_cpio(out, [e for e in entries if e is not None])
        return out.getvalue()

    def write(self, path: Path) -> Path:
        """Write the EIF (bootstrap ramdisk: dev/, init, nsm.ko; customer: rootfs/, cmd, env)."""
        boot = [cpio.Entry.directory("dev")]
        if self.init is not None:
            boot.append(cpio.Entry.file("init", self.init, mode=0o755))
        if self.nsm_ko is not None:
            boot.append(cpio.Entry.file("nsm.ko", self.nsm_ko, mode=0o755))
        customer = [cpio.Entry.directory("rootfs")]
        for d in ("dev", "proc", "sys", "tmp", "run", "var"):
            customer.append(cpio.Entry.directory(f"rootfs/{d}"))
        customer += [cpio.with_prefix(e, "rootfs") for e in self.rootfs.values() if e]
        if self.cmd is not None:
            customer.append(cpio.Entry.file("cmd", "".join(a + "\n" for a in self.cmd).encode()))
        if self.env is not None:
            customer.append(cpio.Entry.file("env", "".join(a + "\n" for a in self.env).encode()))
        cmdline = "reboot=k panic=30 pci=off nomodules console=ttyS0"
        eif.write_eif(path, self.kernel, cmdline, [self._ramdisk(boot), self._ramdisk(customer)],
                      self.metadata, aarch64=self.aarch64)
        return path
