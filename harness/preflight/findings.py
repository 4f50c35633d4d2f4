"""One preflight finding: severity, rule, what is wrong, what to change (docs/nitro-cli.md#check-eif).

Severities: ``error`` (the enclave would not boot, or not as on Nitro), ``warning`` (it may boot
but something is off), ``info`` (a consequence worth knowing). Each error carries the nitro-cli
code ``check-eif`` exits with when it is the first error: E35 EifParsingError for the file's
structure and CRC, E59 EIFSignatureCheckerError for a signature that does not check out, E26
InsufficientMemoryRequested for too little memory, E36 EnclaveBootFailure for everything that
would stop the boot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from harness.errors import ErrorCode

__all__ = ["Finding", "ERROR", "WARNING", "INFO", "error", "warning", "info", "first_error",
           "counts"]

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    """``severity`` (:data:`ERROR`, :data:`WARNING`, :data:`INFO`), ``rule`` (a short name such
    as ``cmd-relative``), ``message`` (what is wrong, naming the file or field), ``fix`` (what
    to change; may be empty) and ``code`` (the exit code of an error)."""

    severity: str
    rule: str
    message: str
    fix: str = ""
    code: ErrorCode | None = None

    def line(self) -> str:
        """The finding as one line: ``error cmd-relative: <message>; fix: <fix>``."""
        text = f"{self.severity} {self.rule}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text

    def to_json(self) -> dict:
        """``{"Severity", "Rule", "Message", "Fix"}``."""
        return {"Severity": self.severity, "Rule": self.rule, "Message": self.message,
                "Fix": self.fix}


def error(rule: str, message: str, fix: str = "",
          code: ErrorCode = ErrorCode.EnclaveBootFailure) -> Finding:
    """An error finding (default code E36: the enclave would not boot)."""
    return Finding(ERROR, rule, message, fix, code)


def warning(rule: str, message: str, fix: str = "") -> Finding:
    """A warning finding."""
    return Finding(WARNING, rule, message, fix)


def info(rule: str, message: str, fix: str = "") -> Finding:
    """An informational finding."""
    return Finding(INFO, rule, message, fix)


def first_error(findings: Iterable[Finding]) -> Finding | None:
    """The first error in check order (its code is check-eif's exit status), or None."""
    return next((f for f in findings if f.severity == ERROR), None)


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """How many findings of each severity: ``{"error": n, "warning": n, "info": n}``."""
    out = {ERROR: 0, WARNING: 0, INFO: 0}
    for f in findings:
        out[f.severity] += 1
    return out
