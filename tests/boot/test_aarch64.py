"""Graviton (aarch64) enclaves under TCG on this x86_64 machine (docs/boot.md#aarch64-machine):
the flag is where AWS puts it (QEMU's own x86 loader refuses the image for it), the enclave boots
on the virt machine with the PCRs describe-eif gives, and an x86-only QEMU is refused in one
line. The scenarios hello, nsm, attestation and vsock run on aarch64 too (``--arch aarch64``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.enclave import Enclave, EnclaveConfig
from harness.images import recipes
from harness.qemu import find_qemu, probe_qemu

from test_qemu_cross_check import pcrs_from_console


@pytest.fixture(scope="module")
def hello_arm64() -> Path:
    return recipes.build("hello-arm64").path


def _describe(eif: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "harness.cli", "describe-eif", "--eif-path", str(eif)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_qemus_x86_nitro_enclave_loader_refuses_the_arm64_flag(hello_arm64, tmp_path):
    """QEMU's nitro-enclave machine (x86_64 only, as upstream) checks the header's flags: the
    harness's arm64 EIF carries the aarch64 bit exactly where that loader looks."""
    qemu = find_qemu()
    if not probe_qemu(qemu).has_nitro_enclave:
        pytest.skip(f"{qemu} has no nitro-enclave machine")
    doc = _describe(hello_arm64)
    assert doc["Arch"] == "aarch64"
    assert hello_arm64.read_bytes()[6:8] == b"\x00\x01"
    out = subprocess.run([
        str(qemu), "-machine", "nitro-enclave,vsock=vsock,id=arm,memory-backend=mem",
        "-accel", "tcg", "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(hello_arm64),
        "-chardev", f"socket,id=vsock,path={tmp_path / 'v.sock'},server=on,wait=off",
    ], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Expected EIF flags to be 0" in out.stderr, out.stderr


def test_an_arm64_enclave_boots_on_virt_and_its_nsm_reports_describe_eifs_pcrs(hello_arm64):
    measured = _describe(hello_arm64)["Measurements"]
    config = EnclaveConfig(eif_path=hello_arm64, memory_mib=512, cpu_count=2, debug_mode=True)
    with Enclave.start(config) as enclave:
        assert enclave.accel == "tcg" and "aarch64 guest" in enclave.accel_reason
        assert enclave.layout.name == "virt"
        command = enclave.machine.command
        assert Path(command[0]).name == "qemu-system-aarch64"
        assert command[command.index("-machine") + 1].startswith("virt,gic-version=3")
        # hello's application prints PCR0-2 from /dev/nsm (nsm-pcr), then its greeting.
        enclave.console.expect("Hello from the enclave side!", timeout=120)
        pcrs = pcrs_from_console(enclave.console.text())
    assert pcrs == {i: measured[f"PCR{i}"] for i in (0, 1, 2)}


def test_an_x86_only_qemu_is_refused_in_one_line(hello_arm64, tmp_path):
    env = {**os.environ, "NITRO_HARNESS_QEMU_AARCH64": str(find_qemu()),
           "NITRO_HARNESS_RUNTIME_DIR": str(tmp_path / "run")}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run-enclave", "--eif-path",
                          str(hello_arm64), "--memory", "512", "--cpu-count", "1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 19, out.stderr
    # nitro-cli's progress line ("Start allocating memory ..."), then the error: one line.
    errors = [line for line in out.stderr.splitlines() if line.startswith("[ E")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.rstrip().endswith(errors[0])
    assert errors[0].startswith("[ E19 ] ") and "no 'virt' machine" in errors[0]
    assert "install qemu-system-aarch64" in errors[0]
