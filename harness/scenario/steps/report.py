"""Text helpers shared by step modules for failure messages: indented output, subsets."""

from __future__ import annotations

from typing import Any

from harness.scenario.loader import short


def indent(text: str, limit: int = 40) -> str:
    """``text`` indented by four spaces, its last ``limit`` lines only (``<no output>`` if empty)."""
    lines = text.rstrip("\n").splitlines()
    if len(lines) > limit:
        lines = [f"... ({len(lines) - limit} lines before)"] + lines[-limit:]
    return "\n".join("    " + line for line in lines) if lines else "    <no output>"


def subset_mismatch(expected: Any, actual: Any, where: str) -> str | None:
    """Why ``actual`` does not contain ``expected`` (None if it does).

    Mappings: every expected key present and matching; lists: every expected item matches some
    actual item; a string expectation also matches a number equal to it (placeholders give strings).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected a mapping, got {short(actual)}"
        for key, value in expected.items():
            if key not in actual:
                return f"{where}.{key}: missing (have {', '.join(map(str, actual))})"
            if (why := subset_mismatch(value, actual[key], f"{where}.{key}")) is not None:
                return why
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{where}: expected a list, got {short(actual)}"
        for n, item in enumerate(expected):
            if all(subset_mismatch(item, have, where) is not None for have in actual):
                return f"{where}[{n}]: no item matches {short(item)}"
        return None
    if isinstance(expected, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return None if expected == str(actual) else f"{where}: {actual!r} != {expected!r}"
    return None if expected == actual else f"{where}: {short(actual)} != {short(expected)}"
