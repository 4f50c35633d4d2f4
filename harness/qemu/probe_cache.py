"""Keep :func:`harness.qemu.probe_qemu`'s results: in the process and on disk
(``<cache_dir>/probes/``), keyed by the binary's (resolved path, mtime_ns, size) so a rebuilt
or replaced binary is probed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from harness.qemu.find import cache_dir
from harness.qemu.info import QemuInfo, _read_build_info

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


def recall(key: tuple[str, int, int], path: Path) -> QemuInfo | None:
    """The probe kept for exactly ``key`` (resolved path, mtime_ns, size): this process's
    copy, else the one on disk (then also kept in the process), else None."""
    with _probe_lock:
        cached = _probe_cache.get(key)
    if cached is not None:
        return cached
    stored = _load_probe(key, path)
    if stored is not None:
        with _probe_lock:
            _probe_cache[key] = stored
    return stored


def remember(key: tuple[str, int, int], info: QemuInfo) -> None:
    """Keep a fresh probe ``info`` for ``key``, in this process and on disk."""
    with _probe_lock:
        _probe_cache[key] = info
    _store_probe(key, info)
