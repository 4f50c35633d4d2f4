"""``boot``: start the scenario's enclave now (otherwise the first step that needs it does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.scenario.steps.registry import StepCall, kind_only, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Boot within the step's limit; StepFailed when the enclave already runs."""
    runner.boot(call.limit)


STEP = register("boot", needs_enclave=False, label=kind_only, run=run)
