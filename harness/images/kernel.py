"""The enclave kernel of an image: a Debian kernel package or a prebuilt directory.

A ``kernel.package`` is unpacked once (``dpkg -x``, never installed) into
``~/.cache/nitro-harness/kernels/``; the modules the recipe lists are ordered after their
``depends`` (read from each module's ``.modinfo``, as depmod does) and decompressed for the
bootstrap ramdisk, and ``nsm`` becomes ``/nsm.ko``. A ``kernel.directory`` is a prebuilt
kernel (``bzImage`` for an x86_64 recipe, ``Image`` for an aarch64 one, ``nsm.ko``, drivers
built in; ``nitro-harness setup --only kernel`` writes one of each).
:func:`kernel_parts` gives a build what it needs of either. Errors are NitroError(E48).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.arch import AARCH64, X86_64, Arch
from harness.atomic_file import write_atomically
from harness.images import debian
from harness.images.file_lock import exclusive_lock
from harness.images.recipe import Log, Recipe, fail, nolog


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
        return {module_name(line.strip()) for line in f.read_text().splitlines() if line.strip()}

    def module_index(self) -> dict[str, Path]:
        """Loadable modules by name (``_`` form) -> ``.ko``/``.ko.xz`` file."""
        out: dict[str, Path] = {}
        for p in (self.modules_dir / "kernel").rglob("*.ko*"):
            out[module_name(p.name)] = p
        return out


def module_name(file_name: str) -> str:
    """A module's name as the kernel spells it: ``vmw-vsock.ko.xz`` -> ``vmw_vsock``."""
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
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise fail(path, "zstd-compressed modules are not supported (use an xz kernel)")
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
        raise fail(where, f"kernel module: not an ELF object: {e}") from None
    if sec is None:
        raise fail(where, "kernel module: no .modinfo section")
    for item in sec.data().split(b"\0"):
        if item.startswith(b"depends="):
            return [module_name(x) for x in item[8:].decode().split(",") if x]
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
        name = module_name(name)
        if name in order or name in found_builtin:
            return
        if name in builtin:
            found_builtin.append(name)
            return
        if name in visiting:
            raise fail(kernel.modules_dir, f"kernel.modules: dependency cycle {chain + [name]}")
        path = index.get(name)
        if path is None:
            raise fail(kernel.modules_dir, f"kernel.modules: {name!r} (needed by "
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


def resolve_kernel_package(name: str, arch: Arch = X86_64) -> debian.DebPackage:
    """apt's candidate of ``arch`` for a kernel package, following meta packages to the real
    image.

    ``linux-image-6.12-cloud-amd64`` depends on exactly the newest
    ``linux-image-6.12.N+debXX-cloud-amd64``; that one (with a ``/boot/vmlinuz``) is returned.
    Raises NitroError(E48) when apt does not know the name.
    """
    seen: list[str] = []
    while True:
        pkg = debian.show([name], arch).get(name)
        if pkg is None:
            hint = ("run `apt-get update` (bookworm-backports must be an apt source)"
                    if debian.uses_host_apt(arch) else
                    f"run `nitro-harness setup --only sources` (refreshes "
                    f"{debian.apt_state_dir(arch)})")
            raise fail(name, f"kernel.package: not in apt's {arch.debian} index; {hint}")
        seen.append(name)
        nxt = [g[0] for g in debian.parse_relations(pkg.depends)
               if g[0].startswith("linux-image-")]
        if not nxt or nxt[0] in seen:
            return pkg
        name = nxt[0]


def prepare_kernel(pkg: debian.DebPackage, log: Log = nolog, arch: Arch = X86_64) -> Kernel:
    """Fetch (as ``arch``'s package) and unpack a kernel package into
    ``~/.cache/nitro-harness/kernels/`` (once).

    Raises NitroError(E48) when the package has no ``boot/vmlinuz-*``.
    """
    root = debian.cache_root() / "kernels" / f"{pkg.name}_{pkg.version}_{pkg.sha256[:12]}"
    if not (root / ".complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        # Parallel builds (pytest-xdist workers) unpack a kernel once; the others wait here.
        with exclusive_lock(root.parent / f".{root.name}.lock"):
            if not (root / ".complete").is_file():
                deb = debian.fetch([pkg], arch)[pkg.name]
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
        raise fail(root, f"kernel.package {pkg.name}: expected one boot/vmlinuz-*, "
                   f"found {len(kernels)}")
    return Kernel(pkg, kernels[0].name[len("vmlinuz-"):], root)


def decompressed_module(kernel: Kernel, name: str) -> Path:
    """Path of module ``name`` as a plain ``.ko`` (decompressed once into the kernel cache)."""
    out = kernel.root / ".ko" / f"{module_name(name)}.ko"
    if not out.is_file():
        src = kernel.module_index().get(module_name(name))
        if src is None:
            raise fail(kernel.modules_dir, f"kernel module {name!r}: not found")
        out.parent.mkdir(exist_ok=True)
        write_atomically(out, _module_bytes(src))
    return out


# --- what a build takes from the kernel -------------------------------------------------


@dataclass(frozen=True)
class KernelParts:
    """What an image takes from its kernel: ``vmlinuz`` (the kernel image: a bzImage, or an
    arm64 ``Image`` for an aarch64 recipe), ``release``
    (``uname -r``, "unknown" for a prebuilt kernel without build-info.json), ``order`` (module
    names in load order) and ``builtin`` (wanted names built in), ``modules`` (the
    decompressed ``.ko`` files, in ``order``) and ``nsm_ko`` (None: no ``/nsm.ko``)."""

    vmlinuz: Path
    release: str
    order: list[str]
    builtin: list[str]
    modules: list[Path]
    nsm_ko: Path | None


def kernel_parts(r: Recipe, pkg: debian.DebPackage | None, log: Log = nolog) -> KernelParts:
    """The parts of recipe ``r``'s kernel: of the resolved kernel package ``pkg``, or (None)
    of its ``kernel.directory``. Raises NitroError(E48) for a missing module, an nsm module
    also in kernel.modules or needing unlisted modules, or a directory without nsm.ko."""
    if pkg is None:
        return _prebuilt_kernel_parts(r)
    return _package_kernel_parts(r, pkg, log)


def _package_kernel_parts(r: Recipe, pkg: debian.DebPackage, log: Log) -> KernelParts:
    """Kernel image, release, module order, built-ins, module files and nsm.ko of a kernel
    package."""
    kernel = prepare_kernel(pkg, log, r.arch)
    kspec = r.kernel
    order, builtin = module_load_order(kernel, kspec["modules"])
    if kspec["nsm"] and module_name(kspec["nsm"]) in order:
        raise fail(r.path, "kernel.nsm: must not also be listed in kernel.modules")
    modules = [decompressed_module(kernel, m) for m in order]
    nsm_ko = None
    if kspec["nsm"]:
        nsm_order, nsm_builtin = module_load_order(kernel, [kspec["nsm"]])
        if nsm_builtin:
            log(f"{kspec['nsm']} is built into {kernel.release}: no /nsm.ko")
        else:
            needs = nsm_order[:-1]
            if nsm_order != [module_name(kspec["nsm"])] and not set(needs) <= set(order):
                raise fail(r.path, f"kernel.nsm: {kspec['nsm']} needs {needs}; "
                           "list them in kernel.modules")
            nsm_ko = decompressed_module(kernel, kspec["nsm"])
    return KernelParts(kernel.vmlinuz, kernel.release, order, builtin, modules, nsm_ko)


def _prebuilt_kernel_parts(r: Recipe) -> KernelParts:
    """Kernel image (``bzImage`` or ``Image``, the recipe's arch's), release, (no modules),
    nsm.ko of a ``kernel.directory`` recipe."""
    d = prebuilt_kernel_dir(r)
    nsm_ko = None
    if r.kernel["nsm"]:
        nsm_ko = d / "nsm.ko"
        if not nsm_ko.is_file():
            raise fail(r.path, f"kernel.nsm: {d} has no nsm.ko (set nsm: null for a kernel "
                       "with the NSM driver built in)")
    release = "unknown"
    info = d / "build-info.json"
    if info.is_file():
        try:
            release = json.loads(info.read_text()).get("kernelrelease", release)
        except ValueError:
            pass
    return KernelParts(d / r.arch.kernel_blob, release, [], [], [], nsm_ko)


def prebuilt_kernel_dir(r: Recipe) -> Path:
    """The directory a ``kernel.directory`` recipe names: ``{cache}`` is the harness cache
    (``$NITRO_HARNESS_CACHE`` or ``~/.cache/nitro-harness``), ``~`` expanded, relative to the
    recipe; a glob picks the newest match holding a ``.complete`` marker (a finished
    ``nitro-harness setup --only kernel`` output, which also points ``{cache}/kernel-current`` at the
    build of the current config; ``{cache}/kernel-arm64-current`` for aarch64). The kernel in
    it is the recipe's architecture's blob (:attr:`harness.arch.Arch.kernel_blob`: ``bzImage``
    for x86_64, ``Image`` for aarch64; docs/boot.md#blobs). Raises NitroError(E48) when it
    has none, or when the blob is the other architecture's kernel (an arm64 ``Image``, magic
    ``ARM\\x64`` at 0x38, is required for aarch64 and refused for x86_64)."""
    raw = os.path.expanduser(r.kernel["directory"].replace("{cache}", str(debian.cache_root())))
    pattern = raw if os.path.isabs(raw) else str(r.base / raw)
    if glob.has_magic(pattern):
        hits = [Path(h) for h in glob.glob(pattern) if (Path(h) / ".complete").is_file()]
        hits.sort(key=lambda h: (h / ".complete").stat().st_mtime)
        if not hits:
            raise fail(r.path, f"kernel.directory: nothing matches {pattern} with a .complete "
                       "marker (build it first: nitro-harness setup --only kernel)")
        d = hits[-1]
    else:
        d = Path(pattern)
    blob = d / r.arch.kernel_blob
    if not blob.is_file():
        raise fail(r.path, f"kernel.directory: {blob} not found (an {r.arch} recipe boots "
                   f"{r.arch.kernel_blob})")
    try:
        with open(blob, "rb") as f:
            is_arm64_image = f.read(0x40)[0x38:0x3C] == _ARM64_MAGIC
    except OSError as e:
        raise fail(r.path, f"kernel.directory: {blob}: unreadable: {e.strerror or e}") from None
    if is_arm64_image != (r.arch == AARCH64):
        what = "an arm64 Image" if is_arm64_image else "not an arm64 Image"
        raise fail(r.path, f"kernel.directory: {blob}: {what}, for an {r.arch} recipe "
                   "(arch: must match the kernel's architecture)")
    return d


#: An arm64 ``Image``'s magic at offset 0x38, in Linux's arm64 boot header
#: (docs/boot.md#aarch64-machine).
_ARM64_MAGIC = b"ARM\x64"


def prebuilt_kernel_key(d: Path, arch: Arch = X86_64) -> dict[str, str]:
    """Cache-key part of a prebuilt kernel for ``arch``: the directory and its files' SHA256
    (the kernel under its blob name, ``bzImage`` or ``Image``)."""
    key = {"directory": str(d), arch.kernel_blob: debian.sha256_file(d / arch.kernel_blob)}
    if (d / "nsm.ko").is_file():
        key["nsm.ko"] = debian.sha256_file(d / "nsm.ko")
    return key

