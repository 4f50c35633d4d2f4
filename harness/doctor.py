"""The doctor: can this host run enclaves, how, and what to do about each missing piece.

Two things live here:

- :func:`choose_accelerator` -- KVM only when ``/dev/kvm`` opens AND the CPU exposes ``vmx``
  or ``svm`` AND a probe boot under KVM succeeds; otherwise TCG, with the reason
  (docs/architecture.md#accelerator: these hosts have a paravirtual ``/dev/kvm`` without vmx/svm).
- :func:`diagnose` -- the full report (:class:`Report`): QEMU path and version, whether it
  accepts ``vhost-user-device`` (the NSM needs it), ``vhost-user-vsock-device``, ``microvm``,
  ``nitro-enclave``; qboot; accelerator; ``/dev/vhost-vsock``; hugepages; CPU topology and
  the enclave CPU pool; what ``nitro-harness setup`` provides (apt packages, the Nitro-style
  kernel, the hello image). Each :class:`Check` that is not fine carries the command that fixes
  it, a ``nitro-harness setup --only STEP`` where the set-up provides the piece.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import assets
from harness import host as hostmod
from harness.arch import AARCH64
from harness import qemu as qemumod
from harness.errors import ErrorCode, NitroError
from harness.host import HostFacts, KvmStatus, format_cpu_list
from harness.qemu import BootProbe, QemuInfo

__all__ = [
    "ACCEL_ENV",
    "Check",
    "Report",
    "choose_accelerator",
    "diagnose",
]

ACCEL_ENV = "NITRO_HARNESS_ACCEL"
OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"

ProbeBoot = Callable[[Path, str], BootProbe]


def _default_probe(qemu: Path, accel: str) -> BootProbe:
    return qemumod.probe_boot(qemu, accel)


def _kvm_of(host: HostFacts | KvmStatus) -> KvmStatus:
    return host.kvm if isinstance(host, HostFacts) else host


def _kvm_missing_reason(kvm: KvmStatus) -> str | None:
    """Why KVM is not even worth a probe boot, or None when it is."""
    node = kvm.device
    if not node.exists:
        return f"{node.path} does not exist"
    if not node.opens:
        return f"{node.path} does not open ({node.error})"
    if kvm.cpu_virt_flag is None:
        return (
            f"{node.path} opens but the CPU exposes neither vmx nor svm in /proc/cpuinfo "
            "(a paravirtual KVM cannot run a stock kernel)"
        )
    return None


_accel_cache: dict[tuple[Any, ...], tuple[str, str]] = {}
_accel_lock = threading.Lock()


def forced_accelerator() -> str:
    """``$NITRO_HARNESS_ACCEL`` as ``"kvm"``, ``"tcg"`` or ``""`` (unset: the doctor chooses).
    Raises NitroError(E03) for any other value."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced not in ("", "kvm", "tcg"):
        raise NitroError(
            ErrorCode.InvalidArgument,
            f"{ACCEL_ENV}={forced}: expected 'kvm' or 'tcg' (or unset it to let the doctor choose)",
        )
    return forced


def choose_accelerator(
    info: QemuInfo,
    host: HostFacts | KvmStatus,
    *,
    probe: ProbeBoot | None = None,
) -> tuple[str, str]:
    """Pick the accelerator for enclave boots: ``("kvm" | "tcg", reason)``.

    Rule (docs/architecture.md#accelerator): KVM only when ``/dev/kvm`` opens, the CPU exposes
    ``vmx`` or ``svm``, QEMU has the ``kvm`` accelerator, and a probe boot under KVM
    (:func:`harness.qemu.probe_boot`, guest code in a microvm) succeeds; the probe is only
    attempted when the first three hold. Otherwise TCG, and ``reason`` says which condition
    failed. ``$NITRO_HARNESS_ACCEL=tcg`` forces TCG; ``=kvm`` forces KVM without the CPU-flag
    check and probe but still requires ``/dev/kvm`` to open (else ``NitroError(E03)``).
    ``probe`` replaces the probe boot (signature ``(qemu_path, accel) -> BootProbe``).
    A decision that ran the real probe is cached per process by binary and /dev/kvm state.
    """
    kvm = _kvm_of(host)
    forced = forced_accelerator()
    if forced:
        if forced == "tcg":
            return "tcg", f"forced by {ACCEL_ENV}=tcg"
        if forced == "kvm":
            if not kvm.device.opens:
                raise NitroError(
                    ErrorCode.InvalidArgument,
                    f"{ACCEL_ENV}=kvm: {kvm.device.path} does not open "
                    f"({kvm.device.error or 'missing'}); unset {ACCEL_ENV} to fall back to TCG",
                )
            return "kvm", f"forced by {ACCEL_ENV}=kvm"

    missing = _kvm_missing_reason(kvm)
    if missing:
        return "tcg", missing
    if "kvm" not in info.accelerators:
        return "tcg", f"{info.path} was built without the kvm accelerator"

    key: tuple[Any, ...] | None = None
    if probe is None:
        try:
            st = Path(info.path).stat()
            key = (str(info.path), st.st_mtime_ns, kvm.device.path, kvm.cpu_virt_flag)
        except OSError:
            key = None
        if key is not None:
            with _accel_lock:
                if key in _accel_cache:
                    return _accel_cache[key]
    result = (probe or _default_probe)(Path(info.path), "kvm")
    if result.ok:
        decision = ("kvm", f"{kvm.device.path} opens, CPU has {kvm.cpu_virt_flag}, probe boot ok")
    else:
        decision = ("tcg", f"{kvm.device.path} opens and CPU has {kvm.cpu_virt_flag}, but the "
                           f"probe boot under KVM failed: {result.detail}")
    if key is not None:
        with _accel_lock:
            _accel_cache[key] = decision
    return decision


@dataclass(frozen=True)
class Check:
    """One line of the report.

    ``name``: what was checked (``"qemu"``, ``"vhost-user-device"``, ``"accelerator"``, ...);
    ``status``: ``"ok"``, ``"warn"`` (works, but slower or less faithful), ``"fail"`` (enclaves
    cannot run until fixed) or ``"info"``; ``detail``: one line of facts; ``fix``: the command
    (or action) that fixes it, ``None`` when nothing needs fixing.
    """

    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Report:
    """The doctor's findings: ``checks`` in display order plus the raw facts behind them.

    ``qemu``: :class:`QemuInfo` or ``None`` when no QEMU was found; ``firmware``: qboot path or
    ``None``; ``accelerator``/``accelerator_reason``: :func:`choose_accelerator`'s answer;
    ``host``: :class:`HostFacts`. ``ok`` is true when no check failed.
    """

    checks: list[Check]
    host: HostFacts
    qemu: QemuInfo | None = None
    firmware: Path | None = None
    accelerator: str = "tcg"
    accelerator_reason: str = ""

    @property
    def ok(self) -> bool:
        """No check failed: the harness can boot enclaves on this host."""
        return all(check.status != FAIL for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (stable keys; see ``nitro-harness doctor --json``)."""
        return {
            "ok": self.ok,
            "qemu": self.qemu.to_json() if self.qemu else None,
            "firmware": str(self.firmware) if self.firmware else None,
            "accelerator": {"choice": self.accelerator, "reason": self.accelerator_reason},
            "host": self.host.to_json(),
            "checks": [
                {"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix}
                for c in self.checks
            ],
        }

    def to_text(self) -> str:
        """Human-readable report: one line per check, its fix indented below it."""
        width = max((len(c.name) for c in self.checks), default=0)
        lines = ["nitro-harness doctor"]
        for c in self.checks:
            lines.append(f"  [{c.status:>4}] {c.name:<{width}}  {c.detail}")
            if c.fix:
                lines.append(f"  {'':>6} {'':<{width}}  fix: {c.fix}")
        verdict = (
            f"ready: enclaves boot with {self.accelerator.upper()}"
            if self.ok
            else "NOT ready: fix the failed checks above"
        )
        lines.append(verdict)
        return "\n".join(lines) + "\n"


_REBUILD = "nitro-harness setup --only qemu (the patched QEMU; nitro-harness setup for everything)"


def _qemu_checks(info: QemuInfo, from_env: bool) -> list[Check]:
    """Checks about the binary: version, the devices and machines the harness uses."""
    rebuild = (f"unset {qemumod.QEMU_ENV} to use the harness's build, or run " + _REBUILD
               if from_env else _REBUILD)
    patch = info.build_info.get("patch_hash") if info.build_info else None
    origin = f"harness build, patches {patch}" if patch else (
        f"from {qemumod.QEMU_ENV}" if from_env else "not the harness's build")
    checks = [Check("qemu", OK, f"{info.path} (QEMU {'.'.join(map(str, info.version))}, {origin})")]
    wanted = qemumod.patch_hash()
    if patch and wanted and patch != wanted:
        checks.append(Check(
            "qemu patches", WARN,
            f"this build has patches {patch} but harness/data/qemu-patches/ is now {wanted}",
            qemumod.SETUP_HINT,
        ))
    if info.vhost_user_device_creatable:
        checks.append(Check("vhost-user-device", OK, "creatable (the NSM, virtio ID 33, needs it)"))
    else:
        checks.append(Check(
            "vhost-user-device", FAIL,
            f"not creatable: {info.vhost_user_device_detail} "
            "(the NSM needs it; docs/vhost-user.md#generic-device)",
            rebuild,
        ))
    checks.append(
        Check("vhost-user-vsock-device", OK, "present (vsock served by the harness)")
        if info.has_vhost_user_vsock_device
        else Check("vhost-user-vsock-device", FAIL, "missing (build with --enable-vhost-user)",
                   rebuild)
    )
    checks.append(
        Check("microvm", OK, "machine present (enclaves boot on it)")
        if info.has_microvm
        else Check("microvm", FAIL, "machine missing", rebuild)
    )
    checks.append(
        Check("nitro-enclave", OK, "machine present (QEMU's own model, a reference)")
        if info.has_nitro_enclave
        else Check("nitro-enclave", INFO,
                   "machine missing (only a reference; needs QEMU >= 9.2 with libcbor and gnutls)",
                   rebuild)
    )
    checks.append(
        Check("virtio-nsm-device", OK, "present (QEMU's built-in NSM, a reference)")
        if info.has_virtio_nsm_device
        else Check("virtio-nsm-device", INFO, "missing (only a reference)")
    )
    return checks


def _aarch64_check() -> Check:
    """The QEMU for aarch64 (Graviton) EIFs: found and with the ``virt`` machine
    (docs/architecture.md#architectures). A warning when missing: x86_64 EIFs boot without it."""
    try:
        info = qemumod.probe_qemu(qemumod.find_qemu(AARCH64))
    except NitroError as err:
        return Check("qemu aarch64", WARN, f"aarch64 EIFs cannot boot: {err.message}",
                     qemumod.SETUP_HINT)
    if not info.has_virt:
        return Check("qemu aarch64", WARN, f"{info.path} has no 'virt' machine: aarch64 EIFs "
                     "cannot boot", _REBUILD)
    return Check("qemu aarch64", OK, f"{info.path} (QEMU {'.'.join(map(str, info.version))}, "
                 "virt machine present: aarch64 EIFs boot)")


def _accelerator_fix(kvm: KvmStatus, reason: str) -> str | None:
    """The command (or action) that would make KVM usable, given why it was not chosen."""
    if os.environ.get(ACCEL_ENV):
        return None
    node = kvm.device
    if kvm.cpu_virt_flag is None:
        return ("no command: hardware virtualisation is not exposed to this host; run on bare "
                "metal or an instance with nested virtualisation (VT-x/AMD-V) enabled")
    if not node.exists:
        module = {"intel": "kvm_intel", "amd": "kvm_amd"}.get(kvm.vendor or "", "kvm_intel  # or kvm_amd")
        return f"sudo modprobe {module}"
    if not node.opens:
        return f"sudo usermod -aG kvm $USER  (then log in again); or sudo chmod 666 {node.path}"
    if "probe boot" in reason:
        return "check 'sudo dmesg | tail' for KVM errors; nested KVM may be disabled on the host"
    return None


def _host_checks(host: HostFacts) -> list[Check]:
    """Checks about the host: /dev/vhost-vsock, hugepages, memory, CPUs and the enclave pool."""
    checks: list[Check] = []
    vv = host.vhost_vsock
    if vv.opens:
        checks.append(Check("/dev/vhost-vsock", OK,
                            "present (not used: the harness serves vsock itself over vhost-user)"))
    else:
        checks.append(Check(
            "/dev/vhost-vsock", INFO,
            f"{'absent' if not vv.exists else 'does not open: ' + str(vv.error)} (not needed: "
            "the harness serves vsock over vhost-user so the parent can be CID 3)",
            "sudo modprobe vhost_vsock  (only for tools outside the harness)",
        ))

    if not host.hugepages:
        checks.append(Check("hugepages", INFO, "kernel offers none (enclaves use normal pages)",
                            "a kernel with CONFIG_HUGETLBFS"))
    else:
        parts = [f"{p.label}: {p.total} reserved, {p.available} free ({p.available_mib} MiB)"
                 for p in host.hugepages]
        usable = any(p.available for p in host.hugepages)
        smallest = host.hugepages[0]
        checks.append(Check(
            "hugepages", OK if usable else INFO,
            "; ".join(parts) + ("" if usable else " (enclaves use normal pages)"),
            None if usable else (
                f"echo 512 | sudo tee /sys/kernel/mm/hugepages/hugepages-{smallest.size_kib}kB"
                "/nr_hugepages  (1 GiB of 2M pages)" if smallest.size_kib == 2048 else
                f"echo N | sudo tee /sys/kernel/mm/hugepages/hugepages-{smallest.size_kib}kB"
                "/nr_hugepages"
            ),
        ))

    mem = host.memory_kib
    if mem.get("MemTotal"):
        checks.append(Check("memory", INFO,
                            f"{mem['MemTotal'] // 1024} MiB total, "
                            f"{mem.get('MemAvailable', 0) // 1024} MiB available"))

    cpus = host.cpus
    cores = {(c.package_id, c.core_id) for c in cpus}
    threads = max((len(c.siblings) for c in cpus), default=1)
    reserved = next((c.siblings for c in cpus if c.id == 0), (0,))
    shape = f"{len(cpus)} online CPUs, {len(cores)} cores x {threads} thread{'s' * (threads > 1)}"
    if host.enclave_pool:
        pool_cores = {(c.package_id, c.core_id) for c in cpus if c.id in host.enclave_pool}
        checks.append(Check(
            "cpus", OK,
            f"{shape}; enclave pool {format_cpu_list(host.enclave_pool)} ({len(pool_cores)} whole "
            f"core{'s' * (len(pool_cores) > 1)}; CPU {format_cpu_list(reserved)} kept for the parent)",
        ))
    else:
        checks.append(Check(
            "cpus", WARN,
            f"{shape}; no whole core outside CPU 0's core, so enclave vCPUs cannot get "
            "dedicated host CPUs (they will share the parent's)",
            "run on a host with at least 2 cores",
        ))
    return checks


def _kernel_check(arch: str = "x86_64") -> Check:
    """The Nitro-style kernel the set-up's kernel step caches for ``arch`` (``kernel-*/`` with
    ``.complete`` and a bzImage; for aarch64 ``kernel-arm64-*/`` with an Image), which the shipped
    image recipes boot; the newest one is reported ("nitro kernel", "nitro kernel arm64")."""
    import json

    prefix, blob, name, users = (
        ("kernel-arm64-", "Image", "nitro kernel arm64", "the aarch64 images boot it")
        if arch == "aarch64" else
        ("kernel-", "bzImage", "nitro kernel", "the hello and python recipes boot it"))
    builds = []
    for d in qemumod.cache_dir().glob(f"{prefix}*"):
        if (d / ".complete").is_file() and (d / blob).is_file():
            builds.append(((d / ".complete").stat().st_mtime, d))
    if not builds:
        return Check(name, WARN,
                     f"no complete build in {qemumod.cache_dir()}/{prefix}* "
                     f"({users})",
                     "nitro-harness setup --only kernel")
    newest = max(builds)[1]
    try:
        release = json.loads((newest / "build-info.json").read_text()).get("kernelrelease", "?")
    except (OSError, ValueError):
        release = "?"
    nsm = "with nsm.ko" if (newest / "nsm.ko").is_file() else "no nsm.ko"
    return Check(name, OK, f"{newest} ({release}, {nsm})")


def _setup_checks() -> list[Check]:
    """What ``nitro-harness setup`` provides besides QEMU and the kernel: the apt packages image
    builds need (gcc for init, cpio, xz, zstd, ...) and the default image, built once."""
    from harness.images import debian
    from harness.setup.apt import missing_packages
    from harness.setup.context import Context

    checks = []
    if shutil.which("dpkg-query") is None:
        checks.append(Check("packages", INFO, "not a Debian host: cannot check the apt packages "
                            "image builds need (gcc, make, cpio, xz, zstd)"))
    else:
        missing = missing_packages(Context())
        checks.append(Check("packages", WARN, f"missing: {' '.join(missing)}",
                            "nitro-harness setup --only packages") if missing
                      else Check("packages", OK, "host tools and build dependencies installed"))
    images = sorted((debian.cache_root() / "images").glob("hello-*.eif"))
    checks.append(Check("hello image", OK, f"built ({len(images)} in the image cache)") if images
                  else Check("hello image", WARN, "not built yet (the enclave fixture's default "
                             "image; built on first use otherwise)",
                             "nitro-harness setup --only images"))
    return checks


def diagnose(
    root: str | os.PathLike[str] = "/",
    *,
    qemu_path: str | os.PathLike[str] | None = None,
    probe: ProbeBoot | None = None,
) -> Report:
    """Examine QEMU and the host and return the :class:`Report`.

    ``root``: where /proc, /sys and /dev are read (tests pass a fake tree); ``qemu_path``:
    the binary to examine (default :func:`harness.qemu.find_qemu`; a missing QEMU becomes a
    failed check, not an exception); ``probe``: replaces the KVM probe boot. Never raises for
    anything the report can describe.
    """
    host = hostmod.host_facts(root)
    checks: list[Check] = []
    info: QemuInfo | None = None
    from_env = bool(os.environ.get(qemumod.QEMU_ENV)) and qemu_path is None
    try:
        path = Path(qemu_path) if qemu_path is not None else qemumod.find_qemu()
        info = qemumod.probe_qemu(path)
    except NitroError as err:
        checks.append(Check("qemu", FAIL, err.message, qemumod.SETUP_HINT))
    if info is not None:
        checks.extend(_qemu_checks(info, from_env))
    checks.append(_aarch64_check())

    firmware = qemumod.find_firmware(info.path if info else None)
    checks.append(
        Check("firmware", OK, f"qboot at {firmware}")
        if firmware
        else Check("firmware", FAIL, "qboot.rom not found (microvm boots with qboot)",
                   "nitro-harness setup --only packages (installs qemu-system-data)")
    )

    if info is not None:
        loader = info.kernel_loader
        checks.append(
            Check("kernel loader", OK, f"linuxboot_dma.bin at {loader}")
            if loader
            else Check("kernel loader", FAIL,
                       "linuxboot_dma.bin is in none of QEMU's data dirs "
                       f"({', '.join(map(str, info.data_dirs)) or 'none'}); -kernel boots fail",
                       "nitro-harness setup --only packages (qemu-system-data), then "
                       f"bash {assets.build_script('build-qemu.sh')} --force (copies it beside "
                       "the build); or add -L /usr/share/qemu")
        )

    accel, reason = "tcg", "no usable QEMU"
    if info is not None:
        try:
            accel, reason = choose_accelerator(info, host, probe=probe)
        except NitroError as err:
            checks.append(Check("accelerator", FAIL, err.message, f"unset {ACCEL_ENV}"))
        else:
            if accel == "kvm":
                checks.append(Check("accelerator", OK, f"kvm: {reason}"))
            else:
                status = INFO if os.environ.get(ACCEL_ENV) else WARN
                checks.append(Check("accelerator", status,
                                    f"tcg (slower, works everywhere): {reason}",
                                    _accelerator_fix(host.kvm, reason)))
    checks.append(_kernel_check())
    checks.append(_kernel_check("aarch64"))
    checks.extend(_setup_checks())
    checks.extend(_host_checks(host))
    return Report(checks=checks, host=host, qemu=info, firmware=firmware,
                  accelerator=accel, accelerator_reason=reason)
