"""Writing OCI image-layout tarballs without Docker: a base image's root filesystem plus an
application layer (files and pure-Python wheels), for ``build-enclave --docker-archive``.

What ``docker save`` of an image built ``FROM base`` with ``COPY`` and ``pip install`` lines
gives, assembled directly (docs/boot.md#customer-ramdisk describes how such an archive becomes
the customer ramdisk):

* layer 1: the root filesystem of an EIF's customer ramdisk (:func:`eif_rootfs`), such as a
  recipe's image (``python``: Debian's python3 with cryptography, cbor2, asn1crypto and
  aws-nsm-interface), with its command and environment as the image's defaults;
* layer 2: the wheels installed under ``pip_target`` by ``pip install --target`` (with their
  pycs, compiled with ``PYTHONHASHSEED=0`` when the host's Python has the guest's version, so
  imports under TCG need no compiling) and the files given.

Layers are uncompressed tar (``application/vnd.oci.image.layer.v1.tar``), members sorted, owners
and mtimes fixed, so the same inputs give the same bytes. Errors are NitroError(E48) naming the
input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from harness.cpio import Entry, entries_from_directory, read_cpio, sort_key
from harness.errors import ErrorCode, NitroError

#: mtime of every member the application layer gets (as the harness's image builds, docs/boot.md).
FIXED_MTIME = 1492533000
_LAYER = "application/vnd.oci.image.layer.v1.tar"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass(frozen=True)
class ImageFile:
    """A file of the application layer: absolute ``path`` in the image, ``data``, ``mode``."""

    path: str
    data: bytes
    mode: int = 0o644


def _fail(where: Path | str, rule: str) -> NitroError:
    return NitroError(ErrorCode.EifBuildingError, f"{where}: {rule}")


def eif_rootfs(eif_path: Path | str) -> tuple[list[Entry], list[str], list[str]]:
    """``(entries, cmd, env)`` of an EIF's customer ramdisk (its last ramdisk section): the
    members below ``rootfs/`` as rootfs-relative entries (data in memory) and the lines of
    ``cmd`` and ``env``. Raises NitroError(E35) for a bad EIF, E48 for a ramdisk without them.
    """
    from harness.cpio import CpioError
    from harness.eif import SectionType
    from harness.eif.reader import read_eif

    eif = read_eif(eif_path, check_crc=False)
    ramdisks = [s for s in eif.sections if s.type == SectionType.RAMDISK]
    if len(ramdisks) < 2:
        raise _fail(eif_path, "no customer ramdisk (an EIF has a bootstrap and a customer ramdisk)")
    with open(eif_path, "rb") as f:
        f.seek(ramdisks[-1].data_offset)
        data = f.read(ramdisks[-1].size)
    try:
        records = read_cpio(data)
    except CpioError as err:
        raise _fail(eif_path, f"customer ramdisk: {err}") from None
    entries, cmd, env = [], None, None
    for r in records:
        if r.name == "cmd":
            cmd = r.data.decode().splitlines()
        elif r.name == "env":
            env = r.data.decode().splitlines()
        elif r.name.startswith("rootfs/"):
            entries.append(Entry(r.name[len("rootfs/"):], r.mode, r.data, None, r.uid, r.gid, r.mtime,
                                 r.rdevmajor, r.rdevminor))
    if cmd is None or env is None:
        raise _fail(eif_path, "customer ramdisk: no cmd or env file")
    return entries, cmd, env


def python_version(entries: Sequence[Entry]) -> tuple[int, int] | None:
    """The ``(3, N)`` of the image's ``usr/bin/python3.N``, None without one (the newest if several)."""
    found = []
    for e in entries:
        base = posixpath.basename(e.name)
        if posixpath.dirname(e.name) == "usr/bin" and base.startswith("python3.") and base[8:].isdigit():
            found.append((3, int(base[8:])))
    return max(found) if found else None


def application_entries(workdir: Path, files: Sequence[ImageFile], wheels: Sequence[Path],
                        pip_target: str, compile_for: tuple[int, int] | None,
                        log: Callable[[str], None] = lambda text: None) -> list[Entry]:
    """Entries of the application layer, assembled in ``workdir`` (an empty folder the caller
    removes): ``wheels`` unpacked below ``pip_target``, their pycs compiled when
    ``compile_for`` is this Python's version, then ``files``. Owner 0:0, mtime
    :data:`FIXED_MTIME`. Raises NitroError(E48)."""
    root = Path(workdir)
    if wheels:
        target = root / pip_target.lstrip("/")
        _pip_install(wheels, target)
        if compile_for == sys.version_info[:2]:
            _compile(root, target)
        else:
            log(f"pycs not compiled: the image's Python is {compile_for}, this one "
                f"{sys.version_info[:2]} (the guest compiles at import)")
    for item in files:
        path = root / item.path.lstrip("/")
        if not item.path.startswith("/") or ".." in Path(item.path).parts:
            raise _fail(item.path, "files: a path in the image is absolute and stays below /")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        path.chmod(item.mode & 0o7777)
    return [replace(e, mtime=FIXED_MTIME) for e in entries_from_directory(root, keep_owner=False)]


def _pip_install(wheels: Sequence[Path], target: Path) -> None:
    """``pip install --target``, as a Dockerfile's ``RUN pip install`` would, from the wheel
    files only (no index, no dependency resolution: the caller pins every wheel)."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-index", "--no-deps", "--no-compile", "--target", str(target), *map(str, wheels)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        raise _fail(wheels[0].parent, f"pip install --target {target.name}: {tail}")


def _compile(root: Path, target: Path) -> None:
    """Unchecked-hash pycs (never stale, never re-checked) named as the guest sees them;
    PYTHONHASHSEED=0 makes the bytes reproducible (set and frozenset constants)."""
    argv = [sys.executable, "-I", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
            "unchecked-hash", "-s", str(root), "-p", "/", str(target)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode not in (0, 1):  # 1: some file did not compile (py2-only examples)
        raise _fail(target, f"compileall exited {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}")


def write_layer(path: Path, entries: Sequence[Entry]) -> str:
    """Write ``entries`` as a tar layer at ``path`` (sorted, GNU format, no user names); return
    its ``sha256:`` digest (the diff ID and, uncompressed, the blob digest)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: sort_key(e.name)):
            info = tarfile.TarInfo(e.name)
            info.mode, info.uid, info.gid, info.mtime = e.mode & 0o7777, e.uid, e.gid, e.mtime
            info.uname = info.gname = ""
            fileobj = None
            if stat.S_ISDIR(e.mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(e.mode):
                data = e.source.read_bytes() if e.source is not None else e.data
                info.size, fileobj = len(data), io.BytesIO(data)
            elif stat.S_ISLNK(e.mode):
                info.type, info.linkname = tarfile.SYMTYPE, e.data.decode("utf-8", "surrogateescape")
            elif stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(e.mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = e.rdevmajor, e.rdevminor
            elif stat.S_ISFIFO(e.mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue
            tar.addfile(info, fileobj)
    return _digest_of(path)


def _digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_oci_archive(out: Path, layers: Sequence[Path], *, cmd: Sequence[str], env: Sequence[str],
                      tag: str) -> str:
    """Write an OCI image-layout tarball at ``out`` (atomically) with ``layers`` (tar files,
    lowest first), the image config's ``Cmd`` and ``Env``, and ``tag`` as the index's
    ``org.opencontainers.image.ref.name``; return the manifest's digest. The file appears
    whole (a temporary name renamed), E19 when it cannot be written."""
    descs = [{"mediaType": _LAYER, "digest": _digest_of(p), "size": p.stat().st_size} for p in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2017-04-18T16:30:00Z",
        "config": {"Cmd": list(cmd), "Env": list(env)},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }, sort_keys=True).encode()
    config_desc = {"mediaType": _CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": _MANIFEST, "config": config_desc,
                           "layers": descs}, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": _MANIFEST, "digest": manifest_digest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}, sort_keys=True).encode()
    small = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index,
             "blobs/sha256/" + config_desc["digest"][7:]: config,
             "blobs/sha256/" + manifest_digest[7:]: manifest}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for name in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                tar.addfile(info)
            for name, data in small.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
                tar.addfile(info, io.BytesIO(data))
            for path, desc in zip(layers, descs):
                info = tarfile.TarInfo("blobs/sha256/" + desc["digest"][7:])
                info.size, info.mode, info.mtime = desc["size"], 0o644, FIXED_MTIME
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise NitroError(ErrorCode.FileOperationFailure, f"{out}: cannot write ({err.strerror or err})") from None
    return manifest_digest


def build_oci_archive(out: Path, *, base: Path | None, files: Sequence[ImageFile],
                      wheels: Sequence[Path] = (), pip_target: str = "/usr/lib/python3/dist-packages",
                      cmd: Sequence[str] | None = None, env: Sequence[str] = (), tag: str = "app:latest",
                      log: Callable[[str], None] = lambda text: None) -> str:
    """Assemble and write the archive at ``out``: ``base`` (an EIF whose root filesystem is
    layer 1, or None) and the application layer. ``cmd`` defaults to the base's; ``env`` is
    the base's with these ``KEY=VALUE`` added (same key: replaced). Returns the manifest's
    digest. Raises NitroError (E48 bad input, E35 bad base EIF, E19 unwritable output)."""
    base_entries, base_cmd, base_env = eif_rootfs(base) if base is not None else ([], [], [])
    merged = {kv.split("=", 1)[0]: kv for kv in base_env}
    merged.update({kv.split("=", 1)[0]: kv for kv in env})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=out.parent) as tmps:
        tmp = Path(tmps)
        (tmp / "app").mkdir()
        layers = []
        if base_entries:
            layers.append(tmp / "base.tar")
            write_layer(layers[-1], base_entries)
            log(f"layer 1: {len(base_entries)} entries of {base}")
        app = application_entries(tmp / "app", files, wheels, pip_target, python_version(base_entries), log)
        layers.append(tmp / "app.tar")
        write_layer(layers[-1], app)
        log(f"layer {len(layers)}: {len(app)} entries ({len(wheels)} wheels, {len(files)} files)")
        return write_oci_archive(out, layers, cmd=list(cmd) if cmd else base_cmd,
                                 env=list(merged.values()), tag=tag)


__all__ = ["FIXED_MTIME", "ImageFile", "application_entries", "build_oci_archive", "eif_rootfs",
           "python_version", "write_layer", "write_oci_archive"]
