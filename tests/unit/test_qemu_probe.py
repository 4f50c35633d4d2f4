"""harness.qemu: finding QEMU, probing the real patched build, firmware, probe boots.

The probe tests run the QEMU that scripts/build-qemu.sh builds, located independently of the
code under test: the cache directory name is recomputed here from the patch files. They skip
(with the command to run) when that build does not exist yet.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from harness import qemu
from harness.errors import ErrorCode, NitroError
from harness.qemu import probe_cache

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "scripts" / "qemu-patches"


def expected_build_dir() -> Path:
    """``~/.cache/nitro-harness/qemu-10.0.2-<sha256(name\\n + bytes per patch)[:12]>``."""
    digest = hashlib.sha256()
    for patch in sorted(PATCHES.glob("*.patch")):
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    cache = os.environ.get("NITRO_HARNESS_CACHE") or str(Path.home() / ".cache" / "nitro-harness")
    return Path(cache) / f"qemu-10.0.2-{digest.hexdigest()[:12]}"


@pytest.fixture(scope="module")
def built_qemu() -> Path:
    binary = expected_build_dir() / "bin" / "qemu-system-x86_64"
    if not (binary.parent.parent / ".complete").is_file():
        pytest.skip(f"patched QEMU not built yet at {binary}: run scripts/build-qemu.sh")
    return binary


def test_build_script_agrees_on_cache_dir() -> None:
    out = subprocess.run([str(REPO / "scripts" / "build-qemu.sh"), "--print-dir"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == str(expected_build_dir())


def test_patch_flips_user_creatable() -> None:
    text = (PATCHES / "0001-vhost-user-device-user-creatable.patch").read_text()
    assert "--- a/hw/virtio/vhost-user-device.c" in text
    assert "-    dc->user_creatable = false;" in text
    assert "+    dc->user_creatable = true;" in text


# --- the real build ---------------------------------------------------------------------------

def test_probe_real_build(built_qemu: Path) -> None:
    info = qemu.probe_qemu(built_qemu)
    assert info.version == (10, 0, 2)
    assert info.version_text.startswith("QEMU emulator version 10.0.2")
    assert info.has_microvm and info.has_nitro_enclave
    assert info.has_vhost_user_vsock_device and info.has_virtio_nsm_device
    assert info.vhost_user_device_creatable, info.vhost_user_device_detail
    # Past the user_creatable check, the -machine none run stops at the missing virtio bus.
    assert "virtio-bus" in info.vhost_user_device_detail
    assert {"kvm", "tcg"} <= info.accelerators
    assert info.fit_for_enclaves
    assert info.build_info is not None
    assert info.build_info["patch_hash"] == expected_build_dir().name.rsplit("-", 1)[1]
    assert "--enable-libcbor" in info.build_info["configure"]
    # microvm's -kernel boot needs linuxboot_dma.bin where QEMU looks (-L help): the build
    # carries Debian's copy beside itself.
    assert info.kernel_loader == built_qemu.parent.parent / "share" / "qemu" / "linuxboot_dma.bin"
    system = Path("/usr/share/qemu/linuxboot_dma.bin")
    if system.is_file():
        assert info.kernel_loader.read_bytes() == system.read_bytes()


def test_probe_is_cached_per_binary(built_qemu: Path) -> None:
    assert qemu.probe_qemu(built_qemu) is qemu.probe_qemu(built_qemu)


def test_probe_disk_cache_is_read_and_invalidated(built_qemu: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-disk probe is used only for the exact (path, mtime, size) it was made for."""
    import json
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(probe_cache, "_probe_cache", {})
    real = qemu.probe_qemu(built_qemu)
    stored = list((tmp_path / "probes").glob("qemu-*.json"))
    assert len(stored) == 1
    data = json.loads(stored[0].read_text())
    st = built_qemu.stat()
    assert data["key"] == [str(built_qemu.resolve()), st.st_mtime_ns, st.st_size]
    # A poisoned entry with the right key is believed (proof the disk copy is read) ...
    data["info"]["version"] = [9, 9, 9]
    stored[0].write_text(json.dumps(data))
    monkeypatch.setattr(probe_cache, "_probe_cache", {})
    assert qemu.probe_qemu(built_qemu).version == (9, 9, 9)
    # ... and one whose key no longer matches the binary is probed again and replaced.
    data["key"][1] -= 1
    stored[0].write_text(json.dumps(data))
    monkeypatch.setattr(probe_cache, "_probe_cache", {})
    assert qemu.probe_qemu(built_qemu) == real
    assert json.loads(stored[0].read_text())["info"]["version"] == [10, 0, 2]


def test_refusal_reads_as_documented(built_qemu: Path) -> None:
    """vhost-user-device-pci keeps user_creatable = false in the patched build: QEMU's real
    refusal must be recognised (docs/vhost-user.md#generic-device: "Parameter 'driver' expects a
    pluggable device type")."""
    creatable, answer = qemu.device_creatable(built_qemu, "vhost-user-device-pci",
                                              "chardev=probe0,virtio-id=33")
    assert not creatable
    assert "expects a pluggable device type" in answer
    creatable, answer = qemu.device_creatable(built_qemu, "no-such-device-xyz")
    assert not creatable and "not a valid device model name" in answer


def test_help_lists_options_even_for_refused_device(built_qemu: Path) -> None:
    """Why the probe creates the device: `,help` answers for a refused class too
    (docs/vhost-user.md#generic-device)."""
    out = subprocess.run([str(built_qemu), "-device", "vhost-user-device-pci,help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "virtio-id" in out.stdout


def test_probe_boot_tcg_runs_guest_code(built_qemu: Path) -> None:
    result = qemu.probe_boot(built_qemu, "tcg")
    assert result.ok, result.detail
    assert "status 99" in result.detail


def test_firmware_beside_build(built_qemu: Path) -> None:
    fw = qemu.find_firmware(built_qemu)
    assert fw is not None and fw.name == "qboot.rom"
    system = Path("/usr/share/qemu/qboot.rom")
    if system.is_file():
        assert hashlib.sha256(fw.read_bytes()).digest() == hashlib.sha256(system.read_bytes()).digest()


def test_find_qemu_prefers_env(built_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_HARNESS_QEMU", str(built_qemu))
    assert qemu.find_qemu() == built_qemu


# --- finding QEMU (no QEMU needed) ------------------------------------------------------------

def fake_build(cache: Path, name: str, mtime: float) -> Path:
    binary = cache / name / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    stamp = cache / name / ".complete"
    stamp.write_text("done\n")
    os.utime(stamp, (mtime, mtime))
    return binary


def test_find_qemu_newest_cached_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_HARNESS_QEMU", raising=False)
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path))
    fake_build(tmp_path, "qemu-10.0.2-aaaaaaaaaaaa", 1_000_000)
    newest = fake_build(tmp_path, "qemu-10.0.2-bbbbbbbbbbbb", 2_000_000)
    (tmp_path / "qemu-10.0.2-cccccccccccc" / "bin").mkdir(parents=True)  # no .complete: ignored
    assert qemu.find_qemu() == newest


def test_find_qemu_prefers_current_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer build of other patches loses to the build of scripts/qemu-patches/ as it is."""
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
    assert "scripts/setup.sh" in info.value.message


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


def test_probe_boot_kvm_without_vmx_fails(built_qemu: Path) -> None:
    """docs/architecture.md#accelerator: a /dev/kvm that opens on a CPU without vmx/svm (a
    paravirtual KVM) cannot run a stock kernel; the probe's VEX instruction must expose that. Only
    meaningful on such a host."""
    from harness.host import kvm_status
    kvm = kvm_status()
    if not kvm.device.opens or kvm.cpu_virt_flag is not None:
        pytest.skip("needs a /dev/kvm that opens on a CPU without vmx/svm (this host differs)")
    result = qemu.probe_boot(built_qemu, "kvm")
    assert not result.ok
    assert "exit status" in result.detail


# --- scripts/build-qemu.sh without building ---------------------------------------------------

def test_build_script_reuses_a_complete_build(tmp_path: Path) -> None:
    """Second run: a complete build for the current patches is reused ("cached"), in well
    under the time any build step would take (it must not even look at apt)."""
    name = expected_build_dir().name
    fake_build(tmp_path, name, 1_000_000)
    env = {**os.environ, "NITRO_HARNESS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(REPO / "scripts" / "build-qemu.sh")], capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"cached: {tmp_path / name / 'bin' / 'qemu-system-x86_64'}" in out.stderr
    assert "step:" not in out.stderr


def test_build_script_rejects_unknown_argument() -> None:
    out = subprocess.run([str(REPO / "scripts" / "build-qemu.sh"), "--fast"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.count("FAILED") == 1 and "unknown argument '--fast'" in out.stderr
