"""``wait_exit``: the enclave must end by itself (its application exited, the guest died)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, kind_only, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Wait ``within`` seconds (default: the step's limit); StepFailed if it still runs."""
    if runner.enclave is None:
        raise StepFailed("no enclave to wait for")
    within = min(float(call.body.get("within", call.limit)), call.limit)
    if not runner.enclave.wait(within):
        raise StepFailed(f"the enclave was still running after {within:g} s")


STEP = register("wait_exit", needs_enclave=False, label=kind_only, run=run)
