"""Watching a running enclave for its end, and saying why it ended.

docs/boot.md#enclave-end: an enclave does not restart; when its application exits, init reboots
and the VM (QEMU with ``-no-reboot``) exits, which ends the enclave. A device back end that fails
ends it too: the guest could no longer reach the parent or its NSM.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["wait_for_end", "end_reason"]


def wait_for_end(
    machine: Any, backends: Sequence[Any], stopped: Callable[[], bool]
) -> tuple[int | None, list[str]] | None:
    """Poll ``machine`` (:class:`harness.machine.QemuMachine`) and ``backends`` every 0.2 s until
    QEMU exits or a back end has ``error`` set; return ``(QEMU status or None, back-end errors)``.
    Returns None once ``stopped()`` is true (the enclave is being terminated). Never raises."""
    while not stopped():
        status = machine.wait(0.2)
        failed = [b.error for b in backends if getattr(b, "error", None)]
        if status is not None or failed:
            return status, failed
    return None


def end_reason(machine: Any, status: int | None, failed: list[str]) -> str:
    """The one-line reason for an end :func:`wait_for_end` saw: a back end failure when QEMU
    still runs, a clean VM exit (status 0: the application ended), else QEMU's status and the
    last lines of its stderr."""
    if status is None:
        return f"a device back end failed: {failed[0]}"
    if status == 0:
        return "the enclave's VM exited (the application ended and init rebooted)"
    return f"QEMU ended with status {status}; {machine.stderr_excerpt()}"
