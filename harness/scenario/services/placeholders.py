"""Dotted placeholders: ``${eif.pcrN}`` of the scenario's EIF and ``${kms.*}`` of its services.

Which names a document may use (checked at load, docs/scenarios.md#placeholders) and their
values while a case runs. ``${eif.pcr0}``, ``${eif.pcr1}``, ``${eif.pcr2}`` and
``${eif.pcr8}`` (signed EIFs only) are lower-case hex measured from the scenario's EIF (its
``image`` or ``eif``), which is how KMS's ``kms:RecipientAttestation:PCR<n>`` condition keys
read (docs/kms.md#condition-keys). ``${kms.*}`` exist with a ``services: kms:`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError
from harness.scenario.errors import StepFailed

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner

#: The PCRs of the scenario's EIF a placeholder can name (PCR8 only when it is signed).
EIF_PCRS = (0, 1, 2, 8)
#: ``${kms.<name>}`` a step can use with a ``services: kms:`` block.
KMS_NAMES = ("endpoint", "ca_file", "host", "port", "region", "account_id", "access_key_id",
             "secret_access_key", "principal_arn")
#: ``${kms.keys.<alias name>.<field>}`` fields of each declared key.
KEY_FIELDS = ("key_id", "arn")
#: Names a ``services:`` block itself may use (keys are created after these are known).
SERVICE_KMS_NAMES = ("region", "account_id", "principal_arn")


def eif_names() -> list[str]:
    """``eif.pcr0``, ``eif.pcr1``, ``eif.pcr2``, ``eif.pcr8``."""
    return [f"eif.pcr{n}" for n in EIF_PCRS]


def _alias_names(services: Any) -> Iterator[str]:
    kms = services.get("kms") if isinstance(services, dict) else None
    for key in (kms.get("keys") if isinstance(kms, dict) else None) or []:
        if isinstance(key, dict) and isinstance(key.get("alias"), str):
            yield key["alias"].removeprefix("alias/")


def step_names(doc: dict) -> set[str]:
    """Dotted names the steps of ``doc`` may use: the EIF's PCRs, and with ``services.kms``
    its ``kms.*`` values and each declared key's ID and ARN."""
    names = set(eif_names())
    services = doc.get("services")
    if isinstance(services, dict) and "kms" in services:
        names |= {f"kms.{n}" for n in KMS_NAMES}
        names |= {f"kms.keys.{a}.{f}" for a in _alias_names(services) for f in KEY_FIELDS}
    return names


def service_names(doc: dict) -> set[str]:
    """Names a ``services:`` block may use: ``artifacts``, ``scenario``, ``scenario_dir``, the
    EIF's PCRs and,
    with ``services.kms``, ``kms.region``, ``kms.account_id`` and ``kms.principal_arn``."""
    names = {"artifacts", "scenario", "scenario_dir", *eif_names()}
    services = doc.get("services")
    if isinstance(services, dict) and "kms" in services:
        names |= {f"kms.{n}" for n in SERVICE_KMS_NAMES}
    return names


def eif_pcr(runner: ScenarioRunner, name: str) -> str:
    """The value of ``${eif.pcrN}``: PCR N of the scenario's EIF, lower-case hex (measured once
    per file version). StepFailed when the EIF does not exist (yet) or PCR8 of an unsigned EIF
    is asked for."""
    from harness.eif import measure_eif

    index = int(name.removeprefix("eif.pcr"))
    try:
        path = runner.scenario_eif()
        stat = path.stat()
        cache: dict[tuple, dict[int, str]] = runner.state("eif-pcrs", dict)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in cache:
            cache[key] = {i: v.hex() for i, v in measure_eif(path).as_dict().items()}
    except NitroError as err:
        raise StepFailed(f"${{{name}}}: the scenario's EIF: {err.message}") from None
    except OSError as err:
        raise StepFailed(f"${{{name}}}: the scenario's EIF {runner.scenario_eif()}: "
                         f"{err.strerror}") from None
    if index not in cache[key]:
        raise StepFailed(f"${{{name}}}: {path} is not signed, so it has no PCR{index}")
    return cache[key][index]


def dotted_value(runner: ScenarioRunner, name: str) -> str:
    """The value of a dotted placeholder in a step (``eif.*``, ``kms.*``); StepFailed when it
    has none (no such service, the EIF missing)."""
    if name.startswith("eif.pcr"):
        return eif_pcr(runner, name)
    services = getattr(runner, "services", None)
    if services is not None:
        value = services.value(name)
        if value is not None:
            return value
    raise StepFailed(f"${{{name}}} has no value (no services.kms block in this scenario)")


def substitute(node: Any, lookup: Callable[[str, list[Any]], str], at: list[Any] | None = None) -> Any:
    """``node`` (mappings, lists, strings) with every ``${name}`` replaced by
    ``lookup(name, path)``, ``path`` being where the string is below ``at``."""
    from harness.scenario.loader import PLACEHOLDER_RE

    at = at or []
    if isinstance(node, dict):
        return {k: substitute(v, lookup, at + [k]) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, lookup, at + [i]) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        return PLACEHOLDER_RE.sub(lambda m: str(lookup(m.group(1), at)), node)
    return node


__all__ = ["EIF_PCRS", "KEY_FIELDS", "KMS_NAMES", "dotted_value", "eif_names", "eif_pcr",
           "service_names", "step_names", "substitute"]
