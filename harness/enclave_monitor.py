"""Watching a running enclave for its end, and saying why it ended.

docs/boot.md#enclave-end: an enclave does not restart; when its application exits, init reboots
and the VM (QEMU with ``-no-reboot``) exits, which ends the enclave. A device back end that fails
ends it too: the guest could no longer reach the parent or its NSM.
"""

from __future__ import annotations

import re
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


# What the console says about an end, the most telling first (docs/boot.md#enclave-end): the
# kernel's panic line, the harness init's fatal error (a failed exec comes before the exit
# status 127 it causes), the application's exit as the harness's and AWS's init report it.
_CONSOLE_EVIDENCE = (
    (r"Kernel panic - not syncing: ([^\r\n]*)", "the kernel panicked: {0}"),
    (r"nitro-init: fatal: ([^\r\n]*?)(?: \(t=[0-9.]+s\))?\r?$", "init failed: {0}"),
    (r"nitro-init: application exited with status (\d+)",
     "the application exited with status {0}, and init rebooted the VM"),
    (r"nitro-init: application killed by signal (\d+)",
     "the application was killed by signal {0}, and init rebooted the VM"),
    (r"^(child exited (?:with error|by signal))", "the application ended ({0}), and init "
     "rebooted the VM"),
)


def _console_evidence(console_text: str) -> str | None:
    """Why the VM ended, in words, from the most telling console line, or None."""
    for pattern, words in _CONSOLE_EVIDENCE:
        found = list(re.finditer(pattern, console_text, re.M))
        if found:
            return words.format(found[-1].group(1).strip())
    return None


def end_reason(machine: Any, status: int | None, failed: list[str], console_text: str = "") -> str:
    """The one-line reason for an end :func:`wait_for_end` saw: a back end failure when QEMU
    still runs; for a VM exit, what the console says (a kernel panic, init's fatal error, the
    application's exit status) when it says it, else a clean exit (status 0: the application
    ended and init rebooted) or QEMU's status and the last lines of its stderr."""
    if status is None:
        return f"a device back end failed: {failed[0]}"
    said = _console_evidence(console_text)
    if status == 0:
        return said or "the enclave's VM exited (the application ended and init rebooted)"
    reason = f"QEMU ended with status {status}; {machine.stderr_excerpt()}"
    return f"{said}; {reason}" if said else reason
