"""What the preflight needs to know of an executable: ELF machine and interpreter, a script's
``#!`` line, a kernel module's ``vermagic`` (docs/boot.md#init).

Reads through a ``read_at(offset, size) -> bytes`` callable, so a file inside a ramdisk is never
loaded whole: only the ELF header, the program headers and the ``PT_INTERP`` string.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Callable

__all__ = ["ElfFacts", "elf_facts", "shebang", "module_vermagic", "MACHINES"]

ReadAt = Callable[[int, int], bytes]
#: e_machine values of the architectures an enclave kernel may run.
MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64"}
_PT_INTERP = 3
_MAX_PHNUM = 512
# Linux's BINPRM_BUF_SIZE: the kernel reads at most this much of a "#!" line.
_SHEBANG_MAX = 256


@dataclass(frozen=True)
class ElfFacts:
    """``machine`` (``"x86_64"``, ``"aarch64"``, ... or ``"e_machine N"``), ``bits`` (32 or 64),
    ``interp`` (the ``PT_INTERP`` path of a dynamically linked program, None when static)."""

    machine: str
    bits: int
    interp: str | None


def elf_facts(read_at: ReadAt) -> ElfFacts | None:
    """The ELF facts of a file, or None when it is not a (readable) ELF file."""
    head = read_at(0, 64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    bits = 64 if head[4] == 2 else 32
    e = "<" if head[5] == 1 else ">"
    machine_no = struct.unpack_from(e + "H", head, 18)[0]
    if bits == 64:
        phoff = struct.unpack_from(e + "Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from(e + "HH", head, 54)
    else:
        phoff = struct.unpack_from(e + "I", head, 28)[0]
        phentsize, phnum = struct.unpack_from(e + "HH", head, 42)
    machine = MACHINES.get(machine_no, f"e_machine {machine_no}")
    interp = None
    if phentsize and 0 < phnum <= _MAX_PHNUM:
        table = read_at(phoff, phentsize * phnum)
        for i in range(len(table) // phentsize):
            ph = table[i * phentsize:(i + 1) * phentsize]
            if struct.unpack_from(e + "I", ph, 0)[0] != _PT_INTERP:
                continue
            if bits == 64:
                off, size = struct.unpack_from(e + "Q", ph, 8)[0], struct.unpack_from(e + "Q", ph, 32)[0]
            else:
                off, size = struct.unpack_from(e + "I", ph, 4)[0], struct.unpack_from(e + "I", ph, 16)[0]
            raw = read_at(off, min(size, 4096))
            interp = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            break
    return ElfFacts(machine, bits, interp)


def shebang(read_at: ReadAt) -> list[str] | None:
    """A script's ``#!`` line split as the kernel does (interpreter, then at most one argument),
    or None when the file does not start with ``#!``."""
    head = read_at(0, _SHEBANG_MAX)
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        return []
    interp, _, arg = line.replace(b"\t", b" ").partition(b" ")
    words = [interp.decode("utf-8", "replace")]
    if arg.strip():
        words.append(arg.strip().decode("utf-8", "replace"))
    return words


def module_vermagic(data: bytes) -> str | None:
    """The ``vermagic=`` value of a kernel module's ``.modinfo`` (``"6.12.118 SMP mod_unload "``),
    or None when the module has none."""
    m = re.search(rb"(?:^|\0)vermagic=([^\0]*)\0", data)
    return m.group(1).decode("utf-8", "replace") if m else None
