"""The harness's own blobs: its Nitro-style kernel, AWS's command line, its init and nsm.ko.

docs/boot.md#blobs. ``build-enclave`` falls back to these when nitro-cli's blobs are nowhere
(no ``--blobs``, no ``NITRO_CLI_BLOBS``, no ``/usr/share/nitro_enclaves/blobs``): the kernel the
shipped recipes boot (``{cache}/kernel-current``: ``bzImage``, ``nsm.ko`` and ``config``, built
by ``nitro-harness setup --only kernel``), AWS's x86_64 command line, and the static init
built from ``harness/data/programs/init``. :func:`export_blobs` writes them in nitro-cli's blob layout for other tools.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.errors import ErrorCode, NitroError
from harness.images import debian
from harness.images.blobs import Blobs
from harness.images.recipe import AWS_CMDLINE, Log, nolog

__all__ = ["harness_kernel_dir", "harness_blobs", "export_blobs", "EXPORTED_FILES"]

#: What :func:`export_blobs` writes (``bzImage.config`` only when the kernel's config is known).
#: nitro-cli's RPM also ships ``linuxkit``; the harness builds its ramdisks without it.
EXPORTED_FILES = ("bzImage", "bzImage.config", "cmdline", "init", "nsm.ko")


def harness_kernel_dir() -> Path:
    """The folder of the harness's Nitro-style kernel: ``{cache}/kernel-current``."""
    return debian.cache_root() / "kernel-current"


def harness_blobs(log: Log = nolog) -> Blobs:
    """The harness's own blobs as a :class:`~harness.images.blobs.Blobs` (``directory`` is the
    kernel's folder; ``init`` the cached static init, built on first use).

    Raises NitroError E52 BlobsPathNotSet when the kernel has not been built (naming the
    folder and the script that builds it), E48 when the init cannot be built (no gcc).
    """
    d = harness_kernel_dir()
    if not (d / "bzImage").is_file() or not (d / "nsm.ko").is_file():
        raise NitroError(
            ErrorCode.BlobsPathNotSet,
            f"{d}: no blobs: neither --blobs, NITRO_CLI_BLOBS nor /usr/share/nitro_enclaves/blobs "
            "exists, and the harness's own kernel is not built yet (run: nitro-harness setup "
            "--only kernel)")
    from harness.images.static_programs import build_init

    init = build_init(log)
    config = d / "config"
    return Blobs(d, d / "bzImage", AWS_CMDLINE, init, d / "nsm.ko",
                 config if config.is_file() else None)


def export_blobs(blobs: Blobs, dest: Path) -> list[Path]:
    """Write ``blobs`` into ``dest`` in nitro-cli's blob layout (created if missing): the
    kernel as ``bzImage``, its config as ``bzImage.config`` when known, ``cmdline`` (one line),
    ``init`` (mode 0755) and ``nsm.ko``. Returns the written paths, in that order.

    Raises NitroError E19 FileOperationFailure naming the file that cannot be written.
    """
    pairs: list[tuple[Path | None, str]] = [
        (blobs.kernel, "bzImage"), (blobs.kernel_config, "bzImage.config"),
        (None, "cmdline"), (blobs.init, "init"), (blobs.nsm_ko, "nsm.ko")]
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for src, name in pairs:
            out = dest / name
            if name == "cmdline":
                out.write_text(blobs.cmdline + "\n")
            elif src is None:
                continue
            else:
                shutil.copyfile(src, out)
            out.chmod(0o755 if name == "init" else 0o644)
            written.append(out)
    except OSError as e:
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{e.filename or dest}: cannot write the blobs: {e.strerror or e}") from None
    return written
