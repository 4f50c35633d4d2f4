"""harness.qemu against the real patched build: probing it, its firmware, probe boots.

The binary is the one build-qemu.sh (``nitro-harness setup --only qemu``) builds, located
independently of the code under test (the ``built_qemu`` fixture, tests/boot/conftest.py);
finding QEMU without one is tested in tests/unit/test_qemu_probe.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from harness import qemu
from harness.qemu import probe_cache
from helpers.qemu_build import expected_build_dir


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
