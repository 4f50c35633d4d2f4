"""Static programs built from ``harness/data/programs/<name>/``: the enclave's init and helpers
like nsm-pcr.

Each program is ``harness/data/programs/<name>/<name>.c`` (plus other C sources and headers)
and a Makefile that links statically: the bootstrap ramdisk and busybox images have no libc, and
a dynamically linked init cannot boot (docs/boot.md). A build is cached under
``~/.cache/nitro-harness/init/<key>/init`` (init) or ``.../programs/<name>/<key>/<name>``, keyed
by :func:`program_key`: the sources, the Makefile and the toolchain's versions. Errors are
NitroError(E48) naming the source file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from harness.atomic_file import write_atomically
from harness.images import debian
from harness.images.recipe import Log, fail, nolog, program_source_dir


def _toolchain_id() -> str:
    """Compiler, linker and C library versions: what decides a static program's bytes."""
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "none"
        return (out.strip().splitlines() or ["none"])[0]

    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "unknown"
    gcc = first_line(["gcc", "-dumpfullversion"])
    ld = first_line(["ld", "--version"])
    return f"gcc {gcc}; {ld}; {libc}"


def _program_sources(name: str) -> list[str]:
    """The files a program's key covers: ``<name>.c`` first, other C sources and headers
    sorted, the Makefile last (for init exactly init.c then Makefile, the order its key has
    always had, so inits already in the cache stay valid)."""
    src = program_source_dir(name)
    main = f"{name}.c"
    others = sorted(p.name for p in src.glob("*") if p.suffix in (".c", ".h") and p.name != main)
    return [main, *others, "Makefile"]


def program_key(name: str) -> str:
    """Cache key of a static program: its sources, Makefile and the toolchain's versions.

    Raises NitroError(E48) when ``harness/data/programs/<name>`` lacks ``<name>.c`` or its
    Makefile."""
    src = program_source_dir(name)
    h = hashlib.sha256(_toolchain_id().encode())
    for n in _program_sources(name):
        try:
            data = (src / n).read_bytes()
        except OSError as e:
            raise fail(src / n, f"{name}: cannot read the program's source: "
                       f"{e.strerror or e}") from None
        h.update(n.encode() + b"\0" + data)
    return h.hexdigest()


def _program_cache_dir(name: str) -> Path:
    # init keeps the location it always had; other programs live apart from the cache's own
    # directories (images, kernels, ...), whatever they are called.
    root = debian.cache_root()
    return root / "init" if name == "init" else root / "programs" / name


def build_static_program(name: str, log: Log = nolog) -> Path:
    """Build (or reuse) the static program ``harness/data/programs/<name>`` and return its path
    in the cache.

    Runs ``make -C harness/data/programs/<name> OUT=<cache>/<key>/<name>`` (the Makefile links
    statically: the bootstrap ramdisk and busybox images have no libc). Raises NitroError(E48)
    when gcc or make is missing (``apt-get install build-essential``), the build fails, or the
    result is dynamically linked.
    """
    src = program_source_dir(name)
    key = program_key(name)
    out_dir = _program_cache_dir(name) / key[:16]
    out = out_dir / name
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise fail(src, f"{name}: gcc and make are required "
                   "(apt-get install build-essential)")
    log(f"building {name} ({src / f'{name}.c'})")
    # make writes a scratch file of its own; only a checked, static result becomes ``out``.
    tmp = out_dir / f".{name}.{os.getpid()}"
    try:
        proc = subprocess.run(["make", "-s", "-C", str(src), f"OUT={tmp}"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tmp.is_file():
            tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            raise fail(src / f"{name}.c", f"{name}: build failed: {tail}")
        interp = elf_interpreter(tmp)
        if interp is not None:
            raise fail(src / "Makefile", f"{name}: dynamically linked (PT_INTERP {interp}); "
                       "link it with -static")
        write_atomically(out, tmp.read_bytes(), mode=0o755)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def init_source_dir() -> Path:
    """Directory of the enclave init's source (``harness/data/programs/init``: init.c and its
    Makefile)."""
    return program_source_dir("init")


def init_key() -> str:
    """Cache key of the init binary: its source, Makefile and the toolchain's versions."""
    return program_key("init")


def build_init(log: Log = nolog) -> Path:
    """Build (or reuse) the static enclave init and return its path in the cache.

    :func:`build_static_program` of ``harness/data/programs/init`` (gcc -static -O2; docs/boot.md: a
    dynamically linked init cannot boot). Raises NitroError(E48) when gcc or the static libc
    is missing (``apt-get install build-essential``) or the build fails.
    """
    return build_static_program("init", log)


def elf_interpreter(path: Path) -> str | None:
    """Return the PT_INTERP path of an ELF file (None for a static binary).

    Raises NitroError(E48) when ``path`` is not an ELF file.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    return seg.get_interp_name()
    except ELFError as e:
        raise fail(path, f"not an ELF file: {e}") from None
    return None

