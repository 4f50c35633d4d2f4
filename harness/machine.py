"""One QEMU microVM shaped like a Nitro enclave: command line, launch, QMP, vCPU pinning, stop.

docs/architecture.md#faithfulness (point 5) and docs/boot.md#qemu-machine: a ``microvm`` with
qboot, ``-nodefaults`` (no network, no disk, no display), guest RAM as a shared memfd (vhost-user
back ends map it), preallocated and locked, optionally hugepage-backed; the EIF's kernel, command
line and concatenated ramdisks; ``-no-reboot`` so init's reboot after the application exits ends
the VM as on Nitro; the serial console and QMP on Unix sockets the harness listens on. QEMU starts
paused (``-S``) with its whole process on the non-enclave CPUs; once QMP reports the vCPU thread
ids each is pinned to its enclave CPU and the guest is resumed, so no QEMU thread but a vCPU ever
runs on an enclave CPU.

An aarch64 EIF boots on ``qemu-system-aarch64``'s ``virt`` machine instead
(docs/boot.md#aarch64-machine): GICv3, a Neoverse N1 CPU (Graviton2's core) under TCG, no
firmware (QEMU loads the ``Image`` itself), the virtio-mmio transports described in the device
tree, the PL011 UART as the console; everything else is the same.

Finding and probing the QEMU binary lives in :mod:`harness.qemu`; the accelerator choice in
:mod:`harness.doctor`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.arch import X86_64, Arch
from harness.console import Console

@dataclass
class MachineSpec:
    """Everything the QEMU command line is built from.

    ``memory_mib`` in MiB; ``vcpu_cpus`` the host CPU of each vCPU (its length is the vCPU
    count); ``other_cpus`` where QEMU's other threads run; ``vsock_socket``/``nsm_socket`` the
    vhost-user back ends' sockets (None leaves the device out); ``nsm`` is ``"vhost-user"``,
    ``"qemu"`` (QEMU's own unsigned virtio-nsm) or None; ``acpi`` False for Nitro-style kernels
    that find virtio-mmio devices on the command line; ``mem_lock_on_fault`` locks QEMU's
    memory as it is touched (``mem-lock=on-fault``, QEMU 10 and later) rather than populating
    all of it first: guest RAM is preallocated, so it is all resident and locked either way
    (docs/boot.md#qemu-machine). ``memory_fd``: a memfd of the harness's holding the guest RAM,
    already allocated (:class:`harness.guest_ram.GuestRam`, docs/boot.md#guest-ram), which QEMU
    maps under the same number; None lets QEMU create its own. ``arch`` the EIF's
    architecture (:mod:`harness.arch`): the machine type follows from it.
    """

    qemu: Path
    accel: str
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mib: int
    vcpu_cpus: tuple[int, ...]
    other_cpus: tuple[int, ...]
    state_dir: Path
    firmware: Path | None = None
    vsock_socket: Path | None = None
    nsm: str | None = None
    nsm_socket: Path | None = None
    nsm_queue_size: int = 2
    acpi: bool = True
    hugepage_size_kib: int | None = None
    memory_fd: int | None = None
    prealloc: bool = True
    mem_lock: bool = True
    mem_lock_on_fault: bool = True
    extra_args: list[str] = field(default_factory=list)
    arch: Arch = X86_64

    @property
    def console_socket(self) -> Path:
        return self.state_dir / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"


def _guest_cmdline(spec: MachineSpec) -> str:
    """The EIF's command line, plus what emulation needs (PCRs are measured from the EIF).

    Under TCG a loaded host can make the kernel's IO-APIC timer check miss its ticks and panic
    ("IO-APIC + timer doesn't work!"); KVM guests skip that check themselves (kvmclock sets
    no_timer_check), as on Nitro, so TCG guests get the same parameter. QEMU appends the
    virtio_mmio.device= entries itself for the Nitro layout.

    On aarch64 the EIF's ``console=ttyS0`` names a UART the ``virt`` machine does not have;
    its PL011 is added after it (the last ``console=`` becomes /dev/console; the PCRs are
    measured from the EIF, so they do not change): docs/boot.md#aarch64-machine.
    """
    if spec.arch != X86_64:
        return f"{spec.cmdline} console={spec.arch.console}"
    if spec.accel == "tcg" and not spec.acpi:
        return f"{spec.cmdline} no_timer_check"
    return spec.cmdline


def _machine_and_cpu(spec: MachineSpec) -> list[str]:
    """``-machine``, ``-cpu`` and the x86-only pieces for ``spec``'s architecture."""
    if spec.arch != X86_64:
        # No ACPI tables without firmware, so the guest reads the device tree QEMU writes; a
        # Neoverse N1 rather than ``max``: Graviton2's core, and TCG emulates it faster
        # (``max`` adds pointer authentication, which costs every function return under TCG).
        return ["-machine", "virt,gic-version=3,memory-backend=mem",
                "-cpu", "host" if spec.accel == "kvm" else "neoverse-n1"]
    machine = "microvm,memory-backend=mem"
    machine += ",acpi=on" if spec.acpi else ",acpi=off"
    return [
        "-machine", machine,
        "-cpu", "host" if spec.accel == "kvm" else "max",
        # docs/boot.md#enclave-end: AWS's command line reboots through the keyboard controller
        # (reboot=k, i8042.*); microvm has none, and without it init's reboot would never end the
        # VM.
        "-device", "i8042",
    ]


def build_command(spec: MachineSpec) -> list[str]:
    """Return QEMU's argv for ``spec`` (see the module doc for why each part is there)."""
    if spec.memory_fd is not None:
        if spec.hugepage_size_kib:
            raise ValueError("a harness memfd is never hugepage-backed: QEMU makes that one")
        memory = (f"memory-backend-file,id=mem,size={spec.memory_mib}M,share=on,"
                  f"mem-path=/proc/self/fd/{spec.memory_fd}")
    else:
        memory = f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"
    if spec.prealloc:
        memory += ",prealloc=on"
    if spec.hugepage_size_kib:
        memory += f",hugetlb=on,hugetlbsize={spec.hugepage_size_kib}K"
    cmd = [
        str(spec.qemu),
        *_machine_and_cpu(spec),
        "-accel", spec.accel,
        "-smp", str(len(spec.vcpu_cpus)),
        "-m", f"{spec.memory_mib}M",
        "-object", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", _guest_cmdline(spec),
        "-chardev", f"socket,id=console,path={spec.console_socket}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
    ]
    if spec.accel == "tcg" and spec.acpi and spec.arch == X86_64:
        # With ACPI, a guest whose TSC calibration fails (a loaded host) falls back to the PIT
        # and never gets a tick on microvm under TCG; instruction counting gives it a
        # deterministic clock. The Nitro layout (no ACPI) needs no such help.
        cmd += ["-icount", "shift=auto"]
    if spec.firmware and spec.arch == X86_64:
        cmd += ["-bios", str(spec.firmware)]
    if spec.mem_lock:
        # mem-lock=on would also populate and lock all of QEMU's other memory before the guest
        # starts, TCG's 1 GiB buffer of translated code above all: 0.5-2 s of every TCG start
        # and 1 GiB more resident per enclave.
        cmd += ["-overcommit", "mem-lock=on-fault" if spec.mem_lock_on_fault else "mem-lock=on"]
    if spec.vsock_socket:
        cmd += [
            "-chardev", f"socket,id=vsock,path={spec.vsock_socket}",
            "-device", "vhost-user-vsock-device,chardev=vsock",
        ]
    if spec.nsm == "vhost-user" and spec.nsm_socket:
        cmd += [
            "-chardev", f"socket,id=nsm,path={spec.nsm_socket}",
            "-device",
            f"vhost-user-device,virtio-id=33,chardev=nsm,num_vqs=1,vq_size={spec.nsm_queue_size}",
        ]
    elif spec.nsm == "qemu":
        cmd += ["-device", "virtio-nsm-device"]
    return cmd + list(spec.extra_args)


def launcher(other_cpus: tuple[int, ...]) -> list[str]:
    """argv prefix that starts QEMU bound to the harness's lifetime and off the enclave CPUs.

    ``setpriv --pdeathsig KILL``: the VM must not outlive the process that started it (Ctrl-C,
    crash, kill -9); ``taskset``: every QEMU thread starts on ``other_cpus``, and only the vCPU
    threads are moved to enclave CPUs afterwards. Both are util-linux programs, exec'd in turn,
    so no Python runs between fork and exec (unsafe in a threaded process).
    """
    prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
    if other_cpus:
        prefix += ["taskset", "--cpu-list", ",".join(map(str, other_cpus))]
    return prefix


class MachineError(Exception):
    """QEMU could not be started or controlled; the message names the step and QEMU's stderr."""


class QemuMachine:
    """A running QEMU process for one enclave.

    ``launch()`` starts QEMU paused, connects QMP and the console, pins vCPUs and resumes;
    ``shutdown()`` ends it (QMP ``quit``, then SIGKILL) and releases every socket; both are safe
    to call on any path, ``shutdown()`` any number of times.
    """

    def __init__(self, spec: MachineSpec):
        self.spec = spec
        self.command = build_command(spec)
        self.process: subprocess.Popen | None = None
        self.console = Console(spec.console_socket, spec.state_dir / "console.log")
        self.qmp: QEMUMonitorProtocol | None = None
        self.vcpu_thread_ids: list[int] = []
        self.stderr_path = spec.state_dir / "qemu.stderr"
        self._stderr = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def launch(self, timeout: float = 30.0, mark: Callable[[str], None] | None = None) -> None:
        """Start QEMU, attach console and QMP, pin vCPUs, resume the guest.

        ``mark`` (a :meth:`harness.boot_timeline.BootTimeline.mark`) is called with
        ``qemu_spawned``, ``console_connected``, ``qmp_socket``, ``qmp_ready``, ``vcpus_pinned``
        and ``resumed`` as each happens (docs/boot.md#boot-timeline). Each wait ends as soon as
        what it waits for happens or QEMU exits (a pidfd of QEMU is watched beside the socket).
        Raises MachineError with QEMU's stderr when QEMU exits or does not connect within
        ``timeout`` seconds.
        """
        mark = mark or (lambda name: None)
        (self.spec.state_dir / "qemu.cmdline").write_text(
            " ".join(_quote(a) for a in self.command) + "\n"
        )
        with contextlib.suppress(FileNotFoundError):
            self.spec.qmp_socket.unlink()
        self.console.listen()
        self._stderr = open(self.stderr_path, "wb")
        try:
            self.process = subprocess.Popen(
                launcher(self.spec.other_cpus) + self.command,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                close_fds=True,
                pass_fds=() if self.spec.memory_fd is None else (self.spec.memory_fd,),
            )
        except OSError as err:
            raise MachineError(f"cannot start {self.spec.qemu}: {err}") from None
        mark("qemu_spawned")
        pidfd = _pidfd(self.process.pid)
        try:
            deadline = time.monotonic() + timeout
            # QEMU creates its character devices in command-line order: the console's first,
            # then QMP's, so once the console is connected the QMP socket exists.
            self._attach_console(deadline, pidfd)
            mark("console_connected")
            self._accept_qmp(deadline, mark)
            mark("qmp_ready")
            self._pin_vcpus()
            mark("vcpus_pinned")
            self.qmp.cmd("cont")
            mark("resumed")
        except MachineError:
            raise
        except Exception as err:  # QMP and socket errors: report with QEMU's own words
            raise MachineError(f"QEMU start failed ({type(err).__name__}: {err}); {self.stderr_excerpt()}") from None
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _exited(self) -> MachineError:
        assert self.process is not None
        return MachineError(
            f"QEMU exited with status {self.process.returncode} at start: {self.stderr_excerpt()}")

    def _attach_console(self, deadline: float, pidfd: int | None) -> None:
        """Accept QEMU's console connection; MachineError when QEMU exits first or at
        ``deadline``. Without a pidfd (a kernel before 5.3) QEMU is polled every 50 ms."""
        assert self.process is not None
        while True:
            remaining = deadline - time.monotonic()
            try:
                self.console.attach(max(remaining, 0.0) if pidfd is not None else
                                    min(max(remaining, 0.0), 0.05), gone_fd=pidfd)
                return
            except (TimeoutError, ChildProcessError):
                if self.process.poll() is not None:
                    raise self._exited() from None
                if time.monotonic() >= deadline:
                    raise MachineError(f"QEMU did not connect its console within the start "
                                       f"timeout: {self.stderr_excerpt()}") from None

    def _accept_qmp(self, deadline: float, mark: Callable[[str], None]) -> None:
        assert self.process is not None
        # The socket normally exists already (see launch); a QEMU that orders its character
        # devices otherwise is waited for in short steps.
        while not self.spec.qmp_socket.exists():
            if self.process.poll() is not None:
                raise self._exited()
            if time.monotonic() > deadline:
                raise MachineError(f"QEMU did not open QMP within the start timeout: {self.stderr_excerpt()}")
            time.sleep(0.005)
        mark("qmp_socket")
        while True:
            # Blocks until QEMU greets and answers qmp_capabilities, i.e. until its main loop
            # runs; a QEMU that exits meanwhile closes the socket, which ends the wait.
            qmp = QEMUMonitorProtocol(str(self.spec.qmp_socket))
            try:
                qmp.connect()
            except Exception:  # noqa: BLE001 - bound but not yet listening: retry
                with contextlib.suppress(Exception):
                    qmp.close()
                if self.process.poll() is not None:
                    raise self._exited() from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
            else:
                self.qmp = qmp
                return

    def _pin_vcpus(self) -> None:
        assert self.qmp is not None
        cpus = self.qmp.cmd("query-cpus-fast")
        self.vcpu_thread_ids = [int(c["thread-id"]) for c in cpus]
        for index, tid in enumerate(self.vcpu_thread_ids):
            target = self.spec.vcpu_cpus[index % len(self.spec.vcpu_cpus)]
            try:
                os.sched_setaffinity(tid, {target})
            except OSError as err:
                raise MachineError(f"cannot pin vCPU {index} (thread {tid}) to CPU {target}: {err}") from None

    def thread_affinities(self) -> dict[int, set[int]]:
        """Every QEMU thread id -> the host CPUs it may run on (for isolation checks)."""
        result: dict[int, set[int]] = {}
        if not self.pid:
            return result
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    result[int(entry)] = os.sched_getaffinity(int(entry))
        return result

    def stderr_excerpt(self, lines: int = 5) -> str:
        """QEMU's last stderr lines, one line, for error messages."""
        with contextlib.suppress(OSError):
            if self._stderr:
                self._stderr.flush()
            text = self.stderr_path.read_text(errors="replace").strip()
            if text:
                return "qemu: " + " | ".join(text.splitlines()[-lines:])
        return "qemu printed nothing on stderr"

    def poll(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return self.process.poll() if self.process else 0

    def wait(self, timeout: float | None) -> int | None:
        """Wait up to ``timeout`` seconds for QEMU to exit; its status, or None if still running."""
        if not self.process:
            return 0
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, grace: float = 5.0) -> None:
        """End QEMU (QMP quit, then SIGKILL after ``grace`` seconds) and release everything.

        Never raises once QEMU is gone: a QEMU that ignores ``quit`` (or never opened QMP, so no
        ``quit`` could be sent and waiting would only burn the grace period) is killed, and
        that is the end of it. Safe against a second Ctrl-C: whatever interrupts the wait,
        QEMU is killed and every socket and file is still released before the interruption
        propagates.
        """
        try:
            if self.process and self.process.poll() is None:
                asked = False
                if self.qmp is not None:
                    with contextlib.suppress(Exception):
                        self.qmp.settimeout(2)
                        self.qmp.cmd("quit")
                        asked = True
                try:
                    if asked:
                        self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    pass  # it did not quit in time: killed below
                finally:
                    # Reached on a timeout, without QMP, and on Ctrl-C alike.
                    if self.process.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            self.process.kill()
                        self.process.wait()
        finally:
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.close()
                self.qmp = None
            self.console.close()
            if self._stderr:
                with contextlib.suppress(OSError):
                    self._stderr.close()
                self._stderr = None
            for path in (self.spec.qmp_socket, self.spec.console_socket):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid`` (readable once it exits), or None where the kernel or Python
    has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_=,./:@+" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"
