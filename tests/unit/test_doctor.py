"""harness.doctor: the accelerator decision and the report, on faked /proc, /sys and /dev.

The decision rule (docs/architecture.md#accelerator): KVM only when /dev/kvm opens AND the CPU
exposes vmx or svm AND a probe boot succeeds; else TCG with the reason. Decision tests pass a
``probe`` stand-in only where the rule says a probe would run, and one that fails the test if
called where it must not. The report with the real patched QEMU is checked in
tests/boot/test_doctor_qemu.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import doctor
from harness.errors import ErrorCode, NitroError
from harness.qemu import BootProbe, QemuInfo
from helpers.fake_host import (AMD_SVM, INTEL_NO_VMX, INTEL_VMX, fake_cpus, fake_host, fake_hugepages,
                               interleaved, no_probe, write)


def info(accels: frozenset[str] = frozenset({"kvm", "tcg"}), path: str = "/nonexistent/qemu"
         ) -> QemuInfo:
    """A QemuInfo for decision tests (the decision reads only path and accelerators)."""
    return QemuInfo(
        path=Path(path), version=(10, 0, 2), version_text="QEMU emulator version 10.0.2",
        machines=frozenset({"microvm"}), devices=frozenset({"vhost-user-device"}),
        accelerators=accels, vhost_user_device_creatable=True,
        vhost_user_device_detail="No 'virtio-bus' bus found",
    )


@pytest.fixture(autouse=True)
def _no_accel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(doctor.ACCEL_ENV, raising=False)


# --- choose_accelerator ------------------------------------------------------------------------

def test_kvm_present_but_no_vmx_svm_chooses_tcg(tmp_path: Path) -> None:
    from harness.host import host_facts
    host = host_facts(fake_host(tmp_path, INTEL_NO_VMX))
    assert host.kvm.device.opens
    accel, reason = doctor.choose_accelerator(info(), host, probe=no_probe)
    assert accel == "tcg"
    assert "neither vmx nor svm" in reason


def test_no_dev_kvm_chooses_tcg(tmp_path: Path) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, INTEL_VMX, kvm=None))
    accel, reason = doctor.choose_accelerator(info(), kvm, probe=no_probe)
    assert accel == "tcg" and "does not exist" in reason


def test_dev_kvm_that_does_not_open_chooses_tcg(tmp_path: Path) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, AMD_SVM, kvm="dir"))
    accel, reason = doctor.choose_accelerator(info(), kvm, probe=no_probe)
    assert accel == "tcg" and "does not open" in reason


def test_qemu_without_kvm_accel_chooses_tcg(tmp_path: Path) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, INTEL_VMX))
    accel, reason = doctor.choose_accelerator(info(frozenset({"tcg"})), kvm, probe=no_probe)
    assert accel == "tcg" and "without the kvm accelerator" in reason


def test_all_conditions_and_probe_ok_choose_kvm(tmp_path: Path) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, AMD_SVM))
    calls: list[tuple[Path, str]] = []

    def probe(path: Path, accel: str) -> BootProbe:
        calls.append((path, accel))
        return BootProbe(True, "kvm: probe guest ran and exited (status 99)", 0.05)

    accel, reason = doctor.choose_accelerator(info(), kvm, probe=probe)
    assert (accel, calls) == ("kvm", [(Path("/nonexistent/qemu"), "kvm")])
    assert "svm" in reason and "probe boot ok" in reason


def test_probe_failure_falls_back_to_tcg_with_its_detail(tmp_path: Path) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, INTEL_VMX))
    failed = BootProbe(False, "kvm: probe boot failed (exit status 1: failed to initialize kvm)", 0.1)
    accel, reason = doctor.choose_accelerator(info(), kvm, probe=lambda p, a: failed)
    assert accel == "tcg" and "failed to initialize kvm" in reason


def test_env_forces_tcg_and_rejects_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.host import kvm_status
    kvm = kvm_status(fake_host(tmp_path, INTEL_VMX))
    monkeypatch.setenv(doctor.ACCEL_ENV, "tcg")
    assert doctor.choose_accelerator(info(), kvm, probe=no_probe) == (
        "tcg", "forced by NITRO_HARNESS_ACCEL=tcg")
    monkeypatch.setenv(doctor.ACCEL_ENV, "hvf")
    with pytest.raises(NitroError) as err:
        doctor.choose_accelerator(info(), kvm, probe=no_probe)
    assert err.value.code == ErrorCode.InvalidArgument and "NITRO_HARNESS_ACCEL=hvf" in err.value.message


def test_env_forced_kvm_needs_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.host import kvm_status
    monkeypatch.setenv(doctor.ACCEL_ENV, "kvm")
    with pytest.raises(NitroError):
        doctor.choose_accelerator(info(), kvm_status(fake_host(tmp_path, INTEL_VMX, kvm=None)))


# --- the report --------------------------------------------------------------------------------

def by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


def test_report_without_qemu_fails_with_setup_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", INTEL_NO_VMX)
    monkeypatch.setenv("NITRO_HARNESS_QEMU", str(tmp_path / "missing-qemu"))
    report = doctor.diagnose(root, probe=no_probe)
    checks = by_name(report)
    assert not report.ok
    assert checks["qemu"].status == "fail" and checks["qemu"].fix == "nitro-harness setup --only qemu"
    assert "NITRO_HARNESS_QEMU" in checks["qemu"].detail


def test_report_fix_commands_for_host_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    fake_cpus(root, interleaved(1, 2))  # one core: no enclave pool possible
    write(root, "proc/cpuinfo", INTEL_VMX)  # vmx, but no /dev/kvm
    fake_hugepages(root, 2048, nr=0, free=0, resv=0)
    monkeypatch.setenv("NITRO_HARNESS_QEMU", str(tmp_path / "missing-qemu"))
    checks = by_name(doctor.diagnose(root, probe=no_probe))
    assert checks["cpus"].status == "warn" and "no whole core" in checks["cpus"].detail
    assert checks["hugepages"].fix and "hugepages-2048kB/nr_hugepages" in checks["hugepages"].fix
    assert checks["/dev/vhost-vsock"].status == "info"
    assert "modprobe vhost_vsock" in (checks["/dev/vhost-vsock"].fix or "")


def test_report_nitro_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel build the set-up caches: missing -> warn + fix; newest reported."""
    root = fake_host(tmp_path / "root", INTEL_NO_VMX)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(cache))
    monkeypatch.setenv("NITRO_HARNESS_QEMU", str(tmp_path / "missing-qemu"))
    check = by_name(doctor.diagnose(root, probe=no_probe))["nitro kernel"]
    assert (check.status, check.fix) == ("warn", "nitro-harness setup --only kernel")
    for name, release, stamp in (("kernel-6.12.1-aaaa", "6.12.1-old", 1_000_000),
                                 ("kernel-6.12.2-bbbb", "6.12.2-new", 2_000_000),
                                 ("kernel-6.12.3-cccc", "6.12.3-unfinished", None)):
        d = cache / name
        d.mkdir(parents=True)
        (d / "bzImage").write_bytes(b"MZ")
        (d / "nsm.ko").write_bytes(b"\x7fELF")
        (d / "build-info.json").write_text(json.dumps({"kernelrelease": release}))
        if stamp is not None:
            (d / ".complete").write_text("done\n")
            __import__("os").utime(d / ".complete", (stamp, stamp))
    check = by_name(doctor.diagnose(root, probe=no_probe))["nitro kernel"]
    assert check.status == "ok"
    assert check.detail == f"{cache / 'kernel-6.12.2-bbbb'} (6.12.2-new, with nsm.ko)"
    # The arm64 kernel (kernel-arm64-*/Image) is its own check; it never counts as the x86 one.
    arm64 = by_name(doctor.diagnose(root, probe=no_probe))["nitro kernel arm64"]
    assert (arm64.status, arm64.fix) == ("warn", "nitro-harness setup --only kernel")
    d = cache / "kernel-arm64-6.12.9-dddd"
    d.mkdir()
    (d / "Image").write_bytes(b"\0" * 0x38 + b"ARM\x64")
    (d / "build-info.json").write_text(json.dumps({"kernelrelease": "6.12.9-arm"}))
    (d / ".complete").write_text("done\n")
    checks = by_name(doctor.diagnose(root, probe=no_probe))
    assert checks["nitro kernel arm64"].status == "ok"
    assert checks["nitro kernel arm64"].detail == f"{d} (6.12.9-arm, no nsm.ko)"
    assert checks["nitro kernel"].detail == check.detail


def test_cli_exit_status_when_qemu_missing(tmp_path: Path) -> None:
    root = fake_host(tmp_path, INTEL_NO_VMX)
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "doctor", "--qemu", str(tmp_path / "none"),
         "--host-root", str(root)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "fix: nitro-harness setup --only qemu" in out.stdout and "Traceback" not in out.stderr
