"""Find the QEMU binary and the qboot firmware the harness runs enclaves with.

Where QEMU comes from (docs/architecture.md#qemu-build): ``nitro-harness setup --only qemu``
(``harness/data/build/build-qemu.sh``) builds Debian's qemu 10.0 source with a patch that makes
``vhost-user-device`` user-creatable and installs it under ``~/.cache/nitro-harness/qemu-<version>-<patch hash>/``, ``qemu-system-x86_64`` and
``qemu-system-aarch64`` side by side (docs/architecture.md#architectures). A user may point
``NITRO_HARNESS_QEMU`` at any other ``qemu-system-x86_64`` (``NITRO_HARNESS_QEMU_AARCH64`` at a
``qemu-system-aarch64``); :func:`harness.qemu.probe_qemu` then says what that binary lacks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from harness import assets
from harness.arch import X86_64, Arch
from harness.errors import ErrorCode, NitroError

QEMU_ENV = "NITRO_HARNESS_QEMU"
#: The variable naming the QEMU for aarch64 EIFs (``QEMU_ENV`` names the x86_64 one).
QEMU_AARCH64_ENV = "NITRO_HARNESS_QEMU_AARCH64"
QBOOT_ENV = "NITRO_HARNESS_QBOOT"
BINARY = "qemu-system-x86_64"
#: The command that builds the patched QEMU (the doctor's and the errors' fix).
SETUP_HINT = "nitro-harness setup --only qemu"
# Debian's qemu-system-data ships qboot; build-qemu.sh also copies it beside the build.
SYSTEM_QBOOT = Path("/usr/share/qemu/qboot.rom")


def cache_dir() -> Path:
    """The harness's cache root: ``$NITRO_HARNESS_CACHE``, else ``~/.cache/nitro-harness``
    (the same rule as build-qemu.sh and the image cache)."""
    explicit = os.environ.get("NITRO_HARNESS_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "nitro-harness"


def qemu_env(arch: Arch = X86_64) -> str:
    """The environment variable that names the QEMU for ``arch``'s EIFs."""
    return QEMU_ENV if arch == X86_64 else QEMU_AARCH64_ENV


def _cached_builds(root: Path, binary_name: str = BINARY) -> list[Path]:
    """Complete builds under ``root`` (``qemu-*/.complete`` + ``binary_name``), newest first."""
    builds: list[tuple[float, Path]] = []
    try:
        candidates = list(root.glob("qemu-*"))
    except OSError:
        return []
    for build in candidates:
        stamp = build / ".complete"
        binary = build / "bin" / binary_name
        if build.is_dir() and stamp.is_file() and os.access(binary, os.X_OK):
            builds.append((stamp.stat().st_mtime, binary))
    return [binary for _, binary in sorted(builds, key=lambda b: b[0], reverse=True)]


#: The patches of the harness's QEMU build (package data: :func:`harness.assets.qemu_patches_dir`).
PATCH_DIR = assets.qemu_patches_dir()


def patch_hash(patch_dir: Path | None = None) -> str | None:
    """The cache key build-qemu.sh derives from the patches (default :data:`PATCH_DIR`): sha256
    over each ``*.patch`` in name order as ``name + "\\n" + bytes``, first 12 hex digits (names and
    bytes only, so the key does not depend on where the package is installed); ``None`` when
    the folder holds no patch."""
    patch_dir = PATCH_DIR if patch_dir is None else patch_dir
    patches = sorted(patch_dir.glob("*.patch")) if patch_dir.is_dir() else []
    if not patches:
        return None
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    return digest.hexdigest()[:12]


def current_build(arch: Arch = X86_64) -> Path | None:
    """The complete cached build for the shipped patch set
    (``qemu-<version>-<patch hash>/bin/qemu-system-x86_64``, or ``arch``'s binary), or ``None``."""
    wanted = patch_hash()
    if wanted is None:
        return None
    for binary in _cached_builds(cache_dir(), arch.qemu_binary):
        if binary.parent.parent.name.endswith("-" + wanted):
            return binary
    return None


def find_qemu(arch: Arch = X86_64) -> Path:
    """The QEMU to run ``arch``'s enclaves with (``qemu-system-x86_64`` or
    ``qemu-system-aarch64``: :attr:`harness.arch.Arch.qemu_binary`).

    Order: the variable :func:`qemu_env` names (must be an executable file), else the cached
    build of the shipped patches (:func:`current_build`), else the newest complete build in
    :func:`cache_dir` (``qemu-<version>-<patch hash>/bin/<binary>``), else the binary on
    ``PATH``. Raises ``NitroError(E19 FileOperationFailure)`` when none exists, naming the fix
    (:data:`SETUP_HINT`), in one line that says which architecture's EIF needs it. Whether the
    binary is fit for enclaves (patched, its machine, ...) is :func:`probe_qemu`'s question.
    """
    env = qemu_env(arch)
    explicit = os.environ.get(env)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"{env}={explicit}: not an executable file "
                f"(unset it to use the harness's own build from {SETUP_HINT})",
            )
        return path.absolute()
    current = current_build(arch)
    if current is not None:
        return current
    builds = _cached_builds(cache_dir(), arch.qemu_binary)
    if builds:
        return builds[0]
    on_path = shutil.which(arch.qemu_binary)
    if on_path:
        return Path(on_path)
    needs = "" if arch == X86_64 else f" (an {arch.name} EIF boots on it)"
    raise NitroError(
        ErrorCode.FileOperationFailure,
        f"{arch.qemu_binary} not found{needs}: {env} is unset, {cache_dir()} holds no complete "
        f"build with it and PATH has none; run {SETUP_HINT} (builds the patched QEMU for "
        f"x86_64 and aarch64) or set {env}",
    )


def find_firmware(qemu: str | os.PathLike[str] | None = None) -> Path | None:
    """The qboot firmware microvm boots with (SeaBIOS hung on microvm with this QEMU).

    Order: ``$NITRO_HARNESS_QBOOT``; ``<qemu prefix>/share/qemu/qboot.rom`` beside ``qemu``
    (build-qemu.sh copies it there); ``/usr/share/qemu/qboot.rom`` from Debian's
    ``qemu-system-data``. Returns ``None`` when none exists (fix:
    ``apt-get install qemu-system-data``).
    """
    explicit = os.environ.get(QBOOT_ENV)
    if explicit:
        candidate = Path(explicit)
        return candidate if candidate.is_file() else None
    candidates: list[Path] = []
    if qemu is not None:
        candidates.append(Path(qemu).resolve().parent.parent / "share" / "qemu" / "qboot.rom")
    candidates.append(SYSTEM_QBOOT)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None
