"""The two ramdisks nitro-cli puts in an EIF, built deterministically (docs/boot.md#bootstrap-ramdisk).

* Bootstrap ramdisk (ramdisk 0, measured into PCR1): ``dev/`` (0755), ``init`` (0755, a static
  binary), ``nsm.ko`` (0755) and, as a harness extension, ``modules/<name>.ko`` (0644) plus
  ``modules/order`` listing the module file names in load order (the enclave init loads them
  before the heartbeat).
* Customer ramdisk (ramdisk 1, PCR2): ``rootfs/`` holding the container filesystem after
  linuxkit's changes, ``rootfs/{dev,run,sys,var,proc,tmp}`` (0755), and at the archive root
  ``cmd`` (one argv element per line) and ``env`` (one KEY=VALUE per line), both 0644.

Both are uncompressed newc archives written by :mod:`harness.cpio` (sorted, inode numbers from
721, mtime 1492533000 for entries created here). Errors are ``NitroError(E48)`` naming the file.
"""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from harness.cpio import (CpioError, Entry, LINUXKIT_MTIME, entries_from_directory,
                          write_cpio_file)
from harness.errors import ErrorCode, NitroError

#: Paths linuxkit drops from an image's filesystem (docs/boot.md#image-changes; linuxkit moby/image.go).
LINUXKIT_EXCLUDE = (".dockerenv", "Dockerfile", "dev/console", "dev/pts", "dev/shm",
                    "etc/hostname")
#: linuxkit's replacement /etc/hosts.
LINUXKIT_HOSTS = (
    "127.0.0.1       localhost\n"
    "::1     localhost ip6-localhost ip6-loopback\n"
    "fe00::0 ip6-localnet\n"
    "ff00::0 ip6-mcastprefix\n"
    "ff02::1 ip6-allnodes\n"
    "ff02::2 ip6-allrouters\n"
)
#: Where nitro-cli's linuxkit points /etc/resolv.conf (docs/boot.md#image-changes).
RESOLV_TARGET = "/run/resolvconf/resolv.conf"
#: Mount points nitro-cli's customer ramdisk always carries below rootfs/ (docs/boot.md#customer-ramdisk).
ROOTFS_MOUNT_POINTS = ("dev", "run", "sys", "var", "proc", "tmp")


def _fail(path: Path | str, rule: str) -> NitroError:
    return NitroError(ErrorCode.EifBuildingError, f"{path}: {rule}")


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise _fail(path, f"{what}: not found or not a regular file")
    return path


def bootstrap_entries(init: Path, nsm_ko: Path | None,
                      modules: Sequence[Path] = ()) -> list[Entry]:
    """Entries of the bootstrap ramdisk (see module docstring); files are streamed later."""
    init = _need_file(Path(init), "init")
    entries = [Entry.directory("dev", 0o755), Entry.file("init", source=init, mode=0o755)]
    if nsm_ko is not None:
        entries.append(Entry.file("nsm.ko", source=_need_file(Path(nsm_ko), "nsm.ko"),
                                  mode=0o755))
    if modules:
        names: list[str] = []
        for m in modules:
            m = _need_file(Path(m), "kernel module")
            if m.name in names:
                raise _fail(m, f"kernel module: a module named {m.name} is already included")
            if "\n" in m.name or not m.name.endswith(".ko"):
                raise _fail(m, "kernel module: file name must end in .ko and be one line")
            names.append(m.name)
            entries.append(Entry.file(f"modules/{m.name}", source=m, mode=0o644))
        entries.append(Entry.directory("modules", 0o755))
        entries.append(Entry.file("modules/order", ("\n".join(names) + "\n").encode(),
                                  mode=0o644))
    return entries


def build_bootstrap_ramdisk(out: Path | str, init: Path, nsm_ko: Path | None,
                            modules: Sequence[Path] = ()) -> Path:
    """Write the bootstrap ramdisk (docs/boot.md#bootstrap-ramdisk) to ``out`` atomically and return ``out``.

    ``init`` must be a static binary (not checked here); ``nsm_ko`` may be None for kernels
    with the NSM driver built in; ``modules`` are extra ``.ko`` files loaded by init in the
    given order before the heartbeat. Raises ``NitroError(E48)`` naming a missing input.
    """
    out = Path(out)
    entries = bootstrap_entries(Path(init), Path(nsm_ko) if nsm_ko else None, modules)
    try:
        write_cpio_file(out, entries)
    except (CpioError, OSError) as e:
        raise _fail(out, f"bootstrap ramdisk: {e}") from None
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


def apply_linuxkit_changes(entries: Iterable[Entry]) -> list[Entry]:
    """Apply the filesystem changes linuxkit makes to an image (docs/boot.md#image-changes); names are rootfs-relative.

    Drops ``.dockerenv``, ``Dockerfile``, ``dev/console``, ``dev/pts``, ``dev/shm`` and
    ``etc/hostname`` (and anything below them); rewrites ``etc/hosts`` with linuxkit's text;
    makes ``etc/resolv.conf`` a symlink to ``/run/resolvconf/resolv.conf``; adds
    ``etc/mtab -> /proc/mounts``; makes sure ``dev``, ``etc``, ``proc``, ``sys`` exist. Entries
    linuxkit creates or rewrites get mtime 1492533000; others keep their metadata.
    """
    out: dict[str, Entry] = {}
    for e in entries:
        if any(_under(e.name, x) for x in LINUXKIT_EXCLUDE):
            continue
        out[e.name] = e
    hosts = out.get("etc/hosts")
    perm = stat.S_IMODE(hosts.mode) if hosts is not None and stat.S_ISREG(hosts.mode) else 0o644
    kw = dict(uid=hosts.uid, gid=hosts.gid) if hosts is not None else {}
    out["etc/hosts"] = Entry.file("etc/hosts", LINUXKIT_HOSTS.encode(), mode=perm, **kw)
    resolv = out.get("etc/resolv.conf")
    rperm = stat.S_IMODE(resolv.mode) if resolv is not None else 0o644
    out["etc/resolv.conf"] = replace(Entry.symlink("etc/resolv.conf", RESOLV_TARGET),
                                     mode=stat.S_IFLNK | rperm)
    mtab = out.get("etc/mtab")
    if mtab is None:
        out["etc/mtab"] = replace(Entry.symlink("etc/mtab", "/proc/mounts"),
                                  mode=stat.S_IFLNK | 0o755)
    else:
        out["etc/mtab"] = replace(mtab, mtime=LINUXKIT_MTIME)
    for d in ("dev", "etc", "proc", "sys"):
        if d in out:
            out[d] = replace(out[d], mtime=LINUXKIT_MTIME)
        else:
            out[d] = Entry.directory(d, 0o755)
    return list(out.values())


def customer_entries(rootfs_entries: Iterable[Entry], cmd: Sequence[str],
                     env: Sequence[str], *, linuxkit_changes: bool = True) -> list[Entry]:
    """Entries of the customer ramdisk from rootfs-relative entries plus cmd and env (docs/boot.md#cmd-and-env)."""
    for line in list(cmd) + list(env):
        if "\n" in line:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"cmd/env: {line!r}: an element may not contain a newline")
    for kv in env:
        if "=" not in kv:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"env: {kv!r}: must be KEY=VALUE")
    rootfs = list(rootfs_entries)
    if linuxkit_changes:
        rootfs = apply_linuxkit_changes(rootfs)
    by_name = {e.name: e for e in rootfs}
    for d in ROOTFS_MOUNT_POINTS:
        if d not in by_name:
            by_name[d] = Entry.directory(d, 0o755)
        elif not by_name[d].is_dir:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"rootfs: {d}: must be a directory (nitro-cli mounts it)")
    entries = [Entry.directory("rootfs", 0o755)]
    entries += [replace(e, name=f"rootfs/{e.name}") for e in by_name.values()]
    entries.append(Entry.file("cmd", "".join(f"{a}\n" for a in cmd).encode(), mode=0o644))
    entries.append(Entry.file("env", "".join(f"{kv}\n" for kv in env).encode(), mode=0o644))
    return entries


def build_customer_ramdisk(out: Path | str, rootfs: Path | str | Sequence[Entry],
                           cmd: Sequence[str], env: Sequence[str], *,
                           linuxkit_changes: bool = True, mtime: int | None = None,
                           keep_owner: bool = True) -> Path:
    """Write the customer ramdisk (docs/boot.md#customer-ramdisk) to ``out`` atomically and return ``out``.

    ``rootfs`` is a directory (walked; files keep mode, mtime and owner unless ``mtime`` /
    ``keep_owner=False`` override them, for builds reproducible across checkouts) or a list of
    rootfs-relative :class:`~harness.cpio.Entry` (from :mod:`harness.images.docker_archive`).
    ``cmd`` is the argv (one element per line of ``cmd``), ``env`` the ``KEY=VALUE`` list.
    Raises ``NitroError(E48)`` naming the bad input.
    """
    out = Path(out)
    if isinstance(rootfs, (str, Path)):
        root = Path(rootfs)
        if not root.is_dir():
            raise _fail(root, "rootfs: not a directory")
        try:
            rentries = entries_from_directory(root, keep_owner=keep_owner)
        except (CpioError, OSError) as e:
            raise _fail(root, f"rootfs: {e}") from None
    else:
        rentries = list(rootfs)
    if mtime is not None:
        rentries = [replace(e, mtime=mtime) for e in rentries]
    entries = customer_entries(rentries, cmd, env, linuxkit_changes=linuxkit_changes)
    try:
        write_cpio_file(out, entries)
    except (CpioError, OSError) as e:
        raise _fail(out, f"customer ramdisk: {e}") from None
    return out
