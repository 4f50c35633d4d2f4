"""nitro-cli's blob directory: the kernel, its command line, init and nsm.ko (docs/boot.md#blobs, docs/nitro-cli.md#build-enclave).

nitro-cli takes the blobs from ``$NITRO_CLI_BLOBS`` (default
``/usr/share/nitro_enclaves/blobs``): ``bzImage`` (x86_64) or ``Image`` (aarch64), ``cmdline``
(the kernel command line, trimmed), ``init`` (static) and ``nsm.ko``; ``bzImage.config`` (or
``Image.config``) optionally gives the kernel version recorded in the metadata. The harness
also accepts ``--blobs DIR``, which wins over the environment; when none of the three is set
or present, ``build-enclave`` uses the harness's own blobs (:mod:`harness.images.own_blobs`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ErrorCode, NitroError

#: Where nitro-cli's RPM installs the blobs.
DEFAULT_BLOBS_PATH = Path("/usr/share/nitro_enclaves/blobs")
ENV_VAR = "NITRO_CLI_BLOBS"
KERNEL_NAMES = ("bzImage", "Image")


@dataclass(frozen=True)
class Blobs:
    """A resolved blob directory: ``kernel`` path, ``cmdline`` text, ``init`` and ``nsm_ko`` paths.

    ``nsm_ko`` is None only when the directory has no ``nsm.ko`` and the caller allowed that
    (kernels with the NSM driver built in); ``kernel_config`` is the ``.config`` beside the
    kernel when present; ``aarch64`` is True for an ``Image`` kernel.
    """

    directory: Path
    kernel: Path
    cmdline: str
    init: Path
    nsm_ko: Path | None
    kernel_config: Path | None = None
    aarch64: bool = False

    def kernel_version(self) -> str:
        """Kernel version for the EIF metadata: from the ``.config`` header, else the bzImage
        header's version string, else ``"unknown"``."""
        if self.kernel_config is not None:
            try:
                head = self.kernel_config.read_text(errors="replace")[:4096]
            except OSError:
                head = ""
            m = re.search(r"^# Linux/\S+ (\S+) Kernel Configuration", head, re.M)
            if m:
                return m.group(1)
        from harness.eif import kernel_version_of

        return kernel_version_of(self.kernel) or "unknown"


def blobs_source(blobs_dir: Path | str | None = None) -> tuple[Path, str] | None:
    """Where nitro-cli would take its blobs from, and which setting named it: ``blobs_dir``
    (``"--blobs"``), else ``$NITRO_CLI_BLOBS``, else the default folder when it exists
    (``"default path"``); None when none of them is set or present, which is when
    ``build-enclave`` uses the harness's own blobs (:mod:`harness.images.own_blobs`)."""
    if blobs_dir is not None:
        return Path(blobs_dir), "--blobs"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), ENV_VAR
    if DEFAULT_BLOBS_PATH.is_dir():
        return DEFAULT_BLOBS_PATH, "default path"
    return None


def resolve_blobs_dir(blobs_dir: Path | str | None = None) -> Path:
    """Return the blob directory: ``blobs_dir``, else ``$NITRO_CLI_BLOBS``, else the default.

    Raises ``NitroError(E52 BlobsPathNotSet)`` when the chosen directory does not exist,
    naming where the path came from.
    """
    path, origin = blobs_source(blobs_dir) or (DEFAULT_BLOBS_PATH, "default path")
    if not path.is_dir():
        raise NitroError(ErrorCode.BlobsPathNotSet,
                         f"{path}: blobs directory ({origin}) does not exist; pass --blobs DIR "
                         f"or set {ENV_VAR} to a directory holding bzImage, cmdline, init, nsm.ko")
    return path


def find_blobs(blobs_dir: Path | str | None = None, *, require_nsm_ko: bool = True) -> Blobs:
    """Resolve and check a blob directory (see :func:`resolve_blobs_dir`).

    Raises ``NitroError(E52)`` when no directory exists, ``NitroError(E48 EifBuildingError)``
    naming the first missing file (``bzImage``/``Image``, ``cmdline``, ``init``, ``nsm.ko``)
    or an empty ``cmdline``.
    """
    d = resolve_blobs_dir(blobs_dir)
    kernel = next((d / n for n in KERNEL_NAMES if (d / n).is_file()), None)
    if kernel is None:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{d / 'bzImage'}: kernel blob not found (nor {d / 'Image'})")
    for name in ("cmdline", "init"):
        if not (d / name).is_file():
            raise NitroError(ErrorCode.EifBuildingError, f"{d / name}: {name} blob not found")
    nsm = d / "nsm.ko"
    if not nsm.is_file():
        if require_nsm_ko:
            raise NitroError(ErrorCode.EifBuildingError, f"{nsm}: nsm.ko blob not found")
        nsm = None
    try:
        cmdline = (d / "cmdline").read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise NitroError(ErrorCode.EifBuildingError, f"{d / 'cmdline'}: unreadable ({e})") from None
    if not cmdline:
        raise NitroError(ErrorCode.EifBuildingError, f"{d / 'cmdline'}: is empty")
    cfg = d / f"{kernel.name}.config"
    return Blobs(d, kernel, cmdline, d / "init", nsm, cfg if cfg.is_file() else None,
                 kernel.name == "Image")
