"""aarch64 image recipes (docs/boot.md#arm64-images) without the network: the recipe's ``arch``
field, the shipped arm64 twins, the private apt state's command lines and on-demand fetch, the
cross-built static programs (keys, folders, the ELF they are), the kernel blob an aarch64 recipe
needs, and an aarch64 EIF built end to end from a hand-made kernel (header flag bit 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.arch import AARCH64, X86_64
from harness.eif import measure_eif, read_eif
from harness.errors import ErrorCode, NitroError
from harness.images import apt_state, debian, host_twin, recipes, static_programs
from harness.images.cache import Inputs, image_digest
from harness.preflight.elf import elf_facts
from helpers import REPO

RECIPES = REPO / "harness" / "data" / "recipes"
CROSS_GCC = "aarch64-linux-gnu-gcc"
#: The first 64 bytes of an arm64 Image: only the magic at 0x38 matters here.
FAKE_IMAGE = bytes(0x38) + b"ARM\x64" + bytes(4) + b"fake arm64 kernel" * 8


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of the test's own (nothing shared with the user's cache)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(root))
    return root


def write_recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


# --- the recipe's arch ------------------------------------------------------------------------


def test_arch_defaults_to_x86_64_and_aarch64_takes_the_aarch64_command_line(tmp_path: Path) -> None:
    plain = recipes.load_recipe(write_recipe(
        tmp_path, "kernel: {package: linux-image-6.12-cloud-amd64}\n", "plain.yaml"))
    assert plain.arch is X86_64 and plain.kernel["cmdline"] == recipes.AWS_CMDLINE
    arm = recipes.load_recipe(write_recipe(
        tmp_path, "arch: aarch64\nkernel: {directory: k}\n", "arm.yaml"))
    assert arm.arch is AARCH64
    assert arm.kernel["cmdline"] == ("reboot=k panic=30 pci=off nomodules console=ttyS0 "
                                     "random.trust_cpu=on root=/dev/ram0")


@pytest.mark.parametrize("value", ["arm64", "ppc64le", "X86_64", "1"])
def test_arch_rejects_other_names_with_file_field_and_rule(tmp_path: Path, value: str) -> None:
    p = write_recipe(tmp_path, f"arch: {value}\nkernel: {{directory: k}}\n")
    with pytest.raises(NitroError) as e:
        recipes.load_recipe(p)
    assert e.value.code == ErrorCode.EifBuildingError
    assert e.value.message.startswith(f"{p}: arch: ")
    assert "is not one of ['x86_64', 'aarch64']" in e.value.message
    assert "\n" not in e.value.message


@pytest.mark.parametrize("twin", ["hello-arm64", "python-arm64"])
def test_shipped_arm64_twins_differ_only_in_name_arch_and_kernel(twin: str) -> None:
    """The arm64 recipes must build the same image as their x86_64 twins: only the name, the
    arch and the kernel differ (and, in paths, the multiarch triplet)."""
    x86_text = (RECIPES / f"{twin.removesuffix('-arm64')}.yaml").read_text()
    x86 = yaml.safe_load(x86_text.replace("x86_64-linux-gnu", "aarch64-linux-gnu"))
    arm = yaml.safe_load((RECIPES / f"{twin}.yaml").read_text())
    differs = {k for k in set(x86) | set(arm) if x86.get(k) != arm.get(k)}
    assert differs == {"name", "arch", "kernel"}
    assert arm["name"] == twin and arm["arch"] == "aarch64"
    assert arm["kernel"] == {"directory": "{cache}/kernel-arm64-current", "nsm": "nsm",
                             "cmdline": AARCH64.aws_cmdline}
    loaded = recipes.load_recipe(twin)
    assert loaded.arch is AARCH64 and loaded.kernel["cmdline"] == AARCH64.aws_cmdline


# --- the private apt state --------------------------------------------------------------------


def test_arm64_apt_runs_on_a_private_state_and_x86_64_on_the_host(cache: Path) -> None:
    state = cache / "apt-arm64"
    assert debian.apt_state_dir(AARCH64) == state
    assert debian.apt_argv("apt-cache", X86_64) == ["apt-cache"]
    assert debian.apt_argv("apt-get", AARCH64) == [
        "apt-get",
        "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
        "-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::State::status={state}/status",
        "-o", f"Dir::Etc::SourceList={state}/etc/sources.list",
        "-o", f"Dir::Etc::SourceParts={state}/etc/none",
        "-o", f"Dir::Cache={state}", "-o", f"Dir::Cache::archives={state}/archives"]
    assert not state.exists()  # building the command fetches nothing


def test_sources_list_groups_components_and_names_debians_keyring() -> None:
    text = apt_state.sources_list([("http://m/debian", "bookworm", "main"),
                                   ("http://m/debian", "bookworm", "contrib"),
                                   ("http://m/debian-security", "bookworm-security", "main")])
    signed = (f" [signed-by={apt_state.DEBIAN_KEYRING}]"
              if apt_state.DEBIAN_KEYRING.is_file() else "")
    assert text == (f"deb{signed} http://m/debian bookworm main contrib\n"
                    f"deb{signed} http://m/debian-security bookworm-security main\n")


def test_missing_arm64_lists_are_fetched_once_and_fingerprinted(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_update(argv, **kwargs):
        calls.append(argv)
        lists = cache / "apt-arm64" / "lists"
        (lists / "deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages.lz4"
         ).write_bytes(b"x")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(apt_state, "host_debian_sources", lambda: [])
    monkeypatch.setattr(apt_state.subprocess, "run", fake_update)
    empty = debian.apt_index_fingerprint(AARCH64)
    debian.ensure_lists(AARCH64)
    debian.ensure_lists(AARCH64)
    assert len(calls) == 1 and calls[0][-1] == "update"
    assert calls[0][:2] == ["apt-get", "-q"]
    assert calls[0][2:18] == debian.apt_argv("apt-get", AARCH64)[1:]
    state = cache / "apt-arm64"
    assert (state / "status").read_bytes() == b""
    assert (state / "etc" / "sources.list").read_text() == apt_state.sources_list(
        apt_state.FALLBACK_SOURCES)
    # The arm64 fingerprint is the private lists', not the host's.
    assert debian.apt_index_fingerprint(AARCH64) not in (
        empty, debian.apt_index_fingerprint(X86_64))
    debian.ensure_lists(X86_64)  # the host's lists are the host's business
    assert len(calls) == 1


def test_a_failed_arm64_update_is_one_line_naming_the_state(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apt_state, "host_debian_sources", lambda: [])
    failed = "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease\n"
    monkeypatch.setattr(apt_state.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 100, "", failed))
    with pytest.raises(NitroError) as e:
        debian.show(["busybox-static"], AARCH64)
    assert e.value.code == ErrorCode.EifBuildingError and "\n" not in e.value.message
    assert e.value.message.startswith(f"{cache / 'apt-arm64'}: apt-get update for arm64 failed")


def test_twins_are_the_same_source_up_to_a_binnmu() -> None:
    assert host_twin.same_source_version("1:1.35.0-4+deb12u1+b1", "1:1.35.0-4+deb12u1")
    assert host_twin.same_source_version("3.11.2-6+deb12u9", "3.11.2-6+deb12u9")
    assert not host_twin.same_source_version("3.11.2-6+deb12u9", "3.11.2-6+deb12u6")


# --- static programs --------------------------------------------------------------------------


def test_static_program_keys_and_folders_differ_per_arch(cache: Path) -> None:
    for name in ("init", "nsm-pcr"):
        assert static_programs.program_key(name, AARCH64) != static_programs.program_key(name)
    # Only a cross build names its architecture: the host's keys (and cached inits) stay as
    # they were.
    assert static_programs._toolchain_id(X86_64).startswith("gcc ")
    assert static_programs._toolchain_id(AARCH64).startswith("aarch64: aarch64-linux-gnu-gcc ")
    assert static_programs.program_cache_dir("init") == cache / "init"
    assert static_programs.program_cache_dir("init", AARCH64) == cache / "init-arm64"
    assert static_programs.program_cache_dir("nsm-pcr") == cache / "programs" / "nsm-pcr"
    assert (static_programs.program_cache_dir("nsm-pcr", AARCH64)
            == cache / "programs-arm64" / "nsm-pcr")
    assert static_programs.init_key(AARCH64) == static_programs.program_key("init", AARCH64)


def test_missing_cross_compiler_names_its_packages(cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which

    def which(cmd, *args, **kwargs):
        return None if cmd == CROSS_GCC else real_which(cmd, *args, **kwargs)

    monkeypatch.setattr(static_programs.shutil, "which", which)
    with pytest.raises(NitroError) as e:
        static_programs.build_static_program("nsm-pcr", arch=AARCH64)
    assert e.value.code == ErrorCode.EifBuildingError and "\n" not in e.value.message
    assert f"{CROSS_GCC} not found" in e.value.message
    assert "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" in e.value.message
    assert not (cache / "programs-arm64").exists()


@pytest.mark.skipif(shutil.which(CROSS_GCC) is None,
                    reason=f"{CROSS_GCC} not installed (apt-get install gcc-aarch64-linux-gnu "
                           "libc6-dev-arm64-cross)")
def test_cross_built_init_and_nsm_pcr_are_static_aarch64(cache: Path) -> None:
    for name in ("init", "nsm-pcr"):
        built = static_programs.build_static_program(name, arch=AARCH64)
        assert built.parent.parent == static_programs.program_cache_dir(name, AARCH64)
        with open(built, "rb") as f:
            facts = elf_facts(lambda off, size: (f.seek(off), f.read(size))[1])
        assert facts is not None
        assert (facts.machine, facts.bits, facts.interp) == ("aarch64", 64, None)
        assert os.access(built, os.X_OK)
        # The same sources for the host: another file, an x86_64 one.
        host = static_programs.build_static_program(name)
        assert host.parent.parent == static_programs.program_cache_dir(name)
        assert static_programs.elf_machine(host) == "EM_X86_64"
    # A second call reuses the cached build (same path, same bytes).
    again = static_programs.build_init(arch=AARCH64)
    assert again == static_programs.build_static_program("init", arch=AARCH64)


# --- the kernel blob and the image --------------------------------------------------------------


def _kernel_dir(path: Path, blob: str, data: bytes) -> Path:
    path.mkdir()
    (path / blob).write_bytes(data)
    return path


def test_aarch64_recipe_needs_an_arm64_image(tmp_path: Path) -> None:
    _kernel_dir(tmp_path / "x86", "bzImage", b"\0" * 0x300)
    _kernel_dir(tmp_path / "arm", "Image", FAKE_IMAGE)
    _kernel_dir(tmp_path / "bad", "Image", b"\0" * 0x300)
    arm_dir = tmp_path / "arm"
    (arm_dir / "bzImage").write_bytes(FAKE_IMAGE)

    def recipe(arch: str, kdir: str):
        body = f"arch: {arch}\nkernel: {{directory: {kdir}, nsm: null}}\n"
        return recipes.load_recipe(write_recipe(tmp_path, body, f"{arch}-{kdir}.yaml"))

    with pytest.raises(NitroError, match=r"x86/Image not found \(an aarch64 recipe boots Image\)"):
        recipes.prebuilt_kernel_dir(recipe("aarch64", "x86"))
    with pytest.raises(NitroError, match=r"bad/Image: not an arm64 Image, for an aarch64 recipe"):
        recipes.prebuilt_kernel_dir(recipe("aarch64", "bad"))
    with pytest.raises(NitroError, match=r"arm/bzImage: an arm64 Image, for an x86_64 recipe"):
        recipes.prebuilt_kernel_dir(recipe("x86_64", "arm"))
    assert recipes.prebuilt_kernel_dir(recipe("aarch64", "arm")) == arm_dir
    assert set(recipes.prebuilt_kernel_key(arm_dir, AARCH64)) == {"directory", "Image"}


def test_arch_is_part_of_the_image_key(tmp_path: Path, cache: Path) -> None:
    kdir = _kernel_dir(tmp_path / "k", "Image", FAKE_IMAGE)
    (kdir / "bzImage").write_bytes(b"\0" * 0x300)
    keys = {}
    for arch in ("x86_64", "aarch64"):
        r = recipes.load_recipe(write_recipe(
            tmp_path, f"name: same\narch: {arch}\nkernel: {{directory: k, nsm: null}}\n",
            f"{arch}.yaml"))
        key = Inputs(r, None).key()
        assert key["arch"] == arch and key["init"] == static_programs.init_key(r.arch)
        keys[arch] = image_digest(Inputs(r, None))
    assert keys["x86_64"] != keys["aarch64"]


@pytest.mark.skipif(shutil.which(CROSS_GCC) is None, reason=f"{CROSS_GCC} not installed")
def test_aarch64_eif_has_flag_bit_0_and_an_aarch64_init(tmp_path: Path, cache: Path) -> None:
    _kernel_dir(tmp_path / "k", "Image", FAKE_IMAGE)
    p = write_recipe(tmp_path, "name: tiny-arm64\narch: aarch64\n"
                     "kernel: {directory: k, nsm: null}\n"
                     "rootfs: {files: [{path: /app, mode: 0755, content: \"#!/bin/sh\\n\"}]}\n"
                     "cmd: [/app]\n")
    built = recipes.build(p)
    eif = read_eif(built.path)
    assert eif.header.flags & 1 == 1
    assert built.info["Arch"] == "aarch64"
    assert measure_eif(built.path).to_json() == built.info["Measurements"]
    assert built.info["Sizes"]["kernel"] == len(FAKE_IMAGE)
    # The bootstrap ramdisk is an uncompressed cpio: the cross-built init is in it as is.
    assert static_programs.build_init(arch=AARCH64).read_bytes() in built.path.read_bytes()
    again = recipes.build(p)
    assert again.cached and again.path == built.path
