"""Static programs built from ``harness/data/programs/<name>/``: the enclave's init and helpers
like nsm-pcr.

Each program is ``harness/data/programs/<name>/<name>.c`` (plus other C sources and headers)
and a Makefile that links statically: the bootstrap ramdisk and busybox images have no libc, and
a dynamically linked init cannot boot (docs/boot.md). A build is cached under
``~/.cache/nitro-harness/init/<key>/init`` (init) or ``.../programs/<name>/<key>/<name>``, keyed
by :func:`program_key`: the sources, the Makefile and the toolchain's versions. Programs are
built for an architecture (:class:`harness.arch.Arch`, default x86_64): for another one than the
host's with Debian's cross compiler (``make CC=aarch64-linux-gnu-gcc``, docs/boot.md#arm64-images),
cached apart (``init-arm64/``, ``programs-arm64/``) under a key naming the architecture and the
cross toolchain, so the two never mix; every result is checked to be a static ELF executable of
its architecture. Errors are NitroError(E48) naming the source file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from harness.arch import X86_64, Arch, host_arch
from harness.atomic_file import write_atomically
from harness.images import debian
from harness.images.recipe import Log, fail, nolog, program_source_dir

#: pyelftools' ``e_machine`` name of each architecture's executables.
_E_MACHINE = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "none"
    return (out.strip().splitlines() or ["none"])[0]


def is_cross(arch: Arch) -> bool:
    """Whether programs for ``arch`` are cross-compiled (``arch`` is not the host's)."""
    return arch != host_arch()


def _triplet(arch: Arch) -> str:
    """Debian's GNU triplet of ``arch`` (``aarch64-linux-gnu``), its cross tools' prefix."""
    return arch.cross_prefix.rstrip("-") or f"{arch.name}-linux-gnu"


def compiler(arch: Arch = X86_64) -> str:
    """The C compiler that builds ``arch``'s programs: ``gcc`` for the host's architecture,
    else Debian's cross compiler (``aarch64-linux-gnu-gcc``)."""
    return f"{_triplet(arch)}-gcc" if is_cross(arch) else "gcc"


def cross_packages(arch: Arch) -> tuple[str, str]:
    """The Debian packages of ``arch``'s cross toolchain: compiler and static C library
    (``gcc-aarch64-linux-gnu``, ``libc6-dev-arm64-cross``)."""
    return f"gcc-{_triplet(arch).replace('_', '-')}", f"libc6-dev-{arch.debian}-cross"


def _toolchain_id(arch: Arch = X86_64) -> str:
    """Compiler, linker and C library versions: what decides a static program's bytes. For a
    cross build also the architecture, so no key of one architecture is another's."""
    if not is_cross(arch):
        # The host's toolchain, worded as it always was, so inits already cached stay valid.
        libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "unknown"
        gcc = _first_line(["gcc", "-dumpfullversion"])
        ld = _first_line(["ld", "--version"])
        return f"gcc {gcc}; {ld}; {libc}"
    triplet = _triplet(arch)
    gcc = _first_line([f"{triplet}-gcc", "-dumpfullversion"])
    ld = _first_line([f"{triplet}-ld", "--version"])
    # The cross C library's package version (the static libc.a every program links).
    libc = _first_line(["dpkg-query", "-W", "-f=${Version}\n", cross_packages(arch)[1]])
    return f"{arch.name}: {triplet}-gcc {gcc}; {ld}; {cross_packages(arch)[1]} {libc}"


def _program_sources(name: str) -> list[str]:
    """The files a program's key covers: ``<name>.c`` first, other C sources and headers
    sorted, the Makefile last (for init exactly init.c then Makefile, the order its key has
    always had, so inits already in the cache stay valid)."""
    src = program_source_dir(name)
    main = f"{name}.c"
    others = sorted(p.name for p in src.glob("*") if p.suffix in (".c", ".h") and p.name != main)
    return [main, *others, "Makefile"]


def program_key(name: str, arch: Arch = X86_64) -> str:
    """Cache key (hex SHA-256) of a static program built for ``arch``: its sources, Makefile
    and the toolchain's versions (for a cross build, the architecture and cross toolchain too).

    Raises NitroError(E48) when ``harness/data/programs/<name>`` lacks ``<name>.c`` or its
    Makefile."""
    src = program_source_dir(name)
    h = hashlib.sha256(_toolchain_id(arch).encode())
    for n in _program_sources(name):
        try:
            data = (src / n).read_bytes()
        except OSError as e:
            raise fail(src / n, f"{name}: cannot read the program's source: "
                       f"{e.strerror or e}") from None
        h.update(n.encode() + b"\0" + data)
    return h.hexdigest()


def program_cache_dir(name: str, arch: Arch = X86_64) -> Path:
    """Folder of ``name``'s cached builds for ``arch`` (one ``<key16>/<name>`` per key):
    ``<cache>/init`` and ``<cache>/programs/<name>`` for x86_64, the same with the
    architecture's suffix for another (``init-arm64``, ``programs-arm64/<name>``)."""
    # init keeps the location it always had; other programs live apart from the cache's own
    # directories (images, kernels, ...), whatever they are called.
    root = debian.cache_root()
    return (root / f"init{arch.suffix}" if name == "init"
            else root / f"programs{arch.suffix}" / name)


def _check_toolchain(name: str, src: Path, arch: Arch) -> list[str]:
    """The ``make`` variables that pick ``arch``'s compiler (none for the host's gcc); raises
    NitroError(E48) naming the packages to install when make or the compiler is missing, or
    a cross compiler has no static C library."""
    if not is_cross(arch):
        if shutil.which("make") is None or shutil.which("gcc") is None:
            raise fail(src, f"{name}: gcc and make are required "
                       "(apt-get install build-essential)")
        return []
    cc = compiler(arch)
    gcc_pkg, libc_pkg = cross_packages(arch)
    if shutil.which("make") is None:
        raise fail(src, f"{name}: make is required (apt-get install build-essential)")
    if shutil.which(cc) is None:
        raise fail(src, f"{name}: {cc} not found: building for {arch} needs the cross "
                   f"compiler (apt-get install {gcc_pkg} {libc_pkg})")
    # gcc prints the bare name when it has no such file: no static C library for the target.
    if not os.path.isabs(_first_line([cc, "-print-file-name=libc.a"])):
        raise fail(src, f"{name}: {cc} finds no libc.a: building for {arch} needs the cross "
                   f"C library (apt-get install {libc_pkg})")
    # A command-line variable overrides the Makefile's ``CC = gcc``.
    return [f"CC={cc}"]


def build_static_program(name: str, log: Log = nolog, *, arch: Arch = X86_64) -> Path:
    """Build (or reuse) the static program ``harness/data/programs/<name>`` for ``arch`` and
    return its path in the cache (:func:`program_cache_dir`).

    Runs ``make -C harness/data/programs/<name> OUT=<cache>/<key>/<name>`` (the Makefile links
    statically: the bootstrap ramdisk and busybox images have no libc), with
    ``CC=<triplet>-gcc`` for another architecture than the host's (docs/boot.md#arm64-images).
    Raises NitroError(E48) when gcc or make is missing (``apt-get install build-essential``),
    the cross compiler or its C library is missing (naming their packages), the build fails,
    or the result is dynamically linked or not an executable of ``arch``.
    """
    src = program_source_dir(name)
    key = program_key(name, arch)
    out_dir = program_cache_dir(name, arch) / key[:16]
    out = out_dir / name
    if out.is_file():
        return out
    make_vars = _check_toolchain(name, src, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building {name} for {arch} ({src / f'{name}.c'}"
        f"{', with ' + compiler(arch) if make_vars else ''})")
    # make writes a scratch file of its own; only a checked, static result becomes ``out``.
    tmp = out_dir / f".{name}.{os.getpid()}"
    try:
        proc = subprocess.run(["make", "-s", "-C", str(src), f"OUT={tmp}", *make_vars],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tmp.is_file():
            tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            raise fail(src / f"{name}.c", f"{name}: build failed: {tail}")
        machine = elf_machine(tmp)
        if machine != _E_MACHINE[arch.name]:
            raise fail(src / "Makefile", f"{name}: built for {machine}, not {arch} "
                       f"({_E_MACHINE[arch.name]}); the compiler was {compiler(arch)}")
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


def init_key(arch: Arch = X86_64) -> str:
    """Cache key of the init binary for ``arch``: its source, Makefile and the toolchain's
    versions."""
    return program_key("init", arch)


def build_init(log: Log = nolog, *, arch: Arch = X86_64) -> Path:
    """Build (or reuse) the static enclave init for ``arch`` and return its path in the cache.

    :func:`build_static_program` of ``harness/data/programs/init`` (gcc -static -O2; docs/boot.md: a
    dynamically linked init cannot boot). Raises NitroError(E48) when gcc or the static libc
    is missing (``apt-get install build-essential``, or the cross toolchain's packages for
    another architecture) or the build fails.
    """
    return build_static_program("init", log, arch=arch)


def elf_machine(path: Path) -> str:
    """Return the ``e_machine`` of an ELF file as pyelftools names it (``EM_X86_64``,
    ``EM_AARCH64``). Raises NitroError(E48) when ``path`` is not an ELF file."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        with open(path, "rb") as f:
            return str(ELFFile(f)["e_machine"])
    except ELFError as e:
        raise fail(path, f"not an ELF file: {e}") from None


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

