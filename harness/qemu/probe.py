"""Probe what one QEMU binary can do: version, machines, devices, accelerators, data
directories, and whether ``vhost-user-device`` (the harness's NSM) is user-creatable.

Public API: :func:`probe_qemu` (-> :class:`~harness.qemu.info.QemuInfo`),
:func:`device_creatable`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from harness.errors import ErrorCode, NitroError
from harness.qemu.find import QEMU_ENV, SETUP_HINT
from harness.qemu.info import QemuInfo, _read_build_info
from harness.qemu.probe_cache import recall, remember

# How a QEMU without the patch refuses `-device vhost-user-device`
# (docs/vhost-user.md#generic-device).
REFUSAL = "expects a pluggable device type"
_PROBE_TIMEOUT_S = 30


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
    known = recall(key, binary)
    if known is not None:
        return known

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
    remember(key, info)
    return info
