"""harness.doctor with the real patched QEMU: the report on a fake host, `nitro-harness doctor`
as a user runs it, and the accelerator decision on this machine (docs/architecture.md#accelerator).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import doctor, qemu
from helpers.fake_host import INTEL_NO_VMX, fake_host, fake_hugepages, no_probe


def test_report_with_real_qemu_on_fake_host(built_qemu: Path, tmp_path: Path) -> None:
    root = fake_host(tmp_path, INTEL_NO_VMX)
    fake_hugepages(root, 2048, nr=64, free=64, resv=0)
    report = doctor.diagnose(root, qemu_path=built_qemu, probe=no_probe)
    checks = {c.name: c for c in report.checks}
    assert report.ok, report.to_text()
    assert (report.accelerator, checks["accelerator"].status) == ("tcg", "warn")
    assert checks["accelerator"].fix and "nested virtualisation" in checks["accelerator"].fix
    for name in ("vhost-user-device", "vhost-user-vsock-device", "microvm", "nitro-enclave",
                 "firmware", "kernel loader"):
        assert checks[name].status == "ok", checks[name]
    assert checks["cpus"].status == "ok" and "enclave pool 1 " in checks["cpus"].detail
    assert checks["hugepages"].status == "ok" and "2M: 64 reserved, 64 free (128 MiB)" in \
        checks["hugepages"].detail
    data = report.to_json()
    assert data["qemu"]["devices"]["vhost-user-device"]["creatable"] is True
    assert data["accelerator"]["choice"] == "tcg"
    assert json.loads(json.dumps(data)) == data


def test_cli_json_and_text(built_qemu: Path, tmp_path: Path) -> None:
    """`nitro-harness doctor --json` and the text form, as a user runs them (a subprocess)."""
    root = fake_host(tmp_path, INTEL_NO_VMX)
    base = [sys.executable, "-m", "harness.cli", "doctor", "--qemu", str(built_qemu),
            "--host-root", str(root)]
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert out.stdout.startswith('{\n  "ok": true')  # nitro-cli style 2-space JSON
    assert data["qemu"]["version"] == "10.0.2"
    assert data["host"]["enclave_pool"] == [1]
    text = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0
    assert "[warn] accelerator" in text.stdout and "ready: enclaves boot with TCG" in text.stdout


def test_real_host_decision_follows_the_rule(built_qemu: Path) -> None:
    """On this machine: no vmx/svm -> TCG whatever /dev/kvm does
    (docs/architecture.md#accelerator)."""
    from harness.host import kvm_status
    kvm = kvm_status()
    accel, reason = doctor.choose_accelerator(qemu.probe_qemu(built_qemu), kvm)
    if kvm.cpu_virt_flag is None or not kvm.device.opens:
        assert accel == "tcg"
    else:  # a host with VT-x/AMD-V: the real probe boot decided
        assert (accel == "kvm") == qemu.probe_boot(built_qemu, "kvm").ok, reason
