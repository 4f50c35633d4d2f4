"""The runtime directory: which enclaves run, their slots, CIDs, CPUs and control sockets.

Every enclave, whether started by ``run-enclave`` (its own supervising process) or in-process by
the pytest plugin, holds one record ``<runtime>/enclaves/<slot>.json`` while it lives, so
``describe-enclaves`` sees them all and two enclaves never share a slot, a CID or (in strict
mode) a CPU. Records are created under an exclusive ``flock`` on ``<runtime>/lock`` and carry the
owning process and its QEMU, each as a PID and a start time (:mod:`harness.processes`). A record
whose owner is gone (exited, killed, a zombie, or its PID now another process's) is stale: it is
never listed, and under the lock it is reclaimed (docs/nitro-cli.md#stale-enclaves): its QEMU,
if still that same process, is killed, its state folder, control socket and log are removed, and
for a ``run-enclave`` enclave an ended record says what happened, so a crashed or killed harness
never blocks the next run or keeps a CID or CPU.

Runtime directory: ``NITRO_HARNESS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/nitro-harness``, else
``/run/nitro-harness`` when writable (root), else ``/tmp/nitro-harness-<uid>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from harness import processes
from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError

# docs/vsock.md#addresses: enclave CIDs auto-assigned from 16 upwards (16, 17, ... seen on Nitro).
FIRST_AUTO_CID = 16
# docs/vsock.md#addresses: CIDs 0-3 are reserved (hypervisor, local, host, parent) and 2^32-1 is
# VMADDR_CID_ANY.
MAX_CID = 2**32 - 2


def runtime_dir() -> Path:
    """Return (and create, mode 0700) the harness's runtime directory; see the module doc."""
    explicit = os.environ.get("NITRO_HARNESS_RUNTIME_DIR")
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "nitro-harness"
    elif os.access("/run", os.W_OK):
        path = Path("/run/nitro-harness")
    else:
        path = Path(tempfile.gettempdir()) / f"nitro-harness-{os.getuid()}"
    (path / "enclaves").mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@dataclass
class EnclaveRecord:
    """What the runtime directory knows of one running enclave.

    ``slot`` is the enclave's number (the hex suffix of its ID), ``pid`` the process that owns
    the enclave (supervisor or test process) and ``pid_start`` its start time, ``qemu_pid`` and
    ``qemu_start`` the same for QEMU (start times in clock ticks since boot, None when unknown:
    :mod:`harness.processes`), ``control_socket`` its control endpoint (None for in-process
    enclaves), ``state_dir`` the folder with its sockets and logs,
    ``nitro_warning`` the line saying the EIF would not boot on Nitro (a kernel without
    command-line devices, booted in the ACPI layout; docs/boot.md#choosing-a-layout), else None.
    """

    slot: int
    enclave_id: str
    name: str
    cid: int
    cpu_ids: list[int]
    memory_mib: int
    pid: int
    state_dir: str
    shared_cpus: bool = False
    debug_mode: bool = False
    control_socket: str | None = None
    qemu_pid: int | None = None
    eif_path: str = ""
    measurements: dict = field(default_factory=dict)
    state: str = "RUNNING"
    nitro_warning: str | None = None
    pid_start: int | None = None
    qemu_start: int | None = None

    def to_json(self) -> dict:
        """The record as a JSON-ready dict."""
        return asdict(self)

    def describe(self) -> dict:
        """nitro-cli's describe-enclaves entry for this enclave, plus ``CPUMode``
        (docs/nitro-cli.md#describe-enclaves).

        ``CPUIDs`` lists the host CPU of each vCPU; a CPU repeats only in the harness's shared
        CPU mode, which ``CPUMode`` names (see :mod:`harness.allocator`).
        """
        return {
            "EnclaveName": self.name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.pid,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": len(self.cpu_ids),
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": "DEBUG_MODE" if self.debug_mode else "NONE",
            "Measurements": self.measurements,
            "CPUMode": "shared" if self.shared_cpus else "strict",
        }


# The files a supervising process keeps in the runtime directory (harness/enclave_process.py).
_PER_PROCESS_FILE = re.compile(r"(?:control-(\d+)\.sock|supervisor-(\d+)\.log)")
_STATE_DIR = re.compile(r"enc(\d+)")


class Registry:
    """The set of enclave records under one runtime directory.

    Use :meth:`locked` around any read-modify-write so that concurrent ``run-enclave`` calls and
    pytest-xdist workers allocate distinct slots, CIDs and CPUs.
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else runtime_dir()
        (self.root / "enclaves").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._local = threading.local()  # how deep this thread holds the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator["Registry"]:
        """Hold the runtime directory's exclusive lock for the duration of the block
        (re-entrant within one thread)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield self
            finally:
                self._local.depth = depth
            return
        with open(self.root / "lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._local.depth = 1
            try:
                yield self
            finally:
                self._local.depth = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _holding(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def _path(self, slot: int) -> Path:
        return self.root / "enclaves" / f"{slot}.json"

    def records(self) -> list[EnclaveRecord]:
        """Live records, lowest slot first. Stale ones (see the module doc) are left out and,
        when this thread holds :meth:`locked`, reclaimed (:meth:`reclaim`); without the lock
        nothing is changed, so a start that is reusing a reclaimed slot is never disturbed."""
        found, stale = [], []
        for path in sorted((self.root / "enclaves").glob("*.json"), key=lambda p: p.stem):
            try:
                data = json.loads(path.read_text())
                record = EnclaveRecord(**data)
            except (OSError, ValueError, TypeError):
                # A torn or foreign file: not an enclave we can describe.
                continue
            if processes.running(record.pid, record.pid_start):
                found.append(record)
            else:
                stale.append((path, record))
        if self._holding():
            for path, record in stale:
                self._reclaim_record(path, record)
            self._sweep({r.slot for r in found}, {r.pid for r in found})
        return sorted(found, key=lambda r: r.slot)

    def reclaim(self) -> None:
        """Under the lock, reclaim what dead owners left (docs/nitro-cli.md#stale-enclaves):
        for each stale record, its QEMU if still the process recorded (PID and start time, its
        state folder in the command line), its state folder, control socket and log, and the
        record (an ended record is written for a ``run-enclave`` enclave); then state folders
        no record names and per-process files of processes that are gone. Never ends a
        process it cannot verify; raises only OSError for a runtime directory it cannot
        change."""
        with self.locked():
            self.records()

    def _inside(self, path: str | None) -> Path | None:
        """``path`` when it is directly in the runtime directory (a record's paths are never
        followed elsewhere), else None."""
        if not path:
            return None
        p = Path(path)
        return p if p.parent == self.root else None

    def _reclaim_record(self, path: Path, record: EnclaveRecord) -> None:
        # QEMU's command line names its sockets in the state folder.
        killed = processes.kill_verified(record.qemu_pid, record.qemu_start,
                                         marker=f"{record.state_dir}/")
        state_dir = self._inside(record.state_dir)
        if record.control_socket:  # a run-enclave enclave: say how it ended
            from harness.ended_enclaves import record_end

            reason = (f"its enclave process (PID {record.pid}) ended without releasing it "
                      "(killed or crashed); the harness reclaimed its CID and CPUs"
                      + (f" and killed QEMU (PID {record.qemu_pid})" if killed else ""))
            log = state_dir / "console.log" if state_dir is not None else None
            with contextlib.suppress(OSError):
                record_end(self, record, reason, log)
        if state_dir is not None and _STATE_DIR.fullmatch(state_dir.name):
            shutil.rmtree(state_dir, ignore_errors=True)
        for leftover in (self._inside(record.control_socket),
                         self.root / f"supervisor-{record.pid}.log"):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _sweep(self, live_slots: set[int], live_pids: set[int]) -> None:
        """Remove state folders no live record names and the control sockets and logs of
        supervising processes that are gone (one killed before it wrote a record)."""
        for entry in self.root.iterdir():
            folder = _STATE_DIR.fullmatch(entry.name)
            if folder and entry.is_dir() and int(folder.group(1)) not in live_slots:
                shutil.rmtree(entry, ignore_errors=True)
                continue
            owned = _PER_PROCESS_FILE.fullmatch(entry.name)
            if owned:
                pid = int(owned.group(1) or owned.group(2))
                if pid not in live_pids and not processes.running(pid):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()

    def allocate_slot(self) -> int:
        """Lowest free slot number (call under :meth:`locked`)."""
        used = {r.slot for r in self.records()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def allocate_cid(self, requested: int | None) -> int:
        """Validate or auto-assign a CID (call under :meth:`locked`).

        docs/nitro-cli.md#validation-rules: CIDs 1, 2, 3 and >= 2^32-1 are rejected with E03; 0 or
        None means auto, starting at 16 and skipping CIDs in use. A CID already used by a running
        enclave is E03 too.
        """
        used = {r.cid for r in self.records()}
        if requested:
            if requested < 4 or requested > MAX_CID:
                raise NitroError(
                    ErrorCode.InvalidArgument,
                    f"--enclave-cid {requested}: CIDs 0-3 are reserved and the largest is {MAX_CID} "
                    "(docs/vsock.md#addresses)",
                )
            if requested in used:
                raise NitroError(
                    ErrorCode.InvalidArgument,
                    f"--enclave-cid {requested}: already used by a running enclave",
                )
            return requested
        cid = FIRST_AUTO_CID
        while cid in used:
            cid += 1
        return cid

    def put(self, record: EnclaveRecord) -> None:
        """Write ``record`` atomically (a reader never sees half a record)."""
        write_atomically(self._path(record.slot), json.dumps(record.to_json(), indent=2).encode(), 0o600)

    def remove(self, slot: int) -> None:
        """Forget the enclave in ``slot`` (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(slot).unlink()

    def find(self, *, enclave_id: str | None = None, name: str | None = None) -> EnclaveRecord:
        """The record with this enclave ID or name.

        Raises NitroError E03 naming the unknown ID or name (nitro-cli rejects unknown IDs as
        invalid arguments).
        """
        for record in self.records():
            if enclave_id is not None and record.enclave_id == enclave_id:
                return record
            if name is not None and record.name == name:
                return record
        what = f"--enclave-id {enclave_id}" if enclave_id is not None else f"--enclave-name {name}"
        raise NitroError(ErrorCode.InvalidArgument, f"{what}: no running enclave has it")
