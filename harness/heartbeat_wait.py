"""Waiting for an enclave's heartbeat, as nitro-cli does, and saying why it never came.

docs/boot.md#heartbeat-wait: nitro-cli listens on vsock port 9000 before it starts the enclave and
waits ``90 s x ceil(EIF / 6 GiB) + 90 s x ceil(memory / 100 GiB)``. The harness fails at once,
rather than at the deadline, when QEMU exits, the console shows a panic or init's death, or a
device back end fails; the error is E36 with the console's last lines.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

from harness.console import DEFAULT_FAIL_PATTERN, tail
from harness.errors import ErrorCode, NitroError

__all__ = ["HEARTBEAT_PORT", "heartbeat_timeout", "wait_for_heartbeat"]

HEARTBEAT_PORT = 9000
# docs/boot.md#heartbeat-wait: nitro-cli waits 90 s per started 6 GiB of EIF plus 90 s per
# started 100 GiB of memory.
_HEARTBEAT_UNIT_S = 90


def heartbeat_timeout(eif_size: int, memory_mib: int) -> float:
    """nitro-cli's heartbeat wait in seconds (docs/boot.md#heartbeat-wait):
    90 x ceil(EIF/6 GiB) + 90 x ceil(mem/100 GiB)."""
    return float(
        _HEARTBEAT_UNIT_S * math.ceil(eif_size / (6 << 30))
        + _HEARTBEAT_UNIT_S * math.ceil(memory_mib / (100 * 1024))
    )


def wait_for_heartbeat(
    heartbeat: Any,
    machine: Any,
    backends: Sequence[Any],
    timeout: float,
    console_log: Path | None,
) -> float:
    """Wait for ``heartbeat`` (:class:`harness.vsock.HeartbeatListener`) while ``machine``
    (:class:`harness.machine.QemuMachine`) runs; return the seconds it took.

    Raises NitroError E36 (docs/nitro-cli.md#validation-rules) as soon as QEMU exits, the console
    matches :data:`harness.console.DEFAULT_FAIL_PATTERN`, one of ``backends`` has ``error`` set,
    or ``timeout`` seconds pass; the message names the reason and ``console_log`` (the full
    log's path), ``details`` holds the console's last 20 lines.
    """
    started = time.monotonic()
    deadline = started + timeout
    # Each poll searches only what the console printed since the previous one.
    failure = machine.console.watch(DEFAULT_FAIL_PATTERN)
    try:
        while True:
            if heartbeat.wait(0.2):
                return time.monotonic() - started
            reason = None
            status = machine.poll()
            if status is not None:
                reason = f"the enclave's VM exited (QEMU status {status}) before the heartbeat"
                if status != 0:
                    reason += f"; {machine.stderr_excerpt()}"
            else:
                bad = failure.poll()
                if bad:
                    reason = f"the console printed {bad.group(0)!r} before the heartbeat"
                for backend in backends:
                    if getattr(backend, "error", None):
                        reason = f"a device back end failed: {backend.error}"
                if reason is None and time.monotonic() > deadline:
                    reason = f"no heartbeat on vsock port {HEARTBEAT_PORT} within {timeout:g} s"
            if reason:
                raise NitroError(
                    ErrorCode.EnclaveBootFailure,
                    f"{reason} (full console log: {console_log})",
                    details="last console lines:\n" + tail(machine.console.text(), 20),
                )
    finally:
        failure.close()
