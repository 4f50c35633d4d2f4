"""The one list of scenario step kinds: each step module registers its kind here.

A kind is its name (the step's key in YAML), whether it needs the scenario's enclave running
(the runner boots it first when it is not), its label function (the step's main argument in
reports) and its runner function. Everything else that knows the kinds reads them from here;
the schema (harness/data/scenario_schema.yaml) and docs/scenarios.md are checked against it by
tests/unit/test_scenario_steps.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.scenario.results import ScenarioResult
    from harness.scenario.runner import ScenarioRunner


@dataclass
class StepCall:
    """One step as its runner function gets it.

    ``body`` is the step's mapping with ``${...}`` placeholders substituted (nested ``steps``
    left as written), ``limit`` the seconds it may take (its ``timeout``, cut to what is left of
    the scenario), ``at`` its path in the scenario document (for line numbers), ``number`` its
    report number (``"2"``, ``"2.1"``), ``result`` the case's result the step records go into.
    """

    body: dict[str, Any]
    limit: float
    at: list[Any]
    number: str
    result: ScenarioResult


#: ``label(body)``: the step's main argument for reports, or None to show just the kind.
LabelFunction = Callable[[dict[str, Any]], "str | None"]
#: ``run(runner, call)``: do the step; raise StepFailed / StepSkipped (harness.scenario.errors).
RunFunction = Callable[["ScenarioRunner", StepCall], None]


@dataclass(frozen=True)
class StepKind:
    """A registered step kind (see the module docstring)."""

    name: str
    needs_enclave: bool
    label: LabelFunction
    run: RunFunction

    @property
    def module(self) -> str:
        """The module that implements the kind (its runner function's module)."""
        return self.run.__module__


_KINDS: dict[str, StepKind] = {}


def register(name: str, *, needs_enclave: bool, label: LabelFunction, run: RunFunction) -> StepKind:
    """Register step kind ``name``; raises ValueError when the name is taken (kinds are unique)."""
    if name in _KINDS:
        raise ValueError(f"step kind {name!r} is already registered by {_KINDS[name].module}")
    kind = StepKind(name, needs_enclave, label, run)
    _KINDS[name] = kind
    return kind


def step_kinds() -> tuple[str, ...]:
    """Every step kind's name, in registration order (harness.scenario.steps imports in order)."""
    return tuple(_KINDS)


def registered() -> tuple[StepKind, ...]:
    """Every registered step kind, in registration order."""
    return tuple(_KINDS.values())


def get(name: str) -> StepKind:
    """The kind registered as ``name``; KeyError for an unknown one (validation rejects those)."""
    return _KINDS[name]


def kind_only(body: dict[str, Any]) -> str | None:
    """Label function of kinds without a main argument: the report shows just the kind."""
    return None


def step_kind(step: dict) -> tuple[str, dict]:
    """Split a validated step ``{kind: body}`` into ``(kind, body as a dict)``."""
    (kind, body), = step.items()
    if kind == "sleep" and not isinstance(body, dict):
        body = {"seconds": body}
    return kind, dict(body or {})


def step_label(step: dict) -> str:
    """Short human label of a step: its ``name``, or its kind plus its main argument (50 chars)."""
    kind, body = step_kind(step)
    if body.get("name"):
        return str(body["name"])
    main = _KINDS[kind].label(body) if kind in _KINDS else None
    if main is None:
        return kind
    main = str(main)
    return f"{kind} {main if len(main) <= 50 else main[:47] + '...'}"
