"""``terminate``: terminate the enclave and check nothing of it remains."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.enclave_factory import process_alive
from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, kind_only, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Terminate; StepFailed when its QEMU process survives, its state is not EMPTY or its
    state folder remains. Later steps that need the enclave then fail (no silent reboot)."""
    enclave = runner.enclave
    if enclave is None:
        raise StepFailed("no enclave to terminate")
    pid = enclave.qemu_pid
    enclave.terminate()
    if pid and process_alive(pid):
        raise StepFailed(f"QEMU process {pid} still runs after terminate")
    if enclave.state != "EMPTY":
        raise StepFailed(f"state is {enclave.state} after terminate, expected EMPTY")
    state_dir = getattr(enclave, "state_dir", None)
    if state_dir is not None and Path(state_dir).exists():
        raise StepFailed(f"the enclave's state folder {state_dir} survived terminate")
    runner.enclave = None


STEP = register("terminate", needs_enclave=False, label=kind_only, run=run)
