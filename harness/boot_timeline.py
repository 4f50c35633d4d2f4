"""An enclave's boot timeline: what the harness did and what the guest printed, on one clock.

docs/boot.md#boot-timeline. :class:`harness.enclave.Enclave` marks each host step of its start
(EIF measured, sections extracted, back ends started, QEMU spawned, QMP ready, vCPUs pinned,
resumed, heartbeat) in seconds since the start began (``time.monotonic()``), adds the guest's
milestones from the console (:mod:`harness.console_timestamps`: the first kernel line, ``Run
/init``, each init step up to the heartbeat, each with the guest's own clock and the host time its
line arrived), and writes ``boot-timeline.json`` with the other artifacts, on success and on a
failed boot alike. ``run-enclave --verbose`` prints it, and a failed boot (E36) or scenario
shows its last phases.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from harness.console_timestamps import GuestEvent, LineClock

__all__ = ["FORMAT", "FILE_NAME", "HOST_PHASES", "GUEST_PHASES", "Phase", "BootTimeline",
           "format_phases", "load_phases"]

#: The ``format`` field of boot-timeline.json; changes when the shape does.
FORMAT = "nitro-harness boot timeline 1"
#: Its name in the state and artifacts folders.
FILE_NAME = "boot-timeline.json"

#: Host phases, in the order a boot passes them, with their labels.
HOST_PHASES = {
    "eif_measured": "EIF read, CRC-checked and measured",
    "resources_reserved": "CPUs, memory budget, CID and slot reserved",
    "sections_extracted": "kernel and initrd extracted from the EIF (or found in the cache)",
    "kernel_read": "kernel payload read, machine layout chosen",
    "preflight_checked": "preflight checks done",
    "vsock_started": "vsock back end listening (heartbeat listener bound)",
    "nsm_started": "NSM back end listening",
    "guest_ram_ready": "guest RAM allocated on the enclave's CPUs (memfd filled)",
    "qemu_spawned": "QEMU process started (paused)",
    "console_connected": "QEMU connected the serial console",
    "qmp_socket": "QMP socket bound (QEMU read its options)",
    "vsock_connected": "QEMU connected the vsock back end's socket",
    "nsm_connected": "QEMU connected the NSM back end's socket",
    "vsock_handshake": "vsock device realized, vhost-user handshake began (guest memory "
                       "already mapped and preallocated)",
    "nsm_handshake": "NSM device realized, vhost-user handshake began",
    "qmp_ready": "QMP answered: QEMU's main loop runs (machine built)",
    "vcpus_pinned": "vCPU threads pinned to the enclave CPUs",
    "resumed": "guest resumed",
    "vsock_driver_ready": "guest's vsock driver started the device (every ring up)",
    "nsm_driver_ready": "guest's NSM driver started the device (every ring up)",
    "heartbeat": "heartbeat received",
    "failed": "boot failed",
}

#: Guest phases (:mod:`harness.console_timestamps`), with their labels; init's steps are labelled
#: with their own text.
GUEST_PHASES = {
    "console_first_byte": "first console byte",
    "decompressed": "kernel decompressed",
    "kernel_started": "first kernel line (decompression done)",
    "console_enabled": "kernel console enabled (earlier lines flushed)",
    "initramfs_unpacking": "unpacking the initramfs",
    "initramfs_unpacked": "initramfs unpacked",
    "run_init": "Run /init",
    "kernel_panic": "kernel panic",
    "init_step": "init",
    "init_heartbeat": "init",
    "init_fatal": "init",
}


@dataclass(frozen=True)
class Phase:
    """One entry of the timeline: ``side`` ``"host"`` or ``"guest"``, ``name`` (a key of
    :data:`HOST_PHASES` or :data:`GUEST_PHASES`), ``label`` (one line), ``host_s`` seconds since
    the start began (None for a guest line whose arrival was not timed), ``guest_s`` the guest's
    own clock (guest phases with a timestamp, else None)."""

    side: str
    name: str
    label: str
    host_s: float | None
    guest_s: float | None = None


class BootTimeline:
    """The timeline of one boot, begun when it is created (``origin``, ``time.monotonic()``).

    :meth:`mark` records a host phase now, :meth:`set_observed` the host phases seen elsewhere
    (the device back ends), :meth:`add_console` the guest's phases, :meth:`finish` the outcome;
    :meth:`to_json` and :meth:`write` give boot-timeline.json (docs/boot.md#boot-timeline). The
    last two replace what an earlier call gave, so the timeline can be completed later (init
    prints its heartbeat line after the heartbeat arrived).
    """

    def __init__(self, eif: str = "") -> None:
        self.origin = time.monotonic()
        self.started_at = time.time()
        self.eif = eif
        self.host: list[Phase] = []
        self.observed: list[Phase] = []
        self.guest: list[Phase] = []
        self.outcome = "booting"
        self.error: str | None = None
        self.console_bytes = 0

    def mark(self, name: str) -> None:
        """Record host phase ``name`` (a key of :data:`HOST_PHASES`) as happening now."""
        self.host.append(self._host_phase(name, time.monotonic()))

    def set_observed(self, phases: Iterable[tuple[str, float]]) -> None:
        """Replace the host phases observed outside the start's own steps: ``(name, when)`` with
        ``when`` in ``time.monotonic()`` seconds (the back ends' milestones:
        :meth:`harness.enclave_devices.EnclaveDevices.milestones`)."""
        self.observed = [self._host_phase(name, when) for name, when in phases]

    def _host_phase(self, name: str, when: float) -> Phase:
        return Phase("host", name, HOST_PHASES[name], round(when - self.origin, 6))

    def add_console(self, events: Iterable[GuestEvent], clock: LineClock | None) -> None:
        """Replace the guest phases with ``events`` (:func:`harness.console_timestamps.parse_console`)
        and the first console byte ``clock`` saw."""
        self.guest = []
        if clock is not None:
            self.console_bytes = clock.size
            if clock.first_byte_at is not None:
                self.guest.append(Phase("guest", "console_first_byte",
                                        GUEST_PHASES["console_first_byte"],
                                        round(clock.first_byte_at - self.origin, 6)))
        for e in events:
            label = f"init: {e.text}" if e.name.startswith("init_") else GUEST_PHASES[e.name]
            host_s = round(e.arrived - self.origin, 6) if e.arrived is not None else None
            self.guest.append(Phase("guest", e.name, label, host_s, e.guest_s))

    def finish(self, error: str | None = None) -> None:
        """Record the outcome: ``"heartbeat"`` when ``error`` is None, else ``"failed"`` with
        ``error`` (its one-line reason) and a ``failed`` host phase now. Only the first call
        counts."""
        if self.outcome != "booting":
            return
        if error is None:
            self.outcome = "heartbeat"
        else:
            self.outcome, self.error = "failed", error
            self.mark("failed")

    @property
    def heartbeat_s(self) -> float | None:
        """Seconds from the start to the heartbeat, or None without one."""
        return next((p.host_s for p in self.host if p.name == "heartbeat"), None)

    def phases(self) -> list[Phase]:
        """Every phase by host time (guest phases without one after the rest), host phases first
        among equal times, each side keeping its own order."""
        timed = sorted(self.host + self.observed + [p for p in self.guest if p.host_s is not None],
                       key=lambda p: p.host_s)
        return timed + [p for p in self.guest if p.host_s is None]

    def to_json(self) -> dict[str, Any]:
        """The boot-timeline.json object (docs/boot.md#boot-timeline)."""
        return {
            "format": FORMAT,
            "eif": self.eif,
            "started_at": datetime.fromtimestamp(self.started_at, timezone.utc)
                                  .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "outcome": self.outcome,
            "error": self.error,
            "heartbeat_s": self.heartbeat_s,
            "console_bytes": self.console_bytes,
            "phases": [asdict(p) for p in self.phases()],
        }

    def write(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` (indented JSON). Raises OSError when it cannot."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def lines(self, last: int | None = None) -> list[str]:
        """The phases as text, one line each (:func:`format_phases`); only the ``last`` ones
        when given."""
        return format_phases(self.phases(), last)


def format_phases(phases: list[Phase], last: int | None = None) -> list[str]:
    """One line per phase: host seconds, side, the guest's clock in brackets, the label; e.g.
    ``   2.310 s  guest [  1.420] init: heartbeat: sent 0xB7 ...``. With ``last`` only the last
    ones."""
    chosen = phases[-last:] if last else phases
    out = []
    for p in chosen:
        host = f"{p.host_s:8.3f} s" if p.host_s is not None else "       ? s"
        guest = f"[{p.guest_s:7.3f}] " if p.guest_s is not None else ""
        out.append(f"{host}  {p.side:<5} {guest}{p.label}")
    return out


def load_phases(path: Path) -> list[Phase]:
    """The phases of a boot-timeline.json at ``path``. Raises OSError when it cannot be read,
    ValueError when it is not such a file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT!r} file")
    try:
        return [Phase(str(p["side"]), str(p["name"]), str(p["label"]), p["host_s"], p["guest_s"])
                for p in data["phases"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed phase: {err}") from None
