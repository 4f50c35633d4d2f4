"""Write the fuzz seeds: small, real inputs for each target, in ``fuzz/seeds/<target>/``.

    python fuzz/make_seeds.py [TARGET ...]

Real data where the repository has it (the AWS attestation documents and KMS blobs of
tests/vectors, the shipped scenarios), otherwise inputs made by the harness's own writers
(EIFs, cpio archives, NSM requests, CiphertextForRecipient) or laid out as the guest and the
clients lay them out (image tarballs, KMS HTTP requests, vsock scripts, virtqueue rings).
Signing keys and certificates are made afresh, so running it again rewrites the signed seeds;
the KMS key store the KMS seeds refer to (``fuzz/keys/kms_state.json``) is made once and kept.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEEDS = ROOT / "fuzz" / "seeds"
VECTORS = ROOT / "tests" / "vectors"


def _write(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# -- EIF -------------------------------------------------------------------------------------

def _cpio(entries) -> bytes:
    from harness.cpio import write_cpio

    out = io.BytesIO()
    write_cpio(out, entries)
    return out.getvalue()


def _signer():
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from harness.eif import Signer

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz signer")])
    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=36500))
            .sign(key, hashes.SHA384()))
    return Signer(cert.public_bytes(serialization.Encoding.PEM),
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


def eif_seeds(tmp: Path) -> None:
    from harness.cpio import Entry
    from harness.eif import build_metadata, write_eif

    boot = _cpio([Entry.directory("dev"), Entry.file("init", b"\x7fELF init", mode=0o755)])
    app = _cpio([Entry.directory("rootfs"), Entry.file("cmd", b"/bin/app\n"),
                 Entry.file("env", b"A=1\n"), Entry.symlink("rootfs/bin/sh", "busybox")])
    meta = build_metadata(image_name="fuzz:1", build_time="2025-01-01T00:00:00+00:00",
                          kernel_version="6.12.0", docker_info={"Id": "sha256:00", "Config": {}},
                          custom_metadata={"team": "fuzz"})
    kernel = b"MZ fuzz kernel " * 4
    for name, kw in (("plain.eif", {}), ("signed.eif", {"signer": _signer()}),
                     ("aarch64.eif", {"aarch64": True})):
        out = tmp / name
        write_eif(out, kernel, "console=ttyS0 reboot=k", [boot, app], meta, **kw)
        _write("eif", name, out.read_bytes())
    out = tmp / "nometa.eif"
    write_eif(out, kernel, "init=/init", [boot], None)
    _write("eif", "nometa.eif", out.read_bytes())
    # A version 2 file whose table lists the sections out of file order, with a gap and
    # trailing bytes: where nitro-cli's sequential reading and the table's differ.
    sections = [(1, kernel), (3, boot), (2, b"console=ttyS0")]
    body, offs, sizes, pos = b"", [], [], 548
    for i, (t, data) in enumerate(sections):
        gap = b"\0" * 8 if i == 1 else b""
        body += gap
        pos += len(gap)
        offs.append(pos)
        sizes.append(len(data))
        body += struct.pack(">HHQ", t, 0, len(data)) + data
        pos += 12 + len(data)
    order = [0, 2, 1]
    offs, sizes = [offs[i] for i in order], [sizes[i] for i in order]
    head = struct.pack(">4sHHQQHH", b".eif", 2, 0, 1 << 30, 2, 0, 3)
    head += struct.pack(">32Q", *(offs + [0] * 29)) + struct.pack(">32Q", *(sizes + [0] * 29))
    _write("eif", "v2-table-order.eif", head + b"\0" * 8 + body + b"tail")


# -- cpio ------------------------------------------------------------------------------------

def cpio_seeds() -> None:
    from harness.cpio import Entry

    _write("cpio", "bootstrap.cpio", _cpio([
        Entry.directory("dev"), Entry.file("init", b"\x7fELF", mode=0o755),
        Entry.file("nsm.ko", b"ko", mode=0o755)]))
    _write("cpio", "customer.cpio", _cpio([
        Entry.directory("rootfs"), Entry.directory("rootfs/bin"),
        Entry.file("rootfs/bin/busybox", b"#!", mode=0o755),
        Entry.symlink("rootfs/bin/sh", "busybox"), Entry.symlink("rootfs/usr", "/"),
        Entry.device("rootfs/dev/null", "c", 1, 3, 0o666),
        Entry.file("cmd", b"/bin/sh\n"), Entry.file("env", b"PATH=/bin\n")]))
    _write("cpio", "empty.cpio", _cpio([]))


# -- docker / OCI archives ----------------------------------------------------------------------

def _tar(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """A ustar archive of (name, kind, data or link target); the zero padding tarfile adds
    after the end-of-archive blocks is cut (the reader stops at the end either way)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1600000000, 0o755 if kind == "dir" else 0o644
            data = None
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            else:
                data = payload
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue().rstrip(b"\0")
    return raw.ljust(-(-len(raw) // 512) * 512, b"\0")


_LAYER = [("bin", "dir", b""), ("bin/app", "file", b"#!/bin/sh\necho hi\n"),
          ("bin/sh", "sym", "app"), ("bin/app2", "hard", "bin/app"), ("etc", "dir", b""),
          ("etc/.wh.old", "file", b""), ("data/.wh..wh..opq", "file", b""),
          ("dev/null", "chr", b"")]
_CONFIG = {"architecture": "amd64", "os": "linux", "created": "2025-01-01T00:00:00Z",
           "config": {"Cmd": ["/bin/app"], "Entrypoint": ["/bin/sh", "-c"], "Env": ["A=1"]}}


def docker_seeds() -> None:
    import gzip
    import hashlib

    layer = _tar(_LAYER)
    config = json.dumps(_CONFIG).encode()
    manifest = json.dumps([{"Config": "cfg.json", "RepoTags": ["fuzz:1"],
                            "Layers": ["l1/layer.tar"]}]).encode()
    _write("docker_archive", "docker-save.tar", _tar([
        ("manifest.json", "file", manifest), ("cfg.json", "file", config),
        ("l1/layer.tar", "file", layer)]))

    def blob(data: bytes) -> tuple[str, str]:
        h = hashlib.sha256(data).hexdigest()
        return f"sha256:{h}", f"blobs/sha256/{h}"

    for gz in (False, True):
        ldata = gzip.compress(layer, mtime=0) if gz else layer
        ldig, lpath = blob(ldata)
        cdig, cpath = blob(config)
        man = json.dumps({"schemaVersion": 2, "config": {"digest": cdig},
                          "layers": [{"digest": ldig, "mediaType":
                                      "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")}]
                          }).encode()
        mdig, mpath = blob(man)
        index = json.dumps({"schemaVersion": 2, "manifests": [
            {"digest": mdig, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "platform": {"os": "linux", "architecture": "amd64"},
             "annotations": {"org.opencontainers.image.ref.name": "fuzz:oci"}}]}).encode()
        _write("docker_archive", f"oci{'-gzip' if gz else ''}.tar", _tar([
            ("oci-layout", "file", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", "file", index), (mpath, "file", man), (cpath, "file", config),
            (lpath, "file", ldata)]))


# -- NSM -------------------------------------------------------------------------------------

def nsm_seeds() -> None:
    import cbor2

    from harness.nsm import (Attestation, DescribeNSM, DescribePCR, ExtendPCR, GetRandom,
                             LockPCR, LockPCRs, encode_request)

    requests = {
        "describe-pcr": DescribePCR(0), "extend-pcr": ExtendPCR(16, b"fuzz"),
        "lock-pcr": LockPCR(17), "lock-pcrs": LockPCRs(20), "describe-nsm": DescribeNSM(),
        "get-random": GetRandom(),
        "attestation": Attestation(user_data=b"user", nonce=b"\x01" * 20, public_key=b"pk"),
        "attestation-empty": Attestation(user_data=None, nonce=None, public_key=None),
    }
    for name, req in requests.items():
        _write("nsm", name, b"\0" + encode_request(req))
    _write("nsm", "extend-pcr-strict-list", b"\x03" + cbor2.dumps(
        {"ExtendPCR": {"index": 18, "data": list(b"serde bytes as a list")}}))


# -- attestation and CMS -----------------------------------------------------------------------

def attestation_seeds() -> None:
    for p in sorted((VECTORS / "attestation").iterdir()):
        if p.suffix != ".pem":
            _write("attestation", p.name, p.read_bytes())


def cms_seeds() -> None:
    from cryptography.hazmat.primitives import serialization

    from harness.kms.cms import build_ciphertext_for_recipient

    from fuzz.targets.cms import recipient_key

    for p in sorted((VECTORS / "kms").iterdir()):
        _write("cms", p.name, p.read_bytes())
    spki = recipient_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write("cms", "harness-built.ber", build_ciphertext_for_recipient(b"fuzz secret", spki))


# -- scenarios ---------------------------------------------------------------------------------

def scenario_seeds() -> None:
    for p in sorted((ROOT / "scenarios").glob("*.yaml")):
        _write("scenario", p.name, p.read_bytes())


TARGET_SEEDS = {
    "eif": eif_seeds, "cpio": cpio_seeds, "docker_archive": docker_seeds, "nsm": nsm_seeds,
    "attestation": attestation_seeds, "cms": cms_seeds, "scenario": scenario_seeds,
}


def main(argv: list[str]) -> int:
    import tempfile

    from fuzz import seed_scripts

    makers = {**TARGET_SEEDS, **seed_scripts.MAKERS}
    names = argv or list(makers)
    for name in names:
        if name not in makers:
            print(f"unknown target {name!r} (known: {', '.join(makers)})", file=sys.stderr)
            return 2
        shutil.rmtree(SEEDS / name, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            fn = makers[name]
            fn(Path(tmp)) if name == "eif" else fn()
        print(f"{name}: {len(list((SEEDS / name).iterdir()))} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
