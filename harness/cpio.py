"""Deterministic newc (``070701``) cpio archives, written the way linuxkit writes them.

docs/boot.md#archive-format (linuxkit's cpio details, to match nitro-cli's ramdisks byte for byte):
magic ``070701``; inode numbers start at 721 and count up (the trailer takes the next one); nlink 2
for directories, 1 otherwise; devmajor/devminor written as 3/1; check 0; hex fields lower case;
header+name and data each padded to 4 bytes; a ``TRAILER!!!`` entry, then the archive padded with
zeros to a multiple of 512 bytes. Entries the harness creates get mtime 1492533000 (2017-04-18
16:30:00 UTC) and owner 0:0 unless told otherwise.

Determinism: :func:`write_cpio` sorts entries by path components (a directory is followed by
its contents), so the same set of entries always gives the same bytes whatever order they were
given in. Large files are streamed from disk (``Entry.source``), never held in memory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

MAGIC = b"070701"
#: First inode number linuxkit's writer hands out (docs/boot.md#archive-format; also Linux's
#: gen_init_cpio).
FIRST_INODE = 721
#: mtime of entries linuxkit creates itself: 2017-04-18 16:30:00 UTC (docs/boot.md#archive-format).
LINUXKIT_MTIME = 1492533000
#: devmajor/devminor every linuxkit header carries (docs/boot.md#archive-format).
DEV_MAJOR, DEV_MINOR = 3, 1
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_FIELDS = 13
_COPY_CHUNK = 1 << 20


class CpioError(ValueError):
    """A malformed archive or entry; the message names the entry (or offset) and the rule."""


def _pad(n: int, mod: int) -> int:
    return (mod - n % mod) % mod


def _norm_name(name: str) -> str:
    """Strip ``./`` and leading/trailing slashes: archive paths are relative (``bin/sh``)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    if name in ("", "."):
        raise CpioError(f"entry name {name!r}: must name something below the archive root")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CpioError(f"entry name {name!r}: no empty, '.' or '..' components allowed")
    return name


def _as_bytes(text: str, what: str) -> bytes:
    """``text`` as the bytes Linux stores for it: UTF-8, and the bytes a reader could not decode
    (kept as surrogate escapes by :func:`read_cpio` and by tarfile) written back as they were.
    Raises :class:`CpioError` for a string no bytes decode to (a lone surrogate)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise CpioError(f"{what} {text!r}: not representable as bytes (a lone surrogate)") \
            from None


@dataclass(frozen=True)
class Entry:
    """One archive member: ``name`` (relative path), ``mode`` (full st_mode: type + permissions).

    Regular files carry ``data`` (bytes) or ``source`` (a path streamed at write time); symlinks
    carry their target in ``data``; device nodes carry ``rdevmajor``/``rdevminor``. ``uid``,
    ``gid`` and ``mtime`` (seconds since the epoch) default to linuxkit's 0, 0, 1492533000.
    Build entries with :meth:`directory`, :meth:`file`, :meth:`symlink`, :meth:`device`.
    """

    name: str
    mode: int
    data: bytes = b""
    source: Path | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = LINUXKIT_MTIME
    rdevmajor: int = 0
    rdevminor: int = 0

    @classmethod
    def directory(cls, name: str, mode: int = 0o755, **kw) -> "Entry":
        """A directory entry (permissions ``mode``, default 0755)."""
        return cls(_norm_name(name), stat.S_IFDIR | (mode & 0o7777), **kw)

    @classmethod
    def file(
        cls, name: str, data: bytes | None = None, *, source: Path | str | None = None,
        mode: int = 0o644, **kw,
    ) -> "Entry":
        """A regular file with content ``data`` or streamed from ``source`` (exactly one)."""
        if (data is None) == (source is None):
            raise CpioError(f"entry {name!r}: give exactly one of data or source")
        return cls(
            _norm_name(name), stat.S_IFREG | (mode & 0o7777), data or b"",
            Path(source) if source is not None else None, **kw,
        )

    @classmethod
    def symlink(cls, name: str, target: str, **kw) -> "Entry":
        """A symbolic link (mode 0777) pointing at ``target``."""
        if not target:
            raise CpioError(f"entry {name!r}: symlink target is empty")
        return cls(_norm_name(name), stat.S_IFLNK | 0o777,
                   _as_bytes(target, f"entry {name!r}: symlink target"), **kw)

    @classmethod
    def device(
        cls, name: str, kind: str, major: int, minor: int, mode: int = 0o600, **kw
    ) -> "Entry":
        """A device node: ``kind`` ``"c"`` (character) or ``"b"`` (block), ``major:minor``."""
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise CpioError(f"entry {name!r}: device kind must be 'c' or 'b', not {kind!r}")
        return cls(_norm_name(name), kinds[kind] | (mode & 0o7777), b"", None,
                   rdevmajor=major, rdevminor=minor, **kw)

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    def size(self) -> int:
        """Data size in bytes as the header will state it (stat of ``source`` if streamed)."""
        if self.source is not None:
            return self.source.stat().st_size
        return len(self.data)


@dataclass(frozen=True)
class Record:
    """One header as read back from an archive: every newc field, the name and the data."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    filesize: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    namesize: int
    check: int
    name: str
    data: bytes = field(repr=False)
    offset: int = 0

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link (its target is ``data``)."""
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return stat.S_ISREG(self.mode)


def sort_key(name: str) -> tuple[str, ...]:
    """Ordering used for entries: by path components, so a directory precedes its contents."""
    return tuple(name.split("/"))


def _header(ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int,
            rmaj: int, rmin: int, namesize: int) -> bytes:
    values = (ino, mode, uid, gid, nlink, mtime, size, DEV_MAJOR, DEV_MINOR, rmaj, rmin,
              namesize, 0)
    for v in values:
        if not 0 <= v <= 0xFFFFFFFF:
            raise CpioError(f"header field value {v} does not fit newc's 32-bit hex field")
    return MAGIC + "".join(f"{v:08x}" for v in values).encode("ascii")


class CpioWriter:
    """Streaming newc writer with linuxkit's numbering and padding (docs/boot.md#archive-format).

    Use :func:`write_cpio` for a whole sorted archive; use this class directly only when
    entries arrive already in the wanted order. ``out`` is a binary file object opened for
    writing; ``written`` counts bytes. Raises :class:`CpioError` for unrepresentable entries.
    """

    def __init__(self, out: BinaryIO, first_inode: int = FIRST_INODE):
        self._out = out
        self._ino = first_inode
        self.written = 0

    def _write(self, b: bytes) -> None:
        self._out.write(b)
        self.written += len(b)

    def _begin(self, name: str, mode: int, uid: int, gid: int, nlink: int, mtime: int,
               size: int, rmaj: int = 0, rmin: int = 0) -> None:
        bname = _as_bytes(name, "entry name")
        if b"\0" in bname:
            raise CpioError(f"entry {name!r}: name contains a NUL byte")
        self._write(_header(self._ino, mode, uid, gid, nlink, mtime, size, rmaj, rmin,
                            len(bname) + 1))
        self._write(bname + b"\0")
        self._write(b"\0" * _pad(self.written, 4))
        self._ino += 1

    def add(self, entry: Entry) -> None:
        """Append one entry: header, name, padding, data, padding."""
        nlink = 2 if entry.is_dir else 1
        if entry.source is not None:
            size = entry.size()
            self._begin(entry.name, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, size)
            copied = 0
            with open(entry.source, "rb") as f:
                while copied < size:
                    chunk = f.read(min(_COPY_CHUNK, size - copied))
                    if not chunk:
                        break
                    self._write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise CpioError(f"{entry.source}: file shrank while archived ({copied} of {size})")
        else:
            if entry.is_dir and entry.data:
                raise CpioError(f"entry {entry.name!r}: a directory has no data")
            self._begin(entry.name, entry.mode, entry.uid, entry.gid, nlink, entry.mtime,
                        len(entry.data), entry.rdevmajor, entry.rdevminor)
            self._write(entry.data)
        self._write(b"\0" * _pad(self.written, 4))

    def close(self) -> None:
        """Write the trailer (it takes the next inode, like linuxkit) and pad to 512 bytes."""
        self._begin(TRAILER, 0, 0, 0, 1, 0, 0)
        self._write(b"\0" * _pad(self.written, 512))


def write_cpio(out: BinaryIO, entries: Iterable[Entry], *, add_parents: bool = True,
               parent_mtime: int = LINUXKIT_MTIME) -> int:
    """Write a complete deterministic archive of ``entries`` to ``out``; return bytes written.

    Entries are sorted by :func:`sort_key`. With ``add_parents`` every missing parent
    directory is created (0755, owner 0:0, ``parent_mtime``). Raises :class:`CpioError` on
    duplicate names or a non-directory used as a parent. Source: docs/boot.md#archive-format.
    """
    by_name: dict[str, Entry] = {}
    for e in entries:
        if e.name in by_name:
            raise CpioError(f"entry {e.name!r}: appears twice")
        by_name[e.name] = e
    if add_parents:
        for name in list(by_name):
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in by_name:
                    by_name[parent] = Entry.directory(parent, mtime=parent_mtime)
    for name in by_name:
        parts = name.split("/")
        for i in range(1, len(parts)):
            p = by_name.get("/".join(parts[:i]))
            if p is not None and not p.is_dir:
                raise CpioError(f"entry {name!r}: parent {p.name!r} is not a directory")
    writer = CpioWriter(out)
    for name in sorted(by_name, key=sort_key):
        writer.add(by_name[name])
    writer.close()
    return writer.written


def write_cpio_file(path: Path | str, entries: Iterable[Entry], **kw) -> int:
    """Write an archive to ``path`` atomically (temporary name, then rename); return its size."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            n = write_cpio(f, entries, **kw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def entries_from_directory(root: Path | str, prefix: str = "", *,
                           keep_owner: bool = True) -> list[Entry]:
    """Return entries for everything below ``root`` (not ``root`` itself), names under ``prefix``.

    Files are streamed at write time; their mode, mtime and (with ``keep_owner``) uid/gid are kept,
    as linuxkit keeps an image's metadata (docs/boot.md#archive-format). Hard links become relative
    symlinks to the first path seen (docs/boot.md#image-changes). Sockets are skipped; FIFOs are
    kept.
    """
    root = Path(root)
    out: list[Entry] = []
    seen_inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            name = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
            st = p.lstat()
            kw = dict(mtime=int(st.st_mtime), uid=st.st_uid if keep_owner else 0,
                      gid=st.st_gid if keep_owner else 0)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out.append(Entry.directory(name, perm, **kw))
            elif stat.S_ISLNK(st.st_mode):
                out.append(Entry.symlink(name, os.readlink(p), **kw))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    target = os.path.relpath(seen_inodes[key], os.path.dirname(name) or ".")
                    out.append(Entry.symlink(name, target, **kw))
                    continue
                seen_inodes[key] = name
                out.append(Entry.file(name, source=p, mode=perm, **kw))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                out.append(Entry.device(name, kind, os.major(st.st_rdev), os.minor(st.st_rdev),
                                        perm, **kw))
            elif stat.S_ISFIFO(st.st_mode):
                out.append(Entry(_norm_name(name), stat.S_IFIFO | perm, **kw))
    return out


def iter_cpio(f: BinaryIO, *, with_trailer: bool = False) -> Iterator[Record]:
    """Yield every :class:`Record` of the newc archive read from ``f``, up to ``TRAILER!!!``.

    Raises :class:`CpioError` naming the byte offset for a bad magic, bad hex, a truncated
    header, name or data, or a missing trailer.
    """
    offset = 0

    def need(n: int, what: str) -> bytes:
        nonlocal offset
        b = f.read(n)
        if len(b) != n:
            raise CpioError(f"offset {offset}: truncated {what} ({len(b)} of {n} bytes)")
        offset += n
        return b

    while True:
        start = offset
        hdr = f.read(HEADER_SIZE)
        if not hdr:
            raise CpioError(f"offset {start}: archive ends without {TRAILER}")
        if len(hdr) != HEADER_SIZE:
            raise CpioError(f"offset {start}: truncated header ({len(hdr)} of 110 bytes)")
        offset += HEADER_SIZE
        if hdr[:6] != MAGIC:
            raise CpioError(f"offset {start}: magic {hdr[:6]!r} is not newc 070701")
        fields = hdr[6:]
        if fields.strip(b"0123456789abcdefABCDEF"):  # int() would also take ' ', '+', '-'
            raise CpioError(f"offset {start}: header has a non-hex field")
        vals = [int(fields[8 * i: 8 * i + 8], 16) for i in range(_FIELDS)]
        namesize = vals[11]
        if namesize < 1:
            raise CpioError(f"offset {start}: namesize 0")
        raw = need(namesize, "name")
        if raw[-1:] != b"\0":
            raise CpioError(f"offset {start}: name is not NUL-terminated")
        name = raw[:-1].decode("utf-8", "surrogateescape")
        need(_pad(offset, 4), "name padding")
        data = need(vals[6], f"data of {name!r}")
        rec = Record(*vals, name=name, data=data, offset=start)
        if name == TRAILER:
            if with_trailer:
                yield rec
            return
        f.read(_pad(offset, 4))
        offset += _pad(offset, 4)
        yield rec


def read_cpio(path_or_bytes: Path | str | bytes, *, with_trailer: bool = False) -> list[Record]:
    """Return every :class:`Record` of an archive given as a path or as bytes."""
    import io

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return list(iter_cpio(io.BytesIO(bytes(path_or_bytes)), with_trailer=with_trailer))
    with open(path_or_bytes, "rb") as f:
        return list(iter_cpio(f, with_trailer=with_trailer))


def with_prefix(entry: Entry, prefix: str) -> Entry:
    """Return ``entry`` moved below directory ``prefix`` (e.g. ``rootfs``)."""
    return replace(entry, name=_norm_name(f"{prefix}/{entry.name}"))


def extract_cpio(records: Iterable[Record], dest: Path | str) -> None:
    """Materialise records below ``dest`` (files, dirs, symlinks; device nodes are skipped).

    Used by tests and debugging; names are checked to stay below ``dest``.
    """
    dest = Path(dest).resolve()
    for r in records:
        target = (dest / r.name).resolve() if not r.is_symlink else dest / r.name
        if not str(target).startswith(str(dest)):
            raise CpioError(f"entry {r.name!r}: escapes the destination")
        if r.is_dir:
            target.mkdir(parents=True, exist_ok=True)
        elif r.is_symlink:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            os.symlink(r.data.decode("utf-8", "surrogateescape"), target)
        elif r.is_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(r.data)
            os.chmod(target, stat.S_IMODE(r.mode))


__all__ = [
    "CpioError", "CpioWriter", "Entry", "Record", "FIRST_INODE", "LINUXKIT_MTIME",
    "entries_from_directory", "extract_cpio", "iter_cpio", "read_cpio", "sort_key",
    "with_prefix", "write_cpio", "write_cpio_file",
]
