"""``console``: write to the serial console, wait for a regex on it, or check one never appears."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str | None:
    """The expected regex, or ``not <regex>`` for ``expect_not``."""
    return body.get("expect") or (f"not {body.get('expect_not')}" if body.get("expect_not") else None)


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """``send`` first (debug mode only), then ``expect`` ``count`` times from the runner's
    cursor (an absolute console position, :mod:`harness.console`; it then moves past the
    match), then ``expect_not`` over the whole console (the log file holds what scrolled out of
    the console's memory window).

    A failure-pattern match or timeout is StepFailed with the console's tail.
    """
    from harness.console import ConsoleError

    body = call.body
    enclave = runner.ensure_enclave()
    within = min(float(body.get("within", call.limit)), call.limit)
    fail_pattern = body.get("fail_pattern", runner.scenario.fail_pattern)
    if "send" in body:
        if not enclave.debug_mode:
            raise StepFailed("console send needs a debug-mode enclave (no console otherwise)")
        runner.cursor = max(runner.cursor, enclave.console.position)
        enclave.console.write(body["send"].encode())
    if "expect" in body:
        try:
            match = enclave.console.expect(body["expect"], timeout=within, fail_pattern=fail_pattern,
                                           count=int(body.get("count", 1)), start=runner.cursor)
        except ConsoleError as exc:
            # The whole console's tail, not only what followed the cursor: the lines before
            # the expectation started are often what explains it.
            raise StepFailed(str(exc), runner.console_tail() or exc.excerpt, exc) from None
        runner.cursor = match.end()
    if "expect_not" in body:
        end = time.monotonic() + (float(body["within"]) if "within" in body and "expect" not in body else 0)
        # From the console's start; each poll reads only what arrived since the previous one.
        watch = enclave.console.watch(body["expect_not"], start=0)
        try:
            while True:
                found = watch.poll()
                if found:
                    raise StepFailed(f"console printed {found.group(0)!r}, which must not appear",
                                     found.excerpt())
                if time.monotonic() >= end:
                    break
                time.sleep(min(0.25, max(0.0, end - time.monotonic())))
        finally:
            watch.close()


STEP = register("console", needs_enclave=True, label=label, run=run)
