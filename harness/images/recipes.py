"""Building an enclave image (EIF) from a recipe, through the image cache: the public front.

:func:`build_image` turns a recipe (:mod:`harness.images.recipe`, fields in
``harness/data/recipe_schema.yaml``) into an EIF laid out as nitro-cli lays one out
(docs/eif-format.md, docs/boot.md):

* kernel: the bzImage of a Debian kernel package or of a prebuilt kernel directory
  (:mod:`harness.images.kernel`), or the ``Image`` of an ``arch: aarch64`` recipe, whose EIF
  carries the aarch64 flag (bit 0 of the header's flags) and whose packages and programs are
  arm64 ones (docs/boot.md#arm64-images);
* bootstrap ramdisk: the harness's static init (``harness/data/programs/init``,
  :mod:`harness.images.static_programs`), ``nsm.ko``, and ``modules/`` with the kernel's
  vsock/virtio-mmio modules in dependency order (a harness extension: Debian's cloud kernel
  has them as modules, AWS's blobs build them in);
* customer ramdisk: ``rootfs/`` (:mod:`harness.images.rootfs`) plus ``cmd`` and ``env``.

Images are cached under ``~/.cache/nitro-harness/images/<name>-<hash>.eif`` where ``<hash>``
covers every input (:mod:`harness.images.cache`). An unchanged rebuild returns the cached
file (same bytes, same PCRs) without work; a cold build is deterministic too (fixed mtimes,
owner 0:0 for package files), so PCRs only change when an input does. Every failure is
``NitroError(E48 EifBuildingError, "<file>: <field>: <rule>")``.

Public API: :func:`build_image` (path of the EIF), :func:`build` (path, cache hit, info),
:func:`recipe_path`, :func:`load_recipe`, :func:`list_recipes`, :func:`cached_images`,
:func:`build_init` (the static init alone), :func:`build_static_program` (init, nsm-pcr or
another program under ``harness/data/programs/``). The names of the modules above are
importable from here too. The CLI front is ``nitro-harness images``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from harness.arch import AARCH64
from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError
from harness.images import debian
from harness.images.cache import (KEEP_BUILDS, Inputs, cached_images, image_cache,
                                  image_digest, prune_old_builds, resolve_inputs)
from harness.images.file_lock import exclusive_lock
from harness.images.kernel import (Kernel, KernelParts, decompressed_module, kernel_parts,
                                   module_depends, module_load_order, prebuilt_kernel_dir,
                                   prebuilt_kernel_key, prepare_kernel, resolve_kernel_package)
from harness.images.recipe import (AWS_CMDLINE, RECIPE_SCHEMA, Log, Recipe, fail, guest_dir,
                                   list_recipes, load_recipe, nolog, program_source_dir,
                                   recipe_dirs, recipe_path, recipes_dir)
from harness.images.rootfs import (FIXED_MTIME, application_entries, assemble_rootfs,
                                   fetch_wheel, rootfs_entries)
from harness.images.static_programs import (build_init, build_static_program, elf_interpreter,
                                            init_key, init_source_dir, program_key)

__all__ = [
    "AWS_CMDLINE", "FIXED_MTIME", "KEEP_BUILDS", "RECIPE_SCHEMA", "BuiltImage", "Inputs",
    "Kernel", "KernelParts", "Log", "Recipe", "build", "build_image", "build_init",
    "build_static_program", "cached_images", "decompressed_module", "elf_interpreter",
    "fetch_wheel", "guest_dir", "image_cache", "init_key", "init_source_dir",
    "list_recipes", "load_recipe", "module_depends", "module_load_order", "prebuilt_kernel_dir",
    "prebuilt_kernel_key", "prepare_kernel", "program_key", "program_source_dir",
    "recipe_dirs", "recipe_path", "recipes_dir", "resolve_inputs", "resolve_kernel_package",
]


@dataclass(frozen=True)
class BuiltImage:
    """Result of :func:`build`: the EIF path, whether it came from the cache, and its info.

    ``info`` is the JSON stored beside the EIF (``<eif>.json``): name, recipe, kernel release,
    packages, measurements (nitro-cli's Measurements object), sizes, build seconds.
    """

    path: Path
    cached: bool
    info: dict[str, Any]


def build_image(name_or_path: str | Path, output: str | Path | None = None, *,
                cmd: Sequence[str] | None = None, env: Sequence[str] | None = None,
                log: Log = nolog) -> Path:
    """Build the image of a recipe (a name looked up in the recipe folders, or a path) and
    return the EIF.

    Returns the cached EIF (``~/.cache/nitro-harness/images/<name>-<hash>.eif``), or
    ``output`` (a copy written atomically) when given. Unchanged inputs hit the cache: no work,
    same file, same PCRs. ``cmd``/``env`` override the recipe's. ``log`` receives progress
    lines. Raises NitroError(E48) for a bad recipe or a failed step (apt, gcc, pip, dpkg).
    """
    return build(name_or_path, output, cmd=cmd, env=env, log=log).path


def build(name_or_path: str | Path, output: str | Path | None = None, *,
          cmd: Sequence[str] | None = None, env: Sequence[str] | None = None,
          log: Log = nolog) -> BuiltImage:
    """Build (or fetch from the cache) the image of a recipe; see :func:`build_image`.

    ``cmd``/``env`` override the recipe's (and the docker image's) values. Concurrent builds
    of the same inputs wait for each other (file lock) and build once. Raises NitroError(E48)
    for a failed build, E19 FileOperationFailure when ``output`` cannot be written.
    """
    t0 = time.monotonic()
    recipe = load_recipe(name_or_path)
    inputs = resolve_inputs(recipe, cmd=cmd, env=env, log=log)
    digest = image_digest(inputs)
    eif = image_cache() / f"{recipe.name}-{digest}.eif"
    info_path = eif.with_suffix(".json")
    with exclusive_lock(image_cache() / f".{recipe.name}-{digest}.lock"):
        cached = eif.is_file() and info_path.is_file()
        if cached:
            info = json.loads(info_path.read_text())
        else:
            info = _build_uncached(inputs, eif, log)
            info["BuildSeconds"] = round(time.monotonic() - t0, 3)
            write_atomically(info_path, (json.dumps(info, indent=2) + "\n").encode())
            prune_old_builds(recipe.name, keep=KEEP_BUILDS)
    path = eif
    if output is not None:
        path = Path(output)
        try:
            write_atomically(path, eif.read_bytes())
        except OSError as e:
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"{path}: cannot write the image: {e.strerror or e}") from None
    return BuiltImage(path, cached, info)


def cached_image(name_or_path: str | Path) -> Path | None:
    """The cached EIF that :func:`build_image` would return for the recipe's current inputs
    (recipe, packages, init, kernel, harness code), or None when it has not been built yet.

    Builds nothing; an older build of the same recipe (other inputs) is never returned. Raises
    NitroError(E48) for a bad recipe or when apt cannot resolve its packages.
    """
    recipe = load_recipe(name_or_path)
    eif = image_cache() / f"{recipe.name}-{image_digest(resolve_inputs(recipe))}.eif"
    return eif if eif.is_file() and eif.with_suffix(".json").is_file() else None


def _build_uncached(inputs: Inputs, eif_path: Path, log: Log) -> dict[str, Any]:
    """Build the image of resolved ``inputs`` into ``eif_path``; return its info."""
    started = time.time()
    init = build_init(log, arch=inputs.recipe.arch)
    interp = elf_interpreter(init)
    if interp is not None:
        raise fail(init, f"init: dynamically linked (PT_INTERP {interp}); an enclave's init "
                   "must be static (docs/boot.md)")
    kernel = kernel_parts(inputs.recipe, inputs.kernel_pkg, log)
    return _write_image(inputs, eif_path, init, kernel, started, log)


def _write_image(inputs: Inputs, eif_path: Path, init: Path, kernel: KernelParts,
                 started: float, log: Log) -> dict[str, Any]:
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
        app_entries, app_cmd, app_env, docker_info = application_entries(r, tmpd / "app")
        cmd = inputs.cmd if inputs.cmd is not None else r.raw.get("cmd", app_cmd or [])
        env = inputs.env if inputs.env is not None else r.raw.get("env", app_env or [])
        root = tmpd / "rootfs"
        root.mkdir()
        assemble_rootfs(r, inputs.debs, inputs.wheels, root, log)
        by_name = {e.name: e for e in app_entries}
        for e in rootfs_entries(root, started):
            by_name[e.name] = e
        boot_rd = build_bootstrap_ramdisk(tmpd / "bootstrap.cpio", init, kernel.nsm_ko,
                                          kernel.modules)
        cust_rd = build_customer_ramdisk(tmpd / "customer.cpio", list(by_name.values()),
                                         cmd, env)
        build_time = os.environ.get("SOURCE_DATE_EPOCH")
        bt = (_dt.datetime.fromtimestamp(int(build_time), _dt.timezone.utc)
              if build_time and build_time.isdigit() else None)
        meta = build_metadata(image_name=r.name, image_version=str(r.raw.get("version", "1.0")),
                              build_time=bt, kernel_version=kernel.release,
                              docker_info=docker_info)
        log(f"writing {eif_path}")
        m = write_eif(eif_path, kernel.vmlinuz, kspec["cmdline"], [boot_rd, cust_rd], meta,
                      aarch64=r.arch == AARCH64)
        sizes = {"kernel": kernel.vmlinuz.stat().st_size, "bootstrap_ramdisk":
                 boot_rd.stat().st_size, "customer_ramdisk": cust_rd.stat().st_size,
                 "eif": eif_path.stat().st_size}
    return {
        "ImageName": r.name,
        "Recipe": str(r.path),
        "Arch": r.arch.name,
        "EifPath": str(eif_path),
        "Measurements": m.to_json(),
        "Kernel": {"package": inputs.kernel_pkg.name if inputs.kernel_pkg else None,
                   "version": inputs.kernel_pkg.version if inputs.kernel_pkg else None,
                   "directory": (str(prebuilt_kernel_dir(r)) if inputs.kernel_pkg is None
                                 else None),
                   "release": kernel.release, "cmdline": kspec["cmdline"],
                   "modules": kernel.order, "builtin": kernel.builtin,
                   "nsm": kernel.nsm_ko is not None},
        "Packages": {p.name: p.version for p in inputs.debs},
        "Wheels": [w.name for w in inputs.wheels],
        "Cmd": list(cmd),
        "Env": list(env),
        "Sizes": sizes,
    }
