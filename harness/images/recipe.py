"""Image recipes: finding, loading and validating the YAML files that say how to build an EIF.

A recipe (``<name>.yaml`` in a recipes folder: the user's, then the shipped
``harness/data/recipes``; :mod:`harness.assets`) names its architecture (``arch``: x86_64, the
default, or aarch64; docs/boot.md#arm64-images), a kernel (a Debian package or a prebuilt
directory), the kernel modules init loads, the command line, and the application's root
filesystem (Debian packages, inline files, PyPI wheels, the harness's guest helpers, static
programs, a ``docker save``/OCI tarball or a directory), plus cmd and env. Every field is
described in ``harness/data/recipe_schema.yaml`` (JSON Schema, checked with ``jsonschema``)::

    name: hello
    kernel: {directory: "{cache}/kernel-current", nsm: nsm}
    rootfs:
      debs: [busybox-static]
      busybox_links: true
      programs: {/usr/bin/nsm-pcr: nsm-pcr}
      files: [{path: /usr/bin/hello, mode: 0755, content: "..."}]
    cmd: [/usr/bin/hello]

This module also looks recipes up by name and finds the sources a recipe names (guest helpers,
static programs) through :mod:`harness.assets`, the one place that knows where they live, and
holds the conventions every image-building step shares: progress
goes to a :data:`Log` callable, and every failure is
``NitroError(E48 EifBuildingError, "<file>: <field>: <rule>")`` (:func:`fail`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

from harness import assets
from harness.arch import X86_64, Arch, arch_named
from harness.errors import ErrorCode, NitroError

#: AWS's x86_64 blob command line (docs/boot.md#kernel-command-line), the default
#: ``kernel.cmdline`` of an x86_64 recipe (an aarch64 one's is :attr:`Arch.aws_cmdline` of
#: :data:`harness.arch.AARCH64`).
AWS_CMDLINE = X86_64.aws_cmdline

#: The schema every recipe is checked against (shipped as package data).
RECIPE_SCHEMA_PATH = assets.data_dir() / "recipe_schema.yaml"

#: Receives one progress line at a time (e.g. ``print`` or a logger's ``info``).
Log = Callable[[str], None]


def nolog(_msg: str) -> None:
    """The default :data:`Log`: progress lines go nowhere."""


def fail(where: Path | str, rule: str) -> NitroError:
    """The error of a failed image build: E48 EifBuildingError, ``"<where>: <rule>"``."""
    return NitroError(ErrorCode.EifBuildingError, f"{where}: {rule}")


# --- where recipes and the sources they name live ---------------------------------------


def recipes_dir() -> Path:
    """Folder of the recipes the harness ships (``harness/data/recipes``)."""
    return assets.shipped_recipes_dir()


def recipe_dirs() -> list[Path]:
    """Folders a recipe name is looked up in, first match wins (:func:`harness.assets.recipe_dirs`:
    ``$NITRO_HARNESS_RECIPES`` folders, then the shipped one)."""
    return assets.recipe_dirs()


def guest_dir() -> Path:
    """Folder of the guest-side helpers copied into images (``harness/data/guest``)."""
    return assets.guest_dir()


def program_source_dir(name: str) -> Path:
    """Folder of a static program's source (``harness/data/programs/<name>``: ``<name>.c``, a
    Makefile). Raises NitroError(E48) for a name that is not a plain folder name."""
    try:
        return assets.program_dir(name)
    except ValueError as e:
        raise fail(name, f"program: {e}") from None


def recipe_path(name: str | Path) -> Path:
    """Return the recipe file for ``name``: an existing ``.yaml``/``.yml`` path, else
    ``<name>.yaml`` in the first of :func:`recipe_dirs` that has it. Raises NitroError(E48)
    listing the folders searched and the known recipes."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p.resolve()
    dirs = recipe_dirs()
    for d in dirs:
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return cand
    known = ", ".join(sorted({x.stem for d in dirs for x in d.glob("*.yaml")})) or "none"
    searched = ", ".join(str(d) for d in dirs)
    raise fail(name, f"recipe: no such recipe file or name (searched {searched}; "
               f"known recipes: {known})")


# --- schema and loading -----------------------------------------------------------------


def _load_schema() -> dict[str, Any]:
    with open(RECIPE_SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


#: JSON Schema (draft 7) of a recipe file, loaded from :data:`RECIPE_SCHEMA_PATH`.
RECIPE_SCHEMA: dict[str, Any] = _load_schema()


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
    def arch(self) -> Arch:
        """The architecture the image is for (``arch:``, default x86_64; the schema admits
        only the names of :data:`harness.arch.ARCHES`)."""
        return arch_named(self.raw.get("arch", X86_64.name))

    @property
    def kernel(self) -> dict[str, Any]:
        """The ``kernel:`` mapping with defaults filled in (AWS's command line for the
        recipe's architecture, nsm)."""
        k = {"modules": [], "nsm": "nsm", "cmdline": self.arch.aws_cmdline}
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
    """Load and validate a recipe by name (:func:`recipe_path`) or path.

    Raises NitroError(E48) naming the file and the offending field for unreadable YAML,
    schema violations (``harness/data/recipe_schema.yaml``; the first error by field path),
    a kernel that is not exactly one of package/directory, kernel.modules with a prebuilt
    kernel, or a ``rootfs.programs`` entry naming no program or a path also in rootfs.files.
    """
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise fail(path, f"recipe: cannot read YAML: {e}") from None
    if not isinstance(raw, dict):
        raise fail(path, "recipe: the file must hold a mapping")
    errors = sorted(jsonschema.Draft7Validator(RECIPE_SCHEMA).iter_errors(raw),
                    key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise fail(path, f"{where}: {e.message}")
    kernel = raw.get("kernel") or {}
    if ("package" in kernel) == ("directory" in kernel):
        raise fail(path, "kernel: give exactly one of package (a Debian kernel package) or "
                   "directory (a prebuilt bzImage or Image, and nsm.ko)")
    if "directory" in kernel and kernel.get("modules"):
        raise fail(path, "kernel.modules: only with kernel.package (a prebuilt kernel's "
                   "drivers are built in)")
    rootfs = raw.get("rootfs") or {}
    file_paths = {os.path.normpath(f["path"]) for f in rootfs.get("files", [])}
    for guest_path, program in (rootfs.get("programs") or {}).items():
        if os.path.normpath(guest_path) in file_paths:
            raise fail(path, f"rootfs.programs: {guest_path}: also listed in rootfs.files")
        if not (program_source_dir(program) / f"{program}.c").is_file():
            raise fail(path, f"rootfs.programs: {guest_path}: no program {program!r} "
                       f"({program_source_dir(program)}/{program}.c not found)")
    return Recipe(name=raw.get("name") or path.stem, path=path, raw=raw)


def list_recipes() -> list[Recipe]:
    """Every recipe of :func:`recipe_dirs`, sorted by name; a name in an earlier folder hides
    the same name in a later one. Invalid recipes raise."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return [load_recipe(found[name]) for name in sorted(found)]
