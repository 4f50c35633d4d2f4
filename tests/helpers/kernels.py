"""Kernel images for tests: hand-made bzImages whose payload is any compression the kernel
offers (a real setup header: ``HdrS``, version string, ``xloadflags``, ``payload_offset`` and
``payload_length``), and the real kernels the harness caches, when they are there."""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

from harness.images.debian import cache_root

#: The release the hand-made kernels report.
FAKE_RELEASE = "6.12.9-test"
FAKE_VERMAGIC = f"{FAKE_RELEASE} SMP mod_unload "


def compress(data: bytes, kind: str) -> bytes | None:
    """``data`` compressed as the kernel's Makefile would for ``kind``; None when no
    compressor for it is installed (zstd needs the zstandard package or the zstd command)."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "lz4":  # Linux's legacy frame (lz4 -l): magic, then size-prefixed blocks
        import lz4.block

        blocks = [data[i:i + (8 << 20)] for i in range(0, len(data), 8 << 20)] or [b""]
        out = b"\x02\x21\x4c\x18"
        for block in blocks:
            packed = lz4.block.compress(block, store_size=False)
            out += struct.pack("<I", len(packed)) + packed
        return out
    if kind == "zstd":
        try:
            import zstandard
            return zstandard.ZstdCompressor().compress(data)
        except ImportError:
            pass
        if shutil.which("zstd"):
            return subprocess.run(["zstd", "-cq"], input=data, capture_output=True, check=True).stdout
        return None
    raise ValueError(kind)


def vmlinux(config: str | None = None, *, param: bool = False,
            vermagic: str = FAKE_VERMAGIC) -> bytes:
    """A stand-in vmlinux: an ELF magic, the module version magic the kernel compares modules
    with, optionally an embedded config (IKCONFIG markers around a gzip stream) and the
    built-in ``virtio_mmio.device`` parameter name."""
    body = b"\x7fELF" + b"\0" * 60 + b"\0" + vermagic.encode() + b"\0" + b"\0" * 32
    if config is not None:
        body += b"IKCFG_ST" + gzip.compress(config.encode(), mtime=0) + b"IKCFG_ED"
    if param:
        body += b"\0virtio_mmio.device\0"
    return body + b"\0" * 64


def fake_bzimage(payload: bytes, kind: str = "gzip", *, release: str = FAKE_RELEASE,
                 bits64: bool = True) -> bytes:
    """A bzImage (boot protocol 2.15) around ``payload`` compressed with ``kind``; the kernel's
    uncompressed size follows the stream, as the kernel's build appends it."""
    compressed = compress(payload, kind)
    if compressed is None:
        raise LookupError(f"no {kind} compressor installed")
    compressed += struct.pack("<I", len(payload))
    setup = bytearray(1024)  # setup_sects 1: the protected-mode code starts at 1024
    setup[0x1F1] = 1
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    version = f"{release} (builder@ci) #1 SMP".encode() + b"\0"
    setup[0x300:0x300 + len(version)] = version
    struct.pack_into("<H", setup, 0x20E, 0x100)  # the string is at 0x200 + 0x100
    struct.pack_into("<H", setup, 0x236, 1 if bits64 else 0)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<II", setup, 0x248, 0x80, len(compressed))
    return bytes(setup) + b"\x90" * 0x80 + compressed


def cached_kernel(kind: str) -> Path | None:
    """The harness's Nitro-style kernel (``"nitro"``: ``{cache}/kernel-current/bzImage``) or
    Debian's cloud kernel (``"debian"``: unpacked under ``{cache}/kernels``), None when the
    cache has not got it."""
    root = cache_root()
    if kind == "nitro":
        path = root / "kernel-current" / "bzImage"
        return path if path.is_file() else None
    hits = sorted(glob.glob(str(root / "kernels" / "*" / "boot" / "vmlinuz-*")))
    return Path(hits[-1]) if hits else None


def cached_nsm_ko(kind: str) -> Path | None:
    """The nsm.ko built with :func:`cached_kernel`'s kernel of the same kind, or None."""
    root = cache_root()
    if kind == "nitro":
        path = root / "kernel-current" / "nsm.ko"
        return path if path.is_file() else None
    hits = sorted(glob.glob(str(root / "kernels" / "*" / ".ko" / "nsm.ko")))
    return Path(hits[-1]) if hits else None


def without_embedded_config(bzimage: bytes) -> bytes | None:
    """A copy of a gzip or LZ4 bzImage whose embedded configuration cannot be found (its
    ``IKCFG_ST`` marker renamed), everything else unchanged: a real kernel that describes itself
    as AWS's do, by its built-in parameters only. The decompressor stub has the payload's size
    built in, so the payload keeps its length: LZ4 stores the marker as literal bytes, renamed
    in place (and checked by decompressing); gzip is recompressed, the stream ends early and
    zeros follow. None when neither works."""
    import zlib

    from harness.bzimage import _unlz4_legacy

    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if payload.startswith(b"\x02\x21\x4c\x18"):
        if payload.count(b"IKCFG_ST") != 1:
            return None
        renamed = payload.replace(b"IKCFG_ST", b"IKCFG_XX")
        before, after = _unlz4_legacy(payload), _unlz4_legacy(renamed)
        if after != before.replace(b"IKCFG_ST", b"IKCFG_XX") or before.count(b"IKCFG_ST") != 1:
            return None
        return bzimage[:start] + renamed + bzimage[start + length:]
    if not payload.startswith(b"\x1f\x8b"):
        return None
    vmlinux_bytes = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if vmlinux_bytes.count(b"IKCFG_ST") != 1:
        return None
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    packed = packer.compress(vmlinux_bytes.replace(b"IKCFG_ST", b"IKCFG_XX")) + packer.flush()
    if len(packed) > length:
        return None
    return bzimage[:start] + packed + b"\0" * (length - len(packed)) + bzimage[start + length:]


def aws_style_blobs(dest: Path) -> str | None:
    """Write into ``dest`` the blobs a nitro-cli user brings, from the harness's own build:
    ``bzImage`` without its embedded configuration (:func:`without_embedded_config`), ``nsm.ko``,
    the static ``init`` and AWS's x86_64 ``cmdline``. Returns None, or why they cannot be made
    (the kernel not built, or its payload not fitting again)."""
    from harness.images.recipe import AWS_CMDLINE
    from harness.images.static_programs import build_init

    kernel, nsm = cached_kernel("nitro"), cached_nsm_ko("nitro")
    if kernel is None or nsm is None:
        return "the harness's kernel is not built ({cache}/kernel-current; scripts/setup.sh)"
    bare = without_embedded_config(kernel.read_bytes())
    if bare is None:
        return "the kernel's payload does not fit again once recompressed"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bzImage").write_bytes(bare)
    (dest / "nsm.ko").write_bytes(nsm.read_bytes())
    (dest / "init").write_bytes(build_init().read_bytes())
    (dest / "cmdline").write_text(AWS_CMDLINE + "\n")
    return None
