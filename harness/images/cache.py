"""The image cache: built EIFs keyed by a hash of every input that decides their bytes.

A recipe resolves (:func:`resolve_inputs`) to exact inputs: its architecture, the kernel
package or prebuilt kernel, each Debian package's version and SHA256, the wheels, plus cmd/env
overrides.
:meth:`Inputs.key` adds the recipe itself, the keys of init and of each static program, the
application tarball or directory, the guest helpers and the code that writes ramdisks and
EIFs; its SHA-256 (:func:`image_digest`) names the cached file,
``~/.cache/nitro-harness/images/<name>-<digest>.eif``, with its info beside it as ``.json``.
An unchanged input set finds that file (same bytes, same PCRs); any change makes a new one,
and only the :data:`KEEP_BUILDS` newest of a recipe are kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.atomic_file import write_atomically
from harness.images import debian
from harness.images.kernel import prebuilt_kernel_dir, prebuilt_kernel_key, resolve_kernel_package
from harness.images.recipe import Log, Recipe, fail, guest_dir, nolog
from harness.images.rootfs import fetch_wheel, guest_file_skipped
from harness.images.static_programs import init_key, program_key

#: Bumped whenever the build's output format changes in a way the code hashes do not show.
BUILD_FORMAT = 1

#: Builds of one recipe kept in the image cache (each code or input change makes a new one).
KEEP_BUILDS = 4


def image_cache() -> Path:
    """Directory of built images (``~/.cache/nitro-harness/images``), created on demand."""
    d = debian.cache_root() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- what the key is made of --------------------------------------------------------------


def tree_digest(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> str:
    """Hex SHA-256 over a directory's names, types, modes, link targets and file contents
    (walked in sorted order; paths for which ``skip`` is true are left out)."""
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
def code_digest() -> str:
    """Hex SHA-256 of the code that decides an image's bytes (the cpio and EIF writers, the
    ramdisk, Debian, docker-archive and recipe modules and every step of the build).

    Computed once per process: the code that runs is the code loaded, even if the files
    change on disk meanwhile."""
    import harness.cose
    import harness.cpio
    import harness.eif
    import harness.images.recipes
    from harness.images import (docker_archive, host_twin, kernel, ramdisk, recipe, rootfs,
                                static_programs)
    h = hashlib.sha256()
    for mod in (harness.cpio, harness.cose, ramdisk, debian, docker_archive, recipe,
                static_programs, kernel, rootfs, harness.images.recipes, host_twin):
        h.update(Path(mod.__file__).read_bytes())
    for path in sorted(Path(harness.eif.__file__).parent.glob("*.py")):  # a package: every module
        h.update(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


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
        """The JSON document hashed into the image's cache key. Raises NitroError(E48) when
        an application path does not exist or a static program's sources cannot be read."""
        r = self.recipe
        app = {}
        for kind, rel in r.application.items():
            p = r.resolve(rel)
            if not p.exists():
                raise fail(r.path, f"application.{kind}: {p} does not exist")
            app[kind] = debian.sha256_file(p) if p.is_file() else tree_digest(p)
        guest = (tree_digest(guest_dir(), guest_file_skipped)
                 if r.rootfs.get("guest") and guest_dir().is_dir() else None)
        return {
            "format": BUILD_FORMAT,
            "recipe": r.raw,
            "name": r.name,
            # Also in the recipe (or its absence), but a default may change: said outright.
            "arch": r.arch.name,
            "init": init_key(r.arch),
            "programs": {p: program_key(n, r.arch)
                         for p, n in sorted(r.rootfs.get("programs", {}).items())},
            "kernel": (self.kernel_pkg.key() if self.kernel_pkg is not None
                       else prebuilt_kernel_key(prebuilt_kernel_dir(r), r.arch)),
            "debs": [p.key() for p in self.debs],
            "wheels": {w.name: debian.sha256_file(w) for w in self.wheels},
            "application": app,
            "guest": guest,
            "cmd": self.cmd,
            "env": self.env,
            "code": code_digest(),
        }


def image_digest(inputs: Inputs) -> str:
    """The 16 hex digits that name ``inputs``' image in the cache: SHA-256 of
    :meth:`Inputs.key` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(inputs.key(), sort_keys=True).encode()).hexdigest()[:16]


# --- resolving a recipe -----------------------------------------------------------------


def _resolution_cache(want: dict[str, Any]) -> Path:
    """Stored resolution for one (kernel, debs, skip, apt index) combination."""
    d = debian.cache_root() / "resolved"
    d.mkdir(parents=True, exist_ok=True)
    return d / (hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:20]
                + ".json")


def resolve_inputs(recipe: Recipe, *, cmd: Sequence[str] | None = None,
                   env: Sequence[str] | None = None, log: Log = nolog) -> Inputs:
    """Resolve a recipe's kernel and Debian packages to exact versions and hashes, as packages
    of the recipe's architecture (an arm64 recipe's from the private apt state,
    :mod:`harness.images.apt_state`, whose lists are fetched first when missing).

    apt is asked once per change of the apt index (of that architecture) or of the recipe's
    package lists; otherwise the stored resolution is reused (this is what makes a warm build
    instant). Wheels are fetched (``pip download``) on first use. Raises NitroError(E48) when
    apt or pip cannot resolve a name.
    """
    rf = recipe.rootfs
    arch = recipe.arch
    if rf.get("debs") or recipe.kernel.get("package"):
        # The fingerprint below must see the lists the resolution will read.
        debian.ensure_lists(arch, log)
    want = {"kernel": recipe.kernel.get("package"), "debs": rf.get("debs", []),
            "skip": rf.get("skip", []), "arch": arch.name,
            "apt": debian.apt_index_fingerprint(arch)}
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
        debs = debian.resolve(want["debs"], skip=want["skip"], what=f"{recipe.path}: rootfs.debs",
                              arch=arch)
        kernel_pkg = resolve_kernel_package(want["kernel"], arch) if want["kernel"] else None
        write_atomically(cache, json.dumps({"want": want,
                                            "kernel": kernel_pkg.__dict__ if kernel_pkg else None,
                                            "debs": [d.__dict__ for d in debs]},
                                           indent=1).encode())
    wheels = [fetch_wheel(s) for s in rf.get("pip", [])]
    return Inputs(recipe, kernel_pkg, debs, wheels,
                  list(cmd) if cmd is not None else None,
                  list(env) if env is not None else None)


# --- the cached images ------------------------------------------------------------------


def prune_old_builds(name: str, keep: int = KEEP_BUILDS) -> None:
    """Delete all but the ``keep`` newest cached EIFs (and their info) of recipe ``name``."""
    pat = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{16}}\.eif$")
    eifs = sorted((p for p in image_cache().glob(f"{name}-*.eif") if pat.match(p.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in eifs[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
        (image_cache() / f".{old.stem}.lock").unlink(missing_ok=True)


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
