"""``describe``: the enclave's describe-enclaves entry must contain ``expect``; Measurements must
equal the EIF's (docs/nitro-cli.md)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, kind_only, register
from harness.scenario.steps.report import subset_mismatch

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Keep the entry as ``describe.json``; StepFailed on a subset mismatch (see
    :func:`~harness.scenario.steps.report.subset_mismatch`) or Measurements differing."""
    enclave = runner.ensure_enclave()
    actual = enclave.describe()
    (runner.artifacts_dir / "describe.json").write_text(json.dumps(actual, indent=2) + "\n")
    expected = call.body.get("expect") or {}
    mismatch = subset_mismatch(expected, actual, "describe")
    if mismatch:
        raise StepFailed(f"{mismatch}; describe-enclaves entry: {json.dumps(actual)}")
    if enclave.measurements is not None and "Measurements" in actual:
        want = enclave.measurements.to_json()
        if actual["Measurements"] != want:
            raise StepFailed(f"describe Measurements {actual['Measurements']} differ from the EIF's {want}")


STEP = register("describe", needs_enclave=True, label=kind_only, run=run)
