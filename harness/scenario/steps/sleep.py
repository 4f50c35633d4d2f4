"""``sleep``: wait a number of seconds (``sleep: 2.5`` or ``sleep: {seconds: 2.5}``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str:
    """``2 s``."""
    return f"{body.get('seconds')} s"


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Sleep ``seconds``; StepFailed (after sleeping what is left) when that exceeds the limit."""
    seconds = float(call.body["seconds"])
    if seconds > call.limit:
        time.sleep(call.limit)
        raise StepFailed(f"sleep of {seconds:g} s exceeds the time left ({call.limit:.1f} s)")
    time.sleep(seconds)


STEP = register("sleep", needs_enclave=False, label=label, run=run)
