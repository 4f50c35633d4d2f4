"""EIFs as nitro-cli users bring them, booted (docs/nitro-cli.md#build-enclave,
docs/nitro-cli.md#console, docs/boot.md#choosing-a-layout).

Two boots. ``build-enclave --docker-archive`` of an OCI archive the test makes, on a machine
with no nitro-cli blobs (the harness's own kernel, cmdline, init and nsm.ko are used), passes
``check-eif``, and ``run-enclave`` boots it; its application prints two lines and exits with
status 3, after which ``console`` prints the kept log and why and when the enclave ended. And
an EIF built with ``--blobs`` around a kernel that embeds no configuration, as AWS's do, boots in
the Nitro layout with no option given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.images.blobs import DEFAULT_BLOBS_PATH
from helpers.image_archives import oci_tarball
from helpers.kernels import aws_style_blobs, cached_kernel

APP = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("oci-app: started in the enclave\n");
    fflush(stdout);
    sleep(4);
    printf("oci-app: done, exiting with 3\n");
    fflush(stdout);
    return 3;
}
"""


@pytest.fixture
def cli(tmp_path):
    """``nitro-harness`` in its own process: a private runtime directory, no NITRO_CLI_BLOBS."""
    env = dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(tmp_path / "run"))
    env.pop("NITRO_CLI_BLOBS", None)

    def run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                              text=True, env=env, timeout=timeout)

    yield run
    run("terminate-enclave", "--all", timeout=120)


def _oci_archive(work: Path, app: str = APP) -> Path:
    source = work / "app.c"
    source.write_text(app)
    binary = work / "app"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    layer = [("app", "dir", None, {}),
             ("app/server", "file", binary.read_bytes(), {"mode": 0o755})]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/app/server"], "WorkingDir": "/app"}}
    archive = work / "app.tar"
    archive.write_bytes(oci_tarball(config=config, layers=(layer,)))
    return archive


def test_oci_archive_without_blobs_boots_and_its_end_is_kept(cli, tmp_path):
    if DEFAULT_BLOBS_PATH.is_dir():
        pytest.skip(f"{DEFAULT_BLOBS_PATH} exists: nitro-cli's blobs would be used")
    if cached_kernel("nitro") is None:
        pytest.skip("the harness's kernel is not built ({cache}/kernel-current; scripts/setup.sh)")
    eif = tmp_path / "app.eif"
    built = cli("build-enclave", "--docker-archive", str(_oci_archive(tmp_path)), "--output-file", str(eif))
    assert built.returncode == 0, built.stderr
    assert "No nitro-cli blobs" in built.stderr and "the harness's own kernel" in built.stderr
    checked = cli("check-eif", "--eif-path", str(eif), "--memory", "256")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not [line for line in checked.stdout.splitlines() if not line.startswith("info ")]

    started = time.monotonic()
    run = cli("run-enclave", "--eif-path", str(eif), "--memory", "256", "--cpu-count", "2", "--debug-mode")
    assert run.returncode == 0, run.stderr
    enclave_id = json.loads(run.stdout)["EnclaveID"]
    assert "warning: preflight" not in run.stderr

    # The application ends by itself a few seconds after the heartbeat; so does the enclave.
    while json.loads(cli("describe-enclaves").stdout):
        assert time.monotonic() - started < 240, "the enclave did not end after its application exited"
        time.sleep(1)

    console = cli("console", "--enclave-id", enclave_id)
    assert console.returncode == 0, console.stderr
    assert "oci-app: started in the enclave" in console.stdout
    assert "oci-app: done, exiting with 3" in console.stdout
    last = console.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Enclave {enclave_id} (app) ended at ")
    assert last.endswith("the application exited with status 3, and init rebooted the VM")

    cleared = cli("terminate-enclave", "--all")
    assert cleared.returncode == 0 and json.loads(cleared.stdout) == []
    again = cli("console", "--enclave-id", enclave_id)
    assert again.returncode == 3 and "no running enclave has it" in again.stderr


def test_kernel_without_embedded_config_boots_in_the_nitro_layout(cli, tmp_path):
    from harness.enclave import Enclave, EnclaveConfig
    from harness.registry import Registry

    blobs = tmp_path / "blobs"
    missing = aws_style_blobs(blobs)
    if missing:
        pytest.skip(missing)
    eif = tmp_path / "bare.eif"
    app = APP.replace("sleep(4)", "sleep(600)")
    built = cli("build-enclave", "--blobs", str(blobs), "--docker-archive", str(_oci_archive(tmp_path, app)),
                "--output-file", str(eif))
    assert built.returncode == 0, built.stderr

    enclave = Enclave.start(EnclaveConfig(eif_path=eif, memory_mib=256, cpu_count=2, debug_mode=True),
                            registry=Registry(tmp_path / "run-api"))
    try:
        assert enclave.layout.name == "nitro"
        assert enclave.layout.devices.evidence == "built-in parameter virtio_mmio.device"
        assert "-icount" not in enclave.qemu_cmdline  # the ACPI layout's slow path under TCG
        enclave.console.expect("oci-app: started in the enclave", timeout=60)
        boot_line = next(line for line in enclave.console.text().splitlines() if "Command line:" in line)
        assert boot_line.count("virtio_mmio.device=") == 2  # what a Nitro enclave's kernel sees
        assert [f.line() for f in enclave.preflight if f.severity != "info"] == []
        print(f"heartbeat after {enclave.heartbeat_seconds:.2f} s ({enclave.accel}, Nitro layout)")
    finally:
        enclave.terminate()
