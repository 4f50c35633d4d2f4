"""``nitro-harness images``: build the enclave images the harness ships, and list them.

``images build NAME [--output-file F]`` builds (or takes from the cache) the EIF of a recipe
(``NAME.yaml`` in a recipe folder, or a recipe path) and prints its description: path, whether it
came from the cache, measurements (nitro-cli's Measurements object), kernel, packages, sizes.
``images list`` prints the recipes and the images in the cache, each with its architecture
(``Arch``: x86_64, or aarch64 for an ``arch: aarch64`` recipe). Recipe folders: ``--recipes DIR``
(repeatable), then ``$NITRO_HARNESS_RECIPES``, then the shipped ``harness/data/recipes``
(:mod:`harness.assets`). Errors are E48 (EifBuildingError) naming the recipe file and field, E19
for a ``--recipes`` folder that does not exist.
"""

from __future__ import annotations

import argparse

from harness.cli import print_json, progress
from harness.errors import ErrorCode, NitroError


def _add_recipe_dirs(args: argparse.Namespace) -> None:
    """Put the ``--recipes`` folders first in the recipe search (E19 for a missing one)."""
    from harness import assets

    try:
        assets.add_recipe_dirs(args.recipes or [])
    except ValueError as err:
        raise NitroError(ErrorCode.FileOperationFailure, f"--recipes: {err}") from None


def _build(args: argparse.Namespace) -> int:
    from harness.images.recipes import build

    _add_recipe_dirs(args)
    result = build(args.name, args.output_file, cmd=args.cmd, env=args.env, log=progress)
    info = dict(result.info)
    out = {"EifPath": str(result.path), "Cached": result.cached}
    if args.output_file:
        out["CachePath"] = info.get("EifPath")
    info.pop("EifPath", None)
    out.update(info)
    print_json(out)
    return 0


def _list(args: argparse.Namespace) -> int:
    from harness.images.recipes import cached_images, list_recipes

    _add_recipe_dirs(args)
    recipes = [{"Name": r.name, "Arch": r.arch.name, "Description": r.raw.get("description", ""),
                "Recipe": str(r.path)} for r in list_recipes()]
    # Images built before recipes had an architecture are x86_64 ones.
    cached = [{"ImageName": i.get("ImageName"), "Arch": i.get("Arch", "x86_64"),
               "EifPath": i.get("EifPath"),
               "PCR0": i.get("Measurements", {}).get("PCR0"),
               "Kernel": i.get("Kernel", {}).get("release")} for i in cached_images()]
    print_json({"Recipes": recipes, "Cached": cached})
    return 0


def register(subparsers) -> None:
    """Add ``images build`` and ``images list`` to the top-level sub-command parser."""
    images = subparsers.add_parser("images", help="build and list the harness's enclave images")
    sub = images.add_subparsers(dest="images_command", metavar="COMMAND",
                                parser_class=type(images), required=True)
    b = sub.add_parser("build", help="build (or reuse from the cache) the EIF of a recipe")
    b.add_argument("name", metavar="NAME", help="recipe name (NAME.yaml in a recipe folder) or path")
    b.add_argument("--output-file", metavar="F", help="also copy the EIF to F")
    b.add_argument("--cmd", nargs="+", metavar="ARG", default=None,
                   help="override the recipe's application command (argv)")
    b.add_argument("--env", nargs="+", metavar="KEY=VALUE", default=None,
                   help="override the recipe's environment")
    b.set_defaults(func=_build)
    ls = sub.add_parser("list", help="list recipes and cached images")
    ls.set_defaults(func=_list)
    for p in (b, ls):
        p.add_argument("--recipes", action="append", metavar="DIR",
                       help="a folder of your own recipes, searched first (repeatable; also "
                            "$NITRO_HARNESS_RECIPES, os.pathsep-separated)")
