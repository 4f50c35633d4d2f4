"""nitro-cli lifecycle through the real command line and real QEMU boots (docs/nitro-cli.md).

run-enclave returns nitro-cli's JSON after the heartbeat; describe-enclaves shows the enclave
RUNNING with the EIF's PCRs; console shows the hello lines; terminate-enclave removes it and
leaves no process, socket or memory file behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.boot_images import recipe_eif, silent_init_eif

HELLO = "Hello from the enclave side!"


@pytest.fixture
def cli(tmp_path):
    """Run ``nitro-harness`` as a separate process with a private runtime directory."""
    env = dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(tmp_path / "run"))

    def run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "harness.cli", *args],
            capture_output=True, text=True, env=env, timeout=timeout,
        )

    run.runtime = tmp_path / "run"
    yield run
    # Whatever a failed test left running is ended here, by the CLI itself.
    if (tmp_path / "run").exists():
        run("terminate-enclave", "--all", timeout=120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_run_describe_console_terminate(cli):
    eif = recipe_eif("hello")
    expected = json.loads(cli("describe-eif", "--eif-path", str(eif)).stdout)["Measurements"]

    run = cli("run-enclave", "--eif-path", str(eif), "--memory", "512", "--cpu-count", "2", "--debug-mode")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert list(info) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"]
    assert info["EnclaveName"] == eif.name.removesuffix(".eif")
    assert info["EnclaveCID"] >= 16
    assert info["NumberOfCPUs"] == 2 and info["MemoryMiB"] == 512
    assert info["EnclaveID"].split("-enc")[0].startswith("i-")
    assert run.stdout.startswith("{\n  \"EnclaveName\"")  # nitro-cli's 2-space JSON

    described = json.loads(cli("describe-enclaves").stdout)
    assert len(described) == 1
    entry = described[0]
    assert entry["EnclaveID"] == info["EnclaveID"]
    assert entry["State"] == "RUNNING" and entry["Flags"] == "DEBUG_MODE"
    assert entry["Measurements"] == expected
    record = json.loads((cli.runtime / "enclaves" / "0.json").read_text())
    qemu_pid, supervisor_pid, state_dir = record["qemu_pid"], entry["ProcessID"], Path(record["state_dir"])
    assert _alive(qemu_pid) and _alive(supervisor_pid)

    console = cli("console", "--enclave-id", info["EnclaveID"], "--disconnect-timeout", "15")
    assert console.returncode == 0, console.stderr
    assert console.stdout.count(HELLO) >= 2
    assert "nitro-init:" in console.stdout

    done = cli("terminate-enclave", "--enclave-id", info["EnclaveID"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"EnclaveName": info["EnclaveName"], "EnclaveID": info["EnclaveID"], "Terminated": True}

    assert json.loads(cli("describe-enclaves").stdout) == []
    assert not _alive(qemu_pid) and not _alive(supervisor_pid)
    assert not state_dir.exists()  # sockets, extracted kernel and initrd, console socket
    leftovers = sorted(p.name for p in cli.runtime.rglob("*") if (p.is_file() or p.is_socket()) and p.name != "lock")
    assert leftovers == []


def test_console_needs_debug_mode_and_terminate_all(cli):
    eif = recipe_eif("hello")
    first = cli("run-enclave", "--eif-path", str(eif), "--memory", "256", "--cpu-count", "1", "--enclave-name", "quiet")
    assert first.returncode == 0, first.stderr
    refused = cli("console", "--enclave-name", "quiet", "--disconnect-timeout", "2")
    assert refused.returncode == 44
    assert refused.stderr.startswith("[ E44 ]")
    second = cli("run-enclave", "--eif-path", str(eif), "--memory", "256", "--cpu-count", "1", "--debug-mode",
                 "--enclave-cid", "42", "--enclave-name", "loud")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["EnclaveCID"] == 42
    names = sorted(e["EnclaveName"] for e in json.loads(cli("describe-enclaves").stdout))
    assert names == ["loud", "quiet"]
    done = cli("terminate-enclave", "--all")
    assert done.returncode == 0, done.stderr
    assert sorted(e["EnclaveName"] for e in json.loads(done.stdout)) == ["loud", "quiet"]
    assert json.loads(cli("describe-enclaves").stdout) == []


def test_terminate_during_the_boot_ends_it_at_once(cli, tmp_path):
    # An init that never sends the heartbeat: the boot would last the whole heartbeat timeout.
    eif = silent_init_eif(tmp_path / "silent.eif")
    env = dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(cli.runtime))
    run = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run-enclave", "--eif-path", str(eif), "--memory", "256",
         "--cpu-count", "1", "--enclave-name", "booting", "--heartbeat-timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):  # the record appears once CPUs, CID and slot are taken
            done = cli("terminate-enclave", "--enclave-name", "booting", timeout=120)
            if "no running enclave has it" not in done.stderr:
                break
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["EnclaveName"], answer["Terminated"]) == ("booting", True)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 36, err
    assert "[ E36 ] EnclaveBootFailure: terminate-enclave ended the enclave before its heartbeat arrived" in err
    assert out == ""
    assert json.loads(cli("describe-enclaves").stdout) == []
    left = sorted(str(p.relative_to(cli.runtime)) for p in cli.runtime.rglob("*"))
    assert [p for p in left if p != "ended"] == ["enclaves", "lock"]


def test_strict_cpu_mode_refuses_more_cpus_than_the_pool(cli, tmp_path):
    allocator = tmp_path / "allocator.yaml"
    allocator.write_text("memory_mib: 1024\ncpu_count: 1\n")
    env_cli = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "harness.cli", *a], capture_output=True, text=True,
        env=dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(cli.runtime), NITRO_HARNESS_ALLOCATOR_CONFIG=str(allocator)),
        timeout=120,
    )
    eif = str(recipe_eif("hello"))
    strict = env_cli("run-enclave", "--eif-path", eif, "--memory", "512", "--cpu-count", "2", "--cpu-mode", "strict")
    assert strict.returncode == 22, strict.stderr
    assert "[ E22 ]" in strict.stderr
    too_much = env_cli("run-enclave", "--eif-path", eif, "--memory", "2048", "--cpu-count", "1")
    assert too_much.returncode == 27, too_much.stderr
    too_little = env_cli("run-enclave", "--eif-path", eif, "--memory", "16", "--cpu-count", "1")
    assert too_little.returncode == 26, too_little.stderr
    cpu0 = env_cli("run-enclave", "--eif-path", eif, "--memory", "512", "--cpu-ids", "0")
    assert cpu0.returncode == 21, cpu0.stderr
    dup = env_cli("run-enclave", "--eif-path", eif, "--memory", "512", "--cpu-ids", "1", "1")
    assert dup.returncode == 20, dup.stderr
    bad_cid = env_cli("run-enclave", "--eif-path", eif, "--memory", "512", "--cpu-count", "1", "--enclave-cid", "3")
    assert bad_cid.returncode == 3, bad_cid.stderr
    for result in (strict, too_much, too_little, cpu0, dup, bad_cid):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2
