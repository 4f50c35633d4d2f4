"""Starting the enclaves of one test or scenario, and the enclave interface their users see.

:class:`EnclaveFactory` starts enclaves (``harness.enclave.Enclave``) with an artifacts folder
each and terminates every one of them at :meth:`EnclaveFactory.close`, checking that no QEMU
process survives. The pytest plugin's ``enclave_factory`` fixture and the scenario runner
(:mod:`harness.scenario`) both use it. :class:`RunningEnclave` is what a started enclave offers
them (a ``typing.Protocol``: the engine's ``Enclave`` satisfies it, and so can a test's stand-in).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import ErrorCode, NitroError

if TYPE_CHECKING:
    from harness.console import ConsoleMatch, ConsoleWatch, ExecResult
    from harness.enclave import EnclaveConfig
    from harness.nsm import Nsm
    from harness.pcr import Measurements
    from harness.vsock import VsockDevice

#: Default enclave settings of a scenario and of the pytest fixtures: the hello image's shape.
DEFAULT_ENCLAVE: dict[str, Any] = {"cpu_count": 2, "memory_mib": 512, "debug_mode": True}


# --------------------------------------------------------------------------------------------
# The interface of a running enclave


class EnclaveConsole(Protocol):
    """An enclave's serial console as :class:`harness.console.Console` offers it. Positions are
    absolute: characters since the console started, carriage returns not counted."""

    @property
    def position(self) -> int:
        """The position after the newest character (what the next expectation from now reads)."""
        ...

    def text(self) -> str:
        """The text kept in memory: the newest characters (carriage returns dropped)."""
        ...

    def write(self, data: bytes) -> None:
        """Send bytes to the guest's serial input."""
        ...

    def expect(self, pattern: str, *, timeout: float, fail_pattern: str | None = ...,
               count: int = ..., start: int = ...) -> ConsoleMatch:
        """Wait for ``pattern`` ``count`` times from position ``start``; raises ``ConsoleError``."""
        ...

    def watch(self, pattern: str, start: int = ...) -> ConsoleWatch:
        """Watch for ``pattern`` from position ``start`` on (polled, never waits)."""
        ...


class ParentListener(Protocol):
    """A parent vsock port (CID 3) the guest connects to (:class:`harness.vsock.VsockListener`)."""

    def accept(self, timeout: float | None = ...) -> socket.socket:
        """The next guest connection; TimeoutError when none comes within ``timeout`` s."""
        ...

    def close(self) -> None:
        """Stop listening (idempotent)."""
        ...


class RunningEnclave(Protocol):
    """What a started enclave offers a scenario step or a test (``harness.enclave.Enclave``).

    Read-only properties so that plain attributes and properties both satisfy it. Optional
    extras some steps read when present (``getattr``): ``nsm_status`` (why there is no NSM),
    ``state_dir`` (the runtime folder terminate must remove), ``machine`` (None once QEMU is
    gone) and ``_backends`` (the device threads isolation checks place).
    """

    @property
    def enclave_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def cid(self) -> int: ...
    @property
    def debug_mode(self) -> bool: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def cpu_ids(self) -> list[int]: ...
    @property
    def state(self) -> str: ...
    @property
    def running(self) -> bool: ...
    @property
    def qemu_pid(self) -> int | None: ...
    @property
    def qemu_cmdline(self) -> list[str]: ...
    @property
    def vcpu_thread_ids(self) -> list[int]: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def measurements(self) -> Measurements | None: ...
    @property
    def nsm(self) -> Nsm | None: ...
    @property
    def config(self) -> EnclaveConfig | None: ...
    @property
    def console(self) -> EnclaveConsole: ...
    @property
    def vsock(self) -> VsockDevice: ...

    def exec(self, command: str, *, timeout: float) -> ExecResult:
        """Run a shell command over the console of a debug-mode enclave."""
        ...

    def vsock_connect(self, port: int, timeout: float = ...) -> socket.socket:
        """Connect from the parent to the guest's ``port``: ConnectionRefusedError on RST,
        TimeoutError when the guest does not answer within ``timeout`` s (docs/vsock.md)."""
        ...

    def vsock_listen(self, port: int) -> ParentListener:
        """Listen on the parent's vsock ``port``."""
        ...

    def describe(self) -> dict[str, Any]:
        """The enclave's describe-enclaves entry (docs/nitro-cli.md)."""
        ...

    def wait(self, timeout: float | None = ...) -> bool:
        """Wait up to ``timeout`` s for the enclave to end by itself; True once it has."""
        ...

    def terminate(self) -> None:
        """Terminate the enclave (idempotent)."""
        ...


# --------------------------------------------------------------------------------------------
# EIF paths and the factory


def resolve_eif(image: str | None = None, eif: str | Path | None = None,
                base: Path | Sequence[Path] | None = None) -> Path:
    """EIF path for a scenario's ``image`` (recipe, built and cached) or ``eif``.

    A relative ``eif`` is tried against each folder of ``base`` in order, first match wins
    (the pytest plugin passes the test file's folder, then pytest's rootdir; the scenario runner
    the scenario file's folder, then the rootdir or the current folder); without ``base``,
    against the current folder. Raises NitroError E19 naming every place tried when none
    exists, E03 (MissingArgument) when neither is given; recipe build errors propagate from
    ``harness.images.recipes.build_image`` (E48).
    """
    if eif is not None:
        given = Path(eif).expanduser()
        bases = [base] if isinstance(base, (str, Path)) else list(base or [])
        tried = [given] if given.is_absolute() or not bases else [
            Path(b) / given for b in dict.fromkeys(bases)]
        for path in tried:
            if path.exists():
                return path
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{eif}: EIF file not found (tried {', '.join(map(str, tried))})")
    if not image:
        raise NitroError(ErrorCode.MissingArgument, "no image or eif given")
    from harness.images.recipes import build_image

    return Path(build_image(image))


class EnclaveFactory:
    """Starts enclaves for one test or scenario and terminates every one of them at :meth:`close`.

    Each enclave gets an artifacts sub-folder (``<artifacts_dir>/<n>-<name>/``: console.log,
    qemu.cmdline, qemu.stderr and traces, kept by the engine; describe.json added here).
    ``cids`` yields CIDs for enclaves that do not ask for one (distinct ranges keep parallel
    pytest-xdist workers apart); ``qemu``/``accel`` are passed to ``Enclave.start``.
    ``start_hooks`` are called with each ``EnclaveConfig`` before its enclave starts, and
    ``vsock_hooks`` with each enclave's vsock device before its QEMU starts (a scenario's
    services: keys created before the first boot, vsock-proxies listening before the guest
    runs); what they raise fails that start.
    Used by the pytest plugin's ``enclave_factory`` fixture and by the scenario runner.
    """

    def __init__(self, artifacts_dir: Path, *, qemu: Path | str | None = None,
                 accel: str | None = None, cids: Iterator[int] | None = None):
        self.artifacts_dir = Path(artifacts_dir)
        self.qemu = Path(qemu) if qemu else None
        self.accel = accel
        self.cids = cids
        self.enclaves: list[RunningEnclave] = []
        self.start_hooks: list[Callable[[EnclaveConfig], None]] = []
        self.vsock_hooks: list[Callable[[Any], None]] = []
        self._count = 0

    def config(self, *, image: str | None = None, eif: str | Path | None = None,
               base: Path | Sequence[Path] | None = None, **settings: Any) -> EnclaveConfig:
        """Build an ``EnclaveConfig`` from scenario-style settings (snake_case keys).

        Fills a CID from ``cids`` and the :data:`DEFAULT_ENCLAVE` memory and CPU count (not
        with ``cpu_ids``); raises what :func:`resolve_eif` raises.
        """
        from harness.enclave import EnclaveConfig

        if settings.get("cid") is None and self.cids is not None:
            settings["cid"] = next(self.cids)
        if "cpu_ids" in settings:
            settings.pop("cpu_count", None)
        settings.setdefault("memory_mib", DEFAULT_ENCLAVE["memory_mib"])
        if "cpu_ids" not in settings:
            settings.setdefault("cpu_count", DEFAULT_ENCLAVE["cpu_count"])
        return EnclaveConfig(eif_path=resolve_eif(image, eif, base), **settings)

    def start(self, config: EnclaveConfig | None = None, **settings: Any) -> RunningEnclave:
        """Start an enclave (from an ``EnclaveConfig`` or from ``image=``/``eif=`` and settings).

        Returns the running ``harness.enclave.Enclave`` after its heartbeat; raises the
        engine's NitroError (having cleaned up) when it cannot start.
        """
        from harness.enclave import Enclave

        if config is None:
            config = self.config(**settings)
        for hook in self.start_hooks:
            hook(config)
        self._count += 1
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", config.name or Path(config.eif_path).stem)
        folder = self.artifacts_dir / f"{self._count}-{label}"
        hooks = list(self.vsock_hooks)
        enclave = Enclave.start(config, artifacts_dir=folder, accel=self.accel, qemu=self.qemu,
                                on_vsock=(lambda device: [hook(device) for hook in hooks]) if hooks else None)
        self.enclaves.append(enclave)
        with contextlib.suppress(Exception):
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / "describe.json").write_text(json.dumps(enclave.describe(), indent=2) + "\n")
        return enclave

    def close(self) -> list[str]:
        """Terminate every enclave started here (idempotent); return problems found, if any.

        Afterwards checks, as Firecracker's kill() does, that no QEMU process of ours survives.
        """
        problems = []
        for enclave in reversed(self.enclaves):
            try:
                enclave.terminate()
            except Exception as exc:  # keep terminating the others
                problems.append(f"terminate {getattr(enclave, 'enclave_id', '?')}: {exc}")
            pid = getattr(enclave, "qemu_pid", None)
            if pid and process_alive(pid):
                problems.append(f"QEMU process {pid} of {enclave.enclave_id} survived terminate")
        return problems


# --------------------------------------------------------------------------------------------
# Processes


def wait_dead(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to end; True if it is still alive afterwards."""
    end = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= end:
            return True
        time.sleep(0.1)
    return False


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (read from ``/proc/<pid>/status``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return not (state and state.group(1) in ("Z", "X"))
