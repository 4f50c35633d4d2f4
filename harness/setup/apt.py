"""The set-up's apt steps: bookworm-backports sources, then the host and build packages.

``sources``: on Debian bookworm, add bookworm-backports (deb + deb-src, deb822 form) when either
line is missing; never another release's binary (deb) lines (docs/architecture.md#qemu-and-kernels:
they pull in a new libc). ``packages``: install, through apt, the host tools and the QEMU and
kernel build dependencies that are missing; refresh the package lists first when a source was
added or the QEMU source is not indexed yet.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

from harness.errors import NitroError
from harness.setup.context import APT_WAIT, Context, StepFailed

#: Host tools the harness itself needs (images build init with `gcc -static`, cpio/xz/zstd for
#: ramdisks and kernel modules, openssl for the PKI tests, qboot from qemu-system-data). Debian's
#: qemu-system-x86 is deliberately not installed: the harness runs its own patched build.
HOST_PACKAGES = ("build-essential", "cpio", "openssl", "qemu-system-data", "xz-utils", "zstd",
                 "kmod", "file", "python3-venv")
#: QEMU build dependencies (docs/architecture.md#qemu-build, checked in a clean bookworm).
QEMU_BUILD_PACKAGES = ("ninja-build", "pkg-config", "libglib2.0-dev", "libpixman-1-dev",
                       "libcbor-dev", "libgnutls28-dev", "libfdt-dev", "flex", "bison", "patch")
#: What the kernel build needs beyond those (bc, libelf for objtool, OpenSSL headers for the
#: certificate tools, lz4 for the payload); cheap, so installed whether or not the kernel is built.
KERNEL_BUILD_PACKAGES = ("bc", "libelf-dev", "libssl-dev", "lz4")
#: The cross toolchain for aarch64: ``aarch64-linux-gnu-gcc`` and binutils, which the kernel step
#: builds the aarch64 kernel with, and the arm64 libc static aarch64 programs link against. Not on
#: an aarch64 host: its own gcc does both (and Debian has no such packages there).
CROSS_BUILD_PACKAGES: tuple[str, ...] = (
    () if platform.machine() in ("aarch64", "arm64")
    else ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"))
ALL_PACKAGES = HOST_PACKAGES + QEMU_BUILD_PACKAGES + KERNEL_BUILD_PACKAGES + CROSS_BUILD_PACKAGES

#: The QEMU version built (``$QEMU_VERSION`` overrides it, as build-qemu.sh reads it).
QEMU_VERSION = "10.0.2"

_TARGET = "sources.list.d/nitro-harness-bookworm-backports.sources"


def os_codename(os_release: Path) -> str:
    """``VERSION_CODENAME`` of an os-release file ("" when absent or unreadable)."""
    try:
        text = os_release.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    m = re.search(r'(?m)^VERSION_CODENAME=["\']?([^"\'\n]*)', text)
    return m.group(1).strip() if m else ""


def backports_types(apt_etc: Path) -> tuple[bool, bool]:
    """Whether bookworm-backports binary (deb) and source (deb-src) lines are configured under
    ``apt_etc``, in one-line (``.list``) or deb822 (``.sources``) form; deb822 stanzas marked
    ``Enabled: no`` do not count."""
    deb = src = False
    one_line = re.compile(r"^\s*(deb|deb-src)\s.*\sbookworm-backports(\s|$)", re.MULTILINE)
    for f in [apt_etc / "sources.list", *sorted((apt_etc / "sources.list.d").glob("*.list"))]:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in one_line.finditer(text):
            deb |= m.group(1) == "deb"
            src |= m.group(1) == "deb-src"
    for f in sorted((apt_etc / "sources.list.d").glob("*.sources")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"(?m)^([A-Za-z-]+):[ \t]*(.*)$", stanza))
            if "bookworm-backports" not in fields.get("Suites", "").split():
                continue
            if fields.get("Enabled", "yes").strip().lower() == "no":
                continue
            types = fields.get("Types", "").split()
            deb |= "deb" in types
            src |= "deb-src" in types
    return deb, src


def step_sources(ctx: Context) -> None:
    """Add bookworm-backports (the missing of deb and deb-src) on bookworm, nothing elsewhere;
    then refresh the package lists of the other architecture's private apt state
    (:func:`refresh_foreign_lists`).

    Reads ``$NITRO_HARNESS_OS_RELEASE`` (/etc/os-release) and writes under
    ``$NITRO_HARNESS_APT_ETC`` (/etc/apt), so tests can run it against other files."""
    _add_backports(ctx)
    refresh_foreign_lists(ctx)



def refresh_foreign_lists(ctx: Context) -> None:
    """``apt-get update`` in the private apt state of the architecture that is not the host's
    (arm64 on an x86_64 host: ``<cache>/apt-arm64``; docs/boot.md#arm64-images), which images
    of that architecture resolve their packages from. Skipped when ``$NITRO_HARNESS_APT_ETC``
    names another apt tree than the host's (the state's sources come from the host's apt) and
    on a host without apt-get. A failed fetch is a warning, not a failed step: x86_64 images
    do not need these lists, and an arm64 build fetches them itself when they are missing."""
    from harness.arch import ARCHES, host_arch  # standard library only, like the set-up
    from harness.images import apt_state

    for debian_arch in sorted(a.debian for a in ARCHES.values() if a != host_arch()):
        state = apt_state.state_dir(ctx.cache, debian_arch)
        if Path(ctx.env.get("NITRO_HARNESS_APT_ETC", "/etc/apt")) != Path("/etc/apt"):
            ctx.log(f"{debian_arch} package lists: not refreshed ($NITRO_HARNESS_APT_ETC is "
                    "not the host's /etc/apt)")
            continue
        if ctx.dry_run:
            ctx.log(f"would refresh the {debian_arch} package lists in {state}")
            continue
        if shutil.which("apt-get", path=ctx.env.get("PATH")) is None:
            ctx.log(f"{debian_arch} package lists: not refreshed (no apt-get: not a Debian host)")
            continue
        try:
            text = apt_state.refresh(ctx.cache, debian_arch)
        except NitroError as err:
            ctx.log(f"warning: {debian_arch} package lists not refreshed: {err.message}")
            continue
        ctx.log(f"{debian_arch} package lists refreshed in {state} "
                f"({len(text.splitlines())} source(s))")


def _add_backports(ctx: Context) -> None:
    """Add bookworm-backports (the missing of deb and deb-src) on bookworm; nothing elsewhere."""
    apt_etc = Path(ctx.env.get("NITRO_HARNESS_APT_ETC", "/etc/apt"))
    codename = os_codename(Path(ctx.env.get("NITRO_HARNESS_OS_RELEASE", "/etc/os-release")))
    if codename != "bookworm":
        version = ctx.env.get("QEMU_VERSION", QEMU_VERSION)
        ctx.log(f"not bookworm (VERSION_CODENAME='{codename}'): adding no apt sources; the QEMU "
                f"build needs a deb-src line offering qemu {version} (or set QEMU_VERSION)")
        return
    have_deb, have_src = backports_types(apt_etc)
    if have_deb and have_src:
        ctx.log("cached: bookworm-backports (deb + deb-src) already configured")
        return
    types = " ".join(t for t, have in (("deb", have_deb), ("deb-src", have_src)) if not have)
    target = apt_etc / _TARGET
    if ctx.dry_run:
        ctx.log(f"would add bookworm-backports ({types}) in {target}")
        return
    ctx.log(f"adding bookworm-backports ({types}) in {target}")
    # bookworm-backports only: its packages are built for bookworm's libc (unlike trixie's).
    text = "\n".join([
        "# Added by nitro-harness setup: QEMU 10 source and the 6.12 kernel.",
        f"Types: {types}",
        "URIs: http://deb.debian.org/debian",
        "Suites: bookworm-backports",
        "Components: main",
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
    ]) + "\n"
    tmp = target.with_name(target.name + ".tmp")
    _write_as_root(ctx, tmp, text)
    ctx.run(ctx.as_root(["mv", str(tmp), str(target)]), f"mv {tmp} {target}")
    ctx.apt_update = True


def _write_as_root(ctx: Context, path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (through ``sudo tee`` when not root)."""
    try:
        proc = subprocess.run(ctx.as_root(["tee", str(path)]), input=text, text=True,
                              stdout=subprocess.DEVNULL, check=False)
    except OSError as e:
        raise StepFailed(f"cannot write {path}: {e.strerror or e}") from None
    if proc.returncode != 0:
        raise StepFailed(f"cannot write {path} (tee exit {proc.returncode})")


def missing_packages(ctx: Context) -> list[str]:
    """Packages of :data:`ALL_PACKAGES` dpkg does not report as installed, in that order
    (all of them when dpkg-query is absent)."""
    status, out = ctx.output(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *ALL_PACKAGES])
    if status == 127:
        return list(ALL_PACKAGES)
    installed = {line.split()[0].split(":")[0] for line in out.splitlines()
                 if line.endswith("install ok installed")}
    return [p for p in ALL_PACKAGES if p not in installed]


def _qemu_source_indexed(ctx: Context) -> bool:
    """Whether apt's source index offers the QEMU tarball build-qemu.sh fetches."""
    version = ctx.env.get("QEMU_VERSION", QEMU_VERSION)
    _, out = ctx.output(["apt-cache", "showsrc", "qemu"])
    return f"qemu_{version}+ds.orig.tar.xz" in out


def step_packages(ctx: Context) -> None:
    """apt-get install the missing packages (after apt-get update when a source was added or
    the QEMU source is not indexed; not needed with ``$NITRO_HARNESS_QEMU``)."""
    ctx.need_apt()
    missing = missing_packages(ctx)
    if not ctx.env.get("NITRO_HARNESS_QEMU") and not _qemu_source_indexed(ctx):
        ctx.apt_update = True
    if not missing and not ctx.apt_update:
        ctx.log(f"cached: all {len(ALL_PACKAGES)} packages installed")
        return
    if ctx.dry_run:
        install = f" and apt-get install {' '.join(missing)}" if missing else ""
        ctx.log(f"would run apt-get update{install}")
        return
    # `env` rather than the environment: sudo drops DEBIAN_FRONTEND.
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *APT_WAIT]
    # Fresh package lists before installing (and after a source was added).
    ctx.log("apt-get update")
    ctx.run(ctx.as_root([*apt, "update"]), "apt-get update")
    if missing:
        ctx.log(f"apt-get install {' '.join(missing)}")
        ctx.run(ctx.as_root([*apt, "install", "-y", "--no-install-recommends", *missing]),
                f"apt-get install {' '.join(missing)}")
