"""docker save and OCI image-layout tarballs -> root filesystem, Cmd/Entrypoint, Env
(docs/boot.md#customer-ramdisk).

The tarballs are made here with tarfile, in the exact layouts Docker and OCI define."""

import gzip
import hashlib
import io
import json
import stat
import tarfile

import pytest

from harness.errors import ErrorCode, NitroError
from harness.images import docker_archive as da


def tar_bytes(members, *, gz=False):
    """members: list of (name, kind, payload/linkname, extra dict)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, payload, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = extra.get("mtime", 1600000000)
            ti.uid, ti.gid = extra.get("uid", 0), extra.get("gid", 0)
            ti.mode = extra.get("mode", 0o644)
            data = None
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, extra.get("mode", 0o755)
            elif kind == "file":
                data = payload
                ti.size = len(data)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, payload[0], payload[1]
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


LAYER1 = [
    ("bin", "dir", None, {}),
    ("bin/app", "file", b"#!/bin/sh\necho one\n", {"mode": 0o755, "uid": 1000, "gid": 50}),
    ("bin/app-hard", "hard", "bin/app", {}),
    ("etc", "dir", None, {}),
    ("etc/hostname", "file", b"builder\n", {}),
    ("etc/old.conf", "file", b"old", {}),
    ("data", "dir", None, {}),
    ("data/lower1", "file", b"l1", {}),
    ("data/lower2", "file", b"l2", {}),
    ("dev", "dir", None, {}),
    ("dev/null", "chr", (1, 3), {"mode": 0o666}),
    (".dockerenv", "file", b"", {}),
]
LAYER2 = [
    ("etc/.wh.old.conf", "file", b"", {}),
    ("data/.wh..wh..opq", "file", b"", {}),
    ("data/upper", "file", b"u", {}),
    ("bin/app", "file", b"#!/bin/sh\necho two\n", {"mode": 0o755, "uid": 1000, "gid": 50}),
]
CONFIG = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
          "config": {"Env": ["PATH=/bin", "MODE=test"], "Cmd": ["/bin/app", "--flag"],
                     "Entrypoint": ["/bin/entry"]}}


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci_tarball(config=CONFIG, layers=(LAYER1, LAYER2), nested_index=False, zstd=False):
    blobs = {}
    layer_descs = []
    for i, lay in enumerate(layers):
        raw = tar_bytes(lay, gz=(i == 0))  # one gzip layer, one plain layer
        blobs[digest(raw)] = raw
        mt = ("application/vnd.oci.image.layer.v1.tar+zstd" if zstd else
              "application/vnd.oci.image.layer.v1.tar+gzip" if i == 0 else
              "application/vnd.oci.image.layer.v1.tar")
        layer_descs.append({"mediaType": mt, "digest": digest(raw), "size": len(raw)})
    cfg = json.dumps(config).encode()
    blobs[digest(cfg)] = cfg
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest(cfg), "size": len(cfg)},
                      "layers": layer_descs}).encode()
    blobs[digest(man)] = man
    top = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(man),
           "size": len(man), "annotations": {"org.opencontainers.image.ref.name": "demo:1"}}
    if nested_index:
        idx = json.dumps({"schemaVersion": 2, "manifests": [
            {**top, "platform": {"os": "linux", "architecture": "arm64"},
             "digest": digest(b"missing")},
            {**top, "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
        blobs[digest(idx)] = idx
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest(idx),
               "size": len(idx)}
    files = [("oci-layout", "file", b'{"imageLayoutVersion":"1.0.0"}', {}),
             ("index.json", "file", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(), {})]
    files.append(("blobs", "dir", None, {}))
    files.append(("blobs/sha256", "dir", None, {}))
    for d, b in blobs.items():
        files.append((f"blobs/sha256/{d.split(':')[1]}", "file", b, {}))
    return tar_bytes(files)


def docker_save_tarball(config=CONFIG, layers=(LAYER1, LAYER2)):
    cfg = json.dumps(config).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    files = [(cfg_name, "file", cfg, {})]
    names = []
    for i, lay in enumerate(layers):
        raw = tar_bytes(lay)
        d = f"layer{i}"
        files += [(d, "dir", None, {}), (f"{d}/layer.tar", "file", raw, {})]
        names.append(f"{d}/layer.tar")
    manifest = [{"Config": cfg_name, "RepoTags": ["demo:latest"], "Layers": names}]
    files.append(("manifest.json", "file", json.dumps(manifest).encode(), {}))
    return tar_bytes(files), "sha256:" + cfg_name[:-5]


def check_rootfs(entries):
    by = {e.name: e for e in entries}
    assert (by["bin/app"].source.read_bytes()) == b"#!/bin/sh\necho two\n"  # upper layer wins
    assert (by["bin/app"].uid, by["bin/app"].gid, by["bin/app"].mtime) == (1000, 50, 1600000000)
    assert stat.S_IMODE(by["bin/app"].mode) == 0o755
    # docs/boot.md#image-changes: hard links become relative symlinks.
    assert stat.S_ISLNK(by["bin/app-hard"].mode) and by["bin/app-hard"].data == b"app"
    assert "etc/old.conf" not in by  # whiteout
    assert "data/lower1" not in by and "data/lower2" not in by  # opaque directory
    assert by["data/upper"].source.read_bytes() == b"u" and by["data"].is_dir
    assert stat.S_ISCHR(by["dev/null"].mode) and (by["dev/null"].rdevmajor,
                                                  by["dev/null"].rdevminor) == (1, 3)
    assert not any(".wh." in n for n in by)
    return by


def test_oci_layout(tmp_path):
    p = tmp_path / "img.tar"
    p.write_bytes(oci_tarball())
    archive, entries = da.load_docker_archive(p, tmp_path / "work")
    assert archive.format == "oci" and archive.repo_tags == ["demo:1"]
    assert archive.cmd == ["/bin/app", "--flag"]  # Cmd wins over Entrypoint, never combined
    assert archive.env == ["PATH=/bin", "MODE=test"]
    check_rootfs(entries)
    assert archive.docker_info()["Config"]["Cmd"] == ["/bin/app", "--flag"]


def test_oci_nested_index_picks_amd64(tmp_path):
    p = tmp_path / "img.tar"
    p.write_bytes(oci_tarball(nested_index=True))
    archive, entries = da.load_docker_archive(p, tmp_path / "work")
    check_rootfs(entries)


def test_docker_save(tmp_path):
    raw, cfg_digest = docker_save_tarball()
    p = tmp_path / "img.tar"
    p.write_bytes(raw)
    archive, entries = da.load_docker_archive(p, tmp_path / "work")
    assert archive.format == "docker-save" and archive.repo_tags == ["demo:latest"]
    assert archive.config_digest == cfg_digest
    check_rootfs(entries)


def test_entrypoint_when_no_cmd(tmp_path):
    cfg = {"config": {"Entrypoint": ["/bin/entry", "x"], "Env": None}}
    raw, _ = docker_save_tarball(config=cfg)
    p = tmp_path / "img.tar"
    p.write_bytes(raw)
    archive = da.open_image_archive(p)
    assert archive.cmd == ["/bin/entry", "x"] and archive.env == []


def test_errors_name_archive_and_rule(tmp_path):
    p = tmp_path / "bad.tar"
    p.write_bytes(tar_bytes([("readme", "file", b"x", {})]))
    with pytest.raises(NitroError) as ei:
        da.open_image_archive(p)
    assert ei.value.code == ErrorCode.EifBuildingError
    assert str(p) in ei.value.message and "manifest.json" in ei.value.message
    z = tmp_path / "zstd.tar"
    z.write_bytes(oci_tarball(zstd=True))
    with pytest.raises(NitroError, match="zstd"):
        da.open_image_archive(z)
    evil = tmp_path / "evil.tar"
    raw, _ = docker_save_tarball(layers=([("../../etc/passwd", "file", b"x", {})],))
    evil.write_bytes(raw)
    with pytest.raises(NitroError, match="escapes the root"):
        da.load_docker_archive(evil, tmp_path / "w")
    notar = tmp_path / "no.tar"
    notar.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(NitroError, match="not a tar archive"):
        da.open_image_archive(notar)
