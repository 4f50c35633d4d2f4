"""Recording one enclave's boot timeline on every path of its start (docs/boot.md#boot-timeline).

:func:`recorded` wraps :meth:`harness.enclave.Enclave.start`'s boot: when the block ends, with a
heartbeat or an error, it adds what the device back ends saw (QEMU connecting, the vhost-user
handshake, the guest's drivers starting the rings) and the guest's milestones from the console
(:mod:`harness.console_timestamps`) to ``enclave.timeline``
(:class:`harness.boot_timeline.BootTimeline`) and writes ``boot-timeline.json`` into the state
folder. A boot failure (E36) gets the timeline's last phases in its ``details``; any error raised
carries the timeline as ``boot_timeline``. :func:`keep_artifacts`, at terminate, completes the
file (init prints its heartbeat line after the heartbeat arrived) and keeps it with the other
artifacts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from harness import artifacts
from harness.boot_timeline import FILE_NAME, BootTimeline
from harness.console_timestamps import parse_console
from harness.errors import ErrorCode, NitroError

__all__ = ["recorded", "keep_artifacts", "LAST_PHASES"]

#: Phases a failed boot's error shows (the whole timeline is in the file).
LAST_PHASES = 12


@contextlib.contextmanager
def recorded(enclave: Any, devices: Any) -> Iterator[BootTimeline]:
    """Finish and write ``enclave.timeline`` when the block ends (``enclave``:
    :class:`harness.enclave.Enclave`, its ``state_dir`` set once the block has taken one;
    ``devices`` its :class:`harness.enclave_devices.EnclaveDevices`).

    On success the ``heartbeat`` phase is marked. On an exception the timeline's outcome is
    ``failed`` with the error's one-line reason, an E36 :class:`NitroError` gets the last
    :data:`LAST_PHASES` phases added to its ``details`` (naming the file kept in the artifacts
    folder, when there is one), and the exception gets the attribute ``boot_timeline``; the
    exception itself is re-raised unchanged. Writing the file is best effort (never raises).
    """
    timeline = enclave.timeline
    try:
        yield timeline
    except BaseException as err:
        with contextlib.suppress(Exception):  # the timeline must never hide the boot's error
            reason = err.message if isinstance(err, NitroError) else f"{type(err).__name__}: {err}"
            timeline.finish((reason or type(err).__name__).splitlines()[0])
            _complete(enclave, devices)
            err.boot_timeline = timeline  # type: ignore[attr-defined]
            if isinstance(err, NitroError) and err.code == ErrorCode.EnclaveBootFailure:
                kept = enclave.artifacts_dir / FILE_NAME if enclave.artifacts_dir else None
                where = f" (all of them: {kept})" if kept else ""
                err.details = "\n".join(x for x in (
                    err.details, f"boot timeline, last phases{where}:",
                    *timeline.lines(LAST_PHASES)) if x)
        raise
    timeline.mark("heartbeat")
    timeline.finish()
    with contextlib.suppress(Exception):
        _complete(enclave, devices)


def keep_artifacts(enclave: Any, devices: Any) -> None:
    """Complete and rewrite ``enclave``'s boot-timeline.json when it has one, then keep the
    artifacts (:func:`harness.artifacts.keep`). Raises OSError only as that does."""
    if enclave.timeline.outcome != "booting":
        with contextlib.suppress(Exception):
            _complete(enclave, devices)
    artifacts.keep(enclave.state_dir, enclave.artifacts_dir)


def _complete(enclave: Any, devices: Any) -> None:
    """Add the back ends' and the console's phases as they are now and write the file into the
    state folder (when there is one)."""
    timeline = enclave.timeline
    filled = getattr(enclave, "_guest_ram", None)
    filled = [("guest_ram_ready", filled.filled_at)] if filled and filled.filled_at else []
    timeline.set_observed(devices.milestones() + filled)
    if enclave.machine is not None:
        clock = enclave.machine.console.boot_clock.copy()
        timeline.add_console(parse_console(clock.head, clock), clock)
    if enclave.state_dir is not None and enclave.state_dir.is_dir():
        with contextlib.suppress(OSError):
            timeline.write(enclave.state_dir / FILE_NAME)
