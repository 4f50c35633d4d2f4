"""Scenario step kinds, one module each; every module registers its kind in :mod:`.registry`.

Importing this package imports every step module, in the order below, which is the order of
:func:`~harness.scenario.steps.registry.step_kinds` (and of "known:" in error messages).
To add a kind: write ``steps/<kind>.py`` ending in ``register(...)``, import it here, describe
its body in harness/data/scenario_schema.yaml and document it in docs/scenarios.md
(tests/unit/test_scenario_steps.py checks the three agree).
"""

from harness.scenario.steps import (  # noqa: F401  (imported to register, in this order)
    boot,
    console,
    exec,
    vsock,
    attest,
    isolation,
    kms,
    oci_archive,
    describe,
    cli,
    wait_exit,
    terminate,
    expect_failure,
    sleep,
)
from harness.scenario.steps.registry import StepCall, StepKind, registered, step_kind, step_kinds, step_label

__all__ = ["StepCall", "StepKind", "registered", "step_kind", "step_kinds", "step_label"]
