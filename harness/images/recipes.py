"""Image recipes: YAML files that say how to build an enclave image (EIF), and the cached build.

A recipe (``images/recipes/<name>.yaml``) names a kernel package, the kernel modules init loads,
the command line, and the application's root filesystem (Debian packages, inline files, PyPI
wheels, the harness's guest helpers, a ``docker save``/OCI tarball or a directory), plus cmd and
env. :func:`build_image` turns it into an EIF laid out as nitro-cli lays one out (SPEC 1, 3):

* kernel: the bzImage of a Debian kernel package (``dpkg -x``, never installed);
* bootstrap ramdisk: the harness's static init (``images/init``), ``nsm.ko``, and
  ``modules/`` with the kernel's vsock/virtio-mmio modules in dependency order (a harness
  extension: Debian's cloud kernel has them as modules, AWS's blobs build them in);
* customer ramdisk: ``rootfs/`` plus ``cmd`` and ``env`` (static helper programs such as
  ``images/nsm-pcr`` are built like init and installed where ``rootfs.programs`` says).

Images are cached under ``~/.cache/nitro-harness/images/<name>-<hash>.eif`` where ``<hash>``
covers every input: the recipe, the sources of init and of each program and the toolchain,
each package's version and SHA256, wheels, guest files, application tarballs/directories and
the code that writes ramdisks and EIFs. An unchanged rebuild returns the cached file (same
bytes, same PCRs) without work; a cold build is deterministic too (fixed mtimes, owner 0:0 for
package files), so PCRs only change when an input does. Every failure is
``NitroError(E48 EifBuildingError, "<file>: <field>: <rule>")``.

Recipe fields (schema in :data:`RECIPE_SCHEMA`)::

    name: hello                        # defaults to the file name
    version: "1.0"                     # ImageVersion in the EIF metadata
    description: ...
    kernel:
      package: linux-image-6.12-cloud-amd64   # a meta package is followed to apt's candidate
      # or directory: DIR (a prebuilt kernel: DIR/bzImage, DIR/nsm.ko if any, DIR/config and
      # DIR/build-info.json optional; "~" and globs allowed, the newest match with a
      # .complete marker wins; e.g. scripts/build-kernel.sh's ~/.cache/nitro-harness/kernel-*)
      modules: [virtio_mmio, vmw_vsock_virtio_transport]  # + their depends, loaded by init
      nsm: nsm                         # module shipped as /nsm.ko (null: none)
      cmdline: "reboot=k panic=30 ..."
    application:                       # optional base filesystem (at most one of the two)
      docker_archive: app.tar          # path relative to the recipe; Cmd/Env come from it
      directory: rootfs/
    rootfs:
      debs: [busybox-static]           # + Depends/Pre-Depends closure minus ``skip``
      skip: [dpkg]
      prune: [usr/share/doc]           # globs relative to the root, removed after unpacking
      busybox_links: true              # a symlink per applet of /bin/busybox
      files: [{path: /usr/bin/hello, mode: 0755, content: "..."}]  # YAML 0755 is octal;
                                       # or {path, symlink: TARGET} / {path, directory: true}
      pip: [aws-nsm-interface==1.0.0]  # pure-Python wheels, unpacked into pip_target
      pip_target: /usr/lib/python3/dist-packages
      guest: /opt/nitro-harness        # every file of images/guest/ copied here
      compile_python: true             # precompiled .pyc (unchecked-hash) for the guest python
      programs: {/usr/bin/nsm-pcr: nsm-pcr}  # guest path -> static program built from
                                       # images/<name>/ (<name>.c + Makefile), mode 0755
    cmd: [/usr/bin/hello]
    env: [PATH=/usr/sbin:/usr/bin:/sbin:/bin]

Public API: :func:`build_image` (path of the EIF), :func:`build` (path, cache hit, info),
:func:`recipe_path`, :func:`load_recipe`, :func:`list_recipes`, :func:`cached_images`,
:func:`build_init` (the static init alone), :func:`build_static_program` (init, nsm-pcr or
another program under ``images/``). The CLI front is ``nitro-harness images``.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import jsonschema
import yaml

from harness.errors import ErrorCode, NitroError
from harness.images import debian

#: AWS's x86_64 blob command line (SPEC 3).
AWS_CMDLINE = ("reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux "
               "i8042.nopnp i8042.dumbkbd random.trust_cpu=on")

#: mtime of every entry the harness creates (linuxkit's, SPEC 3), so cold builds are
#: reproducible whatever the clock says.
FIXED_MTIME = 1492533000

#: Bumped whenever the build's output format changes in a way the code hashes do not show.
_BUILD_FORMAT = 1

_REPO_ROOT = Path(__file__).resolve().parents[2]

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


def _fail(where: Path | str, rule: str) -> NitroError:
    return NitroError(ErrorCode.EifBuildingError, f"{where}: {rule}")


# --- locations --------------------------------------------------------------------------


def images_dir() -> Path:
    """The repository's ``images/`` directory (``$NITRO_HARNESS_IMAGES_DIR`` overrides it)."""
    env = os.environ.get("NITRO_HARNESS_IMAGES_DIR")
    return Path(env) if env else _REPO_ROOT / "images"


def recipes_dir() -> Path:
    """Directory of the recipes the harness ships (``images/recipes``)."""
    return images_dir() / "recipes"


def image_cache() -> Path:
    """Directory of built images (``~/.cache/nitro-harness/images``), created on demand."""
    d = debian.cache_root() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def recipe_path(name: str | Path) -> Path:
    """Return the recipe file for ``name``: an existing ``.yaml``/``.yml`` path, else
    ``images/recipes/<name>.yaml``. Raises NitroError(E48) listing the known recipes."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p.resolve()
    cand = recipes_dir() / f"{name}.yaml"
    if cand.is_file():
        return cand
    known = ", ".join(sorted(x.stem for x in recipes_dir().glob("*.yaml"))) or "none"
    raise _fail(name, f"recipe: no such recipe file or name (known recipes: {known})")


# --- recipe schema and loading ----------------------------------------------------------

_STR_LIST = {"type": "array", "items": {"type": "string"}}

#: A static program's name: a directory directly under ``images/`` (no path separators).
_PROGRAM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

#: JSON Schema of a recipe file (see the module docstring for the meaning of each field).
RECIPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        "version": {"type": "string"},
        "description": {"type": "string"},
        "kernel": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "package": {"type": "string", "pattern": r"^linux-image-"},
                "directory": {"type": "string"},
                "modules": _STR_LIST,
                "nsm": {"type": ["string", "null"]},
                "cmdline": {"type": "string"},
            },
        },
        "application": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "docker_archive": {"type": "string"},
                "directory": {"type": "string"},
            },
        },
        "rootfs": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "debs": _STR_LIST,
                "skip": _STR_LIST,
                "prune": _STR_LIST,
                "busybox_links": {"type": "boolean"},
                "files": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["path"],
                        "properties": {
                            "path": {"type": "string", "pattern": "^/"},
                            "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777},
                            "content": {"type": "string"},
                            "symlink": {"type": "string"},
                            "directory": {"type": "boolean"},
                        },
                    },
                },
                "pip": {"type": "array",
                        "items": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+==[^=\s]+$"}},
                "pip_target": {"type": "string", "pattern": "^/"},
                "guest": {"type": "string", "pattern": "^/"},
                "compile_python": {"type": "boolean"},
                "programs": {"type": "object",
                             "propertyNames": {"pattern": "^/.*[^/]$"},
                             "additionalProperties": {"type": "string",
                                                      "pattern": _PROGRAM_NAME_PATTERN}},
            },
        },
        "cmd": _STR_LIST,
        "env": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+="}},
    },
}


@dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe. ``raw`` is the parsed YAML; ``path`` its file; ``base``
    the directory relative paths are resolved against (the recipe's own directory)."""

    name: str
    path: Path
    raw: dict[str, Any]

    @property
    def base(self) -> Path:
        """Directory that relative paths in the recipe are relative to."""
        return self.path.parent

    @property
    def kernel(self) -> dict[str, Any]:
        """The ``kernel:`` mapping with defaults filled in (AWS's command line, nsm)."""
        k = {"modules": [], "nsm": "nsm", "cmdline": AWS_CMDLINE}
        k.update(self.raw.get("kernel") or {})
        return k

    @property
    def rootfs(self) -> dict[str, Any]:
        """The ``rootfs:`` mapping (empty when absent)."""
        return dict(self.raw.get("rootfs") or {})

    @property
    def application(self) -> dict[str, str]:
        """The ``application:`` mapping (empty when absent)."""
        return dict(self.raw.get("application") or {})

    def resolve(self, rel: str) -> Path:
        """Resolve a path written in the recipe (relative to the recipe's directory)."""
        p = Path(os.path.expanduser(rel))
        return p if p.is_absolute() else (self.base / p).resolve()


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by name (``images/recipes/<name>.yaml``) or path.

    Raises NitroError(E48) naming the file and the offending field for unreadable YAML,
    schema violations, or a recipe without a kernel.
    """
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(path, f"recipe: cannot read YAML: {e}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "recipe: the file must hold a mapping")
    errors = sorted(jsonschema.Draft7Validator(RECIPE_SCHEMA).iter_errors(raw),
                    key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise _fail(path, f"{where}: {e.message}")
    kernel = raw.get("kernel") or {}
    if ("package" in kernel) == ("directory" in kernel):
        raise _fail(path, "kernel: give exactly one of package (a Debian kernel package) or "
                    "directory (a prebuilt bzImage and nsm.ko)")
    if "directory" in kernel and kernel.get("modules"):
        raise _fail(path, "kernel.modules: only with kernel.package (a prebuilt kernel's "
                    "drivers are built in)")
    rootfs = raw.get("rootfs") or {}
    file_paths = {os.path.normpath(f["path"]) for f in rootfs.get("files", [])}
    for guest_path, program in (rootfs.get("programs") or {}).items():
        if os.path.normpath(guest_path) in file_paths:
            raise _fail(path, f"rootfs.programs: {guest_path}: also listed in rootfs.files")
        if not (program_source_dir(program) / f"{program}.c").is_file():
            raise _fail(path, f"rootfs.programs: {guest_path}: no program {program!r} "
                        f"({program_source_dir(program)}/{program}.c not found)")
    return Recipe(name=raw.get("name") or path.stem, path=path, raw=raw)


def list_recipes() -> list[Recipe]:
    """Every recipe under ``images/recipes`` (sorted by name); invalid ones raise."""
    return [load_recipe(p) for p in sorted(recipes_dir().glob("*.yaml"))]


# --- hashing helpers --------------------------------------------------------------------


def _tree_digest(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> str:
    """SHA-256 over a directory's names, types, modes, link targets and file contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip(Path(dirpath) / d))
        for n in sorted(filenames) + dirnames:
            p = Path(dirpath) / n
            if skip(p):
                continue
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(debian.sha256_file(p).encode())
            h.update(b"\n")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the code that decides an image's bytes (writers, builders, this file).

    Computed once per process: the code that runs is the code loaded, even if the files
    change on disk meanwhile."""
    import harness.cose
    import harness.cpio
    import harness.eif
    import harness.images.ramdisk
    h = hashlib.sha256()
    for mod in (harness.cpio, harness.cose, harness.images.ramdisk, debian, sys.modules[__name__]):
        h.update(Path(mod.__file__).read_bytes())
    for path in sorted(Path(harness.eif.__file__).parent.glob("*.py")):  # a package: every module
        h.update(path.read_bytes())
    try:
        import harness.images.docker_archive as da
        h.update(Path(da.__file__).read_bytes())
    except ImportError:
        pass
    return h.hexdigest()


# --- static programs: init, nsm-pcr -------------------------------------------------------


def _toolchain_id() -> str:
    """Compiler, linker and C library versions: what decides a static program's bytes."""
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "none"
        return (out.strip().splitlines() or ["none"])[0]

    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "unknown"
    return f"gcc {first_line(['gcc', '-dumpfullversion'])}; {first_line(['ld', '--version'])}; {libc}"


def program_source_dir(name: str) -> Path:
    """Directory of a static program's source (``images/<name>``: ``<name>.c``, a Makefile)."""
    return images_dir() / name


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

    Raises NitroError(E48) when ``images/<name>`` lacks ``<name>.c`` or its Makefile."""
    src = program_source_dir(name)
    h = hashlib.sha256(_toolchain_id().encode())
    for n in _program_sources(name):
        try:
            data = (src / n).read_bytes()
        except OSError as e:
            raise _fail(src / n, f"{name}: cannot read the program's source: "
                        f"{e.strerror or e}") from None
        h.update(n.encode() + b"\0" + data)
    return h.hexdigest()


def _program_cache_dir(name: str) -> Path:
    # init keeps the location it always had; other programs live apart from the cache's own
    # directories (images, kernels, ...), whatever they are called.
    root = debian.cache_root()
    return root / "init" if name == "init" else root / "programs" / name


def build_static_program(name: str, log: Log = _nolog) -> Path:
    """Build (or reuse) the static program ``images/<name>`` and return its path in the cache.

    Runs ``make -C images/<name> OUT=<cache>/<key>/<name>`` (the Makefile links statically:
    the bootstrap ramdisk and busybox images have no libc). Raises NitroError(E48) when gcc or
    make is missing (``apt-get install build-essential``), the build fails, or the result is
    dynamically linked.
    """
    src = program_source_dir(name)
    key = program_key(name)
    out_dir = _program_cache_dir(name) / key[:16]
    out = out_dir / name
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise _fail(src, f"{name}: gcc and make are required "
                    "(apt-get install build-essential)")
    log(f"building {name} ({src / f'{name}.c'})")
    tmp = out_dir / f".{name}.{os.getpid()}"
    proc = subprocess.run(["make", "-s", "-C", str(src), f"OUT={tmp}"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise _fail(src / f"{name}.c", f"{name}: build failed: {tail}")
    interp = elf_interpreter(tmp)
    if interp is not None:
        tmp.unlink(missing_ok=True)
        raise _fail(src / "Makefile", f"{name}: dynamically linked (PT_INTERP {interp}); "
                    "link it with -static")
    os.replace(tmp, out)
    return out


def init_source_dir() -> Path:
    """Directory of the enclave init's source (``images/init``: init.c and its Makefile)."""
    return program_source_dir("init")


def init_key() -> str:
    """Cache key of the init binary: its source, Makefile and the toolchain's versions."""
    return program_key("init")


def build_init(log: Log = _nolog) -> Path:
    """Build (or reuse) the static enclave init and return its path in the cache.

    :func:`build_static_program` of ``images/init`` (gcc -static -O2; SPEC 3: a dynamically
    linked init cannot boot). Raises NitroError(E48) when gcc or the static libc is missing
    (``apt-get install build-essential``) or the build fails.
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
        raise _fail(path, f"not an ELF file: {e}") from None
    return None


# --- kernel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A kernel package unpacked in the cache.

    ``release`` is ``uname -r`` (e.g. ``6.12.117+deb12-cloud-amd64``); ``root`` the unpacked
    package; ``vmlinuz`` the bzImage; ``modules_dir`` ``lib/modules/<release>``.
    """

    package: debian.DebPackage
    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        """The kernel image (``boot/vmlinuz-<release>``, a bzImage)."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        """``lib/modules/<release>`` inside the unpacked package."""
        return self.root / "lib" / "modules" / self.release

    def builtin_modules(self) -> set[str]:
        """Names (``_`` form) of the modules built into the kernel (modules.builtin)."""
        f = self.modules_dir / "modules.builtin"
        if not f.is_file():
            return set()
        return {_modname(line.strip()) for line in f.read_text().splitlines() if line.strip()}

    def module_index(self) -> dict[str, Path]:
        """Loadable modules by name (``_`` form) -> ``.ko``/``.ko.xz`` file."""
        out: dict[str, Path] = {}
        for p in (self.modules_dir / "kernel").rglob("*.ko*"):
            out[_modname(p.name)] = p
        return out


def _modname(file_name: str) -> str:
    base = file_name.rsplit("/", 1)[-1]
    for suf in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise _fail(path, "zstd-compressed modules are not supported (use an xz kernel)")
    return data


def module_depends(data: bytes, where: Path) -> list[str]:
    """The ``depends=`` list from a module's ``.modinfo`` section (names in ``_`` form).

    Source: the kernel's modpost writes ``depends=a,b`` into .modinfo; depmod builds
    modules.dep from it (Debian's package ships no modules.dep: depmod runs at install).
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        sec = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as e:
        raise _fail(where, f"kernel module: not an ELF object: {e}") from None
    if sec is None:
        raise _fail(where, "kernel module: no .modinfo section")
    for item in sec.data().split(b"\0"):
        if item.startswith(b"depends="):
            return [_modname(x) for x in item[8:].decode().split(",") if x]
    return []


def module_load_order(kernel: Kernel, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return ``(load_order, builtin)`` for ``wanted`` modules and their dependencies.

    ``load_order`` lists loadable module names so that each comes after everything it
    depends on (depth-first post-order, ``wanted`` order kept otherwise); ``builtin`` the
    wanted or needed names the kernel has built in (nothing to load). Raises NitroError(E48)
    for a module the kernel has neither built in nor as a file.
    """
    builtin = kernel.builtin_modules()
    index = kernel.module_index()
    order: list[str] = []
    found_builtin: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: list[str]) -> None:
        name = _modname(name)
        if name in order or name in found_builtin:
            return
        if name in builtin:
            found_builtin.append(name)
            return
        if name in visiting:
            raise _fail(kernel.modules_dir, f"kernel.modules: dependency cycle {chain + [name]}")
        path = index.get(name)
        if path is None:
            raise _fail(kernel.modules_dir, f"kernel.modules: {name!r} (needed by "
                        f"{' <- '.join(reversed(chain)) or 'the recipe'}) is neither built in "
                        f"nor a module of {kernel.release}")
        visiting.add(name)
        for dep in module_depends(_module_bytes(path), path):
            visit(dep, chain + [name])
        visiting.discard(name)
        order.append(name)

    for w in wanted:
        visit(w, [])
    return order, found_builtin


def resolve_kernel_package(name: str) -> debian.DebPackage:
    """apt's candidate for a kernel package, following meta packages to the real image.

    ``linux-image-6.12-cloud-amd64`` depends on exactly the newest
    ``linux-image-6.12.N+debXX-cloud-amd64``; that one (with a ``/boot/vmlinuz``) is returned.
    Raises NitroError(E48) when apt does not know the name.
    """
    seen: list[str] = []
    while True:
        pkg = debian.show([name]).get(name)
        if pkg is None:
            raise _fail(name, "kernel.package: not in apt's index; run `apt-get update` "
                        "(bookworm-backports must be an apt source)")
        seen.append(name)
        nxt = [g[0] for g in debian.parse_relations(pkg.depends)
               if g[0].startswith("linux-image-")]
        if not nxt or nxt[0] in seen:
            return pkg
        name = nxt[0]


def prepare_kernel(pkg: debian.DebPackage, log: Log = _nolog) -> Kernel:
    """Fetch and unpack a kernel package into ``~/.cache/nitro-harness/kernels/`` (once).

    Raises NitroError(E48) when the package has no ``boot/vmlinuz-*``.
    """
    root = debian.cache_root() / "kernels" / f"{pkg.name}_{pkg.version}_{pkg.sha256[:12]}"
    if not (root / ".complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        # Parallel builds (pytest-xdist workers) unpack a kernel once; the others wait here.
        with _lock(root.parent / f".{root.name}.lock"):
            if not (root / ".complete").is_file():
                deb = debian.fetch([pkg])[pkg.name]
                log(f"unpacking {deb.name}")
                tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-"))
                try:
                    debian.extract(deb, tmp)
                    (tmp / ".complete").write_text(pkg.sha256 + "\n")
                    # Only an incomplete leftover (a killed build) can be in the way.
                    shutil.rmtree(root, ignore_errors=True)
                    os.replace(tmp, root)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise _fail(root, f"kernel.package {pkg.name}: expected one boot/vmlinuz-*, "
                    f"found {len(kernels)}")
    return Kernel(pkg, kernels[0].name[len("vmlinuz-"):], root)


def decompressed_module(kernel: Kernel, name: str) -> Path:
    """Path of module ``name`` as a plain ``.ko`` (decompressed once into the kernel cache)."""
    out = kernel.root / ".ko" / f"{_modname(name)}.ko"
    if not out.is_file():
        src = kernel.module_index().get(_modname(name))
        if src is None:
            raise _fail(kernel.modules_dir, f"kernel module {name!r}: not found")
        out.parent.mkdir(exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(_module_bytes(src))
        os.replace(tmp, out)
    return out


# --- root filesystem ----------------------------------------------------------------------


def _wheel_cache() -> Path:
    d = debian.cache_root() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_wheel(spec: str) -> Path:
    """Return the cached wheel for a pinned ``name==version`` (``pip download`` on a miss).

    Raises NitroError(E48) when pip fails or the project has no pure-Python wheel.
    """
    name, version = spec.split("==", 1)
    norm = name.replace("-", "_").replace(".", "_").lower()

    def cached() -> list[Path]:
        return sorted(p for p in _wheel_cache().glob("*.whl")
                      if p.name.lower().startswith(f"{norm}-{version}-"))

    hits = cached()
    if not hits:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", str(_wheel_cache()), spec],
            capture_output=True, text=True, check=False)
        hits = cached()
        if proc.returncode != 0 or not hits:
            tail = " / ".join(proc.stderr.strip().splitlines()[-2:])
            raise _fail(spec, f"rootfs.pip: pip download failed: {tail}")
    if not hits[0].name.endswith("-none-any.whl"):
        raise _fail(hits[0], "rootfs.pip: only pure-Python (py3-none-any) wheels are supported")
    return hits[0]


def _install_wheel(wheel: Path, target: Path) -> None:
    """Unpack a pure-Python wheel into ``target`` (files 0644, dirs 0755)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            rel = Path(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise _fail(wheel, f"rootfs.pip: unsafe member {info.filename!r}")
            if ".data" in rel.parts[0] and rel.parts[0].endswith(".data"):
                raise _fail(wheel, "rootfs.pip: wheels with .data directories are unsupported")
            dest = target / rel
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            dest.chmod(0o644)


def guest_dir() -> Path:
    """Directory of the guest-side helpers copied into images (``images/guest``)."""
    return images_dir() / "guest"


def _guest_skip(p: Path) -> bool:
    return p.name == "__pycache__" or p.name.endswith(".pyc") or p.name.startswith(".")


def _copy_guest(dest: Path) -> int:
    """Copy every file of images/guest/ to ``dest``: mode 0755 if executable there, else 0644."""
    src = guest_dir()
    n = 0
    if not src.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not _guest_skip(Path(dirpath) / d)]
        for fn in filenames:
            p = Path(dirpath) / fn
            if _guest_skip(p) or not p.is_file():
                continue
            out = dest / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(p.read_bytes())
            out.chmod(0o755 if os.access(p, os.X_OK) else 0o644)
            n += 1
    return n


def _inside(root: Path, abs_path: str) -> Path:
    rel = abs_path.lstrip("/")
    p = root / rel
    if ".." in Path(rel).parts:
        raise _fail(abs_path, "path: '..' is not allowed")
    return p


def _busybox_links(root: Path, recipe: Recipe) -> int:
    """One symlink to /bin/busybox per applet (``busybox --list-full``), where no file exists."""
    bb = root / "bin" / "busybox"
    if not bb.is_file():
        raise _fail(recipe.path, "rootfs.busybox_links: no /bin/busybox in the root filesystem "
                    "(add busybox or busybox-static to rootfs.debs)")
    argv = [str(bb), "--list-full"]
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    if elf_interpreter(bb) is not None and (loader.exists() or loader.is_symlink()):
        # A dynamic busybox runs with the image's own loader and libc, not the host's.
        libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
        argv = [str(_resolve_in_root(root, loader)), "--library-path", libs, *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise _fail(bb, f"rootfs.busybox_links: cannot run busybox --list-full: {e}") from None
    if proc.returncode != 0:
        raise _fail(bb, f"rootfs.busybox_links: busybox --list-full failed: {proc.stderr.strip()}")
    n = 0
    for applet in proc.stdout.split():
        link = _inside(root, applet)
        if link.exists() or link.is_symlink() or applet.endswith("/busybox"):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        n += 1
    return n


def _resolve_in_root(root: Path, path: Path) -> Path:
    """Follow symlinks of ``path`` as the guest would: absolute targets are inside ``root``."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise _fail(path, "symlink loop in the root filesystem")


def _compile_python(root: Path, recipe: Recipe, log: Log) -> None:
    """Precompile every .py under usr/lib/python3* and the guest helpers with the guest's python.

    The guest's python runs from the image through its own dynamic loader (exact version and
    magic number); ``unchecked-hash`` pycs never look at source mtimes, so they are both
    reproducible and trusted at import. Without them every boot recompiles the stdlib it
    imports (seconds under TCG).
    """
    pys = sorted((root / "usr" / "bin").glob("python3.[0-9]*"))
    pys = [p for p in pys if p.name.replace("python3.", "").isdigit()]
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    if not pys or not loader.exists():
        raise _fail(recipe.path, "rootfs.compile_python: no usr/bin/python3.N and "
                    "lib64/ld-linux-x86-64.so.2 in the root filesystem")
    py = pys[-1]
    libdirs = [root / "lib" / "x86_64-linux-gnu", root / "usr" / "lib" / "x86_64-linux-gnu"]
    targets = [str(p) for p in sorted((root / "usr" / "lib").glob("python3*")) if p.is_dir()]
    guest = recipe.rootfs.get("guest")
    if guest and _inside(root, guest).is_dir():
        targets.append(str(_inside(root, guest)))
    env = {"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [str(_resolve_in_root(root, loader)), "--library-path", ":".join(map(str, libdirs)), str(py),
            "-I", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
            "-s", str(root), "-p", "/", *targets]
    log(f"compiling python modules with the guest's {py.name}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    # compileall exits 1 when some file does not compile (Debian ships a few py2-only
    # examples); only a crash of the interpreter itself is an error.
    if proc.returncode not in (0, 1):
        raise _fail(py, f"rootfs.compile_python: exit {proc.returncode}: "
                    f"{(proc.stderr or proc.stdout).strip()[-300:]}")


@dataclass
class Inputs:
    """Everything a recipe resolves to before building: what the cache key is made of."""

    recipe: Recipe
    kernel_pkg: debian.DebPackage | None
    debs: list[debian.DebPackage] = field(default_factory=list)
    wheels: list[Path] = field(default_factory=list)
    cmd: list[str] | None = None
    env: list[str] | None = None

    def key(self) -> dict[str, Any]:
        """The JSON document hashed into the image's cache key."""
        r = self.recipe
        app = {}
        for kind, rel in r.application.items():
            p = r.resolve(rel)
            if not p.exists():
                raise _fail(r.path, f"application.{kind}: {p} does not exist")
            app[kind] = debian.sha256_file(p) if p.is_file() else _tree_digest(p)
        guest = (_tree_digest(guest_dir(), _guest_skip)
                 if r.rootfs.get("guest") and guest_dir().is_dir() else None)
        return {
            "format": _BUILD_FORMAT,
            "recipe": r.raw,
            "name": r.name,
            "init": init_key(),
            "programs": {p: program_key(n) for p, n in sorted(r.rootfs.get("programs",
                                                                           {}).items())},
            "kernel": (self.kernel_pkg.key() if self.kernel_pkg is not None
                       else prebuilt_kernel_key(prebuilt_kernel_dir(r))),
            "debs": [p.key() for p in self.debs],
            "wheels": {w.name: debian.sha256_file(w) for w in self.wheels},
            "application": app,
            "guest": guest,
            "cmd": self.cmd,
            "env": self.env,
            "code": _code_digest(),
        }


def _resolution_cache(want: dict[str, Any]) -> Path:
    """Stored resolution for one (kernel, debs, skip, apt index) combination."""
    d = debian.cache_root() / "resolved"
    d.mkdir(parents=True, exist_ok=True)
    return d / (hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:20]
                + ".json")


def resolve_inputs(recipe: Recipe, *, cmd: Sequence[str] | None = None,
                   env: Sequence[str] | None = None, log: Log = _nolog) -> Inputs:
    """Resolve a recipe's kernel and Debian packages to exact versions and hashes.

    apt is asked once per change of the apt index or of the recipe's package lists; otherwise
    the stored resolution is reused (this is what makes a warm build instant).
    """
    rf = recipe.rootfs
    want = {"kernel": recipe.kernel.get("package"), "debs": rf.get("debs", []),
            "skip": rf.get("skip", []), "apt": debian.apt_index_fingerprint()}
    cache = _resolution_cache(want)
    stored = None
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except ValueError:
            stored = None
    if stored and stored.get("want") == want:
        kernel_pkg = debian.DebPackage(**stored["kernel"]) if stored["kernel"] else None
        debs = [debian.DebPackage(**d) for d in stored["debs"]]
    else:
        log(f"resolving packages with apt-cache ({want['kernel'] or 'prebuilt kernel'}, "
            f"{len(want['debs'])} rootfs package(s) and their dependencies)")
        debs = debian.resolve(want["debs"], skip=want["skip"], what=f"{recipe.path}: rootfs.debs")
        kernel_pkg = resolve_kernel_package(want["kernel"]) if want["kernel"] else None
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"want": want,
                                   "kernel": kernel_pkg.__dict__ if kernel_pkg else None,
                                   "debs": [d.__dict__ for d in debs]}, indent=1))
        os.replace(tmp, cache)
    wheels = [fetch_wheel(s) for s in rf.get("pip", [])]
    return Inputs(recipe, kernel_pkg, debs, wheels,
                  list(cmd) if cmd is not None else None,
                  list(env) if env is not None else None)


def _application_entries(recipe: Recipe, workdir: Path
                         ) -> tuple[list, list[str] | None, list[str] | None, dict | None]:
    """Entries, default cmd, default env and DockerInfo of the recipe's ``application:``.

    A ``docker_archive`` (``docker save`` or OCI layout tarball) gives its layers' files with
    their own metadata, Cmd (else Entrypoint) and Env (SPEC 3); its file contents are spilled
    into ``workdir``. A ``directory`` gives its files (owners kept only when building as
    root, the only user who can read them back faithfully).
    """
    from harness.cpio import entries_from_directory
    app = recipe.application
    if "directory" in app:
        d = recipe.resolve(app["directory"])
        if not d.is_dir():
            raise _fail(recipe.path, f"application.directory: {d} is not a directory")
        return entries_from_directory(d, keep_owner=os.geteuid() == 0), None, None, None
    if "docker_archive" in app:
        from harness.images.docker_archive import load_docker_archive
        tar = recipe.resolve(app["docker_archive"])
        if not tar.is_file():
            raise _fail(recipe.path, f"application.docker_archive: {tar} is not a file")
        archive, entries = load_docker_archive(tar, workdir)
        return entries, archive.cmd, archive.env, archive.docker_info()
    return [], None, None, None


def _assemble_rootfs(inputs: Inputs, root: Path, log: Log) -> None:
    """Unpack packages, apply prune/busybox/files/wheels/guest/pyc into ``root``."""
    r = inputs.recipe
    rf = r.rootfs
    if inputs.debs:
        paths = debian.fetch(inputs.debs)
        log(f"unpacking {len(inputs.debs)} package(s) into the root filesystem")
        for pkg in inputs.debs:
            debian.extract(paths[pkg.name], root)
    for pattern in rf.get("prune", []):
        for p in sorted(root.glob(pattern.lstrip("/")), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    if rf.get("busybox_links"):
        _busybox_links(root, r)
    for f in rf.get("files", []):
        p = _inside(root, f["path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.is_file():
            p.unlink()
        if "symlink" in f:
            p.symlink_to(f["symlink"])
        elif f.get("directory"):
            p.mkdir(exist_ok=True)
            p.chmod(f.get("mode", 0o755))
        else:
            p.write_text(f.get("content", ""))
            p.chmod(f.get("mode", 0o644))
    for guest_path, program in sorted(rf.get("programs", {}).items()):
        binary = build_static_program(program, log)
        p = _inside(root, guest_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir() and not p.is_symlink():
            raise _fail(r.path, f"rootfs.programs: {guest_path}: is a directory in the root "
                        "filesystem")
        p.unlink(missing_ok=True)
        # A fresh copy (not copy2): its mtime is the build's, so it gets FIXED_MTIME.
        shutil.copyfile(binary, p)
        p.chmod(0o755)
    if inputs.wheels:
        target = _inside(root, rf.get("pip_target", "/usr/lib/python3/dist-packages"))
        for w in inputs.wheels:
            _install_wheel(w, target)
    if rf.get("guest"):
        n = _copy_guest(_inside(root, rf["guest"]))
        log(f"copied {n} guest helper file(s) to {rf['guest']}")
    if rf.get("compile_python"):
        _compile_python(root, r, log)


def _rootfs_entries(inputs: Inputs, root: Path, started: float) -> list:
    """Entries of the assembled root: owner 0:0 (package files are root's), and FIXED_MTIME
    for everything this build created or touched (package files keep their own mtimes)."""
    from harness.cpio import entries_from_directory
    out = []
    for e in entries_from_directory(root, keep_owner=False):
        if e.mtime >= int(started) - 1:
            e = replace(e, mtime=FIXED_MTIME)
        out.append(e)
    return out


@dataclass(frozen=True)
class BuiltImage:
    """Result of :func:`build`: the EIF path, whether it came from the cache, and its info.

    ``info`` is the JSON stored beside the EIF (``<eif>.json``): name, recipe, kernel release,
    packages, measurements (nitro-cli's Measurements object), sizes, build seconds.
    """

    path: Path
    cached: bool
    info: dict[str, Any]


def _lock(path: Path):
    """An exclusive flock held until the returned file is closed (use with ``with``).

    Lock files are left in place: unlinking one while another process waits on it would let
    a third process lock a new file and enter the critical section too."""
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


#: Builds of one recipe kept in the image cache (each code or input change makes a new one).
KEEP_BUILDS = 4


def _prune_old_builds(name: str, keep: int) -> None:
    """Delete all but the ``keep`` newest cached EIFs (and their info) of recipe ``name``."""
    pat = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{16}}\.eif$")
    eifs = sorted((p for p in image_cache().glob(f"{name}-*.eif") if pat.match(p.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in eifs[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
        (image_cache() / f".{old.stem}.lock").unlink(missing_ok=True)


def build(name_or_path: str | Path, output: str | Path | None = None, *,
          cmd: Sequence[str] | None = None, env: Sequence[str] | None = None,
          log: Log = _nolog) -> BuiltImage:
    """Build (or fetch from the cache) the image of a recipe; see :func:`build_image`.

    ``cmd``/``env`` override the recipe's (and the docker image's) values. Concurrent builds
    of the same inputs wait for each other (file lock) and build once.
    """
    t0 = time.monotonic()
    recipe = load_recipe(name_or_path)
    inputs = resolve_inputs(recipe, cmd=cmd, env=env, log=log)
    digest = hashlib.sha256(json.dumps(inputs.key(), sort_keys=True).encode()).hexdigest()[:16]
    eif = image_cache() / f"{recipe.name}-{digest}.eif"
    info_path = eif.with_suffix(".json")
    with _lock(image_cache() / f".{recipe.name}-{digest}.lock"):
        cached = eif.is_file() and info_path.is_file()
        if cached:
            info = json.loads(info_path.read_text())
        else:
            info = _build_uncached(inputs, eif, log)
            info["BuildSeconds"] = round(time.monotonic() - t0, 3)
            tmp = info_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, info_path)
            _prune_old_builds(recipe.name, keep=KEEP_BUILDS)
    path = eif
    if output is not None:
        path = Path(output)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            shutil.copyfile(eif, tmp)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"{path}: cannot write the image: {e.strerror or e}") from None
    return BuiltImage(path, cached, info)


def _build_uncached(inputs: Inputs, eif_path: Path, log: Log) -> dict[str, Any]:
    """Build the image of resolved ``inputs`` into ``eif_path``; return its info."""
    r = inputs.recipe
    started = time.time()
    init = build_init(log)
    interp = elf_interpreter(init)
    if interp is not None:
        raise _fail(init, f"init: dynamically linked (PT_INTERP {interp}); SPEC 3 needs static")
    if inputs.kernel_pkg is None:
        vmlinuz, release, order, builtin, modules, nsm_ko = _prebuilt_kernel_parts(r)
    else:
        vmlinuz, release, order, builtin, modules, nsm_ko = _package_kernel_parts(
            r, inputs.kernel_pkg, log)
    return _write_image(inputs, eif_path, init, vmlinuz, release, order, builtin, modules,
                        nsm_ko, started, log)


def _package_kernel_parts(r: Recipe, pkg: debian.DebPackage, log: Log):
    """bzImage, release, module order, built-ins, module files and nsm.ko of a kernel package."""
    kernel = prepare_kernel(pkg, log)
    kspec = r.kernel
    order, builtin = module_load_order(kernel, kspec["modules"])
    if kspec["nsm"] and _modname(kspec["nsm"]) in order:
        raise _fail(r.path, "kernel.nsm: must not also be listed in kernel.modules")
    modules = [decompressed_module(kernel, m) for m in order]
    nsm_ko = None
    if kspec["nsm"]:
        nsm_order, nsm_builtin = module_load_order(kernel, [kspec["nsm"]])
        if nsm_builtin:
            log(f"{kspec['nsm']} is built into {kernel.release}: no /nsm.ko")
        else:
            if nsm_order != [_modname(kspec["nsm"])] and not set(nsm_order[:-1]) <= set(order):
                raise _fail(r.path, f"kernel.nsm: {kspec['nsm']} needs {nsm_order[:-1]}; "
                            "list them in kernel.modules")
            nsm_ko = decompressed_module(kernel, kspec["nsm"])
    return kernel.vmlinuz, kernel.release, order, builtin, modules, nsm_ko


def _prebuilt_kernel_parts(r: Recipe):
    """bzImage, release, (no modules), nsm.ko of a ``kernel.directory`` recipe."""
    d = prebuilt_kernel_dir(r)
    nsm_ko = None
    if r.kernel["nsm"]:
        nsm_ko = d / "nsm.ko"
        if not nsm_ko.is_file():
            raise _fail(r.path, f"kernel.nsm: {d} has no nsm.ko (set nsm: null for a kernel "
                        "with the NSM driver built in)")
    release = "unknown"
    info = d / "build-info.json"
    if info.is_file():
        try:
            release = json.loads(info.read_text()).get("kernelrelease", release)
        except ValueError:
            pass
    return d / "bzImage", release, [], [], [], nsm_ko


def prebuilt_kernel_dir(r: Recipe) -> Path:
    """The directory a ``kernel.directory`` recipe names: ``{cache}`` is the harness cache
    (``$NITRO_HARNESS_CACHE`` or ``~/.cache/nitro-harness``), ``~`` expanded, relative to the
    recipe; a glob picks the newest match holding a ``.complete`` marker (a finished
    ``scripts/build-kernel.sh`` output, which also points ``{cache}/kernel-current`` at the
    build of the current config). Raises NitroError(E48) when none has a bzImage."""
    import glob
    raw = os.path.expanduser(r.kernel["directory"].replace("{cache}", str(debian.cache_root())))
    pattern = raw if os.path.isabs(raw) else str(r.base / raw)
    if glob.has_magic(pattern):
        hits = [Path(h) for h in glob.glob(pattern) if (Path(h) / ".complete").is_file()]
        hits.sort(key=lambda h: (h / ".complete").stat().st_mtime)
        if not hits:
            raise _fail(r.path, f"kernel.directory: nothing matches {pattern} with a .complete "
                        "marker (build it first, e.g. scripts/build-kernel.sh)")
        d = hits[-1]
    else:
        d = Path(pattern)
    if not (d / "bzImage").is_file():
        raise _fail(r.path, f"kernel.directory: {d}/bzImage not found")
    return d


def prebuilt_kernel_key(d: Path) -> dict[str, str]:
    """Cache-key part of a prebuilt kernel: the directory and its files' SHA256."""
    key = {"directory": str(d), "bzImage": debian.sha256_file(d / "bzImage")}
    if (d / "nsm.ko").is_file():
        key["nsm.ko"] = debian.sha256_file(d / "nsm.ko")
    return key


def _write_image(inputs: Inputs, eif_path: Path, init: Path, vmlinuz: Path, release: str,
                 order: list[str], builtin: list[str], modules: list[Path],
                 nsm_ko: Path | None, started: float, log: Log) -> dict[str, Any]:
    """Assemble the root filesystem, write both ramdisks and the EIF; return its info."""
    from harness.eif import build_metadata, write_eif
    from harness.images.ramdisk import build_bootstrap_ramdisk, build_customer_ramdisk

    r = inputs.recipe
    kspec = r.kernel
    tmp_root = debian.cache_root() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"{r.name}-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "app").mkdir()
        app_entries, app_cmd, app_env, docker_info = _application_entries(r, tmpd / "app")
        cmd = inputs.cmd if inputs.cmd is not None else r.raw.get("cmd", app_cmd or [])
        env = inputs.env if inputs.env is not None else r.raw.get("env", app_env or [])
        root = tmpd / "rootfs"
        root.mkdir()
        _assemble_rootfs(inputs, root, log)
        by_name = {e.name: e for e in app_entries}
        for e in _rootfs_entries(inputs, root, started):
            by_name[e.name] = e
        boot_rd = build_bootstrap_ramdisk(tmpd / "bootstrap.cpio", init, nsm_ko, modules)
        cust_rd = build_customer_ramdisk(tmpd / "customer.cpio", list(by_name.values()),
                                         cmd, env)
        build_time = os.environ.get("SOURCE_DATE_EPOCH")
        bt = (_dt.datetime.fromtimestamp(int(build_time), _dt.timezone.utc)
              if build_time and build_time.isdigit() else None)
        meta = build_metadata(image_name=r.name, image_version=str(r.raw.get("version", "1.0")),
                              build_time=bt, kernel_version=release,
                              docker_info=docker_info)
        log(f"writing {eif_path}")
        m = write_eif(eif_path, vmlinuz, kspec["cmdline"], [boot_rd, cust_rd], meta)
        sizes = {"kernel": vmlinuz.stat().st_size, "bootstrap_ramdisk":
                 boot_rd.stat().st_size, "customer_ramdisk": cust_rd.stat().st_size,
                 "eif": eif_path.stat().st_size}
    return {
        "ImageName": r.name,
        "Recipe": str(r.path),
        "EifPath": str(eif_path),
        "Measurements": m.to_json(),
        "Kernel": {"package": inputs.kernel_pkg.name if inputs.kernel_pkg else None,
                   "version": inputs.kernel_pkg.version if inputs.kernel_pkg else None,
                   "directory": (str(prebuilt_kernel_dir(r)) if inputs.kernel_pkg is None
                                 else None),
                   "release": release, "cmdline": kspec["cmdline"],
                   "modules": order, "builtin": builtin, "nsm": nsm_ko is not None},
        "Packages": {p.name: p.version for p in inputs.debs},
        "Wheels": [w.name for w in inputs.wheels],
        "Cmd": list(cmd),
        "Env": list(env),
        "Sizes": sizes,
    }


def build_image(name_or_path: str | Path, output: str | Path | None = None, *,
                cmd: Sequence[str] | None = None, env: Sequence[str] | None = None,
                log: Log = _nolog) -> Path:
    """Build the image of a recipe (name in ``images/recipes`` or a path) and return the EIF.

    Returns the cached EIF (``~/.cache/nitro-harness/images/<name>-<hash>.eif``), or
    ``output`` (a copy written atomically) when given. Unchanged inputs hit the cache: no work,
    same file, same PCRs. ``cmd``/``env`` override the recipe's. ``log`` receives progress
    lines. Raises NitroError(E48) for a bad recipe or a failed step (apt, gcc, pip, dpkg).
    """
    return build(name_or_path, output, cmd=cmd, env=env, log=log).path


def cached_images() -> list[dict[str, Any]]:
    """Info of every image in the cache (the ``.json`` written beside each EIF), newest first."""
    out = []
    for p in sorted(image_cache().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            info = json.loads(p.read_text())
        except ValueError:
            continue
        if p.with_suffix(".eif").is_file():
            out.append(info)
    return out
