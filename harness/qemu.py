"""Find the QEMU the harness runs enclaves on, and probe what it can do.

Where QEMU comes from (docs/architecture.md#qemu-build): ``scripts/build-qemu.sh`` builds
Debian's qemu 10.0 source with a patch that makes ``vhost-user-device`` user-creatable and
installs it under ``~/.cache/nitro-harness/qemu-<version>-<patch hash>/``. A user may point
``NITRO_HARNESS_QEMU`` at any other ``qemu-system-x86_64``; :func:`probe_qemu` then says what
that binary lacks.

Public API: :func:`find_qemu`, :func:`probe_qemu` (-> :class:`QemuInfo`),
:func:`find_firmware`, :func:`probe_boot` (run guest code under an accelerator),
:func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ErrorCode, NitroError

__all__ = [
    "QemuInfo",
    "BootProbe",
    "cache_dir",
    "find_qemu",
    "current_build",
    "patch_hash",
    "probe_qemu",
    "find_firmware",
    "probe_boot",
    "device_creatable",
    "QEMU_ENV",
    "SETUP_HINT",
]

QEMU_ENV = "NITRO_HARNESS_QEMU"
QBOOT_ENV = "NITRO_HARNESS_QBOOT"
BINARY = "qemu-system-x86_64"
SETUP_HINT = "scripts/setup.sh"
# How a QEMU without the patch refuses `-device vhost-user-device`
# (docs/vhost-user.md#generic-device).
REFUSAL = "expects a pluggable device type"
# Debian's qemu-system-data ships qboot; build-qemu.sh also copies it beside the build.
SYSTEM_QBOOT = Path("/usr/share/qemu/qboot.rom")
_PROBE_TIMEOUT_S = 30


def cache_dir() -> Path:
    """The harness's cache root: ``$NITRO_HARNESS_CACHE``, else ``~/.cache/nitro-harness``
    (the same rule as scripts/build-qemu.sh and the image cache)."""
    explicit = os.environ.get("NITRO_HARNESS_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "nitro-harness"


def _cached_builds(root: Path) -> list[Path]:
    """Complete builds under ``root`` (``qemu-*/.complete`` + binary), newest first."""
    builds: list[tuple[float, Path]] = []
    try:
        candidates = list(root.glob("qemu-*"))
    except OSError:
        return []
    for build in candidates:
        stamp = build / ".complete"
        binary = build / "bin" / BINARY
        if build.is_dir() and stamp.is_file() and os.access(binary, os.X_OK):
            builds.append((stamp.stat().st_mtime, binary))
    return [binary for _, binary in sorted(builds, key=lambda b: b[0], reverse=True)]


PATCH_DIR = Path(__file__).resolve().parent.parent / "scripts" / "qemu-patches"


def patch_hash(patch_dir: Path = PATCH_DIR) -> str | None:
    """The cache key scripts/build-qemu.sh derives from the patches: sha256 over each
    ``*.patch`` in name order as ``name + "\\n" + bytes``, first 12 hex digits; ``None`` when
    the directory is absent (an installed wheel without the repository's scripts/)."""
    patches = sorted(patch_dir.glob("*.patch")) if patch_dir.is_dir() else []
    if not patches:
        return None
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    return digest.hexdigest()[:12]


def current_build() -> Path | None:
    """The complete cached build for the repository's current patch set
    (``qemu-<version>-<patch hash>/bin/qemu-system-x86_64``), or ``None``."""
    wanted = patch_hash()
    if wanted is None:
        return None
    for binary in _cached_builds(cache_dir()):
        if binary.parent.parent.name.endswith("-" + wanted):
            return binary
    return None


def find_qemu() -> Path:
    """The ``qemu-system-x86_64`` to run enclaves with.

    Order: ``$NITRO_HARNESS_QEMU`` (must be an executable file), else the cached build of the
    repository's current patches (:func:`current_build`), else the newest complete build in
    :func:`cache_dir` (``qemu-<version>-<patch hash>/bin/qemu-system-x86_64``), else
    ``qemu-system-x86_64`` on ``PATH``. Raises ``NitroError(E19 FileOperationFailure)`` when
    none exists, naming the fix (``scripts/setup.sh``). Whether the binary is fit for
    enclaves (patched, microvm, ...) is :func:`probe_qemu`'s question.
    """
    explicit = os.environ.get(QEMU_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"{QEMU_ENV}={explicit}: not an executable file "
                f"(unset it to use the harness's own build from {SETUP_HINT})",
            )
        return path.absolute()
    current = current_build()
    if current is not None:
        return current
    builds = _cached_builds(cache_dir())
    if builds:
        return builds[0]
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path)
    raise NitroError(
        ErrorCode.FileOperationFailure,
        f"{BINARY} not found: {QEMU_ENV} is unset, {cache_dir()} holds no complete build and "
        f"PATH has none; run {SETUP_HINT} (builds the patched QEMU) or set {QEMU_ENV}",
    )


@dataclass(frozen=True)
class QemuInfo:
    """What one QEMU binary offers, as :func:`probe_qemu` found it.

    ``path``: the binary; ``version``: ``(major, minor, micro)``; ``version_text``: the first line
    of ``-version``; ``machines``: names from ``-machine help`` (aliases included); ``devices``:
    names from ``-device help``; ``accelerators``: from ``-accel help``;
    ``vhost_user_device_creatable``: creating ``vhost-user-device`` passed QEMU's user-creatable
    check (only creating it tells: docs/vhost-user.md#generic-device);
    ``vhost_user_device_detail``: what QEMU said when asked to create it; ``build_info``: the
    ``build-info.json`` that scripts/build-qemu.sh writes beside its builds, or ``None`` for other
    binaries.
    """

    path: Path
    version: tuple[int, int, int]
    version_text: str
    machines: frozenset[str]
    devices: frozenset[str]
    accelerators: frozenset[str]
    vhost_user_device_creatable: bool
    vhost_user_device_detail: str
    build_info: dict[str, Any] | None = field(default=None, compare=False)
    data_dirs: tuple[Path, ...] = ()

    def data_file(self, name: str) -> Path | None:
        """The first ``name`` (e.g. ``"linuxboot_dma.bin"``) in :attr:`data_dirs`, or None."""
        for directory in self.data_dirs:
            candidate = directory / name
            if candidate.is_file():
                return candidate
        return None

    @property
    def kernel_loader(self) -> Path | None:
        """``linuxboot_dma.bin``, the option ROM microvm's ``-kernel`` boot needs (QEMU
        fails with "Failed to open file linuxboot_dma.bin" without it), if QEMU can find it."""
        return self.data_file("linuxboot_dma.bin")

    @property
    def has_microvm(self) -> bool:
        """The ``microvm`` machine exists (the harness boots enclaves on it)."""
        return "microvm" in self.machines

    @property
    def has_nitro_enclave(self) -> bool:
        """QEMU's own ``nitro-enclave`` machine exists (QEMU >= 9.2 with libcbor+gnutls)."""
        return "nitro-enclave" in self.machines

    @property
    def vhost_user_device(self) -> bool:
        """Alias of :attr:`vhost_user_device_creatable` (the harness NSM can be attached)."""
        return self.vhost_user_device_creatable

    @property
    def has_vhost_user_device(self) -> bool:
        """``vhost-user-device`` is compiled in (creatable or not)."""
        return "vhost-user-device" in self.devices

    @property
    def has_vhost_user_vsock_device(self) -> bool:
        """``vhost-user-vsock-device`` (virtio-mmio vsock served over vhost-user) exists."""
        return "vhost-user-vsock-device" in self.devices

    @property
    def has_virtio_nsm_device(self) -> bool:
        """QEMU's built-in ``virtio-nsm-device`` exists (reference only; the harness serves
        its own NSM over vhost-user-device)."""
        return "virtio-nsm-device" in self.devices

    @property
    def fit_for_enclaves(self) -> bool:
        """Everything the harness needs: microvm, vhost-user-vsock-device and a creatable
        vhost-user-device (the NSM), plus the tcg accelerator that works everywhere."""
        return (
            self.has_microvm
            and self.has_vhost_user_vsock_device
            and self.vhost_user_device_creatable
            and "tcg" in self.accelerators
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (sorted lists for sets), with the derived flags."""
        return {
            "path": str(self.path),
            "version": ".".join(map(str, self.version)),
            "version_text": self.version_text,
            "machines": {
                "microvm": self.has_microvm,
                "nitro-enclave": self.has_nitro_enclave,
            },
            "devices": {
                "vhost-user-device": {
                    "present": self.has_vhost_user_device,
                    "creatable": self.vhost_user_device_creatable,
                    "detail": self.vhost_user_device_detail,
                },
                "vhost-user-vsock-device": self.has_vhost_user_vsock_device,
                "virtio-nsm-device": self.has_virtio_nsm_device,
            },
            "accelerators": sorted(self.accelerators),
            "fit_for_enclaves": self.fit_for_enclaves,
            "data_dirs": [str(d) for d in self.data_dirs],
            "kernel_loader": str(self.kernel_loader) if self.kernel_loader else None,
            "build_info": self.build_info,
        }


def _run(args: list[str], *, timeout: float = _PROBE_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a short QEMU query with no stdin; NitroError(E05) if it cannot start or hangs."""
    try:
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except OSError as err:
        raise NitroError(
            ErrorCode.ProcessSpawnFailure, f"{args[0]}: cannot run it ({err.strerror})"
        ) from None
    except subprocess.TimeoutExpired:
        raise NitroError(
            ErrorCode.ProcessSpawnFailure,
            f"{args[0]} {' '.join(args[1:3])}: no answer within {timeout:.0f} s",
        ) from None


_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")


def _parse_version(text: str, path: Path) -> tuple[tuple[int, int, int], str]:
    """``(major, minor, micro)`` and the first line of ``qemu -version`` output."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VERSION_RE.search(first)
    if not match:
        raise NitroError(
            ErrorCode.ProcessSpawnFailure,
            f"{path}: '-version' printed {first!r}, not 'QEMU emulator version X.Y.Z' "
            f"(is it a QEMU binary? {QEMU_ENV} may point at the wrong file)",
        )
    major, minor, micro = match.group(1), match.group(2), match.group(3) or "0"
    return (int(major), int(minor), int(micro)), first


def _parse_machines(text: str) -> frozenset[str]:
    """Names (and ``(alias of ...)`` targets' aliases) from ``-machine help``."""
    names: set[str] = set()
    for line in text.splitlines()[1:]:  # first line: "Supported machines are:"
        parts = line.split()
        if parts:
            names.add(parts[0])
    return frozenset(names)


_DEVICE_RE = re.compile(r'^name "([^"]+)"')


def _parse_devices(text: str) -> frozenset[str]:
    """Device names from ``-device help`` (lines ``name "x", bus ..., desc ...``)."""
    return frozenset(
        m.group(1) for line in text.splitlines() if (m := _DEVICE_RE.match(line.strip()))
    )


def _parse_accelerators(text: str) -> frozenset[str]:
    """Accelerator names from ``-accel help`` (first line is a heading)."""
    return frozenset(line.strip() for line in text.splitlines()[1:] if line.strip())


def device_creatable(
    qemu: str | os.PathLike[str], driver: str, properties: str = ""
) -> tuple[bool, str]:
    """Ask ``qemu`` to create ``-device driver[,properties]`` and read how it answers
    (docs/vhost-user.md#generic-device).

    ``-device X,help`` lists the options even where the device is refused, so the device is
    actually created: on ``-machine none -S`` (no bus at all) with a listening socket chardev
    ``probe0`` that nobody connects to (pass ``chardev=probe0`` in ``properties`` if the device
    needs one). QEMU checks ``user_creatable`` before it looks for a bus, so a refused class
    stops with "Parameter 'driver' expects a pluggable device type", while a creatable one
    gets past that check and stops at the missing bus. Returns ``(creatable, QEMU's answer)``
    where the answer is QEMU's first error line(s). Raises ``NitroError(E05)`` when QEMU does
    not run or hangs.
    """
    device = f"{driver},{properties}" if properties else driver
    with tempfile.TemporaryDirectory(prefix="nitro-harness-probe-") as tmp:
        sock = Path(tmp) / "probe.sock"
        proc = _run(
            [
                str(qemu),
                "-machine", "none",
                "-nodefaults", "-no-user-config", "-display", "none", "-S",
                "-chardev", f"socket,id=probe0,path={sock},server=on,wait=off",
                "-device", device,
            ]
        )
    answer = " ".join(line.strip() for line in proc.stderr.strip().splitlines()[:2])
    answer = answer.replace(f"{qemu}: ", "")
    if REFUSAL in answer or "not a valid device model name" in answer:
        return False, answer
    if proc.returncode == 0:
        # Not expected with -machine none, but exit 0 means the device was created.
        return True, "created"
    # Past the user_creatable check: realize stopped for want of a bus (expected here).
    if "bus" in answer:
        return True, answer
    return False, answer or f"exit status {proc.returncode}"


def _read_build_info(path: Path) -> dict[str, Any] | None:
    """``<prefix>/build-info.json`` written by scripts/build-qemu.sh, if this is such a build."""
    info = path.resolve().parent.parent / "build-info.json"
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_probe_cache: dict[tuple[str, int, int], QemuInfo] = {}
_probe_lock = threading.Lock()
_PROBE_FORMAT = 1  # bump when QemuInfo's fields or the probe's method change


def _disk_cache_file(resolved: str) -> Path:
    """Where the probe of the binary at ``resolved`` is kept across processes."""
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return cache_dir() / "probes" / f"qemu-{digest}.json"


def _load_probe(key: tuple[str, int, int], path: Path) -> QemuInfo | None:
    """The probe stored for exactly ``key`` (path, mtime_ns, size), or None."""
    try:
        data = json.loads(_disk_cache_file(key[0]).read_text())
        if data.get("format") != _PROBE_FORMAT or tuple(data.get("key", ())) != key:
            return None
        raw = data["info"]
        return QemuInfo(
            path=path,
            version=tuple(raw["version"]),  # type: ignore[arg-type]
            version_text=raw["version_text"],
            machines=frozenset(raw["machines"]),
            devices=frozenset(raw["devices"]),
            accelerators=frozenset(raw["accelerators"]),
            vhost_user_device_creatable=bool(raw["vhost_user_device_creatable"]),
            vhost_user_device_detail=raw["vhost_user_device_detail"],
            build_info=_read_build_info(path),
            data_dirs=tuple(Path(d) for d in raw["data_dirs"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_probe(key: tuple[str, int, int], info: QemuInfo) -> None:
    """Keep ``info`` for other processes (temp file + rename); silently skip when the cache
    directory is not writable: the cache only saves the ~0.4 s a probe costs."""
    target = _disk_cache_file(key[0])
    data = {
        "format": _PROBE_FORMAT,
        "key": list(key),
        "info": {
            "version": list(info.version),
            "version_text": info.version_text,
            "machines": sorted(info.machines),
            "devices": sorted(info.devices),
            "accelerators": sorted(info.accelerators),
            "vhost_user_device_creatable": info.vhost_user_device_creatable,
            "vhost_user_device_detail": info.vhost_user_device_detail,
            "data_dirs": [str(d) for d in info.data_dirs],
        },
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".probe-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, target)
    except OSError:
        pass


def probe_qemu(path: str | os.PathLike[str]) -> QemuInfo:
    """Probe one QEMU binary: version, machines, devices, accelerators, vhost-user-device.

    Runs ``-version``, ``-machine help``, ``-device help``, ``-accel help``, ``-L help`` and one short
    ``-machine none -S`` run that tries to create ``vhost-user-device`` (about 0.2 s in all).
    Cached by (resolved path, mtime, size), in the process and on disk
    (``<cache_dir>/probes/``), so a rebuilt or replaced binary is re-probed.
    Raises ``NitroError(E19)`` when ``path`` is not an executable file and ``NitroError(E05)``
    when it does not run or does not answer like QEMU.
    """
    binary = Path(path)
    try:
        st = binary.stat()
    except OSError:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"{binary}: no such QEMU binary (run {SETUP_HINT})"
        ) from None
    if not os.access(binary, os.X_OK):
        raise NitroError(ErrorCode.FileOperationFailure, f"{binary}: not executable")
    key = (str(binary.resolve()), st.st_mtime_ns, st.st_size)
    with _probe_lock:
        cached = _probe_cache.get(key)
    if cached is not None:
        return cached
    stored = _load_probe(key, binary)
    if stored is not None:
        with _probe_lock:
            _probe_cache[key] = stored
        return stored

    version_out = _run([str(binary), "-version"])
    version, version_text = _parse_version(version_out.stdout, binary)
    machines = _parse_machines(_run([str(binary), "-machine", "help"]).stdout)
    devices = _parse_devices(_run([str(binary), "-device", "help"]).stdout)
    accels = _parse_accelerators(_run([str(binary), "-accel", "help"]).stdout)
    data_dirs = tuple(
        Path(line.strip()).resolve()
        for line in _run([str(binary), "-L", "help"]).stdout.splitlines()
        if line.strip()
    )
    if "vhost-user-device" in devices:
        creatable, detail = device_creatable(
            binary, "vhost-user-device", "chardev=probe0,virtio-id=33,num_vqs=1,vq_size=2"
        )
    else:
        creatable, detail = False, "not compiled in (needs --enable-vhost-user)"
    info = QemuInfo(
        path=binary,
        version=version,
        version_text=version_text,
        machines=machines,
        devices=devices,
        accelerators=accels,
        vhost_user_device_creatable=creatable,
        vhost_user_device_detail=detail,
        build_info=_read_build_info(binary),
        data_dirs=data_dirs,
    )
    with _probe_lock:
        _probe_cache[key] = info
    _store_probe(key, info)
    return info


def find_firmware(qemu: str | os.PathLike[str] | None = None) -> Path | None:
    """The qboot firmware microvm boots with (SeaBIOS hung on microvm with this QEMU).

    Order: ``$NITRO_HARNESS_QBOOT``; ``<qemu prefix>/share/qemu/qboot.rom`` beside ``qemu``
    (scripts/build-qemu.sh copies it there); ``/usr/share/qemu/qboot.rom`` from Debian's
    ``qemu-system-data``. Returns ``None`` when none exists (fix:
    ``apt-get install qemu-system-data``).
    """
    explicit = os.environ.get(QBOOT_ENV)
    if explicit:
        candidate = Path(explicit)
        return candidate if candidate.is_file() else None
    candidates: list[Path] = []
    if qemu is not None:
        candidates.append(Path(qemu).resolve().parent.parent / "share" / "qemu" / "qboot.rom")
    candidates.append(SYSTEM_QBOOT)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


# The accelerator probe firmware: 64 KiB mapped at 0xFFFF0000. From the reset vector it enters
# 32-bit protected mode and, when CPUID reports BMI2, runs one VEX-encoded instruction (shlx,
# as the Linux decompressor does), then writes 0x31 to isa-debug-exit so QEMU exits with status
# (0x31 << 1) | 1 = 99 (65 if shlx computed a wrong value). Real mode alone is not enough: the
# paravirtual /dev/kvm on these hosts runs it fine but fails a stock kernel with "KVM internal
# error. Suberror: 1" (emulation failure) at exactly such a VEX instruction. Source below,
# assembled with `as --32` + `ld -m elf_i386 -Ttext=0 --oformat=binary` (tests reassemble it).
PROBE_ASM = r"""
    .code16
    .text
    .globl _start
_start:
start16:
    cli
    lgdtl %cs:gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0xFFFF0000 + start32)
    .code32
start32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    cpuid
    cmpl $7, %eax
    jb pass
    movl $7, %eax
    xorl %ecx, %ecx
    cpuid
    testl $0x100, %ebx          /* CPUID.7.0:EBX[8] = BMI2 */
    jz pass
    movl $3, %eax
    movl $1, %edx
    shlxl %eax, %edx, %edx      /* VEX-encoded, as the kernel's decompressor uses */
    cmpl $8, %edx
    jne fail
pass:
    movb $0x31, %al             /* isa-debug-exit: QEMU exits (0x31 << 1) | 1 = 99 */
    outb %al, $0xf4
    hlt
fail:
    movb $0x20, %al             /* exit 65: the instruction computed a wrong value */
    outb %al, $0xf4
    hlt
    .balign 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: flat 32-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: flat data */
gdt_desc:
    .word 23
    .long 0xFFFF0000 + gdt
    .org 0xFFF0
    .code16
reset:
    jmp start16
    .org 0x10000
"""
# PROBE_ASM assembled: the code at offset 0 and the reset vector's jmp at 0xFFF0; zeros elsewhere.
_PROBE_CODE = bytes.fromhex(
    "fa2e660f011678000f20c06683c8010f22c066ea1a00ffff080066b810008ed88ec08ed031c00fa283f807"
    "7225b80700000031c90fa2f7c3000100007414b803000000ba01000000c4e279f7d283fa087505b031e6f4"
    "f4b020e6f4f48db400000000000000000000ffff0000009acf00ffff00000092cf0017006000ffff"
)
_PROBE_RESET = bytes.fromhex("e90d00")  # jmp start16 (IP wraps to 0)
_PROBE_ROM_SIZE = 64 * 1024
_PROBE_EXIT_STATUS = (0x31 << 1) | 1


def _probe_rom() -> bytes:
    """The 64 KiB probe firmware image assembled from :data:`PROBE_ASM`."""
    rom = bytearray(_PROBE_ROM_SIZE)
    rom[: len(_PROBE_CODE)] = _PROBE_CODE
    rom[0xFFF0 : 0xFFF0 + len(_PROBE_RESET)] = _PROBE_RESET
    return bytes(rom)


@dataclass(frozen=True)
class BootProbe:
    """The result of :func:`probe_boot`: ``ok`` when the guest code ran and QEMU exited with
    the expected status; ``detail``: what happened (QEMU's first error line, or the status);
    ``seconds``: wall time of the run."""

    ok: bool
    detail: str
    seconds: float


def probe_boot(qemu: str | os.PathLike[str], accel: str, *, timeout: float = 10.0) -> BootProbe:
    """Boot a ``microvm`` under ``accel`` (``"kvm"`` or ``"tcg"``, ``-cpu max``) with the probe
    firmware (:data:`PROBE_ASM`: protected mode, a VEX instruction, then ``isa-debug-exit``);
    ``ok`` iff QEMU exits with status 99.

    This proves the accelerator creates the VM and runs the kind of guest code a kernel runs.
    On success it takes tens of milliseconds. A "KVM internal error" (QEMU then stays paused)
    ends the run at once; otherwise the run is killed after ``timeout`` seconds. Never raises
    for a failed boot; ``detail`` says why.
    """
    import selectors
    import time

    with tempfile.TemporaryDirectory(prefix="nitro-harness-boot-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(_probe_rom())
        args = [
            str(qemu),
            "-machine", f"microvm,accel={accel},acpi=off,pit=off,pic=off,rtc=off",
            "-cpu", "max",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
            "-m", "16M", "-smp", "1",
            "-bios", str(rom),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as err:
            return BootProbe(False, f"cannot run {qemu}: {err.strerror}", 0.0)
        stderr = b""
        timed_out = False
        deadline = start + timeout
        assert proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = b"internal error" not in stderr
                    break
                if not sel.select(left):
                    continue
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break  # QEMU closed stderr: it is exiting
                stderr += chunk
                if b"internal error" in stderr and b"Code=" in stderr:
                    break  # the register dump is complete; QEMU now sits paused
                if b"internal error" in stderr:
                    # QEMU reports it and then sits paused: collect the dump briefly, then stop.
                    deadline = min(deadline, time.monotonic() + 0.5)
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        proc.stderr.close()
        seconds = time.monotonic() - start
    text = stderr.decode(errors="replace")
    if status == _PROBE_EXIT_STATUS:
        return BootProbe(True, f"{accel}: probe guest ran and exited (status 99)", seconds)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "warning:" not in ln]
    first = lines[0].replace(f"{qemu}: ", "") if lines else ""
    if "internal error" in text and "emulation failure" in text:
        first = f"{first} (emulation failure)"
    if timed_out and not first:
        first = f"no exit within {timeout:.0f} s"
    return BootProbe(
        False,
        f"{accel}: probe boot failed (exit status {status}" + (f": {first}" if first else "") + ")",
        seconds,
    )
