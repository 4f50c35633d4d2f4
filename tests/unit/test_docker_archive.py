"""docker save and OCI image-layout tarballs -> root filesystem, Cmd/Entrypoint, Env
(docs/boot.md#customer-ramdisk).

The tarballs are made with tarfile, in the exact layouts Docker and OCI define
(helpers.image_archives)."""

import stat

import pytest

from harness.errors import ErrorCode, NitroError
from harness.images import docker_archive as da
from helpers.image_archives import docker_save_tarball, oci_tarball, tar_bytes


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
