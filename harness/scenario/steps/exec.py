"""``exec``: run a shell command in a debug-mode enclave over its console; check status and output."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register
from harness.scenario.steps.report import indent

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str | None:
    """The command."""
    return body.get("command")


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Run ``command`` within ``within``; StepFailed when the status is not ``status`` (default 0,
    null = any) or the output misses ``output`` / contains ``output_not`` (regexes)."""
    body = call.body
    within = min(float(body.get("within", call.limit)), call.limit)
    command = body["command"].rstrip()
    if command.endswith("&") and not command.endswith("&&"):
        # A background job: the console shell appends "; <status marker>", and "&;" is a
        # syntax error, so group it ("{ cmd & }" is valid sh).
        command = "{ " + command + " }"
    result = runner.exec(command, within)
    expected = body.get("status", 0)
    shown = indent(result.output)
    if expected is not None and result.status != expected:
        raise StepFailed(f"exit status {result.status}, expected {expected}; output:\n{shown}")
    if "output" in body and not re.search(body["output"], result.output, re.MULTILINE):
        raise StepFailed(f"output does not match {body['output']!r}; output:\n{shown}")
    if "output_not" in body and (bad := re.search(body["output_not"], result.output, re.MULTILINE)):
        raise StepFailed(f"output contains {bad.group(0)!r} (output_not {body['output_not']!r}); "
                         f"output:\n{shown}")


STEP = register("exec", needs_enclave=True, label=label, run=run)
