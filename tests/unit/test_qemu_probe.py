"""harness.qemu without running QEMU: finding it, refusing what is not QEMU, the probe
firmware, and build-qemu.sh's cache directory.

Fake builds stand for the real one here; the real patched build is probed in
tests/boot/test_qemu_probe_real.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import qemu
from harness.errors import ErrorCode, NitroError
from helpers.qemu_build import BUILD_QEMU, PATCHES, expected_build_dir, fake_build


def test_build_script_agrees_on_cache_dir() -> None:
    out = subprocess.run(["bash", str(BUILD_QEMU), "--print-dir"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == str(expected_build_dir())


def test_patch_flips_user_creatable() -> None:
    text = (PATCHES / "0001-vhost-user-device-user-creatable.patch").read_text()
    assert "--- a/hw/virtio/vhost-user-device.c" in text
    assert "-    dc->user_creatable = false;" in text
    assert "+    dc->user_creatable = true;" in text


# --- finding QEMU (no QEMU needed) ------------------------------------------------------------

def test_find_qemu_newest_cached_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_HARNESS_QEMU", raising=False)
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path))
    fake_build(tmp_path, "qemu-10.0.2-aaaaaaaaaaaa", 1_000_000)
    newest = fake_build(tmp_path, "qemu-10.0.2-bbbbbbbbbbbb", 2_000_000)
    (tmp_path / "qemu-10.0.2-cccccccccccc" / "bin").mkdir(parents=True)  # no .complete: ignored
    assert qemu.find_qemu() == newest


def test_find_qemu_prefers_current_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer build of other patches loses to the build of the shipped patches as they are."""
    monkeypatch.delenv("NITRO_HARNESS_QEMU", raising=False)
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path))
    current_hash = expected_build_dir().name.rsplit("-", 1)[1]
    assert qemu.patch_hash() == current_hash
    current = fake_build(tmp_path, f"qemu-10.0.2-{current_hash}", 1_000_000)
    fake_build(tmp_path, "qemu-10.0.2-000000000000", 2_000_000)
    assert qemu.current_build() == current
    assert qemu.find_qemu() == current


def test_find_qemu_missing_names_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_HARNESS_QEMU", raising=False)
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NitroError) as info:
        qemu.find_qemu()
    assert info.value.code == ErrorCode.FileOperationFailure
    assert "nitro-harness setup --only qemu" in info.value.message


def test_find_qemu_bad_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_HARNESS_QEMU", str(tmp_path / "nope"))
    with pytest.raises(NitroError) as info:
        qemu.find_qemu()
    assert "NITRO_HARNESS_QEMU" in info.value.message


def test_probe_rejects_non_qemu(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    with pytest.raises(NitroError) as info:
        qemu.probe_qemu(fake)
    assert info.value.code == ErrorCode.ProcessSpawnFailure
    assert "not 'QEMU emulator version" in info.value.message


def test_probe_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(NitroError) as info:
        qemu.probe_qemu(tmp_path / "qemu")
    assert info.value.code == ErrorCode.FileOperationFailure


def test_firmware_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rom = tmp_path / "qboot.rom"
    rom.write_bytes(b"\0" * 65536)
    monkeypatch.setenv("NITRO_HARNESS_QBOOT", str(rom))
    assert qemu.find_firmware() == rom
    monkeypatch.setenv("NITRO_HARNESS_QBOOT", str(tmp_path / "missing.rom"))
    assert qemu.find_firmware() is None


def test_probe_rom_is_its_assembly_source(tmp_path: Path) -> None:
    """The embedded probe firmware is exactly PROBE_ASM assembled by GNU as/ld (binutils)."""
    import shutil
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed: apt-get install binutils")
    src = tmp_path / "probe.S"
    src.write_text(qemu.PROBE_ASM)
    subprocess.run(["as", "--32", "-o", str(tmp_path / "probe.o"), str(src)], check=True, timeout=30)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat=binary", "-o",
                    str(tmp_path / "probe.rom"), str(tmp_path / "probe.o")], check=True, timeout=30)
    assembled = (tmp_path / "probe.rom").read_bytes()
    assert len(assembled) == 65536
    assert qemu._probe_rom() == assembled


def test_probe_rom_reset_vector() -> None:
    """Reset vector at 0xFFF0 (linear 0xFFFFFFF0): e9 0d 00 = jmp rel16 to IP 0 (wraps)."""
    rom = qemu._probe_rom()
    assert rom[0xFFF0:0xFFF3] == bytes([0xE9, 0x0D, 0x00])
    assert (0xFFF3 + 0x000D) & 0xFFFF == 0
    assert rom[0] == 0xFA  # cli


# --- build-qemu.sh without building ----------------------------------------------------------

def test_build_script_reuses_a_complete_build(tmp_path: Path) -> None:
    """Second run: a complete build for the current patches is reused ("cached"), in well
    under the time any build step would take (it must not even look at apt)."""
    name = expected_build_dir().name
    fake_build(tmp_path, name, 1_000_000)
    env = {**os.environ, "NITRO_HARNESS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(BUILD_QEMU)], capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"cached: {tmp_path / name / 'bin' / 'qemu-system-x86_64'}" in out.stderr
    assert "step:" not in out.stderr


def test_build_script_rejects_unknown_argument() -> None:
    out = subprocess.run(["bash", str(BUILD_QEMU), "--fast"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.count("FAILED") == 1 and "unknown argument '--fast'" in out.stderr
