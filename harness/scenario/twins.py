"""Kernel and architecture twins of a scenario case (docs/scenarios.md#kernels,
docs/scenarios.md#architectures).

A case written for the harness's Nitro-style x86_64 kernel also runs on Debian's cloud kernel
through the recipe ``<image>-debian`` and on Graviton's architecture through ``<image>-arm64``;
these functions name the twin recipes and derive the twin cases (same steps, another image, the
kernel or architecture added to the case id).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from harness.errors import ErrorCode, NitroError

if TYPE_CHECKING:
    from harness.scenario.loader import Scenario

#: Kernels a scenario can be run on: ``nitro``, the harness's Nitro-style kernel (the recipes as
#: named: ACPI off, devices on the command line, docs/vhost-user.md), and ``debian``, Debian's
#: cloud kernel (the recipe ``<image>-debian``: the same root filesystem, ACPI discovery, vsock
#: as modules loaded by init).
KERNELS = ("nitro", "debian")
#: Architectures a scenario can be run on (docs/scenarios.md#architectures): ``x86_64``, the
#: recipes as they are, and ``aarch64``, the recipe's Graviton twin ``<image>-arm64`` (the same
#: application on the arm64 Nitro-style kernel, booted on QEMU's ``virt`` machine).
ARCHES = ("x86_64", "aarch64")




def image_for_kernel(image: str, kernel: str) -> str:
    """Recipe name of ``image`` built for ``kernel`` (one of :data:`KERNELS`).

    ``nitro`` keeps the name (the shipped recipes use the Nitro-style kernel); ``debian`` names
    the recipe's Debian-kernel twin ``<image>-debian`` (kept as is when ``image`` already ends
    so). Raises NitroError E03 for an unknown kernel.
    """
    return _twin(image, kernel, "kernel", "kernel", KERNELS, "-debian")


def image_for_arch(image: str, arch: str) -> str:
    """Recipe name of ``image`` built for ``arch`` (one of :data:`ARCHES`): ``x86_64`` keeps the
    name, ``aarch64`` names the twin ``<image>-arm64`` (kept as is when ``image`` already ends
    so). Raises NitroError E03 for an unknown architecture."""
    return _twin(image, arch, "arch", "architecture", ARCHES, "-arm64")


def _twin(image: str, value: str, key: str, what: str, known: tuple[str, str], suffix: str) -> str:
    """``image`` for ``value`` of a dimension whose ``known`` values are (the recipes as named,
    the twin named ``<image><suffix>``); E03 naming ``key`` for a value outside ``known``."""
    if value not in known:
        raise NitroError(ErrorCode.InvalidArgument,
                         f"{key}: unknown {what} {value!r} (known: {', '.join(known)})")
    if value == known[0] or image.endswith(suffix):
        return image
    return f"{image}{suffix}"


def arch_of_image(image: str) -> str:
    """The architecture a recipe name implies: ``aarch64`` for ``<image>-arm64``, else x86_64."""
    return "aarch64" if image.endswith("-arm64") else "x86_64"


def image_for(image: str, kernel: str, arch: str) -> str:
    """Recipe name of ``image`` for ``kernel`` and ``arch`` (:func:`image_for_kernel`, then
    :func:`image_for_arch`); what steps that build their own images name."""
    return image_for_arch(image_for_kernel(image, kernel), arch)


def kernel_of_image(image: str) -> str:
    """The kernel a recipe name implies: ``debian`` for ``<image>-debian``, else ``nitro``."""
    return "debian" if image.endswith("-debian") else "nitro"


def for_kernel(case: Scenario, kernel: str) -> Scenario | None:
    """``case`` run on ``kernel``, or None when it does not run there.

    A case whose image names its kernel (``hello-debian``) runs only on that kernel, as it is.
    A case of a Nitro-kernel image runs as it is on ``nitro`` and, on ``debian``, boots
    :func:`image_for_kernel`'s twin (and every image its steps build is swapped the same way)
    with ``kernel=debian`` added to its id, except a Graviton image's (``hello-arm64``), which
    has no Debian-kernel twin. ``eif:`` cases are left to :func:`load_scenarios`.
    """
    image = case.data["image"]
    if kernel != "nitro" and arch_of_image(image) != "x86_64":
        return None
    if kernel_of_image(image) != "nitro":
        return replace(case, kernel=kernel) if kernel == kernel_of_image(image) else None
    if kernel == "nitro":
        return case
    data = copy.deepcopy(case.data)
    data["image"] = image_for_kernel(image, kernel)
    suffix = f"kernel={kernel}"
    return replace(case, case=f"{case.case},{suffix}" if case.case else suffix, data=data,
                   matrix_values=dict(case.matrix_values), kernel=kernel)


def for_arch(case: Scenario, arch: str, has_recipe: Any = None) -> Scenario | None:
    """``case`` run on ``arch``, or None when it does not run there.

    A case whose image names its architecture (``hello-arm64``) runs only there, as it is. An
    x86_64 image's case runs as it is on ``x86_64`` and, on ``aarch64``, boots
    :func:`image_for_arch`'s twin with ``arch=aarch64`` added to its id, on the Nitro-style
    kernel only (there is no arm64 Debian-kernel twin), and only when ``has_recipe`` (a
    predicate on recipe names; None: any) says that twin exists, so a scenario whose image has
    no Graviton recipe yet is left out rather than failing for want of one.
    """
    image = case.data["image"]
    if arch_of_image(image) != "x86_64":
        return replace(case, arch=arch) if arch == arch_of_image(image) else None
    if arch == "x86_64":
        return case
    twin = image_for_arch(image, arch)
    if case.kernel != "nitro" or (has_recipe is not None and not has_recipe(twin)):
        return None
    data = copy.deepcopy(case.data)
    data["image"] = twin
    suffix = f"arch={arch}"
    return replace(case, case=f"{case.case},{suffix}" if case.case else suffix, data=data,
                   matrix_values=dict(case.matrix_values), arch=arch)


def recipe_exists(name: str) -> bool:
    """Whether a recipe called ``name`` is found (:func:`harness.images.recipe.recipe_path`)."""
    from harness.images.recipe import recipe_path  # the loader itself needs no image code

    try:
        recipe_path(name)
    except NitroError:
        return False
    return True
