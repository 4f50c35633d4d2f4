"""The root filesystem of an image's customer ramdisk, assembled from a recipe.

In order (later steps win): the ``application`` (a ``docker save``/OCI tarball or a
directory), then in a scratch root the ``rootfs.debs`` unpacked (``dpkg -x``, never
installed), ``prune`` globs removed, ``busybox_links``, inline ``files``, static ``programs``,
pure-Python ``pip`` wheels, the ``guest`` helpers of ``harness/data/guest`` and ``compile_python``'s
precompiled pycs. Entries the build created get :data:`FIXED_MTIME` and owner 0:0, so a cold
build is reproducible (docs/boot.md). The packages and programs are those of the recipe's
``arch``; for an image of another architecture than the host's, busybox's applet list and the
pycs come from the host's build of the same packages (:mod:`harness.images.host_twin`,
docs/boot.md#arm64-images). Errors are NitroError(E48) naming the recipe field.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from harness.images import debian
from harness.images.host_twin import is_foreign, twin_root
from harness.images.recipe import Log, Recipe, fail, guest_dir, nolog
from harness.images.static_programs import build_static_program, elf_interpreter

#: mtime of every entry the harness creates (linuxkit's, docs/boot.md), so cold builds are
#: reproducible whatever the clock says.
FIXED_MTIME = 1492533000

#: An image's dynamic loader and library folder (Debian's multiarch triplet), per
#: architecture: how the build runs the image's own dynamically linked programs.
_GUEST_LIBC = {"x86_64": ("lib64/ld-linux-x86-64.so.2", "x86_64-linux-gnu"),
               "aarch64": ("lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu")}


def _wheel_cache() -> Path:
    d = debian.cache_root() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_wheel(spec: str) -> Path:
    """Return the cached wheel for a pinned ``name==version`` (``pip download`` on a miss).

    Raises NitroError(E48) when pip fails or the project has no pure-Python wheel.
    """
    name, version = spec.split("==", 1)
    norm = name.replace("-", "_").replace(".", "_").lower()

    def cached() -> list[Path]:
        return sorted(p for p in _wheel_cache().glob("*.whl")
                      if p.name.lower().startswith(f"{norm}-{version}-"))

    hits = cached()
    if not hits:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", str(_wheel_cache()), spec],
            capture_output=True, text=True, check=False)
        hits = cached()
        if proc.returncode != 0 or not hits:
            tail = " / ".join(proc.stderr.strip().splitlines()[-2:])
            raise fail(spec, f"rootfs.pip: pip download failed: {tail}")
    if not hits[0].name.endswith("-none-any.whl"):
        raise fail(hits[0], "rootfs.pip: only pure-Python (py3-none-any) wheels are supported")
    return hits[0]


def _install_wheel(wheel: Path, target: Path) -> None:
    """Unpack a pure-Python wheel into ``target`` (files 0644, dirs 0755)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            rel = Path(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise fail(wheel, f"rootfs.pip: unsafe member {info.filename!r}")
            if ".data" in rel.parts[0] and rel.parts[0].endswith(".data"):
                raise fail(wheel, "rootfs.pip: wheels with .data directories are unsupported")
            dest = target / rel
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            dest.chmod(0o644)


def guest_file_skipped(p: Path) -> bool:
    """Whether ``p`` under harness/data/guest/ stays out of images: caches and hidden files."""
    return p.name == "__pycache__" or p.name.endswith(".pyc") or p.name.startswith(".")


def _copy_guest(dest: Path) -> int:
    """Copy every file of harness/data/guest/ to ``dest``: mode 0755 if executable there, else
    0644."""
    src = guest_dir()
    n = 0
    if not src.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not guest_file_skipped(Path(dirpath) / d)]
        for fn in filenames:
            p = Path(dirpath) / fn
            if guest_file_skipped(p) or not p.is_file():
                continue
            out = dest / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(p.read_bytes())
            out.chmod(0o755 if os.access(p, os.X_OK) else 0o644)
            n += 1
    return n


def _inside(root: Path, abs_path: str) -> Path:
    rel = abs_path.lstrip("/")
    p = root / rel
    if ".." in Path(rel).parts:
        raise fail(abs_path, "path: '..' is not allowed")
    return p


def _busybox_links(root: Path, recipe: Recipe, debs: Sequence[debian.DebPackage] = (),
                   log: Log = nolog) -> int:
    """One symlink to /bin/busybox per applet (``busybox --list-full``), where no file exists.
    For an image of another architecture the applets are listed by the host's build of the
    image's busybox package (:func:`harness.images.host_twin.twin_root`)."""
    bb = root / "bin" / "busybox"
    if not bb.is_file():
        raise fail(recipe.path, "rootfs.busybox_links: no /bin/busybox in the root filesystem "
                   "(add busybox or busybox-static to rootfs.debs)")
    if is_foreign(recipe.arch):
        # Of the two, the one unpacked last (debs are unpacked by name) owns /bin/busybox.
        owner = [p.name for p in debs if p.name in ("busybox", "busybox-static")][-1:]
        with tempfile.TemporaryDirectory(prefix="twin-", dir=root.parent) as twin:
            twin_root(debs, owner or ["busybox-static"], Path(twin),
                      f"{recipe.path}: rootfs.busybox_links", log)
            applets = _list_applets(Path(twin) / "bin" / "busybox", [])
    else:
        argv: list[str] = []
        loader_rel, triplet = _GUEST_LIBC[recipe.arch.name]
        loader = root / loader_rel
        if elf_interpreter(bb) is not None and (loader.exists() or loader.is_symlink()):
            # A dynamic busybox runs with the image's own loader and libc, not the host's.
            libs = f"{root}/lib/{triplet}:{root}/usr/lib/{triplet}"
            argv = [str(_resolve_in_root(root, loader)), "--library-path", libs]
        applets = _list_applets(bb, argv)
    n = 0
    for applet in applets:
        link = _inside(root, applet)
        if link.exists() or link.is_symlink() or applet.endswith("/busybox"):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        n += 1
    return n


def _list_applets(bb: Path, prefix: list[str]) -> list[str]:
    """``busybox --list-full`` of ``bb`` (run after ``prefix``: a loader and its options)."""
    try:
        proc = subprocess.run([*prefix, str(bb), "--list-full"], capture_output=True,
                              text=True, check=False)
    except OSError as e:
        raise fail(bb, f"rootfs.busybox_links: cannot run busybox --list-full: {e}") from None
    if proc.returncode != 0:
        raise fail(bb, f"rootfs.busybox_links: busybox --list-full failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def _resolve_in_root(root: Path, path: Path) -> Path:
    """Follow symlinks of ``path`` as the guest would: absolute targets are inside ``root``."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise fail(path, "symlink loop in the root filesystem")


def _compile_python(root: Path, recipe: Recipe, log: Log,
                    debs: Sequence[debian.DebPackage] = ()) -> None:
    """Precompile every .py under usr/lib/python3* and the guest helpers with the guest's python.

    The guest's python runs from the image through its own dynamic loader (exact version and
    magic number); ``unchecked-hash`` pycs never look at source mtimes, so they are both
    reproducible and trusted at import. Without them every boot recompiles the stdlib it
    imports (seconds under TCG). For an image of another architecture the host's build of the
    same python packages compiles them (:func:`harness.images.host_twin.twin_root`: bytecode
    does not depend on the architecture).
    """
    pys = sorted((root / "usr" / "bin").glob("python3.[0-9]*"))
    pys = [p for p in pys if p.name.replace("python3.", "").isdigit()]
    loader_rel, triplet = _GUEST_LIBC[recipe.arch.name]
    loader = root / loader_rel
    foreign = is_foreign(recipe.arch)
    if not pys or not (foreign or loader.exists()):
        raise fail(recipe.path, "rootfs.compile_python: no usr/bin/python3.N and "
                   f"{loader_rel} in the root filesystem")
    py = pys[-1]
    targets = [str(p) for p in sorted((root / "usr" / "lib").glob("python3*")) if p.is_dir()]
    guest = recipe.rootfs.get("guest")
    if guest and _inside(root, guest).is_dir():
        targets.append(str(_inside(root, guest)))
    args = ["-I", "-m", "compileall", "-q", "-j", "0",
            "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/", *targets]
    if foreign:
        with tempfile.TemporaryDirectory(prefix="twin-", dir=root.parent) as tmp:
            twin = Path(tmp)
            # The interpreter's package, and the standard library's where the image has them.
            names = [f"{py.name}-minimal", *(n for n in (f"lib{py.name}-minimal",
                                                        f"lib{py.name}-stdlib")
                                            if n in {p.name for p in debs})]
            twin_root(debs, names, twin, f"{recipe.path}: rootfs.compile_python", log)
            env = {"PYTHONHOME": str(twin / "usr"), "PATH": "/usr/bin:/bin",
                   "PYTHONDONTWRITEBYTECODE": "1"}
            log(f"compiling python modules with the host's build of the guest's {py.name}")
            try:
                proc = subprocess.run([str(twin / "usr" / "bin" / py.name), *args],
                                      capture_output=True, text=True, env=env, check=False)
            except OSError as e:
                raise fail(py, f"rootfs.compile_python: cannot run the host's {py.name}: "
                           f"{e.strerror or e}") from None
    else:
        libdirs = [root / "lib" / triplet, root / "usr" / "lib" / triplet]
        env = {"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [str(_resolve_in_root(root, loader)), "--library-path",
                ":".join(map(str, libdirs)), str(py), *args]
        log(f"compiling python modules with the guest's {py.name}")
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    # compileall exits 1 when some file does not compile (Debian ships a few py2-only
    # examples); only a crash of the interpreter itself is an error.
    if proc.returncode not in (0, 1):
        raise fail(py, f"rootfs.compile_python: exit {proc.returncode}: "
                   f"{(proc.stderr or proc.stdout).strip()[-300:]}")


def application_entries(recipe: Recipe, workdir: Path
                        ) -> tuple[list, list[str] | None, list[str] | None, dict | None]:
    """Entries, default cmd, default env and DockerInfo of the recipe's ``application:``.

    A ``docker_archive`` (``docker save`` or OCI layout tarball) gives its layers' files with
    their own metadata, Cmd (else Entrypoint) and Env (docs/boot.md); its file contents are
    spilled into ``workdir``. A ``directory`` gives its files (owners kept only when building
    as root, the only user who can read them back faithfully). Raises NitroError(E48) when the
    tarball or directory is missing or the archive is malformed.
    """
    from harness.cpio import entries_from_directory
    app = recipe.application
    if "directory" in app:
        d = recipe.resolve(app["directory"])
        if not d.is_dir():
            raise fail(recipe.path, f"application.directory: {d} is not a directory")
        return entries_from_directory(d, keep_owner=os.geteuid() == 0), None, None, None
    if "docker_archive" in app:
        from harness.images.docker_archive import load_docker_archive
        tar = recipe.resolve(app["docker_archive"])
        if not tar.is_file():
            raise fail(recipe.path, f"application.docker_archive: {tar} is not a file")
        archive, entries = load_docker_archive(tar, workdir)
        return entries, archive.cmd, archive.env, archive.docker_info()
    return [], None, None, None


def assemble_rootfs(r: Recipe, debs: Sequence[debian.DebPackage], wheels: Sequence[Path],
                    root: Path, log: Log) -> None:
    """Unpack the resolved packages ``debs``, apply prune/busybox/files/programs, unpack the
    fetched ``wheels``, copy the guest helpers and compile pycs into the directory ``root``,
    as recipe ``r`` says. Raises NitroError(E48) naming the failing field."""
    rf = r.rootfs
    if debs:
        paths = debian.fetch(debs, r.arch)
        log(f"unpacking {len(debs)} package(s) into the root filesystem")
        for pkg in debs:
            debian.extract(paths[pkg.name], root)
    for pattern in rf.get("prune", []):
        for p in sorted(root.glob(pattern.lstrip("/")), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    if rf.get("busybox_links"):
        _busybox_links(root, r, debs, log)
    for f in rf.get("files", []):
        p = _inside(root, f["path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.is_file():
            p.unlink()
        if "symlink" in f:
            p.symlink_to(f["symlink"])
        elif f.get("directory"):
            p.mkdir(exist_ok=True)
            p.chmod(f.get("mode", 0o755))
        else:
            p.write_text(f.get("content", ""))
            p.chmod(f.get("mode", 0o644))
    for guest_path, program in sorted(rf.get("programs", {}).items()):
        binary = build_static_program(program, log, arch=r.arch)
        p = _inside(root, guest_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir() and not p.is_symlink():
            raise fail(r.path, f"rootfs.programs: {guest_path}: is a directory in the root "
                       "filesystem")
        p.unlink(missing_ok=True)
        # A fresh copy (not copy2): its mtime is the build's, so it gets FIXED_MTIME.
        shutil.copyfile(binary, p)
        p.chmod(0o755)
    if wheels:
        target = _inside(root, rf.get("pip_target", "/usr/lib/python3/dist-packages"))
        for w in wheels:
            _install_wheel(w, target)
    if rf.get("guest"):
        n = _copy_guest(_inside(root, rf["guest"]))
        log(f"copied {n} guest helper file(s) to {rf['guest']}")
    if rf.get("compile_python"):
        _compile_python(root, r, log, debs)


def rootfs_entries(root: Path, started: float) -> list:
    """Entries (harness.cpio.Entry) of the assembled ``root``: owner 0:0 (package files are
    root's), and FIXED_MTIME for everything this build created or touched since ``started``
    (``time.time()`` seconds; package files keep their own mtimes)."""
    from harness.cpio import entries_from_directory
    out = []
    for e in entries_from_directory(root, keep_owner=False):
        if e.mtime >= int(started) - 1:
            e = replace(e, mtime=FIXED_MTIME)
        out.append(e)
    return out

