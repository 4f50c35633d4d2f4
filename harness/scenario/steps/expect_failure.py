"""``expect_failure``: the nested steps (default: booting the enclave) must fail, with a
nitro-cli error ``code`` (docs/nitro-cli.md) and/or a ``message`` regex."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError
from harness.scenario.errors import StepFailed
from harness.scenario.results import Status
from harness.scenario.steps.registry import StepCall, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str | None:
    """The expected code, else the message regex."""
    return body.get("code") or body.get("message")


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Run the nested steps within the step's limit, numbered ``<number>.1``, ``.2``, ...

    Their failure passes the step when it carries ``code`` and matches ``message`` (against
    the failure and the console excerpt; kept as ``expected-failure.txt``); the failed nested
    step is then ``xfailed``. A wrong failure, or none, is StepFailed.
    """
    body = call.body
    steps = body.get("steps") or [{"boot": None}]
    want_code = body.get("code")
    want_message = body.get("message")
    saved_deadline = runner.deadline
    runner.deadline = min(runner.deadline, time.monotonic() + call.limit)
    runner.expecting += 1
    try:
        runner.run_steps(steps, call.result, call.at + ["steps"] if body.get("steps") else call.at + ["__boot__"],
                         prefix=f"{call.number}.")
    except StepFailed as failure:
        runner.expecting -= 1
        nested = next((r for r in reversed(call.result.steps) if r.status == Status.XFAILED), None)
        error = failure.error
        code = error.code.tag if isinstance(error, NitroError) else None
        text = f"{failure.message}\n{failure.excerpt}"
        if want_code and code != want_code:
            if nested is not None:
                nested.status = Status.FAILED
            got = f"{code} ({error})" if code else f"a failure without an error code: {failure.message}"
            raise StepFailed(f"expected failure {want_code}, got {got}", failure.excerpt) from None
        if want_message and not re.search(want_message, text, re.MULTILINE):
            if nested is not None:
                nested.status = Status.FAILED
            raise StepFailed(f"failure message does not match {want_message!r}: {failure.message}",
                             failure.excerpt) from None
        (runner.artifacts_dir / "expected-failure.txt").write_text(text)
        return
    except BaseException:
        runner.expecting -= 1
        raise
    finally:
        runner.deadline = saved_deadline
    runner.expecting -= 1
    raise StepFailed(f"expected a failure ({want_code or want_message}) but the steps succeeded")


STEP = register("expect_failure", needs_enclave=False, label=label, run=run)
