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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import allocator, doctor, host
from harness import eif as eif_mod
from harness import qemu as qemu_mod
from harness.console import (
    DEFAULT_FAIL_PATTERN,
    ConsoleError,
    ConsoleFailure,
    ConsoleTimeout,
    ExecResult,
    tail,
)
from harness.errors import ErrorCode, NitroError
from harness.layout import Layout, choose_layout
from harness.machine import MachineError, MachineSpec, QemuMachine
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
    (``RUNNING``, ``TERMINATING``, ``EMPTY``), ``state_dir``, ``artifacts_dir``.
    """

    def __init__(
        self,
        config: EnclaveConfig,
        *,
        artifacts_dir: Path | None = None,
        accel: str | None = None,
        qemu: Path | None = None,
        registry: Registry | None = None,
        control_socket: str | None = None,
    ):
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
        self.vsock: Any = None
        self.nsm: Any = None
        self.nsm_status = "not started"
        self.accel = ""
        self.accel_reason = ""
        self.layout: Layout | None = None
        self.heartbeat_seconds: float | None = None
        self.end_reason: str | None = None
        self._monitor: threading.Thread | None = None
        self._backends: list[Any] = []
        self._vsock_trace = None
        self._heartbeat: Any = None
        self._lock = threading.Lock()
        self._terminated = False
        self._released = threading.Event()

    # ----------------------------------------------------------------------------------------
    # start

    @classmethod
    def start(cls, config: EnclaveConfig, **kwargs: Any) -> "Enclave":
        """Boot an enclave and return once its heartbeat arrived.

        Raises NitroError: E19 missing EIF, E35 bad EIF, E01/E02/E20/E21/E22 CPU rules, E26/E27
        memory rules, E03 bad CID, E36 boot failure (console tail in ``details``). Everything
        taken before the failure is released first.
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
        cfg = self.config
        eif_path = Path(cfg.eif_path)
        if not eif_path.is_file():
            raise NitroError(ErrorCode.FileOperationFailure, f"{eif_path}: EIF file not found")
        # One streaming pass validates the layout and CRC and measures, before anything is taken.
        self.measurements, parsed = eif_mod.measure_and_check(eif_path)
        if parsed.crc_ok is False:
            raise NitroError(
                ErrorCode.EifParsingError,
                f"{eif_path}: crc32: the header's CRC does not match the file (the Nitro "
                "hypervisor and QEMU refuse such an EIF)",
            )
        eif_size = eif_path.stat().st_size

        alloc_cfg = allocator.load_config()
        all_cpus = [c.id for c in host.cpu_topology()]
        with self.registry.locked():
            records = self.registry.records()
            busy = {c for r in records if not r.shared_cpus for c in r.cpu_ids}
            cpus = allocator.allocate_cpus(
                cpu_count=cfg.cpu_count,
                cpu_ids=cfg.cpu_ids,
                pool=alloc_cfg.pool,
                busy=busy,
                mode=cfg.cpu_mode,
                all_cpus=all_cpus,
            )
            if alloc_cfg.memory_mib is not None:
                budget, used = alloc_cfg.memory_mib, sum(r.memory_mib for r in records)
            else:
                # MemAvailable already lacks the running enclaves' (preallocated) memory.
                budget, used = allocator.host_memory_budget_mib(), 0
            allocator.check_memory(cfg.memory_mib, eif_size=eif_size, budget_mib=budget, used_mib=used)
            self.cid = self.registry.allocate_cid(cfg.cid)
            self.slot = self.registry.allocate_slot()
            self.vcpu_cpus = cpus.vcpu_cpus
            self.cpu_mode = cpus.mode
            # docs/nitro-cli.md#enclave-ids: <instance id>-enc<slot in lower-case hex> (16 digits,
            # as in module_id).
            self.enclave_id = f"{self.instance_id}-enc{self.slot:016x}"
            # Named by slot, not by enclave ID: Unix socket paths must stay under 108 bytes.
            self.state_dir = self.registry.root / f"enc{self.slot}"
            shutil.rmtree(self.state_dir, ignore_errors=True)  # a crashed run's leftovers
            self.state_dir.mkdir(mode=0o700)
            self.state = "STARTING"
            self._write_record()

        qemu_path, qemu_info = self._find_qemu()
        self.accel, self.accel_reason = self._choose_accel(qemu_info)
        boot = eif_mod.extract_boot_files(eif_path, self.state_dir)
        self.layout = choose_layout(boot.kernel, cfg.layout)

        self._start_vsock()
        nsm_mode, nsm_socket = self._start_nsm(qemu_info)

        spec = MachineSpec(
            qemu=qemu_path,
            accel=self.accel,
            kernel=boot.kernel,
            initrd=boot.initrd,
            cmdline=boot.cmdline,
            memory_mib=cfg.memory_mib,
            vcpu_cpus=cpus.vcpu_cpus,
            other_cpus=cpus.others,
            state_dir=self.state_dir,
            firmware=qemu_mod.find_firmware(qemu_path),
            vsock_socket=self.state_dir / "vsock.sock",
            nsm=nsm_mode,
            nsm_socket=nsm_socket,
            hugepage_size_kib=self._hugepage_size(alloc_cfg),
            acpi=self.layout.acpi,
            extra_args=list(cfg.extra_qemu_args),
        )
        self.machine = QemuMachine(spec)
        try:
            self.machine.launch()
        except MachineError as err:
            raise NitroError(ErrorCode.EnclaveBootFailure, str(err)) from None
        self._place_harness_threads(cpus.others)
        self._wait_heartbeat(
            cfg.heartbeat_timeout or heartbeat_timeout(eif_size, cfg.memory_mib)
        )
        self.state = "RUNNING"
        self._write_record()
        self._monitor = threading.Thread(target=self._watch, name="enclave-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        """End the enclave when its VM exits or a device back end fails (docs/boot.md#enclave-end:
        an exiting application reboots the VM, which ends the enclave), recording why in
        ``end_reason``."""
        assert self.machine is not None
        while not self._terminated:
            status = self.machine.wait(0.2)
            failed = [b.error for b in self._backends if getattr(b, "error", None)]
            if status is None and not failed:
                continue
            with self._lock:
                if self._terminated:  # the parent terminated it: its reason stands
                    return
                if status is None:
                    self.end_reason = f"a device back end failed: {failed[0]}"
                elif status == 0:
                    self.end_reason = "the enclave's VM exited (the application ended and init rebooted)"
                else:
                    self.end_reason = f"QEMU ended with status {status}; {self.machine.stderr_excerpt()}"
            try:
                self.terminate()
            except NitroError as err:  # released; a stuck thread is recorded, not thrown away
                self.end_reason += f" ({err.message})"
            return

    def _find_qemu(self):
        path = self._qemu or qemu_mod.find_qemu()
        return path, qemu_mod.probe_qemu(path)

    def _choose_accel(self, qemu_info) -> tuple[str, str]:
        if self._accel:
            return self._accel, "chosen by the caller"
        # The doctor also honours (and checks) NITRO_HARNESS_ACCEL.
        return doctor.choose_accelerator(qemu_info, host.kvm_status())

    def _hugepage_size(self, alloc_cfg) -> int | None:
        if self.config.hugepages is False or not alloc_cfg.hugepage_size:
            return None
        size_kib = allocator.HUGEPAGE_SIZES_KIB[alloc_cfg.hugepage_size]
        needed = math.ceil(self.config.memory_mib * 1024 / size_kib)
        free = sum(p.available for p in host.hugepages() if p.size_kib == size_kib)
        if free < needed:
            raise NitroError(
                ErrorCode.InsufficientMemoryAvailable,
                f"{alloc_cfg.source}: hugepage_size {alloc_cfg.hugepage_size}: {needed} pages "
                f"needed for {self.config.memory_mib} MiB, {free} free (reserve them in "
                f"/sys/kernel/mm/hugepages/hugepages-{size_kib}kB/nr_hugepages)",
            )
        return size_kib

    def _start_vsock(self) -> None:
        from harness.vhost_user import VhostUserBackend
        from harness.vsock import VsockDevice

        assert self.state_dir is not None
        # Packet headers for the artifacts folder (kept when a test fails).
        self._vsock_trace = open(self.state_dir / "vsock.trace", "a", buffering=1 << 16)
        trace_file = self._vsock_trace
        self.vsock = VsockDevice(
            self.cid, trace=lambda event: trace_file.write(json.dumps(event) + "\n")
        )
        # docs/boot.md#heartbeat-wait: nitro-cli listens for the heartbeat before it starts the
        # enclave.
        self._heartbeat = self.vsock.heartbeat(HEARTBEAT_PORT)
        backend = VhostUserBackend(self.state_dir / "vsock.sock", self.vsock, offer_config=True)
        backend.start()
        self._backends.append(backend)

    def _start_nsm(self, qemu_info) -> tuple[str | None, Path | None]:
        mode = self.config.nsm
        if mode == "none":
            self.nsm_status = "disabled by configuration"
            return None, None
        can_host = qemu_info.vhost_user_device_creatable
        if mode in ("auto", "harness") and can_host:
            from harness.nsm import Nsm, NsmState, trace_writer
            from harness.nsm.device import NsmDevice
            from harness.pki import Pki
            from harness.vhost_user import VhostUserBackend

            assert self.state_dir is not None
            state = NsmState(
                self.measurements,
                module_id=self.enclave_id,
                debug_mode=self.debug_mode,
                parent_role_arn=self.config.parent_role_arn,
                instance_id=self.instance_id,
            )
            self.nsm = Nsm(
                state,
                Pki.load_or_create(self.config.pki_dir),
                trace=trace_writer(self.state_dir / "nsm.trace"),
            )
            socket_path = self.state_dir / "nsm.sock"
            backend = VhostUserBackend(socket_path, NsmDevice(self.nsm), offer_config=False)
            backend.start()
            self._backends.append(backend)
            self.nsm_status = "harness NSM (signed attestation documents)"
            return "vhost-user", socket_path
        if mode == "harness":
            raise NitroError(
                ErrorCode.EnclaveBootFailure,
                "this QEMU cannot create vhost-user-device, so it cannot host the harness NSM "
                "(run scripts/setup.sh to build the patched QEMU, or use nsm: auto)",
            )
        if mode == "qemu" and qemu_info.has_virtio_nsm_device:
            self.nsm_status = "QEMU's own virtio-nsm: documents are unsigned and fail verification"
            return "qemu", None
        self.nsm_status = (
            "no NSM: this QEMU refuses vhost-user-device (run scripts/setup.sh for the patched QEMU)"
        )
        return None, None

    def _place_harness_threads(self, others: tuple[int, ...]) -> None:
        # Keep the harness's own threads (device back ends, console reader) off enclave CPUs.
        ids = [self.machine.console.native_id if self.machine else None]
        ids += [b.native_id for b in self._backends]
        for tid in ids:
            if tid:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, set(others))

    def _wait_heartbeat(self, timeout: float) -> None:
        assert self.machine is not None
        started = time.monotonic()
        deadline = started + timeout
        log = self.state_dir / "console.log" if self.state_dir else None
        while True:
            if self._heartbeat.wait(0.2):
                self.heartbeat_seconds = time.monotonic() - started
                return
            reason = None
            status = self.machine.poll()
            if status is not None:
                reason = f"the enclave's VM exited (QEMU status {status}) before the heartbeat"
                if status != 0:
                    reason += f"; {self.machine.stderr_excerpt()}"
            else:
                import re

                text = self.machine.console.text()
                bad = re.search(DEFAULT_FAIL_PATTERN, text)
                if bad:
                    reason = f"the console printed {bad.group(0)!r} before the heartbeat"
                for backend in self._backends:
                    if getattr(backend, "error", None):
                        reason = f"a device back end failed: {backend.error}"
                if reason is None and time.monotonic() > deadline:
                    reason = f"no heartbeat on vsock port {HEARTBEAT_PORT} within {timeout:g} s"
            if reason:
                raise NitroError(
                    ErrorCode.EnclaveBootFailure,
                    f"{reason} (full console log: {self._kept_log_path() or log})",
                    details="last console lines:\n" + tail(self.machine.console.text(), 20),
                )

    def _kept_log_path(self) -> Path | None:
        return self.artifacts_dir / "console.log" if self.artifacts_dir else None

    def _write_record(self) -> None:
        self.registry.put(self._record())

    # ----------------------------------------------------------------------------------------
    # while running

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
        if self.machine is None:
            return True
        return self.machine.wait(timeout) is not None

    @property
    def running(self) -> bool:
        """True while QEMU runs."""
        return self.machine is not None and self.machine.poll() is None and not self._terminated

    def _record(self) -> EnclaveRecord:
        assert self.state_dir is not None
        return EnclaveRecord(
            slot=self.slot if self.slot is not None else -1,
            enclave_id=self.enclave_id,
            name=self.name,
            cid=self.cid,
            cpu_ids=list(self.vcpu_cpus),
            memory_mib=self.memory_mib,
            pid=os.getpid(),
            state_dir=str(self.state_dir),
            shared_cpus=self.cpu_mode == "shared",
            debug_mode=self.debug_mode,
            control_socket=self.control_socket,
            qemu_pid=self.machine.pid if self.machine else None,
            eif_path=str(self.config.eif_path),
            measurements=self.measurements.to_json() if self.measurements else {},
            state=self.state if self.running or self.state != "RUNNING" else "EMPTY",
        )

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
        """Stop the VM and release everything (idempotent, safe on any path).

        Keeps console log, QEMU command line and stderr in ``artifacts_dir`` when one was given;
        removes the state folder (sockets, extracted kernel and initrd) and the registry record.
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
        stuck: list[str] = []
        try:
            if self.machine is not None:
                self.machine.shutdown()
        finally:
            for backend in self._backends:
                try:
                    backend.stop()  # releases its fds and guest memory even when it fails
                except Exception as e:
                    stuck.append(str(e))
            if self.vsock is not None:
                with contextlib.suppress(Exception):
                    self.vsock.close()
            if self._vsock_trace is not None:
                with contextlib.suppress(OSError):
                    self._vsock_trace.close()
            try:
                with contextlib.suppress(OSError):  # artifacts are best effort, release is not
                    self._keep_artifacts()
                if self.state_dir is not None:
                    shutil.rmtree(self.state_dir, ignore_errors=True)
                if self.slot is not None:
                    self.registry.remove(self.slot)
            finally:
                self.state = "EMPTY"
                self._released.set()
        if stuck:
            # Everything is released, but a thread is still running: say so rather than
            # report a clean terminate.
            raise NitroError(ErrorCode.UnspecifiedError,
                             f"enclave {self.enclave_id}: released, but " + "; ".join(stuck))

    def _keep_artifacts(self) -> None:
        if not self.artifacts_dir or not self.state_dir or not self.state_dir.exists():
            return
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        for name in ("console.log", "qemu.cmdline", "qemu.stderr", "vsock.trace", "nsm.trace"):
            src = self.state_dir / name
            if src.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(src, self.artifacts_dir / name)

    def __enter__(self) -> "Enclave":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
