"""One enclave's whole life: checks, resources, IDs, CID, devices, boot, heartbeat, terminate.

The engine every front end drives (the CLI's supervising process, the pytest plugin, scenarios).
:meth:`Enclave.start` does what ``nitro-cli run-enclave`` does, in order: read and measure the EIF
(docs/eif-format.md, docs/pcrs.md#image-pcrs), apply the CPU and memory rules
(docs/nitro-cli.md#validation-rules), take a slot and a CID in the runtime directory, start the
vsock device (parent = CID 3, heartbeat listener on port 9000 bound before QEMU starts) and the NSM
over vhost-user, boot QEMU (:mod:`harness.machine`) and wait for the heartbeat with nitro-cli's
timeout. Any failure on the way releases everything already taken and raises
:class:`~harness.errors.NitroError` (E36 carries the console's last lines and the log path).
:meth:`Enclave.terminate` is idempotent and leaves no process, socket or memory file.

The class keeps the lifecycle and its order; the parts live beside it: the EIF check, QEMU choice
and machine in :mod:`harness.enclave_boot`, CPUs, memory, CID, slot and state folder in
:mod:`harness.enclave_resources`, the vsock and NSM back ends in :mod:`harness.enclave_devices`,
the heartbeat wait in :mod:`harness.heartbeat_wait`, the watch for the enclave's end in
:mod:`harness.enclave_monitor`, the kept files in :mod:`harness.artifacts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    artifacts, enclave_boot, enclave_monitor, enclave_resources, enclave_timeline, preflight,
    processes,
)
from harness.boot_timeline import BootTimeline
from harness.console import (
    DEFAULT_FAIL_PATTERN,
    ConsoleError,
    ConsoleFailure,
    ConsoleTimeout,
    ExecResult,
)
from harness.enclave_devices import EnclaveDevices
from harness.ended_enclaves import record_end
from harness.errors import ErrorCode, NitroError
from harness.guest_ram import GuestRam
from harness.heartbeat_wait import HEARTBEAT_PORT as HEARTBEAT_PORT  # importable from here, as before
from harness.heartbeat_wait import heartbeat_timeout, wait_for_heartbeat
from harness.layout import Layout, choose_layout
from harness.machine import QemuMachine
from harness.registry import EnclaveRecord, Registry

__all__ = [
    "DEFAULT_FAIL_PATTERN",
    "ConsoleError",
    "ConsoleFailure",
    "ConsoleTimeout",
    "Enclave",
    "EnclaveConfig",
    "ExecResult",
    "heartbeat_timeout",
]


def default_instance_id() -> str:
    """A stable parent instance ID for this host (``i-`` + 17 hex from /etc/machine-id)."""
    seed = b"nitro-harness"
    with contextlib.suppress(OSError):
        seed = Path("/etc/machine-id").read_bytes().strip()
    return "i-" + hashlib.sha256(seed).hexdigest()[:17]


@dataclass
class EnclaveConfig:
    """What to run and how (nitro-cli's run-enclave options plus the harness's own).

    ``memory_mib`` in MiB; exactly one of ``cpu_count``/``cpu_ids``; ``cid`` None or 0 = auto
    (from 16); ``parent_role_arn``/``instance_id`` feed PCR3/PCR4; ``nsm`` is ``"auto"`` (the
    harness NSM when QEMU can host it, else none), ``"harness"`` (required), ``"qemu"`` (QEMU's
    own unsigned virtio-nsm) or ``"none"``; ``cpu_mode`` see :mod:`harness.allocator`;
    ``heartbeat_timeout`` in seconds (None = nitro-cli's formula); ``layout`` the machine
    layout (``auto``, ``nitro``, ``acpi``; see :mod:`harness.layout`).
    """

    eif_path: Path
    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: list[int] | None = None
    cid: int | None = None
    debug_mode: bool = False
    name: str | None = None
    parent_role_arn: str | None = None
    instance_id: str | None = None
    nsm: str = "auto"
    cpu_mode: str = "auto"
    heartbeat_timeout: float | None = None
    pki_dir: Path | None = None
    hugepages: bool | None = None
    layout: str = "auto"
    extra_qemu_args: list[str] = field(default_factory=list)


class Enclave:
    """A running enclave. Create with :meth:`start`; use as a context manager to terminate.

    Attributes after start: ``enclave_id``, ``name``, ``cid``, ``cpu_ids``, ``vcpu_cpus``,
    ``cpu_mode``, ``memory_mib``, ``debug_mode``, ``measurements`` (:class:`harness.pcr.Measurements`),
    ``console`` (:class:`harness.console.Console`), ``vsock`` (the vsock device's parent side),
    ``nsm`` (:class:`harness.nsm.Nsm` or None, with ``nsm_status`` saying why), ``state``
    (``RUNNING``, ``TERMINATING``, ``EMPTY``), ``state_dir``, ``artifacts_dir``, ``layout``
    (:class:`harness.layout.Layout`), ``preflight`` (the findings of :mod:`harness.preflight`),
    ``timeline`` (:class:`harness.boot_timeline.BootTimeline`), ``end_reason`` once it ended.
    """

    def __init__(self, config: EnclaveConfig, *, artifacts_dir: Path | None = None,
                 accel: str | None = None, qemu: Path | None = None,
                 registry: Registry | None = None, control_socket: str | None = None,
                 on_vsock: Callable[[Any], None] | None = None):
        self.config = config
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self._accel = accel
        self._qemu = Path(qemu) if qemu else None
        self.registry = registry or Registry()
        self.control_socket = control_socket
        self.state = "EMPTY"
        self.slot: int | None = None
        self.enclave_id = ""
        self.name = config.name or Path(config.eif_path).name.removesuffix(".eif")
        self.cid = 0
        self.vcpu_cpus: tuple[int, ...] = ()
        self.cpu_mode = "strict"
        self.memory_mib = config.memory_mib
        self.debug_mode = config.debug_mode
        self.measurements: Any = None
        self.instance_id = config.instance_id or default_instance_id()
        self.state_dir: Path | None = None
        self.machine: QemuMachine | None = None
        self.accel = ""
        self.accel_reason = ""
        self.layout: Layout | None = None
        self.heartbeat_seconds: float | None = None
        self.end_reason: str | None = None
        self.timeline = BootTimeline(str(config.eif_path))
        self.preflight: list[preflight.Finding] = []
        self._ended_by_itself = False
        self._monitor: threading.Thread | None = None
        self._devices = EnclaveDevices(on_vsock)  # on_vsock: see EnclaveDevices
        self._lock = threading.Lock()
        self._terminated = False
        self._released = threading.Event()
        self._guest_ram: GuestRam | None = None

    # ----------------------------------------------------------------------------------------
    # start

    @classmethod
    def start(cls, config: EnclaveConfig, **kwargs: Any) -> "Enclave":
        """Boot an enclave and return once its heartbeat arrived.

        Raises NitroError: E19 missing EIF, E35 bad EIF, E01/E02/E20/E21/E22 CPU rules, E26/E27
        memory rules, E03 bad CID, E36 boot failure (console tail in ``details``)
        (docs/nitro-cli.md#validation-rules). Everything taken before the failure is released
        first, and the first error is the one raised.
        """
        enclave = cls(config, **kwargs)
        try:
            enclave._start()
        except BaseException as first:
            # The first error is the one reported: a clean-up failure after it (a back end that
            # would not stop) is added to its details, never put in its place.
            try:
                enclave.terminate()
            except Exception as cleanup:
                if isinstance(first, NitroError):
                    first.details = "\n".join(
                        x for x in (first.details, f"while releasing: {cleanup}") if x)
            raise
        return enclave

    def _start(self) -> None:
        cfg, mark = self.config, self.timeline.mark  # docs/boot.md#boot-timeline
        eif_path = Path(cfg.eif_path)
        with enclave_timeline.recorded(self, self._devices):
            # One streaming pass validates the layout and CRC and measures, before anything is taken.
            self.measurements, eif_size = enclave_boot.check_eif(eif_path)
            mark("eif_measured")
            with enclave_resources.reserve(self.registry, cfg, eif_size=eif_size) as taken:
                self.cid, self.slot = taken.cid, taken.slot
                self.vcpu_cpus, self.cpu_mode = taken.cpus.vcpu_cpus, taken.cpus.mode
                # docs/nitro-cli.md#enclave-ids: <instance id>-enc<slot in lower-case hex> (16
                # digits, as in module_id).
                self.enclave_id = f"{self.instance_id}-enc{self.slot:016x}"
                self.state_dir = taken.state_dir
                enclave_resources.make_state_dir(self.state_dir)
                self.state = "STARTING"
                self._write_record()  # under the lock: the record keeps other starts off these
            mark("resources_reserved")
            hugepage_kib = enclave_resources.hugepage_size_kib(cfg.memory_mib, cfg.hugepages,
                                                               taken.alloc_cfg)
            self._guest_ram = GuestRam.unless_hugepages(cfg.memory_mib, hugepage_kib, taken.cpus)
            boot = enclave_boot.boot_files(eif_path, self.measurements, self.state_dir)
            mark("sections_extracted")
            qemu = enclave_boot.choose_qemu(self._qemu, self._accel, boot.arch)
            self.accel, self.accel_reason = qemu.accel, qemu.accel_reason
            kernel = enclave_boot.boot_kernel(boot.kernel)  # for the layout and preflight
            enclave_boot.check_kernel_arch(eif_path, kernel, boot.arch)
            self.layout = choose_layout(kernel, cfg.layout, boot.arch)
            mark("kernel_read")
            self.preflight = enclave_boot.preflight(eif_path, cfg, kernel, self.measurements,
                                                    self.state_dir)
            mark("preflight_checked")
            self._devices.start_vsock(self.state_dir, self.cid)
            mark("vsock_started")
            nsm_mode, nsm_socket = self._devices.start_nsm(
                cfg.nsm, qemu.info, self.state_dir, measurements=self.measurements,
                module_id=self.enclave_id, debug_mode=self.debug_mode,
                parent_role_arn=cfg.parent_role_arn, instance_id=self.instance_id, pki_dir=cfg.pki_dir,
            )
            mark("nsm_started")
            memory_fd = self._guest_ram.fd if self._guest_ram else None
            spec = enclave_boot.machine_spec(
                cfg, qemu=qemu, boot=boot, cpus=taken.cpus, state_dir=self.state_dir,
                acpi=self.layout.acpi, nsm=nsm_mode, nsm_socket=nsm_socket,
                hugepage_size_kib=hugepage_kib, memory_fd=memory_fd,
            )
            self.machine = QemuMachine(spec)  # kept before launch: a half-started QEMU is shut down
            enclave_boot.launch(self.machine, mark, self._guest_ram)
            self._write_record()  # QEMU's PID and start time, before the wait: reclaim may end it
            self._devices.place_threads(self.machine.console.native_id, taken.cpus.others)
            with enclave_boot.explained_by(self.preflight):  # no heartbeat: the preflight may say why
                self.heartbeat_seconds = wait_for_heartbeat(
                    self._devices.heartbeat, self.machine, self._devices.backends,
                    cfg.heartbeat_timeout or heartbeat_timeout(eif_size, cfg.memory_mib),
                    artifacts.kept_console_log(self.artifacts_dir) or self.state_dir / "console.log",
                )
        self.state = "RUNNING"
        self._write_record()
        self._monitor = threading.Thread(target=self._watch, name="enclave-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        """End the enclave when its VM exits or a device back end fails (docs/boot.md#enclave-end),
        recording why in ``end_reason``; a parent's terminate that came first keeps its reason."""
        assert self.machine is not None
        ended = enclave_monitor.wait_for_end(
            self.machine, self._devices.backends, lambda: self._terminated)
        if ended is None:
            return
        with self._lock:
            if self._terminated:  # the parent terminated it: its reason stands
                return
            self.end_reason = enclave_monitor.end_reason(self.machine, *ended,
                                                         self.machine.console.text())
            self._ended_by_itself = True
        try:
            self.terminate()
        except NitroError as err:  # released; a stuck thread is recorded, not thrown away
            self.end_reason += f" ({err.message})"

    def _write_record(self) -> None:
        self.registry.put(self._record())

    # ----------------------------------------------------------------------------------------
    # while running

    @property
    def vsock(self) -> Any:
        """The vsock device's parent side (:class:`harness.vsock.VsockDevice`), None before start."""
        return self._devices.vsock

    @property
    def nsm(self) -> Any:
        """The harness NSM (:class:`harness.nsm.Nsm`), or None (``nsm_status`` says why)."""
        return self._devices.nsm

    @property
    def nsm_status(self) -> str:
        """Which NSM the enclave has, or why it has none (one line)."""
        return self._devices.nsm_status

    @property
    def cpu_ids(self) -> list[int]:
        """Host CPUs of the vCPUs, one per vCPU (a CPU repeats only in shared CPU mode)."""
        return list(self.vcpu_cpus)

    @property
    def console(self):
        """The serial console (:class:`harness.console.Console`)."""
        if self.machine is None:
            raise NitroError(ErrorCode.EnclaveConsoleConnectionFailure, "the enclave never started")
        return self.machine.console

    @property
    def qemu_pid(self) -> int | None:
        return self.machine.pid if self.machine else None

    @property
    def qemu_cmdline(self) -> list[str]:
        return list(self.machine.command) if self.machine else []

    @property
    def vcpu_thread_ids(self) -> list[int]:
        return list(self.machine.vcpu_thread_ids) if self.machine else []

    def exec(self, command: str, *, timeout: float = 60.0) -> ExecResult:
        """Run a shell command over the console of a debug-mode enclave (see Console.exec).

        Raises NitroError E44 when the enclave is not in debug mode (no console then:
        docs/nitro-cli.md#console).
        """
        if not self.debug_mode:
            raise NitroError(
                ErrorCode.EnclaveConsoleConnectionFailure,
                f"enclave {self.enclave_id} is not in debug mode: it has no console",
            )
        return self.console.exec(command, timeout=timeout)

    def vsock_connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """Connect from the parent (CID 3) to the enclave's vsock ``port``; a real socket."""
        return self.vsock.connect(port, timeout)

    def vsock_listen(self, port: int):
        """Listen on the parent's vsock ``port`` for the enclave to connect to (CID 3)."""
        return self.vsock.listen(port)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for the enclave to end by itself; True once it has."""
        return self.machine is None or self.machine.wait(timeout) is not None

    def wait_released(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until everything is released (by :meth:`terminate`, or by
        the monitor once the enclave ended by itself, with its end reason recorded)."""
        return self._released.wait(timeout)

    @property
    def running(self) -> bool:
        """True while QEMU runs."""
        return self.machine is not None and self.machine.poll() is None and not self._terminated

    def _record(self) -> EnclaveRecord:
        return enclave_record(self)

    def describe(self) -> dict:
        """This enclave as one entry of nitro-cli's describe-enclaves output
        (docs/nitro-cli.md#describe-enclaves)."""
        return self._record().describe()

    def run_info(self) -> dict:
        """nitro-cli's run-enclave output (docs/nitro-cli.md#run-enclave): the describe fields up to
        MemoryMiB."""
        keys = ("EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB")
        info = self.describe()
        return {k: info[k] for k in keys}

    # ----------------------------------------------------------------------------------------
    # end

    def terminate(self) -> None:
        """Stop the VM and release everything (idempotent, safe from several threads and on any
        path, KeyboardInterrupt included; docs/architecture.md#errors).

        Order: QEMU, the device back ends, the vsock device and its trace, for an enclave of
        run-enclave's (a control socket) that ended by itself its ended record
        (:mod:`harness.ended_enclaves`), the kept artifacts (console log, QEMU command line and
        stderr, traces, preflight; into ``artifacts_dir`` when one was given), the state folder (sockets, extracted kernel and initrd), the registry record.
        A second caller waits (up to 60 s) for the first to finish. Raises NitroError E00 when
        a back end's thread would not stop, after everything else was released.
        """
        with self._lock:
            if self._terminated:
                # Another thread is releasing (or released) everything: wait until it is done.
                self._released.wait(60)
                return
            self._terminated = True
            if self.end_reason is None and self.state == "RUNNING":
                self.end_reason = "terminated by the parent"
            if self.state == "RUNNING":
                self.state = "TERMINATING"
                with contextlib.suppress(Exception):
                    self._write_record()
        stuck = _stop_and_release(self)
        if stuck:
            # Everything is released, but a thread is still running: say so rather than
            # report a clean terminate.
            raise NitroError(ErrorCode.UnspecifiedError,
                             f"enclave {self.enclave_id}: released, but " + "; ".join(stuck))

    def __enter__(self) -> "Enclave":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def enclave_record(enclave: Enclave) -> EnclaveRecord:
    """The registry record of ``enclave`` (docs/nitro-cli.md#describe-enclaves)."""
    assert enclave.state_dir is not None
    return EnclaveRecord(
        slot=enclave.slot if enclave.slot is not None else -1,
        enclave_id=enclave.enclave_id,
        name=enclave.name,
        cid=enclave.cid,
        cpu_ids=list(enclave.vcpu_cpus),
        memory_mib=enclave.memory_mib,
        pid=os.getpid(),
        pid_start=processes.start_time(os.getpid()),
        state_dir=str(enclave.state_dir),
        shared_cpus=enclave.cpu_mode == "shared",
        debug_mode=enclave.debug_mode,
        control_socket=enclave.control_socket,
        qemu_pid=enclave.machine.pid if enclave.machine else None,
        qemu_start=processes.start_time(enclave.machine.pid) if enclave.machine else None,
        eif_path=str(enclave.config.eif_path),
        measurements=enclave.measurements.to_json() if enclave.measurements else {},
        state=enclave.state if enclave.running or enclave.state != "RUNNING" else "EMPTY",
        nitro_warning=enclave.layout.nitro_warning if enclave.layout else None,
    )


def _stop_and_release(enclave: Enclave) -> list[str]:
    """:meth:`Enclave.terminate`'s work, in its order, every step on every path; returns what
    would not stop (a back end's thread), for the caller to report."""
    stuck: list[str] = []
    try:
        if enclave.machine is not None:
            enclave.machine.shutdown()
    finally:
        try:
            if enclave._guest_ram is not None:  # after QEMU: then the memory is freed
                enclave._guest_ram.close()
            stuck = enclave._devices.stop()
        finally:
            try:
                with contextlib.suppress(OSError):  # artifacts are best effort, release is not
                    if enclave._ended_by_itself and enclave.control_socket:  # a run-enclave one
                        assert enclave.state_dir is not None and enclave.end_reason is not None
                        record_end(enclave.registry, enclave_record(enclave), enclave.end_reason,
                                   enclave.state_dir / "console.log")
                with contextlib.suppress(OSError):  # with the boot timeline completed
                    enclave_timeline.keep_artifacts(enclave, enclave._devices)
                enclave_resources.release(enclave.registry, enclave.slot, enclave.state_dir)
            finally:
                enclave.state = "EMPTY"
                enclave._released.set()
    return stuck
