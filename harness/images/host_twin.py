"""Running a foreign-architecture image's own tools at build time through their host twins.

Two build steps run a program of the image: ``busybox_links`` asks the image's busybox for its
applets (``busybox --list-full``) and ``compile_python`` compiles the image's Python modules
with the image's python. An arm64 image's programs cannot run on an x86_64 host (the harness
needs no user-mode emulator), so for an image of another architecture these steps run the
host architecture's build of the same Debian packages instead, unpacked into a scratch folder:
its "twin" (docs/boot.md#arm64-images). What the steps take from the program is decided by its
source, not its architecture: busybox's applet list is its build configuration, the same for
every Debian architecture, and CPython's bytecode is the same on every architecture. So a twin
must be the same source version: the host's candidate must have the image's package version,
up to a binNMU suffix (``+bN``: a rebuild of unchanged source). Errors are NitroError(E48)
naming the recipe field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from harness.arch import Arch, host_arch
from harness.images import debian
from harness.images.recipe import Log, fail, nolog

__all__ = ["is_foreign", "same_source_version", "twin_root"]


def is_foreign(arch: Arch) -> bool:
    """Whether an image of ``arch`` cannot run its own programs on this host."""
    return arch != host_arch()


def same_source_version(a: str, b: str) -> bool:
    """Whether Debian versions ``a`` and ``b`` are builds of the same source: equal once a
    binNMU suffix (``+b1``) is dropped from each."""
    def strip(v: str) -> str:
        return re.sub(r"\+b\d+$", "", v)
    return strip(a) == strip(b)


def twin_root(debs: Sequence[debian.DebPackage], names: Sequence[str], dest: Path,
              where: str, log: Log = nolog) -> Path:
    """Unpack into ``dest`` the host architecture's packages ``names``, each the twin of the
    package of that name in ``debs`` (an image's resolved packages), and return ``dest``.

    ``where`` is the recipe field the twins serve (``<file>: rootfs.busybox_links``), named by
    every error. Raises NitroError(E48) when the host is of no architecture the harness knows,
    a name is not among ``debs``, or the host's apt offers another source version of it.
    """
    host = host_arch()
    if host is None:
        raise fail(where, "this host's architecture runs no image program (x86_64 or aarch64 "
                   "host needed)")
    image = {p.name: p for p in debs}
    missing = [n for n in names if n not in image]
    if missing:
        raise fail(where, f"{', '.join(missing)}: not among the image's packages")
    offered = debian.show(names, host)
    twins = []
    for n in names:
        twin = offered.get(n)
        if twin is None or not same_source_version(twin.version, image[n].version):
            raise fail(where, f"{n} {image[n].version} ({image[n].architecture}) runs on this "
                       f"host through its {host.debian} build of the same version, but apt "
                       f"offers {twin.version if twin else 'none'}; run `apt-get update` "
                       "and `nitro-harness setup --only sources`, then retry")
        twins.append(twin)
    paths = debian.fetch(twins, host)
    log(f"unpacking the host's {', '.join(n for n in names)} to run them for the image")
    for twin in twins:
        debian.extract(paths[twin.name], dest)
    return dest
