"""Outcomes of scenario steps and cases, as the CLI, the pytest plugin and JSON reports show them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from harness.scenario.loader import Scenario


class Status(enum.StrEnum):
    """State of a step or a case. A ``str`` so it compares equal to and prints as its value."""

    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    #: A step nested in ``expect_failure`` that failed as expected (steps only).
    XFAILED = "xfailed"


@dataclass
class StepResult:
    """Outcome of one step: ``status`` is passed/failed/skipped, or xfailed for a step nested in
    ``expect_failure`` that failed as expected; ``elapsed`` in seconds."""

    index: int
    kind: str
    label: str
    line: int | None
    number: str = ""  # "2" for the second step, "2.1" for the first step nested in it
    status: Status = Status.RUNNING
    elapsed: float = 0.0
    message: str = ""

    def __post_init__(self) -> None:
        self.status = Status(self.status)


@dataclass
class ScenarioResult:
    """Outcome of one scenario case: ``status`` passed/failed/skipped, ``elapsed`` seconds,
    per-step results, the failure ``message`` and console ``excerpt``, the ``artifacts`` folder,
    and for a failed case the last boot's ``timeline`` (its phase lines, docs/boot.md#boot-timeline,
    with the file they came from first)."""

    scenario: Scenario
    status: Status = Status.RUNNING
    elapsed: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    message: str = ""
    excerpt: str = ""
    artifacts: Path | None = None
    timeline: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # callers may pass the plain string

    def failure_report(self) -> str:
        """Multi-line report of a failed case: where, why, console excerpt, boot timeline,
        artifacts path."""
        lines = [self.message]
        if self.excerpt:
            lines += ["--- console (last lines) ---", self.excerpt.rstrip("\n"), "---"]
        if self.timeline:
            lines += [f"--- boot timeline ({self.timeline[0]}) ---", *self.timeline[1:], "---"]
        if self.artifacts:
            lines.append(f"artifacts: {self.artifacts}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-ready summary (for ``nitro-harness run --json``)."""
        return {
            "scenario": self.scenario.id,
            "file": str(self.scenario.path),
            "line": self.scenario.line,
            "status": str(self.status),
            "elapsed_s": round(self.elapsed, 3),
            "message": self.message,
            "artifacts": str(self.artifacts) if self.artifacts else None,
            "steps": [
                {"step": s.number, "kind": s.kind, "label": s.label, "line": s.line,
                 "status": str(s.status), "elapsed_s": round(s.elapsed, 3), "message": s.message}
                for s in self.steps
            ],
        }
