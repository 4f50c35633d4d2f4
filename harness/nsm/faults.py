"""Fault injection for the emulated NSM: errors, delays, tampered and expired documents.

docs/nsm.md#fault-injection: faults apply per request type (a wire name or ``"*"``), optionally
to the next N requests only; tests set them while the device thread serves the guest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from harness.nsm.codec import REQUEST_NAMES
from harness.nsm.messages import NsmErrorCode


@dataclass
class Fault:
    """One injected fault: an ``error`` answer, a ``delay_s`` before answering, a ``tamper`` of
    a document part (``"payload"``, ``"signature"`` or ``"certificate"``) or an ``expired``
    signing leaf; ``remaining`` requests it still applies to (None: every request)."""

    error: NsmErrorCode | None = None
    delay_s: float = 0.0
    tamper: str | None = None  # "payload" | "signature" | "certificate"
    expired: bool = False
    remaining: int | None = None  # None = every request


class NsmFaults:
    """Per-request-type faults the NSM applies before (error, delay) or after (tampered or
    expired document) handling a request. Request types are wire names (``"Attestation"``,
    ``"GetRandom"``, ...) or ``"*"`` for every type. ``count`` limits a fault to the next N
    matching requests. Thread-safe: tests set faults while the device thread serves the guest.

    Example: ``faults.fail("Attestation", NsmErrorCode.InternalError, count=1)``;
    ``faults.delay("GetRandom", 0.5)``; ``faults.tamper("signature")``; ``faults.expire()``.
    """

    def __init__(self) -> None:
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()

    def _add(self, request_type: str, fault: Fault) -> None:
        if request_type != "*" and request_type not in REQUEST_NAMES:
            raise ValueError(f"unknown NSM request type {request_type!r}")
        with self._lock:
            self._faults.setdefault(request_type, []).append(fault)

    def fail(self, request_type: str, error: NsmErrorCode | str, *, count: int | None = None) -> None:
        """Answer ``request_type`` with ``{"Error": error}``."""
        self._add(request_type, Fault(error=NsmErrorCode(error), remaining=count))

    def delay(self, request_type: str, seconds: float, *, count: int | None = None) -> None:
        """Hold the response to ``request_type`` for ``seconds`` (the NSM is synchronous, so the
        guest's ioctl blocks for that long)."""
        self._add(request_type, Fault(delay_s=float(seconds), remaining=count))

    def tamper(self, part: str = "signature", *, count: int | None = None) -> None:
        """Change one byte of the next Attestation documents' ``part`` (``payload``,
        ``signature`` or ``certificate``; see :func:`harness.attestation.tamper_document`)."""
        if part not in ("payload", "signature", "certificate"):
            raise ValueError(f"unknown document part {part!r}")
        self._add("Attestation", Fault(tamper=part, remaining=count))

    def expire(self, *, count: int | None = None) -> None:
        """Sign the next Attestation documents with a fresh leaf that expired a minute ago
        (timestamp 3 h 1 min in the past): valid at their own timestamp, ``certificate-expired``
        now, like a stale document replayed."""
        self._add("Attestation", Fault(expired=True, remaining=count))

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def take(self, request_type: str) -> list[Fault]:
        """Return the faults that apply to one request of ``request_type`` and use them up."""
        out: list[Fault] = []
        with self._lock:
            for key in (request_type, "*"):
                kept = []
                for fault in self._faults.get(key, []):
                    out.append(fault)
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    if fault.remaining is None or fault.remaining > 0:
                        kept.append(fault)
                if key in self._faults:
                    self._faults[key] = kept
        return out
