"""EIF files for tests, made independently of harness.eif: hand-assembled bytes (struct +
zlib, docs/eif-format.md), random parts, the PCR arithmetic (docs/pcrs.md) and signing
certificates."""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
import zlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Section types (docs/eif-format.md#section-types).
KERNEL, CMDLINE, RAMDISK, SIGNATURE, METADATA = 1, 2, 3, 4, 5


def ext(d: bytes) -> bytes:
    """A PCR extended once from zero with digest ``d``."""
    return hashlib.sha384(b"\0" * 48 + d).digest()


def sha(*parts: bytes) -> bytes:
    """SHA-384 of the concatenated ``parts``."""
    return hashlib.sha384(b"".join(parts)).digest()


def assemble(sections, *, version=4, flags=0, gaps=None, table=None, num=None, crc=None):
    """Hand-assemble an EIF: ``sections`` = [(type, data)], optional zero gaps before a section.

    Returns (bytes, table-order CRC computed here)."""
    gaps = gaps or {}
    body = b""
    offs, sizes = [], []
    pos = 548
    for i, (t, data) in enumerate(sections):
        g = gaps.get(i, b"")
        body += g
        pos += len(g)
        offs.append(pos)
        sizes.append(len(data))
        body += struct.pack(">HHQ", t, 0, len(data)) + data
        pos += 12 + len(data)
    if table is not None:
        offs, sizes = table
    n = len(offs) if num is None else num
    offs32 = list(offs) + [0] * (32 - len(offs))
    sizes32 = list(sizes) + [0] * (32 - len(sizes))
    head = struct.pack(">4sHHQQHH", b".eif", version, flags, 1 << 30, 2, 0, n)
    head += struct.pack(">32Q", *offs32[:32]) + struct.pack(">32Q", *sizes32[:32])
    assert len(head) == 0x21C
    c = zlib.crc32(head + b"\0" * 4)
    for i, (t, data) in enumerate(sections):
        c = zlib.crc32(struct.pack(">HHQ", t, 0, len(data)) + data, c)
    full = head + b"\0" * 4 + struct.pack(">I", c if crc is None else crc) + body
    return full, c


def random_parts() -> dict[str, bytes]:
    """Random kernel, bootstrap (``boot``) and application (``app``) ramdisks, and a command line."""
    return {"kernel": os.urandom(4096 + 7), "cmdline": b"console=ttyS0 reboot=k",
            "boot": os.urandom(1024), "app": os.urandom(70000)}


def write(tmp_path: Path, data: bytes, name: str = "x.eif") -> Path:
    """Write ``data`` to ``tmp_path/name``; returns the path."""
    p = tmp_path / name
    p.write_bytes(data)
    return p


def make_signer(curve=ec.SECP384R1(), *, days=(-1, 30), key=None):
    """A self-signed EIF signing certificate valid from ``days[0]`` to ``days[1]`` days from now.

    Returns (certificate PEM, PKCS#8 private key PEM, certificate)."""
    key = key or ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eif signer"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Harness")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    kpem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    return pem, kpem, cert
