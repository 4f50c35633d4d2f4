"""The scenario step registry: one module per kind, and the registry, the schema and
docs/scenarios.md naming the same kinds; plus step behaviour checked against a stand-in enclave
(no QEMU): a ``vsock`` step's ``expect_refused`` passes only on a refusal."""

from __future__ import annotations

import importlib
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import scenario as scn
from harness.scenario.steps import registry
from helpers import REPO


# -- the registry ---------------------------------------------------------------------------


def test_every_registered_kind_has_its_module_label_and_runner():
    kinds = registry.registered()
    names = [kind.name for kind in kinds]
    assert len(names) == len(set(names)) == 14
    assert scn.STEP_KINDS == tuple(names)
    for kind in kinds:
        assert kind.module == f"harness.scenario.steps.{kind.name}"
        module = importlib.import_module(kind.module)
        assert module.STEP is kind
        assert callable(kind.run) and callable(kind.label)
        assert registry.get(kind.name) is kind
    # The label of a step is its kind plus its label function's main argument.
    assert scn.step_label({"expect_failure": {"code": "E26"}}) == "expect_failure E26"
    assert scn.step_label({"terminate": None}) == "terminate"
    assert scn.step_label({"cli": {"args": ["describe-enclaves", 3]}}) == "cli describe-enclaves 3"


def test_a_kind_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="step kind 'sleep' is already registered by harness.scenario.steps.sleep"):
        registry.register("sleep", needs_enclave=False, label=registry.kind_only, run=lambda r, c: None)
    assert registry.get("sleep").module == "harness.scenario.steps.sleep"


def test_which_kinds_boot_the_enclave_first():
    needing = {kind.name for kind in registry.registered() if kind.needs_enclave}
    assert needing == {"console", "exec", "vsock", "attest", "isolation", "describe"}


def _documented_step_kinds() -> list[str]:
    text = (REPO / "docs" / "scenarios.md").read_text()
    section = text.split("\n## Steps\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^### `([a-z_]+)`", section, re.MULTILINE)


def test_registry_schema_and_docs_name_the_same_step_kinds():
    step_schema = scn.schema()["$defs"]["step"]
    in_schema = list(step_schema["properties"])
    documented = _documented_step_kinds()
    assert len(documented) == len(set(documented))
    assert set(scn.STEP_KINDS) == set(in_schema) == set(documented)
    for kind in in_schema:  # each kind's body is described in the schema
        ref = step_schema["properties"][kind]["$ref"]
        assert ref == f"#/$defs/{kind}" and kind in scn.schema()["$defs"]


def test_the_enclave_factory_loads_without_the_scenario_engine():
    code = ("import sys, harness.enclave_factory as f; "
            "assert not any(m.startswith('harness.scenario') for m in sys.modules), sorted(sys.modules); "
            "print(f.EnclaveFactory.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "harness.enclave_factory"
    assert scn.EnclaveFactory is importlib.import_module("harness.enclave_factory").EnclaveFactory


# -- vsock expect_refused against a stand-in enclave ---------------------------------------------


class _Console:
    def text(self) -> str:
        return "stand-in console\n"

    def write(self, data: bytes) -> None:
        raise AssertionError("not used")

    def expect(self, pattern, *, timeout, fail_pattern=None, count=1, start=0):
        raise AssertionError("not used")


class GuestPorts:
    """A stand-in :class:`harness.enclave_factory.RunningEnclave` whose guest answers a parent's
    vsock connection as harness.vsock's device reports it: ``"refuse"`` is the guest's RST
    (ConnectionRefusedError at once), ``"silent"`` a guest that never answers (TimeoutError
    after the connect timeout)."""

    def __init__(self, answer: str):
        self.answer = answer
        self.enclave_id, self.name, self.cid = "i-0123456789abcdef0-enc0000000000000002", "ports", 4343
        self.debug_mode, self.memory_mib, self.cpu_ids, self.state = True, 512, [1], "RUNNING"
        self.qemu_pid, self.qemu_cmdline, self.vcpu_thread_ids = None, [], []
        self.instance_id, self.measurements, self.nsm, self.config, self.vsock = "i-0", None, None, None, None
        self.console = _Console()
        self.connects: list[float] = []

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def exec(self, command: str, *, timeout: float):
        raise AssertionError("not used")

    def vsock_connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        self.connects.append(timeout)
        if self.answer == "refuse":
            raise ConnectionRefusedError(f"guest CID {self.cid} refused port {port} (RST)")
        time.sleep(timeout)
        raise TimeoutError(f"guest CID {self.cid} did not answer a connection to port {port} "
                           f"within {timeout} s")

    def vsock_listen(self, port: int):
        raise AssertionError("not used")

    def describe(self) -> dict:
        return {"EnclaveID": self.enclave_id, "State": self.state}

    def wait(self, timeout=None) -> bool:
        return not self.running

    def terminate(self) -> None:
        self.state = "EMPTY"


def run_vsock_step(tmp_path: Path, answer: str, step: str) -> tuple[object, GuestPorts]:
    (tmp_path / "any.eif").write_bytes(b"stand-in: never read")
    path = tmp_path / "case.yaml"
    path.write_text(textwrap.dedent(f"""\
        eif: any.eif
        steps:
          - vsock: {step}
        """))
    (case,) = scn.load_scenarios(path)
    guest = GuestPorts(answer)

    class Factory(scn.EnclaveFactory):
        def start(self, config=None, **settings):
            self.enclaves.append(guest)
            return guest

    artifacts = tmp_path / "artifacts"
    return scn.ScenarioRunner(case, Factory(artifacts), artifacts_dir=artifacts).run(), guest


def test_vsock_expect_refused_passes_on_a_refusal(tmp_path):
    result, guest = run_vsock_step(tmp_path, "refuse", "{connect: 5999, expect_refused: true, within: 5}")
    assert result.status == "passed", result.failure_report()
    assert len(guest.connects) == 1  # a refusal is the answer: no retry


def test_vsock_expect_refused_fails_when_the_connection_times_out(tmp_path):
    result, guest = run_vsock_step(tmp_path, "silent", "{connect: 5999, expect_refused: true, within: 1}")
    assert result.status == "failed"
    assert "case.yaml:3: step 1 (vsock connect 5999) failed: vsock connect to port 5999 timed out" in result.message
    assert "rather than being refused" in result.message
    assert [s.status for s in result.steps] == ["failed"]
    assert len(guest.connects) == 1 and 0.5 <= guest.connects[0] <= 1.0


def test_vsock_connect_retries_a_refusal_until_the_deadline(tmp_path):
    # Without expect_refused a refusal means the guest's server is not up yet: retried, then failed.
    result, guest = run_vsock_step(tmp_path, "refuse", "{connect: 5005, within: 1.2}")
    assert result.status == "failed"
    assert "vsock connect to the enclave's port 5005 failed: guest CID 4343 refused port 5005 (RST)" in result.message
    assert len(guest.connects) >= 2
