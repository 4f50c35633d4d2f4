"""Container image tarballs (``docker save`` and OCI image layout) to a root filesystem.

What nitro-cli does with ``--docker-uri`` (docs/boot.md#customer-ramdisk), without a Docker engine: read the image's
config and layers from the tarball, apply the layers in order with their whiteouts
(``.wh.<name>`` deletes a lower entry, ``.wh..wh..opq`` empties a directory of lower entries),
and take the command from ``Cmd`` else ``Entrypoint`` (never both combined) and the ``Env``.
The result is a list of rootfs-relative :class:`harness.cpio.Entry` whose file contents are
spilled into a caller-owned work directory, so memory stays flat for large images; layer
metadata (mode, uid, gid, mtime) is kept; hard links become relative symlinks (docs/boot.md#image-changes).

Formats: ``docker save`` (``manifest.json`` with ``Config`` and ``Layers``) and OCI image
layout (``oci-layout`` + ``index.json``; nested indexes are followed, picking linux/amd64 when
there is a choice). Layers may be plain tar or gzip; zstd layers are refused with a clear
message. Errors are ``NitroError(E48 EifBuildingError, "<file>: <field>: <rule>")``.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import bounded_json
from harness.cpio import CpioError, Entry
from harness.errors import ErrorCode, NitroError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OCI_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json")


def _fail(path: Path | str, field_: str, rule: str) -> NitroError:
    return NitroError(ErrorCode.EifBuildingError, f"{path}: {field_}: {rule}")


@dataclass
class ImageArchive:
    """An image read from a tarball: its config JSON, layer member names, tags and format."""

    path: Path
    format: str  # "docker-save" or "oci"
    config: dict
    config_digest: str
    layers: list[str]
    repo_tags: list[str] = field(default_factory=list)

    @property
    def cmd(self) -> list[str]:
        """The command nitro-cli runs: ``Cmd`` if set, else ``Entrypoint`` (docs/boot.md#cmd-and-env)."""
        c = self.config.get("config") or {}
        return list(c.get("Cmd") or c.get("Entrypoint") or [])

    @property
    def env(self) -> list[str]:
        """The image's ``Env`` list (``KEY=VALUE`` strings)."""
        return list((self.config.get("config") or {}).get("Env") or [])

    def docker_info(self) -> dict:
        """A ``docker inspect``-like object for the EIF metadata's ``DockerInfo``."""
        return {
            "Id": self.config_digest,
            "RepoTags": self.repo_tags,
            "Architecture": self.config.get("architecture"),
            "Os": self.config.get("os"),
            "Created": self.config.get("created"),
            "Config": self.config.get("config") or {},
        }


def _open_member(tf: tarfile.TarFile, name: str, path: Path, where: str):
    """The file object of member ``name`` of ``tf``: E48 naming ``where`` when the member is
    missing, not a file, or a link to a member the archive does not have (``docker save``
    writes repeated layers as links, so links are followed, not refused)."""
    try:
        member = tf.getmember(name)
    except KeyError:
        raise _fail(path, where, "not found in the archive") from None
    try:
        f = tf.extractfile(member)
    except KeyError:  # tarfile's way of saying a link's target is not in the archive
        raise _fail(path, where, f"links to {member.linkname!r}, which is not in the archive") \
            from None
    if f is None:
        raise _fail(path, where, "is not a regular file")
    return f


def _read_json(tf: tarfile.TarFile, name: str, path: Path) -> Any:
    f = _open_member(tf, name, path, name)
    try:
        return bounded_json.loads(f.read())
    except ValueError as e:  # syntax, encoding, or nesting too deep
        raise _fail(path, name, f"is not valid JSON ({e})") from None


# The JSON documents come from whoever made the tarball: every value used is checked for its
# type first, and a wrong one is E48 naming the document and key.

def _need(value: Any, kind: type | tuple[type, ...], path: Path, where: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(path, where, f"must be {what}")
    return value


def _strings(value: Any, path: Path, where: str) -> list[str]:
    """A JSON array of strings (null or absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, where, "must be an array of strings")
    return value


def _check_config(config: Any, path: Path, where: str) -> dict:
    """The image config: an object whose ``config`` (null or an object) has ``Cmd``,
    ``Entrypoint`` and ``Env`` as arrays of strings (or null)."""
    _need(config, dict, path, where, "a JSON object")
    inner = config.get("config")
    if inner is not None:
        _need(inner, dict, path, f"{where}: config", "an object or null")
        for key in ("Cmd", "Entrypoint", "Env"):
            _strings(inner.get(key), path, f"{where}: config.{key}")
    return config


def _blob_name(digest: Any, path: Path) -> str:
    _need(digest, str, path, "digest", "a string")
    algo, _, hexd = digest.partition(":")
    if not algo or not hexd or "/" in hexd or "/" in algo:
        raise _fail(path, "digest", f"{digest!r} is not <algorithm>:<hex>")
    return f"blobs/{algo}/{hexd}"


#: Image indexes nest (a multi-platform index pointing at per-platform ones) once or twice in
#: practice; deeper is refused, which also ends an index that names itself.
MAX_INDEX_DEPTH = 4


def _pick_manifest(tf: tarfile.TarFile, index: Any, path: Path, where: str = "index.json",
                   depth: int = 0) -> dict:
    _need(index, dict, path, where, "a JSON object")
    manifests = _need(index.get("manifests") or [], list, path, f"{where}: manifests", "an array")
    if not manifests:
        raise _fail(path, where, "lists no manifests")
    for i, m in enumerate(manifests):
        _need(m, dict, path, f"{where}: manifests[{i}]", "an object")
    chosen = manifests[0]
    if len(manifests) > 1:
        for m in manifests:
            plat = m.get("platform") or {}
            if isinstance(plat, dict) and plat.get("os") == "linux" and \
                    plat.get("architecture") == "amd64":
                chosen = m
                break
    name = _blob_name(chosen.get("digest"), path)
    doc = _need(_read_json(tf, name, path), dict, path, name, "a JSON object")
    if chosen.get("mediaType") in _OCI_INDEX_TYPES or doc.get("mediaType") in _OCI_INDEX_TYPES:
        if depth >= MAX_INDEX_DEPTH:
            raise _fail(path, name, f"image indexes nest more than {MAX_INDEX_DEPTH} deep")
        return _pick_manifest(tf, doc, path, name, depth + 1)
    return doc


#: What Python's tarfile raises, besides TarError and OSError, on archives that are damaged
#: or made to hurt: EOFError from a compressed stream cut short; OverflowError and ValueError
#: from a header whose size or offset does not fit a machine integer (a GNU long name of
#: 2**63 bytes, a seek past 2**63).
_DAMAGE = (EOFError, OverflowError, ValueError)
#: The most a gzip layer can decompress to per compressed byte: deflate's limit is 1032:1.
_GZIP_RATIO = 1032
#: For bzip2 and xz layers (which Docker does not write), whose ratios have no useful bound: a
#: member may declare at most this many bytes.
_OTHER_COMPRESSED_LIMIT = 1 << 40


def _layer_limit(head: bytes, size: int) -> int:
    """The most bytes a layer stream of ``size`` bytes starting with ``head`` can hold once
    decompressed."""
    if head[:2] == b"\x1f\x8b":
        return size * _GZIP_RATIO
    if head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return _OTHER_COMPRESSED_LIMIT
    return size


def open_image_archive(path: Path | str) -> ImageArchive:
    """Read the image description from a ``docker save`` or OCI image-layout tarball.

    Raises ``NitroError(E48)`` naming the archive and the missing/invalid field, or E19 when
    the file cannot be read.
    """
    path = Path(path)
    try:
        tf = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise NitroError(ErrorCode.FileOperationFailure, f"{path}: open: no such file") from None
    except _DAMAGE as e:  # a compressed stream that ends early, a header's absurd size
        raise _fail(path, "archive", f"is truncated or corrupt ({e})") from None
    except (tarfile.TarError, OSError) as e:
        raise _fail(path, "archive", f"is not a tar archive ({e})") from None
    with tf:
        try:
            return _describe(tf, path)
        except (tarfile.TarError, OSError) + _DAMAGE as e:
            # tarfile reads members lazily: a truncated or corrupt archive fails here.
            raise _fail(path, "archive", f"is truncated or corrupt ({e})") from None


def _describe(tf: tarfile.TarFile, path: Path) -> ImageArchive:
    """The :class:`ImageArchive` of an open tarball (see :func:`open_image_archive`)."""
    names = set(tf.getnames())
    # Docker >= 25 writes both layouts into `docker save`; manifest.json is simpler.
    if "manifest.json" in names:
        manifest = _read_json(tf, "manifest.json", path)
        if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
            raise _fail(path, "manifest.json", "must be a non-empty array of objects")
        m = manifest[0]
        if "Config" not in m or "Layers" not in m:
            raise _fail(path, "manifest.json", "entry lacks Config or Layers")
        config_name = _need(m["Config"], str, path, "manifest.json: Config", "a string")
        layers = _strings(m["Layers"], path, "manifest.json: Layers")
        tags = _strings(m.get("RepoTags"), path, "manifest.json: RepoTags")
        config = _check_config(_read_json(tf, config_name, path), path, config_name)
        digest = "sha256:" + posixpath.basename(config_name).removesuffix(".json")
        return ImageArchive(path, "docker-save", config, digest, list(layers), list(tags))
    if "index.json" in names:
        index = _read_json(tf, "index.json", path)
        man = _pick_manifest(tf, index, path)
        if "config" not in man or "layers" not in man:
            raise _fail(path, "manifest", "lacks config or layers")
        layers = _need(man["layers"], list, path, "manifest: layers", "an array")
        for i, layer in enumerate(layers):
            _need(layer, dict, path, f"manifest: layers[{i}]", "an object")
            mt = _need(layer.get("mediaType", ""), str, path, f"manifest: layers[{i}].mediaType",
                       "a string")
            if "zstd" in mt:
                raise _fail(path, f"layer {layer.get('digest')}",
                            "zstd-compressed layers are not supported; re-save with gzip")
        config_ref = _need(man["config"], dict, path, "manifest: config", "an object")
        config_digest = _need(config_ref.get("digest"), str, path, "manifest: config.digest",
                              "a string")
        config_name = _blob_name(config_digest, path)
        config = _check_config(_read_json(tf, config_name, path), path, config_name)
        tags = []
        for m in index.get("manifests") or []:  # objects: _pick_manifest checked them
            annotations = m.get("annotations")
            ref = annotations.get("org.opencontainers.image.ref.name") \
                if isinstance(annotations, dict) else None
            if isinstance(ref, str) and ref:
                tags.append(ref)
        return ImageArchive(path, "oci", config, config_digest,
                            [_blob_name(layer.get("digest"), path) for layer in layers], tags)
    raise _fail(path, "archive", "has neither manifest.json (docker save) nor index.json "
                                 "(OCI image layout)")


def _clean(name: str, path: Path, layer: str) -> str | None:
    """Normalise a layer member name to a rootfs-relative path (None for the root itself)."""
    n = posixpath.normpath(name.lstrip("/"))
    if n in ("", "."):
        return None
    if n == ".." or n.startswith("../"):
        raise _fail(path, f"layer {layer}", f"member {name!r} escapes the root filesystem")
    return n


def _remove_tree(fs: dict[str, Entry], name: str) -> None:
    fs.pop(name, None)
    pre = name + "/"
    for k in [k for k in fs if k.startswith(pre)]:
        del fs[k]


def rootfs_entries(archive: ImageArchive, workdir: Path | str) -> list[Entry]:
    """Apply the image's layers in order and return rootfs-relative entries (docs/boot.md#customer-ramdisk).

    File contents are written below ``workdir`` (the caller removes it after the ramdisk is
    written). Whiteouts delete lower entries; an opaque marker empties its directory of lower
    entries; hard links become relative symlinks to their target. Raises ``NitroError(E48)``
    for unreadable layers or members escaping the root.
    """
    path = archive.path
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    fs: dict[str, Entry] = {}
    counter = 0
    with tarfile.open(path, "r:*") as outer:
        for layer in archive.layers:
            try:
                counter = _apply_layer(outer, layer, fs, path, work, counter)
            except CpioError as e:  # a member no ramdisk entry can hold (empty link target)
                raise _fail(path, f"layer {layer}", str(e)) from None
            except (tarfile.TarError, OSError) + _DAMAGE as e:
                # Members are read lazily and layers streamed: damage shows up anywhere here.
                raise _fail(path, f"layer {layer}", f"is truncated or corrupt ({e})") from None
    return list(fs.values())


def _apply_layer(outer: tarfile.TarFile, layer: str, fs: dict[str, Entry], path: Path, work: Path,
                 counter: int) -> int:
    """Apply the layer member ``layer`` of ``outer`` to ``fs``; returns the spill counter."""
    raw = _open_member(outer, layer, path, f"layer {layer}")
    head = raw.read(6)
    limit = _layer_limit(head, raw.seek(0, 2))
    raw.seek(0)
    if head == b"\x28\xb5\x2f\xfd":
        raise _fail(path, f"layer {layer}", "is zstd-compressed; not supported")
    this_layer: set[str] = set()
    try:
        lt = tarfile.open(fileobj=raw, mode="r|*")
    except tarfile.TarError as e:
        raise _fail(path, f"layer {layer}", f"is not a tar stream ({e})") from None
    with lt:
        for m in lt:
            # tarfile skips a member's data by reading up to where its declared size ends, one
            # read per 10 KiB even past the stream's end: a member declaring exabytes would keep
            # it busy for ever. No member can end beyond what the layer decompresses to.
            if m.offset_data + m.size > limit:
                raise _fail(path, f"layer {layer}", f"member {m.name!r} declares {m.size} bytes, "
                                                    f"more than the layer can hold")
            counter = _apply_member(fs, this_layer, lt, m, path, layer, work, counter)
    return counter


def _apply_member(fs: dict[str, Entry], this_layer: set[str], lt: tarfile.TarFile,
                  m: tarfile.TarInfo, path: Path, layer: str, work: Path, counter: int) -> int:
    name = _clean(m.name, path, layer)
    if name is None:
        return counter
    base = posixpath.basename(name)
    parent = posixpath.dirname(name)
    if base == OPAQUE_MARKER:
        # Opaque directory: hide everything from lower layers below ``parent``.
        pre = parent + "/" if parent else ""
        for k in [k for k in fs if k.startswith(pre) and k not in this_layer and k != parent]:
            del fs[k]
        return counter
    if base.startswith(WHITEOUT_PREFIX):
        target = posixpath.join(parent, base[len(WHITEOUT_PREFIX):])
        _remove_tree(fs, target)
        return counter
    kw = dict(uid=m.uid, gid=m.gid, mtime=int(m.mtime))
    perm = m.mode & 0o7777
    if name in fs and not (m.isdir() and fs[name].is_dir):
        _remove_tree(fs, name)  # a new non-directory replaces whatever was there
    if m.isdir():
        fs[name] = Entry.directory(name, perm, **kw)
    elif m.issym():
        fs[name] = Entry.symlink(name, m.linkname, **kw)
    elif m.islnk():
        target = _clean(m.linkname, path, layer)
        if target is None:
            raise _fail(path, f"layer {layer}", f"hard link {m.name!r} points at the root")
        rel = posixpath.relpath(target, parent or ".")
        fs[name] = Entry.symlink(name, rel, **kw)
    elif m.isreg():
        src = lt.extractfile(m)
        counter += 1
        blob = work / f"{counter:08d}"
        with open(blob, "wb") as out:
            if src is not None:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        fs[name] = Entry.file(name, source=blob, mode=perm, **kw)
    elif m.ischr() or m.isblk():
        fs[name] = Entry.device(name, "c" if m.ischr() else "b", m.devmajor, m.devminor,
                                perm, **kw)
    elif m.isfifo():
        fs[name] = Entry(name, stat.S_IFIFO | perm, **kw)
    else:
        return counter  # other types (sparse markers, unknown) carry no filesystem object
    this_layer.add(name)
    return counter


def load_docker_archive(path: Path | str, workdir: Path | str) -> tuple[ImageArchive, list[Entry]]:
    """Open a ``docker save``/OCI tarball and return ``(archive, rootfs entries)``.

    Convenience wrapper over :func:`open_image_archive` and :func:`rootfs_entries`; the
    caller owns ``workdir`` (file contents) until the ramdisk is written.
    """
    archive = open_image_archive(path)
    return archive, rootfs_entries(archive, workdir)


__all__ = ["ImageArchive", "load_docker_archive", "open_image_archive", "rootfs_entries"]
