"""``nitro-harness blobs export DIR``: the harness's own blobs in nitro-cli's blob layout.

docs/nitro-cli.md#harness-commands, docs/boot.md#blobs: ``bzImage``, ``bzImage.config`` (when
the kernel's config is known), ``cmdline``, ``init`` and ``nsm.ko``, the files nitro-cli reads
from ``NITRO_CLI_BLOBS``, so nitro-cli or any other EIF builder can use the harness's Nitro-style
kernel. Prints ``{"Directory", "Files", "KernelVersion"}``. Errors: E52 when the kernel is not
built, E48 when init cannot be built, E19 when ``DIR`` cannot be written.
"""

from __future__ import annotations

from pathlib import Path

from harness.cli import print_json, progress


def register(subparsers) -> None:
    """Add ``blobs export``."""
    blobs = subparsers.add_parser("blobs", help="the harness's own kernel, cmdline, init and "
                                                "nsm.ko in nitro-cli's blob layout")
    sub = blobs.add_subparsers(dest="blobs_command", metavar="COMMAND", required=True)
    export = sub.add_parser("export", help="write the blobs into DIR (NITRO_CLI_BLOBS=DIR "
                                           "then works for nitro-cli)")
    export.add_argument("directory", metavar="DIR", type=Path)
    export.set_defaults(func=export_cmd)


def export_cmd(args) -> int:
    """``blobs export DIR``: write the harness's blobs and print what was written."""
    from harness.eif import kernel_version_of
    from harness.images.own_blobs import export_blobs, harness_blobs

    blobs = harness_blobs(progress)
    written = export_blobs(blobs, args.directory)
    print_json({"Directory": str(args.directory.resolve()),
                "Files": [p.name for p in written],
                "KernelVersion": kernel_version_of(blobs.kernel) or "unknown"})
    return 0
