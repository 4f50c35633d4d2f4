"""Where the files the harness builds its QEMU, kernel and images from live: the one place.

Everything ships as package data under ``harness/data/``, so a clone and an installed wheel find
them the same way (relative to this module, never to a repository):

- ``recipes/*.yaml``: the image recipes (``hello``, ``python`` and their ``-debian`` twins);
- ``programs/<name>/``: static programs built for images (``init``: the enclave's PID 1,
  ``nsm-pcr``), each ``<name>.c`` and a Makefile;
- ``guest/``: the guest-side helpers copied into the ``python`` image;
- ``kernel/nitro.config``: the Nitro-style kernel's configuration fragment;
- ``qemu-patches/*.patch``: the patches of the harness's QEMU build;
- ``build/build-qemu.sh``, ``build/build-kernel.sh``: the QEMU and kernel builds that
  ``nitro-harness setup`` runs.

The image cache keys, the QEMU patch hash and the kernel configuration hash are computed from
these files' bytes and names, never from their paths, so where the package is installed does not
change them.

A user's own recipe folders come first, in this order: ``$NITRO_HARNESS_RECIPES``
(``os.pathsep``-separated; the pytest plugin's ``--recipes`` and ini ``nitro_harness_recipes``
and ``nitro-harness images --recipes`` add to it), then the shipped ``recipes/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

#: Environment variable naming extra recipe folders (``os.pathsep``-separated), searched first.
RECIPES_ENV = "NITRO_HARNESS_RECIPES"

#: The package data folder: ``harness/data`` beside this module.
DATA_DIR = Path(__file__).resolve().parent / "data"


def data_dir() -> Path:
    """The package data folder (``harness/data``) of the harness that is running."""
    return DATA_DIR


def shipped_recipes_dir() -> Path:
    """Folder of the recipes the harness ships (``harness/data/recipes``)."""
    return DATA_DIR / "recipes"


def user_recipe_dirs() -> list[Path]:
    """The user's recipe folders from ``$NITRO_HARNESS_RECIPES``, in order (empty entries and
    duplicates dropped; a folder that does not exist is kept, so an error can name it)."""
    raw = os.environ.get(RECIPES_ENV, "")
    dirs = [Path(os.path.expanduser(p)) for p in raw.split(os.pathsep) if p.strip()]
    return list(dict.fromkeys(dirs))


def recipe_dirs() -> list[Path]:
    """Every folder a recipe name is looked up in, first match wins: the user's
    (:func:`user_recipe_dirs`), then the shipped one."""
    return list(dict.fromkeys([*user_recipe_dirs(), shipped_recipes_dir()]))


def add_recipe_dirs(dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Put ``dirs`` (made absolute) in front of ``$NITRO_HARNESS_RECIPES`` for this process and
    the processes it starts (nitro-harness commands run by scenario steps, xdist workers).

    Returns the resulting user folders. Raises ValueError naming a folder that does not exist.
    """
    added = [Path(os.path.expanduser(str(d))).resolve() for d in dirs]
    for d in added:
        if not d.is_dir():
            raise ValueError(f"{d}: recipes folder not found")
    merged = list(dict.fromkeys([*added, *user_recipe_dirs()]))
    if merged:
        os.environ[RECIPES_ENV] = os.pathsep.join(str(d) for d in merged)
    return merged


def guest_dir() -> Path:
    """Folder of the guest-side helpers copied into images (``harness/data/guest``)."""
    return DATA_DIR / "guest"


def program_dir(name: str) -> Path:
    """Folder of a static program's source (``harness/data/programs/<name>``: ``<name>.c``, a
    Makefile). ``name`` is a plain folder name (letters, digits, ``.``, ``_``, ``-``)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name):
        raise ValueError(f"{name!r}: not a program name")
    return DATA_DIR / "programs" / name


def kernel_config() -> Path:
    """The Nitro-style kernel's configuration fragment (``harness/data/kernel/nitro.config``)."""
    return DATA_DIR / "kernel" / "nitro.config"


def qemu_patches_dir() -> Path:
    """Folder of the patches applied to QEMU (``harness/data/qemu-patches``)."""
    return DATA_DIR / "qemu-patches"


def build_script(name: str) -> Path:
    """A shell build script run by ``nitro-harness setup``: ``build-qemu.sh`` or
    ``build-kernel.sh`` (``harness/data/build/``). Run it with ``bash``: an installed wheel
    need not keep the executable bit."""
    return DATA_DIR / "build" / name


def source_checkout() -> Path | None:
    """The repository root when the running harness is a source checkout (or an editable
    install of one): the folder above ``harness/`` holding a ``pyproject.toml`` that names
    the ``nitro-harness`` project; ``None`` for an installed package."""
    root = DATA_DIR.parent.parent
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'(?m)^name\s*=\s*"nitro-harness"', text) else None
