"""Deterministic newc writer/reader: linuxkit's header details, byte for byte
(docs/boot.md#archive-format)."""

import io
import os
import stat

import pytest

from harness import cpio
from harness.cpio import Entry


def newc(ino, mode, nlink, mtime, size, name, data=b"", uid=0, gid=0, rmaj=0, rmin=0):
    """Independent newc encoder for the expected bytes (lower-case hex, dev 3/1, pad to 4)."""
    fields = [ino, mode, uid, gid, nlink, mtime, size, 3, 1, rmaj, rmin, len(name) + 1, 0]
    hdr = b"070701" + "".join("%08x" % v for v in fields).encode() + name.encode() + b"\0"
    hdr += b"\0" * (-len(hdr) % 4)
    return hdr + data + b"\0" * (-len(data) % 4)


def test_golden_bootstrap_layout():
    out = io.BytesIO()
    n = cpio.write_cpio(out, [
        Entry.file("nsm.ko", b"KO", mode=0o755),
        Entry.file("init", b"\x7fELF-init", mode=0o755),
        Entry.directory("dev", 0o755),
    ])
    t = 1492533000
    expected = (newc(721, 0o40755, 2, t, 0, "dev")
                + newc(722, 0o100755, 1, t, 9, "init", b"\x7fELF-init")
                + newc(723, 0o100755, 1, t, 2, "nsm.ko", b"KO")
                + newc(724, 0, 1, 0, 0, "TRAILER!!!"))
    expected += b"\0" * (-len(expected) % 512)
    assert out.getvalue() == expected
    assert n == len(expected) and n % 512 == 0


def test_order_does_not_matter_and_parents_follow_dirs():
    entries = [Entry.file("b/z", b"1"), Entry.file("a-b", b"2"), Entry.file("a/c", b"3"),
               Entry.symlink("a/link", "c")]
    one, two = io.BytesIO(), io.BytesIO()
    cpio.write_cpio(one, entries)
    cpio.write_cpio(two, list(reversed(entries)))
    assert one.getvalue() == two.getvalue()
    names = [r.name for r in cpio.read_cpio(one.getvalue())]
    # Missing parents are created; a directory is directly followed by its contents.
    assert names == ["a", "a/c", "a/link", "a-b", "b", "b/z"]
    recs = {r.name: r for r in cpio.read_cpio(one.getvalue())}
    assert recs["a"].is_dir and recs["a"].nlink == 2 and recs["a"].mode == 0o40755
    assert recs["a/link"].is_symlink and recs["a/link"].data == b"c"
    assert recs["a/link"].mode == stat.S_IFLNK | 0o777


def test_device_nodes_owner_mtime_and_trailer_inode():
    recs = cpio.read_cpio(_archive([
        Entry.device("dev/console", "c", 5, 1, 0o600),
        Entry.device("dev/loop0", "b", 7, 0, 0o660, uid=0, gid=6),
        Entry.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o644, uid=1000,
                   gid=100, mtime=1700000000),
    ]), with_trailer=True)
    by = {r.name: r for r in recs}
    con = by["dev/console"]
    assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1)
    assert (con.devmajor, con.devminor) == (3, 1)
    loop = by["dev/loop0"]
    assert stat.S_ISBLK(loop.mode) and loop.gid == 6 and (loop.rdevmajor, loop.rdevminor) == (7, 0)
    pw = by["etc/passwd"]
    assert (pw.uid, pw.gid, pw.mtime) == (1000, 100, 1700000000)
    inos = [r.ino for r in recs]
    assert inos == list(range(721, 721 + len(recs)))  # trailer takes the next inode
    assert recs[-1].name == "TRAILER!!!" and recs[-1].nlink == 1 and recs[-1].mtime == 0


def test_streamed_source_and_directory_walk_with_hard_link(tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    big = os.urandom(3 * (1 << 20) + 5)
    (root / "bin" / "tool").write_bytes(big)
    os.chmod(root / "bin" / "tool", 0o750)
    os.link(root / "bin" / "tool", root / "bin" / "tool-alias")
    os.symlink("tool", root / "bin" / "sym")
    os.utime(root / "bin" / "tool", (1600000000, 1600000000))
    entries = cpio.entries_from_directory(root, "rootfs")
    recs = {r.name: r for r in cpio.read_cpio(_archive(entries))}
    assert recs["rootfs/bin/tool"].data == big
    assert stat.S_IMODE(recs["rootfs/bin/tool"].mode) == 0o750
    assert recs["rootfs/bin/tool"].mtime == 1600000000
    # docs/boot.md#image-changes: hard links become relative symlinks.
    assert recs["rootfs/bin/tool-alias"].is_symlink
    assert recs["rootfs/bin/tool-alias"].data == b"tool"
    assert recs["rootfs/bin/sym"].data == b"tool"
    assert "rootfs" in recs and recs["rootfs"].is_dir


def test_reader_rejects_bad_archives():
    good = _archive([Entry.file("x", b"data")])
    with pytest.raises(cpio.CpioError, match="magic"):
        cpio.read_cpio(b"070707" + good[6:])
    with pytest.raises(cpio.CpioError, match="truncated"):
        cpio.read_cpio(good[:120])
    with pytest.raises(cpio.CpioError, match="without TRAILER"):
        cpio.read_cpio(good[:newc_len("x", 4)])


def test_writer_rejects_bad_entries():
    with pytest.raises(cpio.CpioError, match="appears twice"):
        _archive([Entry.file("x", b"1"), Entry.file("x", b"2")])
    with pytest.raises(cpio.CpioError, match="not a directory"):
        _archive([Entry.file("x", b"1"), Entry.file("x/y", b"2")])
    with pytest.raises(cpio.CpioError, match=r"'\.\.'"):
        Entry.file("a/../b", b"")
    with pytest.raises(cpio.CpioError, match="exactly one"):
        Entry.file("a")


def test_write_cpio_file_is_atomic(tmp_path):
    out = tmp_path / "r.cpio"
    with pytest.raises(cpio.CpioError):
        cpio.write_cpio_file(out, [Entry.file("x", b"1"), Entry.file("x", b"2")])
    assert list(tmp_path.iterdir()) == []
    cpio.write_cpio_file(out, [Entry.file("x", b"1")])
    assert [p.name for p in tmp_path.iterdir()] == ["r.cpio"]


def newc_len(name, size):
    return len(newc(721, 0o100644, 1, 0, size, name, b"\0" * size))


def _archive(entries):
    b = io.BytesIO()
    cpio.write_cpio(b, entries)
    return b.getvalue()


def test_gnu_cpio_extracts_our_archive(tmp_path):
    import shutil
    import subprocess

    gnu = shutil.which("cpio")
    if gnu is None:
        pytest.skip("GNU cpio not installed")
    payload = os.urandom(10001)
    data = _archive([Entry.directory("etc", 0o750, mtime=1500000000),
                     Entry.file("etc/motd", b"hello\n", mode=0o640, mtime=1600000000),
                     Entry.file("bin/tool", payload, mode=0o755),
                     Entry.symlink("bin/alias", "tool")])
    dest = tmp_path / "x"
    dest.mkdir()
    r = subprocess.run([gnu, "-i", "-d", "-m", "--no-absolute-filenames", "--quiet"],
                       input=data, cwd=dest, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (dest / "etc" / "motd").read_bytes() == b"hello\n"
    assert stat.S_IMODE((dest / "etc" / "motd").stat().st_mode) == 0o640
    assert (dest / "etc" / "motd").stat().st_mtime == 1600000000
    assert (dest / "bin" / "tool").read_bytes() == payload
    assert os.readlink(dest / "bin" / "alias") == "tool"
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o750
    listing = subprocess.run([gnu, "-i", "-t", "--quiet"], input=data, capture_output=True,
                             timeout=60).stdout.decode().split()
    assert listing == ["bin", "bin/alias", "bin/tool", "etc", "etc/motd"]


def test_reader_rejects_signed_or_spaced_hex():
    good = _archive([Entry.file("x", b"data")])
    # int(" -1", 16) parses; a newc reader must not (a negative size would read everything).
    bad = good[:54] + b"-0000001" + good[62:]
    with pytest.raises(cpio.CpioError, match="non-hex"):
        cpio.read_cpio(bad)
