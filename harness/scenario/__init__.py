"""Declarative YAML scenarios: schema validation with file:line errors, matrix expansion, step runners.

A scenario file holds one or more YAML documents (``---``), each a scenario: the image it boots
(``image:`` recipe or ``eif:`` path), the enclave settings, an optional ``matrix:`` that expands it
into several cases, timeouts, and ordered ``steps``. Every document is validated against
``harness/data/scenario_schema.yaml`` before anything boots; an error names the file, the line
and the offending key. docs/scenarios.md is the user's guide. The design follows labgrid's YAML
environments, QEMU functional tests' success/failure console patterns and LAVA's scenario/step
timeouts.

- :mod:`.loader`: YAML with line numbers, schema validation, matrix cases.
- :mod:`.twins`: a case's kernel and architecture twins (``<image>-debian``, ``<image>-arm64``).
- :mod:`.runner`: :class:`ScenarioRunner` (deadlines, placeholders, boot on demand, the step loop),
  shared by the pytest plugin and ``nitro-harness run``; neither front imports the other.
- :mod:`.steps`: one module per step kind, each registered in :mod:`.steps.registry`.
- :mod:`.services`: the ``services:`` block (KMS emulator, vsock-proxies), one module per service.
- :mod:`.results`: :class:`StepResult`, :class:`ScenarioResult` and their :class:`Status`.
- Enclaves are started by :class:`harness.enclave_factory.EnclaveFactory` (re-exported here).
"""

from harness.console import DEFAULT_FAIL_PATTERN
from harness.enclave_factory import DEFAULT_ENCLAVE, EnclaveFactory, RunningEnclave, resolve_eif
from harness.scenario.errors import ScenarioError, StepFailed, StepSkipped, display_path
from harness.scenario.twins import (
    ARCHES,
    KERNELS,
    arch_of_image,
    for_arch,
    for_kernel,
    image_for,
    image_for_arch,
    image_for_kernel,
    kernel_of_image,
)
from harness.scenario.loader import (
    DEFAULT_SCENARIO_TIMEOUT,
    DEFAULT_STEP_TIMEOUT,
    PLACEHOLDERS,
    SCHEMA_PATH,
    LineDict,
    LineList,
    Scenario,
    expand,
    load_scenarios,
    schema,
    validate_document,
)
from harness.scenario.requirements import requirement_skip_reason
from harness.scenario.results import ScenarioResult, Status, StepResult
from harness.scenario.runner import ScenarioRunner
from harness.scenario.steps.attest import GUEST_NSM_TOOL
from harness.scenario.steps.attest import document_from_output as _document_from_output
from harness.scenario.steps.isolation import ISOLATION_CHECKS
from harness.scenario.steps.kms_production import KMS_RUNNER_PORT
from harness.scenario.steps.registry import step_kind, step_kinds, step_label
from harness.scenario.steps.report import subset_mismatch as _subset_mismatch

#: Every step kind, in registration order (harness.scenario.steps); the registry is the source.
STEP_KINDS = step_kinds()

__all__ = [
    "DEFAULT_ENCLAVE",
    "DEFAULT_FAIL_PATTERN",
    "DEFAULT_SCENARIO_TIMEOUT",
    "DEFAULT_STEP_TIMEOUT",
    "GUEST_NSM_TOOL",
    "ISOLATION_CHECKS",
    "ARCHES",
    "KERNELS",
    "KMS_RUNNER_PORT",
    "PLACEHOLDERS",
    "SCHEMA_PATH",
    "STEP_KINDS",
    "EnclaveFactory",
    "LineDict",
    "LineList",
    "RunningEnclave",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "ScenarioRunner",
    "Status",
    "StepFailed",
    "StepResult",
    "StepSkipped",
    "display_path",
    "expand",
    "arch_of_image",
    "for_arch",
    "for_kernel",
    "image_for",
    "image_for_arch",
    "image_for_kernel",
    "kernel_of_image",
    "load_scenarios",
    "requirement_skip_reason",
    "resolve_eif",
    "schema",
    "step_kind",
    "step_kinds",
    "step_label",
    "validate_document",
]
