"""What is left of an enclave that ended by itself: when, why, and its console log.

docs/nitro-cli.md#console: an enclave started by ``run-enclave`` that ends without being
terminated (its application exited and init rebooted, the kernel panicked, QEMU died) leaves a
record ``<runtime>/ended/<stamp>-<slot>.json`` and a copy of its console log beside it
(``...console.log``). ``console`` on such an enclave prints the kept log and one line saying
when and why it ended. At most :data:`MAX_ENDED` records are kept, the oldest dropped first;
``terminate-enclave --all`` removes them all. Enclave IDs reuse slots, so a lookup by ID or name
returns the newest record that has it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.atomic_file import write_atomically
from harness.registry import EnclaveRecord, Registry

__all__ = ["MAX_ENDED", "EndedEnclave", "record_end", "ended_enclaves", "find_ended",
           "ended_after", "clear_ended"]

#: How many ended enclaves are kept (the oldest is dropped first).
MAX_ENDED = 16
_DIR = "ended"


@dataclass(frozen=True)
class EndedEnclave:
    """One ended enclave: its describe-enclaves identity, ``ended_at`` (RFC 3339, UTC),
    ``reason`` (one line), ``console_log`` (the kept copy's path, "" when none was kept)."""

    enclave_id: str
    name: str
    cid: int
    debug_mode: bool
    eif_path: str
    ended_at: str
    reason: str
    console_log: str

    def line(self) -> str:
        """``Enclave <id> (<name>) ended at <time>: <reason>``."""
        return f"Enclave {self.enclave_id} ({self.name}) ended at {self.ended_at}: {self.reason}"


def _folder(root: Path) -> Path:
    d = root / _DIR
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _records(root: Path) -> list[tuple[Path, EndedEnclave]]:
    """Every readable record, oldest first (the file names start with the end time)."""
    out = []
    for path in sorted(_folder(root).glob("*.json")):
        try:
            out.append((path, EndedEnclave(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError):
            continue  # a torn or foreign file is not a record
    return out


def _remove(path: Path) -> None:
    for p in (path, path.with_suffix(".console.log")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def record_end(registry: Registry, record: EnclaveRecord, reason: str,
               console_log: Path | None, *, now: _dt.datetime | None = None) -> EndedEnclave:
    """Keep what is left of the enclave ``record`` describes: copy ``console_log`` (when it
    exists) and write the record, then drop the oldest beyond :data:`MAX_ENDED`. Runs under the
    registry's lock. Raises OSError when the runtime directory cannot be written."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stem = f"{time.time_ns():020d}-{record.slot}"
    with registry.locked():
        folder = _folder(registry.root)
        kept = folder / f"{stem}.console.log"
        if console_log is not None and console_log.is_file():
            shutil.copyfile(console_log, kept)
        ended = EndedEnclave(
            enclave_id=record.enclave_id, name=record.name, cid=record.cid,
            debug_mode=record.debug_mode, eif_path=record.eif_path,
            ended_at=now.astimezone(_dt.timezone.utc).isoformat(timespec="seconds"),
            reason=reason, console_log=str(kept) if kept.is_file() else "")
        write_atomically(folder / f"{stem}.json", json.dumps(asdict(ended), indent=2).encode(),
                         0o600)
        records = _records(registry.root)
        for path, _ in records[: max(0, len(records) - MAX_ENDED)]:
            _remove(path)
    return ended


def ended_enclaves(registry: Registry) -> list[EndedEnclave]:
    """The kept records, oldest first."""
    return [e for _, e in _records(registry.root)]


def find_ended(registry: Registry, *, enclave_id: str | None = None,
               name: str | None = None) -> EndedEnclave | None:
    """The newest kept record with this enclave ID or name (with neither: the newest), or None."""
    for e in reversed(ended_enclaves(registry)):
        if (enclave_id is None and name is None) or e.enclave_id == enclave_id or \
                (name is not None and e.name == name):
            return e
    return None


def ended_after(ended: EndedEnclave, since: float) -> bool:
    """True when ``ended`` ended at or after ``since`` (a ``time.time()``; ``ended_at`` has
    whole seconds, so the second ``since`` falls in counts)."""
    try:
        at = _dt.datetime.fromisoformat(ended.ended_at).timestamp()
    except ValueError:
        return False
    return at >= int(since)


def clear_ended(registry: Registry) -> int:
    """Remove every kept record and console log; return how many records there were."""
    with registry.locked():
        records = _records(registry.root)
        for path, _ in records:
            _remove(path)
        for stray in _folder(registry.root).glob("*.console.log"):
            stray.unlink(missing_ok=True)
    return len(records)
