"""The enclave's init (docs/boot.md#init): a static binary, reproducible, carrying its texts.

The build checks read the ELF program headers with ``struct`` (independently of the
builder's own pyelftools check). They need gcc and the static libc, no QEMU; init booting is
tests/boot/test_init_boot.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from harness.images import recipes

PT_DYNAMIC, PT_INTERP = 2, 3


def _program_header_types(path: Path) -> list[int]:
    """p_type of every program header of a little-endian ELF64 file (System V gABI layout)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert e_machine == 62  # EM_X86_64
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    return [struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] for i in range(e_phnum)]


def test_init_is_static():
    init = recipes.build_init()
    types = _program_header_types(init)
    assert types, "no program headers"
    # docs/boot.md#bootstrap-ramdisk: a dynamically linked init cannot boot.
    assert PT_INTERP not in types and PT_DYNAMIC not in types
    assert recipes.elf_interpreter(init) is None
    # The builder's check does see an interpreter where there is one.
    dynamic = Path(shutil.which("true") or "/bin/true").resolve()
    assert PT_INTERP in _program_header_types(dynamic)
    assert recipes.elf_interpreter(dynamic).startswith("/lib")


def test_init_build_is_reproducible(tmp_path):
    src = recipes.init_source_dir()
    outs = []
    for n in ("a", "b"):
        out = tmp_path / n / "init"
        out.parent.mkdir()
        subprocess.run(["make", "-s", "-C", str(src), f"OUT={out}"], check=True,
                       capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == recipes.build_init().read_bytes()


def test_init_carries_its_log_prefix_and_search_path():
    data = recipes.build_init().read_bytes()
    # (The "nitro-init: " prefix itself is inlined by gcc as immediates; the boots check it.)
    assert b"fatal: %s; ending the enclave" in data
    # init's search path for argv[0] (docs/boot.md#init).
    assert b"/sbin:/usr/sbin:/bin:/usr/bin" in data
    assert b"/modules/order" in data and b"/nsm.ko" in data
