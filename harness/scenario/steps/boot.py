"""``boot``: start the scenario's enclave now (otherwise the first step that needs it does).

``eif`` boots another EIF instead (a rebuilt image, say) and ``debug_mode`` overrides the
scenario's setting, for this boot only; the scenario's ``${eif.*}`` placeholders keep naming
the scenario's own EIF.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.scenario.steps.registry import StepCall, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str | None:
    """The other EIF's file name and ``debug`` when given, else just the kind."""
    from pathlib import Path

    parts = [Path(str(body["eif"])).name] if body.get("eif") else []
    if "debug_mode" in body:
        parts.append("debug" if body["debug_mode"] else "production")
    return " ".join(parts) or None


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Boot within the step's limit; StepFailed when the enclave already runs, the engine's
    NitroError (E19 naming the places tried) when ``eif`` is not found."""
    from harness.enclave_factory import resolve_eif

    eif = call.body.get("eif")
    path = resolve_eif(eif=eif, base=runner.eif_bases()) if eif else None
    runner.boot(call.limit, eif=path, debug_mode=call.body.get("debug_mode"))


STEP = register("boot", needs_enclave=False, label=label, run=run)
