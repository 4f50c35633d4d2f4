"""Tracing the emulated NSM: one event per handled request, written as JSON lines.

docs/nsm.md#tracing: an enclave writes the events to ``nsm.trace`` in its state folder, kept
with the artifacts of a failed test.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.nsm.messages import (
    Attestation,
    DescribePCR,
    ExtendPCR,
    LockPCR,
    LockPCRs,
    NsmErrorCode,
    Request,
    Response,
)


@dataclass(frozen=True)
class NsmTraceEvent:
    """One handled request: the wire name (``"?"`` when undecodable), decoded request and
    response objects, the error code if any, and the handling time in seconds."""

    request_type: str
    request: Request | None
    response: Response
    error: NsmErrorCode | None
    duration_s: float
    request_size: int
    response_size: int

    def to_json(self) -> dict[str, Any]:
        """The JSON object :func:`trace_writer` writes for this event."""
        return _event_json(self)


def _event_json(event: NsmTraceEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": time.time(),
        "request": event.request_type,
        "error": event.error.value if event.error else None,
        "ms": round(event.duration_s * 1000, 3),
        "request_bytes": event.request_size,
        "response_bytes": event.response_size,
    }
    req = event.request
    if isinstance(req, (DescribePCR, ExtendPCR, LockPCR)):
        out["index"] = req.index
    elif isinstance(req, LockPCRs):
        out["range"] = req.range
    elif isinstance(req, Attestation):
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(req, name)
            out[name] = None if value is None else len(value)
    return out


def trace_writer(path: str | os.PathLike[str]) -> Callable[[NsmTraceEvent], None]:
    """Return a ``trace`` callable for :class:`harness.nsm.Nsm` that appends one JSON line per
    request to ``path`` (time, request type, error name or null, handling ms, sizes, PCR index or
    Attestation field lengths). Thread-safe; the file is opened per line so it can be read
    while the enclave runs. I/O errors are swallowed (a trace never breaks the device)."""
    lock = threading.Lock()

    def write(event: NsmTraceEvent) -> None:
        line = json.dumps(_event_json(event), separators=(",", ":")) + "\n"
        with lock:
            try:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(line)
            except OSError:
                pass

    return write
