"""build-enclave end to end with fake blobs: layout, PCRs recomputed from the raw file,
reproducibility, signing and every bad input (one-line error, no output left behind)."""

import hashlib
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.cli import main
from harness.cpio import read_cpio
from helpers.blob_dirs import fake_blobs, small_rootfs
from helpers.eif_files import make_signer
from helpers.image_archives import oci_tarball


def ext(d):
    return hashlib.sha384(b"\0" * 48 + d).digest()


def sections(path):
    """Independent EIF section reader: [(type, data)] in table order."""
    data = path.read_bytes()
    n = struct.unpack_from(">H", data, 0x1A)[0]
    offs = struct.unpack_from(">32Q", data, 0x1C)[:n]
    out = []
    for o in offs:
        t, _f, size = struct.unpack_from(">HHQ", data, o)
        out.append((t, data[o + 12:o + 12 + size]))
    return out


@pytest.fixture
def blobs(tmp_path):
    return fake_blobs(tmp_path / "blobs")


@pytest.fixture
def rootfs(tmp_path):
    return small_rootfs(tmp_path / "rootfs")


def build(capsys, *args):
    rc = main(["build-enclave", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_build_from_rootfs_layout_and_pcrs(tmp_path, blobs, rootfs, capsys):
    out = tmp_path / "app.eif"
    rc, stdout, stderr = build(capsys, "--rootfs", rootfs, "--cmd", "/bin/hello 'two words'",
                               "--env", "A=1", "--env", "B=x y", "--output-file", out,
                               "--blobs", blobs, "--name", "hello", "--version", "0.3")
    assert rc == 0, stderr
    assert "Start building the Enclave Image..." in stderr
    doc = json.loads(stdout)
    assert list(doc) == ["Measurements"]
    secs = sections(out)
    assert [t for t, _ in secs] == [1, 2, 5, 3, 3]
    kernel, cmdline, meta, boot, cust = (d for _, d in secs)
    assert kernel == (blobs / "bzImage").read_bytes()
    assert cmdline == b"reboot=k panic=30 pci=off nomodules console=ttyS0"
    m = json.loads(meta)
    assert (m["ImageName"], m["ImageVersion"]) == ("hello", "0.3")
    assert m["BuildMetadata"]["KernelVersion"] == "6.12.9-harness"
    # PCRs recomputed here from the raw sections (docs/pcrs.md#image-pcrs).
    pcrs = doc["Measurements"]
    assert pcrs["PCR0"] == ext(hashlib.sha384(kernel + cmdline + boot + cust).digest()).hex()
    assert pcrs["PCR1"] == ext(hashlib.sha384(kernel + cmdline + boot).digest()).hex()
    assert pcrs["PCR2"] == ext(hashlib.sha384(cust).digest()).hex()
    # Bootstrap ramdisk (docs/boot.md#bootstrap-ramdisk).
    b = {r.name: r for r in read_cpio(boot)}
    assert list(b) == ["dev", "init", "nsm.ko"]
    assert b["init"].data == (blobs / "init").read_bytes() and b["init"].mode == 0o100755
    assert b["nsm.ko"].data == (blobs / "nsm.ko").read_bytes() and b["nsm.ko"].mode == 0o100755
    assert b["dev"].mode == 0o40755 and b["dev"].mtime == 1492533000
    # Customer ramdisk (docs/boot.md#customer-ramdisk).
    c = {r.name: r for r in read_cpio(cust)}
    assert c["cmd"].data == b"/bin/hello\ntwo words\n" and c["cmd"].mode == 0o100644
    assert c["env"].data == b"A=1\nB=x y\n"
    for d in ("dev", "run", "sys", "var", "proc", "tmp"):
        assert c[f"rootfs/{d}"].mode == 0o40755
    assert c["rootfs/bin/hello"].data == b"#!/bin/sh\necho hello\n"
    assert "rootfs/etc/hostname" not in c  # linuxkit drops it
    assert c["rootfs/etc/resolv.conf"].data == b"/run/resolvconf/resolv.conf"
    assert c["rootfs/etc/mtab"].data == b"/proc/mounts"
    # Round trip: describe-eif reports the same PCRs.
    assert main(["describe-eif", "--eif-path", str(out)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["Measurements"] == pcrs and described["CheckCRC"] is True
    assert described["Metadata"]["KernelVersion"] == "6.12.9-harness"


def test_two_builds_identical_apart_from_build_time(tmp_path, blobs, rootfs, capsys,
                                                    monkeypatch):
    outs = []
    for i in range(2):
        out = tmp_path / f"b{i}.eif"
        rc, stdout, err = build(capsys, "--rootfs", rootfs, "--cmd", "/bin/hello",
                                "--output-file", out, "--blobs", blobs)
        assert rc == 0, err
        outs.append((out, json.loads(stdout)))
    (a, pa), (b, pb) = outs
    assert pa == pb  # same PCRs
    sa, sb = sections(a), sections(b)
    for (ta, da), (tb, db) in zip(sa, sb):
        assert ta == tb
        if ta == 5:
            ma, mb = json.loads(da), json.loads(db)
            ma["BuildMetadata"].pop("BuildTime")
            mb["BuildMetadata"].pop("BuildTime")
            assert ma == mb
        else:
            assert da == db
    # With SOURCE_DATE_EPOCH even BuildTime is pinned: byte-identical files.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for name in ("c.eif", "d.eif"):
        assert build(capsys, "--rootfs", rootfs, "--cmd", "/bin/hello", "--output-file",
                     tmp_path / name, "--blobs", blobs)[0] == 0
    assert (tmp_path / "c.eif").read_bytes() == (tmp_path / "d.eif").read_bytes()
    assert json.loads(sections(tmp_path / "c.eif")[2][1])["BuildMetadata"]["BuildTime"] == \
        "2023-11-14T22:13:20+00:00"


def test_build_from_docker_archive_env_blobs(tmp_path, blobs, capsys, monkeypatch):
    img = tmp_path / "img.tar"
    img.write_bytes(oci_tarball())
    monkeypatch.setenv("NITRO_CLI_BLOBS", str(blobs))  # nitro-cli's variable
    out = tmp_path / "img.eif"
    rc, stdout, err = build(capsys, "--docker-archive", img, "--output-file", out)
    assert rc == 0, err
    cust = {r.name: r for r in read_cpio(sections(out)[4][1])}
    assert cust["cmd"].data == b"/bin/app\n--flag\n"
    assert cust["env"].data == b"PATH=/bin\nMODE=test\n"
    assert cust["rootfs/bin/app"].data == b"#!/bin/sh\necho two\n"
    assert cust["rootfs/bin/app"].uid == 1000  # layer metadata kept
    assert "rootfs/.dockerenv" not in cust and "rootfs/etc/hostname" not in cust
    meta = json.loads(sections(out)[2][1])
    assert meta["ImageName"] == "demo:1"
    assert meta["DockerInfo"]["Config"]["Env"] == ["PATH=/bin", "MODE=test"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nitro-build-")]
    # Reproducible from an image too: same bytes with a pinned build time.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    again = []
    for name in ("r1.eif", "r2.eif"):
        assert build(capsys, "--docker-archive", img, "--output-file", tmp_path / name)[0] == 0
        again.append((tmp_path / name).read_bytes())
    assert again[0] == again[1]


def test_signed_build_and_modules(tmp_path, blobs, rootfs, capsys):
    pem, kpem, _ = make_signer()
    (tmp_path / "c.pem").write_bytes(pem)
    (tmp_path / "k.pem").write_bytes(kpem)
    mods = []
    for n in ("vsock.ko", "virtio_mmio.ko"):
        (tmp_path / n).write_bytes(b"mod-" + n.encode())
        mods += ["--module", tmp_path / n]
    out = tmp_path / "s.eif"
    rc, stdout, err = build(capsys, "--rootfs", rootfs, "--output-file", out, "--blobs", blobs,
                            "--signing-certificate", tmp_path / "c.pem",
                            "--private-key", tmp_path / "k.pem", *mods)
    assert rc == 0, err
    assert "PCR8" in json.loads(stdout)["Measurements"]
    boot = {r.name: r for r in read_cpio(sections(out)[3][1])}
    assert boot["modules/order"].data == b"vsock.ko\nvirtio_mmio.ko\n"
    assert boot["modules/vsock.ko"].mode == 0o100644
    assert main(["describe-eif", "--eif-path", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["IsSigned"] is True and doc["SignatureCheck"] is True


def one_line_error(err, code):
    lines = err.strip().splitlines()
    return lines[-1].startswith(f"[ E{code:02d} ]") and "Traceback" not in err


def test_bad_inputs(tmp_path, blobs, rootfs, capsys, monkeypatch):
    out = tmp_path / "o.eif"
    base = ["--rootfs", rootfs, "--output-file", out]

    (blobs / "nsm.ko").rename(tmp_path / "nsm.ko.away")
    rc, _, err = build(capsys, *base, "--blobs", blobs)
    assert rc == 48 and str(blobs / "nsm.ko") in err and one_line_error(err, 48)
    (tmp_path / "nsm.ko.away").rename(blobs / "nsm.ko")

    monkeypatch.delenv("NITRO_CLI_BLOBS", raising=False)
    rc, _, err = build(capsys, *base, "--blobs", tmp_path / "no-blobs")
    assert rc == 52 and "no-blobs" in err and one_line_error(err, 52)

    arr = tmp_path / "meta.json"
    arr.write_text("[1, 2]")
    rc, _, err = build(capsys, *base, "--blobs", blobs, "--metadata", arr)
    assert rc == 48 and "must be a JSON object" in err and str(arr) in err

    big = tmp_path / "big.json"
    big.write_text(json.dumps({"k": "x" * 5000}))
    rc, _, err = build(capsys, *base, "--blobs", blobs, "--metadata", big)
    assert rc == 48 and "exceeds 4096" in err

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem, kpem, _ = make_signer(key=key)
    (tmp_path / "rc.pem").write_bytes(pem)
    (tmp_path / "rk.pem").write_bytes(kpem)
    rc, _, err = build(capsys, *base, "--blobs", blobs, "--signing-certificate",
                       tmp_path / "rc.pem", "--private-key", tmp_path / "rk.pem")
    assert rc == 60 and "not an EC key" in err and one_line_error(err, 60)

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    rc, _, err = build(capsys, "--docker-uri", "hello:latest", "--output-file", out,
                       "--blobs", blobs)
    assert rc == 50 and "no Docker engine reachable" in err and "--docker-archive" in err

    (tmp_path / "ctx").mkdir()
    rc, _, err = build(capsys, "--docker-uri", "hello:latest", "--docker-dir", tmp_path / "ctx",
                       "--output-file", out, "--blobs", blobs)
    assert rc == 49 and "no Docker engine reachable" in err
    (tmp_path / "ctx").rmdir()

    rc, _, err = build(capsys, "--output-file", out, "--blobs", blobs)
    assert rc == 1

    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
