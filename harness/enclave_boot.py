"""Booting one enclave's VM: the EIF checked and measured, QEMU and its accelerator chosen, the
machine described (:class:`harness.machine.MachineSpec`) and launched.

The EIF is checked before anything is taken, as nitro-cli does (docs/eif-format.md#validation,
docs/eif-format.md#crc); the PCRs come from the same read (docs/pcrs.md#one-pass-measuring).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness import doctor, host
from harness.arch import X86_64, Arch, host_arch
from harness.bzimage import KernelImage, read_kernel_image
from harness import eif as eif_mod
from harness import qemu as qemu_mod
from harness.errors import ErrorCode, NitroError
from harness.machine import MachineError, MachineSpec, QemuMachine

__all__ = ["QemuChoice", "check_eif", "boot_files", "boot_kernel", "check_kernel_arch",
           "choose_qemu", "machine_spec",
           "launch", "preflight", "explained_by", "PREFLIGHT_FILE", "BOOT_FILES_DIR"]

#: The preflight's findings, one line each, in the state folder (kept with the artifacts).
PREFLIGHT_FILE = "preflight.txt"
#: The cache of extracted boot files, under the harness's cache (docs/boot.md#boot-files).
BOOT_FILES_DIR = "eif-boot-files"
#: The first QEMU with ``-overcommit mem-lock=on-fault`` (docs/boot.md#qemu-machine).
MEM_LOCK_ON_FAULT_SINCE = (10, 0, 0)


def check_eif(eif_path: Path) -> tuple[Any, int]:
    """Validate, CRC-check and measure the EIF at ``eif_path`` in one streaming read; return its
    :class:`harness.pcr.Measurements` and its size in bytes.

    Raises NitroError E19 when the file is missing, E35 when it is invalid or its header's CRC
    does not match (the Nitro hypervisor and QEMU refuse such an EIF: docs/eif-format.md#crc).
    """
    if not eif_path.is_file():
        raise NitroError(ErrorCode.FileOperationFailure, f"{eif_path}: EIF file not found")
    measurements, parsed = eif_mod.measure_and_check(eif_path)
    if parsed.crc_ok is False:
        raise NitroError(
            ErrorCode.EifParsingError,
            f"{eif_path}: crc32: the header's CRC does not match the file (the Nitro "
            "hypervisor and QEMU refuse such an EIF)",
        )
    return measurements, eif_path.stat().st_size


def boot_files(eif_path: Path, measurements: Any, state_dir: Path) -> eif_mod.BootFiles:
    """The kernel, command line and initrd QEMU boots from ``eif_path`` (checked and measured:
    ``measurements``), reused from the boot files cache when an earlier boot of the same content
    left them there (docs/boot.md#boot-files), else extracted into it (into ``state_dir`` when
    the cache cannot be written). Raises NitroError E35 for an EIF that cannot boot."""
    from harness.eif.boot_cache import cached_boot_files

    return cached_boot_files(eif_path, measurements, qemu_mod.cache_dir() / BOOT_FILES_DIR,
                             state_dir)


@dataclass(frozen=True)
class QemuChoice:
    """The QEMU binary (``path``), what it can do (``info``, :class:`harness.qemu.QemuInfo`), the
    accelerator (``"kvm"`` or ``"tcg"``) and why it was chosen (``accel_reason``, one line)."""

    path: Path
    info: Any
    accel: str
    accel_reason: str


#: Kernels read in this process, by the image's digest: a test session boots the same few
#: EIFs again and again, and decompressing a kernel's payload took 45-65 ms of each boot.
_KERNELS: "collections.OrderedDict[bytes, KernelImage]" = collections.OrderedDict()
_KERNELS_KEPT = 4
_KERNELS_LOCK = threading.Lock()


def boot_kernel(path: Path) -> KernelImage:
    """The facts of the kernel image at ``path`` (:func:`harness.bzimage.read_kernel_image`:
    format, architecture, decompressed payload) for the layout choice and the preflight;
    reused from an earlier boot in this process when the image's bytes are the same
    (docs/boot.md#boot-files). Raises OSError when the file cannot be read."""
    image = path.read_bytes()
    digest = hashlib.blake2b(image, digest_size=32).digest()
    with _KERNELS_LOCK:
        if digest in _KERNELS:
            _KERNELS.move_to_end(digest)
            return _KERNELS[digest]
    kernel = read_kernel_image(image)
    with _KERNELS_LOCK:
        _KERNELS[digest] = kernel
        while len(_KERNELS) > _KERNELS_KEPT:
            _KERNELS.popitem(last=False)
    return kernel


def choose_qemu(qemu: Path | None, accel: str | None, arch: Arch = X86_64) -> QemuChoice:
    """Find and probe the QEMU for ``arch``'s EIFs (``qemu`` or :func:`harness.qemu.find_qemu`'s
    choice) and take the accelerator ``accel`` or the doctor's (docs/architecture.md#accelerator,
    which also honours and checks ``NITRO_HARNESS_ACCEL``).

    ``qemu`` names one binary for a whole run (``--qemu``), normally the x86_64 one: for an
    aarch64 EIF the ``qemu-system-aarch64`` beside it is taken when there is one. A guest of
    another architecture than the host's always runs under TCG, whatever was asked: KVM runs
    only the host's own (docs/architecture.md#architectures). On an aarch64 host an aarch64
    guest gets KVM when ``/dev/kvm`` opens and QEMU has it (the doctor's probe boot is x86
    code). Raises NitroError E19 when no QEMU is found and when the one given lacks the machine
    ``arch`` boots on (``microvm`` for x86_64, ``virt`` for aarch64), in one line naming what
    to install; E03 for a ``NITRO_HARNESS_ACCEL`` other than kvm or tcg.
    """
    if qemu is not None and arch != X86_64 and Path(qemu).name != arch.qemu_binary:
        sibling = Path(qemu).with_name(arch.qemu_binary)
        if sibling.is_file() and os.access(sibling, os.X_OK):
            qemu = sibling
    path = qemu or qemu_mod.find_qemu(arch)
    info = qemu_mod.probe_qemu(path)
    machine_ok = info.has_virt if arch != X86_64 else info.has_microvm
    if not machine_ok:
        machine = "virt" if arch != X86_64 else "microvm"
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{path}: has no '{machine}' machine, so it cannot boot an {arch.name} "
                         f"EIF: install {arch.qemu_binary} (`{qemu_mod.SETUP_HINT}` builds it) or "
                         f"set {qemu_mod.qemu_env(arch)} to one")
    if arch == X86_64 and host_arch() in (X86_64, None):
        if accel:
            return QemuChoice(path, info, accel, "chosen by the caller")
        chosen, reason = doctor.choose_accelerator(info, host.kvm_status())
        return QemuChoice(path, info, chosen, reason)
    wanted = accel or doctor.forced_accelerator()
    if host_arch() != arch:
        asked = f" ({wanted} was asked for)" if wanted == "kvm" else ""
        return QemuChoice(path, info, "tcg", f"an {arch.name} guest on an "
                                             f"{host_arch() or 'unknown'} host: TCG emulates it, "
                                             f"KVM runs only the host's architecture{asked}")
    if wanted:
        return QemuChoice(path, info, wanted, "chosen by the caller")
    kvm = host.kvm_status()
    if kvm.device.opens and "kvm" in info.accelerators:
        return QemuChoice(path, info, "kvm", f"{kvm.device.path} opens on this {arch.name} host")
    return QemuChoice(path, info, "tcg", f"{kvm.device.path} does not open "
                                         f"({kvm.device.error or 'missing'}) or {path} has no kvm")


def check_kernel_arch(eif_path: Path, kernel: KernelImage, arch: Arch) -> None:
    """Refuse an EIF whose header flag names another architecture than its kernel section's
    (a bzImage under the aarch64 flag, or an arm64 ``Image`` without it): the hypervisor boots
    the kernel of the flag's architecture only (docs/boot.md#aarch64-machine). Raises NitroError
    E35 naming the file and the flag; a kernel of unknown architecture passes."""
    if kernel.arch not in (arch.name, "unknown"):
        raise NitroError(ErrorCode.EifParsingError,
                         f"{eif_path}: flags: an {arch.name} image (bit 0 "
                         f"{'set' if arch.eif_flags else 'clear'}), but its kernel section is "
                         f"{kernel.arch} ({kernel.format}): rebuild it from blobs of one "
                         "architecture")


def machine_spec(
    config: Any,
    *,
    qemu: QemuChoice,
    boot: eif_mod.BootFiles,
    cpus: Any,
    state_dir: Path,
    acpi: bool,
    nsm: str | None,
    nsm_socket: Path | None,
    hugepage_size_kib: int | None,
    memory_fd: int | None = None,
) -> MachineSpec:
    """The machine for ``config`` (:class:`harness.enclave.EnclaveConfig`: memory, extra QEMU
    arguments): ``boot``'s kernel, initrd and command line, vCPUs on ``cpus.vcpu_cpus`` and QEMU's
    other threads on ``cpus.others`` (:class:`harness.allocator.CpuAllocation`), the vsock back
    end on ``state_dir/vsock.sock``, the NSM as :meth:`EnclaveDevices.start_nsm
    <harness.enclave_devices.EnclaveDevices.start_nsm>` returned it, ``acpi`` from the machine
    layout (docs/boot.md#machine-layout); QEMU's memory locked on fault where ``qemu`` has it;
    guest RAM from ``memory_fd`` when the harness allocated it (docs/boot.md#guest-ram)."""
    return MachineSpec(
        qemu=qemu.path,
        accel=qemu.accel,
        kernel=boot.kernel,
        initrd=boot.initrd,
        cmdline=boot.cmdline,
        memory_mib=config.memory_mib,
        vcpu_cpus=cpus.vcpu_cpus,
        other_cpus=cpus.others,
        state_dir=state_dir,
        firmware=qemu_mod.find_firmware(qemu.path),
        vsock_socket=state_dir / "vsock.sock",
        nsm=nsm,
        nsm_socket=nsm_socket,
        hugepage_size_kib=hugepage_size_kib,
        memory_fd=memory_fd,
        acpi=acpi,
        mem_lock_on_fault=qemu.info.version >= MEM_LOCK_ON_FAULT_SINCE,
        extra_args=list(config.extra_qemu_args),
        arch=boot.arch,
    )


def launch(machine: QemuMachine, mark: Any = None, guest_ram: Any = None) -> None:
    """Launch ``machine`` (paused, vCPUs pinned, resumed: :meth:`harness.machine.QemuMachine.launch`,
    which calls ``mark`` with each boot timeline phase). ``guest_ram``
    (:class:`harness.guest_ram.GuestRam`) may still be filling: QEMU maps and preallocates the
    same file meanwhile (docs/boot.md#guest-ram). Raises NitroError E27 when QEMU failed and the
    fill had found the host short of memory (the reason QEMU failed), else E36 with the
    machine's reason; the caller still shuts the machine down (QEMU may be running)."""
    try:
        machine.launch(mark=mark)
    except MachineError as err:
        if guest_ram is not None:
            guest_ram.ready()
        raise NitroError(ErrorCode.EnclaveBootFailure, str(err)) from None
    if guest_ram is not None:
        guest_ram.settled()


def preflight(eif_path: Path, config: Any, kernel: Any, measurements: Any,
              state_dir: Path) -> list:
    """The preflight findings (:func:`harness.preflight.check_eif`) for ``config``'s run of
    ``eif_path`` (already checked and measured: ``measurements``; ``kernel`` already read), also
    written to ``state_dir/preflight.txt``. Never raises: the preflight advises, it never stops
    a boot, so a check that fails is itself reported as a warning finding."""
    from harness.preflight import check_eif
    from harness.preflight.findings import warning

    try:
        found = check_eif(eif_path, memory_mib=config.memory_mib, debug_mode=config.debug_mode,
                          kernel=kernel, measurements=measurements)
    except Exception as err:  # noqa: BLE001 - advice only: a bug here must not stop a boot
        found = [warning("preflight", f"the preflight checks failed: {type(err).__name__}: {err}")]
    with contextlib.suppress(OSError):
        (state_dir / PREFLIGHT_FILE).write_text("".join(f.line() + "\n" for f in found))
    return found


@contextlib.contextmanager
def explained_by(findings: list) -> Iterator[None]:
    """Add the preflight's errors and warnings to the ``details`` of a boot failure (E36) raised
    in the block, after what is there: they often say why the heartbeat never came (an nsm.ko
    for another kernel, a dynamic init)."""
    try:
        yield
    except NitroError as err:
        lines = [f.line() for f in findings if f.severity != "info"]
        if lines and err.code == ErrorCode.EnclaveBootFailure:
            err.details = "\n".join(x for x in (err.details, "preflight findings:", *lines) if x)
        raise
