"""The two architectures Nitro Enclaves run on, and what differs between them for the harness.

docs/architecture.md#architectures: an EIF says which architecture it is for in its header's
flags (bit 0 set: aarch64, a Graviton parent; clear: x86_64). Everything the harness does for
one architecture it does for the other; what differs is data, kept here: the kernel blob's name
(``bzImage`` or ``Image``), the QEMU binary and machine that boot it, the serial console the
machine offers, AWS's blob command line, Debian's name for the architecture (the packages an
image is built from) and the kernel tree's (``make ARCH=``) and cross compiler's prefix.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from harness.errors import ErrorCode, NitroError

__all__ = ["AARCH64", "ARCHES", "Arch", "FLAG_AARCH64", "X86_64", "arch_named", "from_eif_flags",
           "host_arch"]

#: The EIF header's flags bit that marks an aarch64 image (docs/eif-format.md#header). Defined
#: here, with nothing but the standard library imported, so that the set-up can read this module
#: before the harness's dependencies are installed.
FLAG_AARCH64 = 0x1

@dataclass(frozen=True)
class Arch:
    """One architecture: ``name`` as nitro-cli and ``uname -m`` spell it (``x86_64``,
    ``aarch64``); ``eif_flags`` the header flags an EIF for it carries; ``kernel_blob`` the
    kernel file in a blobs folder; ``qemu_binary`` and ``qemu_target`` (QEMU's
    ``--target-list`` entry); ``debian`` dpkg's architecture; ``kernel_arch`` the kernel tree's
    ``ARCH``; ``cross_prefix`` the Debian cross toolchain's prefix (empty on an x86_64 host for
    x86_64); ``console`` the serial console device the harness's machine gives the guest;
    ``aws_cmdline`` the command line in AWS's blobs for it (docs/boot.md#kernel-command-line);
    ``suffix`` what a recipe name for this architecture ends with (``-arm64``; '' for x86_64).
    """

    name: str
    eif_flags: int
    kernel_blob: str
    qemu_binary: str
    qemu_target: str
    debian: str
    kernel_arch: str
    cross_prefix: str
    console: str
    aws_cmdline: str
    suffix: str

    def __str__(self) -> str:
        return self.name


X86_64 = Arch(
    name="x86_64", eif_flags=0, kernel_blob="bzImage", qemu_binary="qemu-system-x86_64",
    qemu_target="x86_64-softmmu", debian="amd64", kernel_arch="x86", cross_prefix="",
    console="ttyS0",
    aws_cmdline=("reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux "
                 "i8042.nopnp i8042.dumbkbd random.trust_cpu=on"),
    suffix="",
)
AARCH64 = Arch(
    name="aarch64", eif_flags=FLAG_AARCH64, kernel_blob="Image",
    qemu_binary="qemu-system-aarch64", qemu_target="aarch64-softmmu", debian="arm64",
    kernel_arch="arm64", cross_prefix="aarch64-linux-gnu-",
    # QEMU's virt machine has a PL011 UART, not the 8250 AWS's command line names.
    console="ttyAMA0",
    aws_cmdline="reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0",
    suffix="-arm64",
)
#: By name; the order is the order they are listed in help texts.
ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, AARCH64)}


def arch_named(name: str) -> Arch:
    """The architecture called ``name`` (``x86_64`` or ``aarch64``; ``amd64`` and ``arm64``, as
    Debian and Docker say, are accepted too). Raises NitroError(E03 InvalidArgument) otherwise."""
    for arch in ARCHES.values():
        if name in (arch.name, arch.debian):
            return arch
    raise NitroError(ErrorCode.InvalidArgument,
                     f"architecture {name!r}: unknown (known: {', '.join(ARCHES)})")


def from_eif_flags(flags: int) -> Arch:
    """The architecture an EIF header's ``flags`` name: bit 0 set is aarch64, else x86_64
    (docs/eif-format.md#header; the reader rejects other bits before this is asked)."""
    return AARCH64 if flags & FLAG_AARCH64 else X86_64


def host_arch() -> Arch | None:
    """The architecture this host runs (``uname -m``), or None for one Nitro does not run on."""
    machine = platform.machine()
    return {"x86_64": X86_64, "amd64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}.get(machine)
