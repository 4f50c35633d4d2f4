"""build-enclave without nitro-cli's blobs uses the harness's own kernel, cmdline, init and
nsm.ko, and ``blobs export`` writes them in nitro-cli's layout (docs/boot.md#blobs). The cache
is a test folder holding a hand-made kernel; nothing is built."""

from __future__ import annotations

import json
import os

import pytest

from harness.cli import main
from harness.cpio import read_cpio
from harness.eif import SectionType, read_eif
from harness.images import blobs as blobs_mod
from harness.images import static_programs
from harness.images.blobs import find_blobs
from harness.images.recipe import AWS_CMDLINE
from helpers.kernels import FAKE_RELEASE, FAKE_VERMAGIC, fake_bzimage, vmlinux
from helpers.preflight_images import elf_program, kernel_module


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A harness cache with ``kernel-current`` (bzImage, nsm.ko, config), a cached init, and
    no nitro-cli blobs anywhere."""
    cache = tmp_path / "cache"
    build = cache / "kernel-6.12.9-abc"
    build.mkdir(parents=True)
    (build / "bzImage").write_bytes(fake_bzimage(vmlinux(None, param=True)))
    (build / "nsm.ko").write_bytes(kernel_module(FAKE_VERMAGIC))
    (build / "config").write_text("#\n# Automatically generated file; DO NOT EDIT.\n"
                                  "# Linux/x86 6.12.9 Kernel Configuration\n#\nCONFIG_VIRTIO_MMIO=y\n")
    (cache / "kernel-current").symlink_to(build.name)
    init = tmp_path / "init"
    init.write_bytes(elf_program())
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(cache))
    monkeypatch.delenv("NITRO_CLI_BLOBS", raising=False)
    monkeypatch.setattr(blobs_mod, "DEFAULT_BLOBS_PATH", tmp_path / "no-default-blobs")
    monkeypatch.setattr(static_programs, "build_init", lambda log=None: init)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return cache


@pytest.fixture
def rootfs(tmp_path):
    r = tmp_path / "rootfs" / "bin"
    r.mkdir(parents=True)
    (r / "app").write_bytes(elf_program())
    os.chmod(r / "app", 0o755)
    return r.parent


def _sections(path):
    eif = read_eif(path)
    return {t: [eif.read_section(s) for s in eif.of_type(t)] for t in SectionType}


def test_build_enclave_without_blobs_uses_the_harness_kernel(own_cache, rootfs, tmp_path, capsys):
    out = tmp_path / "app.eif"
    assert main(["build-enclave", "--rootfs", str(rootfs), "--cmd", "/bin/app",
                 "--output-file", str(out)]) == 0
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("No nitro-cli blobs")]
    assert len(line) == 1
    assert f"the harness's own kernel {FAKE_RELEASE} ({own_cache.resolve()}/kernel-6.12.9-abc/bzImage)" in line[0]
    sections = _sections(out)
    assert sections[SectionType.KERNEL] == [(own_cache / "kernel-current" / "bzImage").read_bytes()]
    assert sections[SectionType.CMDLINE] == [AWS_CMDLINE.encode()]
    boot = {r.name: r.data for r in read_cpio(sections[SectionType.RAMDISK][0])}
    assert boot["init"] == elf_program() and boot["nsm.ko"] == kernel_module(FAKE_VERMAGIC)
    assert json.loads(sections[SectionType.METADATA][0])["BuildMetadata"]["KernelVersion"] == "6.12.9"
    assert main(["check-eif", "--eif-path", str(out)]) == 0  # the result passes the preflight
    capsys.readouterr()


def test_an_explicit_missing_blobs_folder_is_still_e52(own_cache, rootfs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NITRO_CLI_BLOBS", str(tmp_path / "nope"))
    assert main(["build-enclave", "--rootfs", str(rootfs), "--output-file", str(tmp_path / "x.eif")]) == 52
    assert "nope: blobs directory (NITRO_CLI_BLOBS) does not exist" in capsys.readouterr().err


def test_no_blobs_and_no_harness_kernel_is_e52_naming_both(own_cache, rootfs, tmp_path, capsys):
    (own_cache / "kernel-current").unlink()
    assert main(["build-enclave", "--rootfs", str(rootfs), "--output-file", str(tmp_path / "x.eif")]) == 52
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NITRO_CLI_BLOBS" in err and "kernel-current" in err and "nitro-harness setup --only kernel" in err


def test_blobs_export_writes_nitro_clis_layout_and_builds_the_same_image(own_cache, rootfs, tmp_path, capsys):
    dest = tmp_path / "exported"
    assert main(["blobs", "export", str(dest)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"Directory": str(dest.resolve()), "Files": ["bzImage", "bzImage.config", "cmdline", "init",
                                                                "nsm.ko"], "KernelVersion": FAKE_RELEASE}
    assert sorted(p.name for p in dest.iterdir()) == sorted(doc["Files"])
    assert (dest / "cmdline").read_text() == AWS_CMDLINE + "\n"
    assert oct((dest / "init").stat().st_mode & 0o777) == "0o755"
    blobs = find_blobs(dest)  # nitro-cli's rules accept the folder
    assert blobs.kernel_version() == "6.12.9" and blobs.cmdline == AWS_CMDLINE
    # The exported folder gives the same EIF, byte for byte, as the fallback.
    a, b = tmp_path / "fallback.eif", tmp_path / "exported.eif"
    args = ["build-enclave", "--rootfs", str(rootfs), "--cmd", "/bin/app", "--name", "app"]
    assert main([*args, "--output-file", str(a)]) == 0
    assert main([*args, "--output-file", str(b), "--blobs", str(dest)]) == 0
    assert a.read_bytes() == b.read_bytes()
