"""``isolation``: check the enclave is shaped like a Nitro enclave, from inside and from the host.

Each check returns what it saw or raises StepFailed; the step runs the chosen ones (default:
all but ``peer_unreachable``, which boots a second enclave), keeps the report as
``isolation.json`` and fails naming every failed check. docs/boot.md describes the machine
they check: no network or disk, only CID 3 reachable over vsock (docs/vsock.md), dedicated
CPUs and preallocated memory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.console import without_kernel_messages
from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, kind_only, register
from harness.scenario.steps.report import indent

if TYPE_CHECKING:
    from harness.enclave_factory import RunningEnclave
    from harness.scenario.runner import ScenarioRunner


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Run ``checks`` (:data:`ISOLATION_CHECKS` names) within the step's limit."""
    deadline = time.monotonic() + call.limit
    checks = call.body.get("checks") or [c for c in ISOLATION_CHECKS if c != "peer_unreachable"]
    tolerance = float(call.body.get("memory_tolerance", 0.2))
    report: dict[str, str] = {}
    failures = []
    for check in checks:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            failures.append(f"{check}: no time left")
            break
        try:
            report[check] = _CHECKS[check](_Probe(runner, remaining, tolerance))
        except StepFailed as exc:
            report[check] = f"FAILED: {exc.message}"
            failures.append(f"{check}: {exc.message}")
    (runner.artifacts_dir / "isolation.json").write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        raise StepFailed("isolation checks failed:\n  " + "\n  ".join(failures))


class _Probe:
    """What one check gets: the runner, its enclave, the seconds left, the memory tolerance."""

    def __init__(self, runner: ScenarioRunner, limit: float, tolerance: float):
        self.runner = runner
        self.enclave: RunningEnclave = runner.ensure_enclave()
        self.limit = limit
        self.tolerance = tolerance

    def guest_value(self, key: str, expression: str) -> str:
        """Value of a shell ``expression`` in the guest, framed by <KEY>...</KEY>.

        The frame is assembled by the shell from a variable, so a console that echoes the typed
        command line (a tty in echo mode) never shows it: only the real output matches.
        """
        res = self.runner.exec(f'__k={key}; echo "<$__k>$({expression})</$__k>"', self.limit)
        found = re.search(rf"<{key}>(.*?)</{key}>", without_kernel_messages(res.output), re.DOTALL)
        if found is None:
            raise StepFailed(f"guest command for {key} ({expression!r}) printed no value "
                             f"(status {res.status}):\n{indent(res.output)}")
        return found.group(1)

    def connect_results(self, targets: list[tuple[int, int]],
                        enclave: RunningEnclave | None = None) -> dict[int, str]:
        """From the guest (python3), try each (CID, port): ``{cid: "ok" | "errno<n>"}``."""
        script = (
            "import socket\n"
            f"for cid, port in {targets!r}:\n"
            "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
            "    s.settimeout(15)\n"
            "    try:\n"
            "        s.connect((cid, port)); r = 'ok'\n"
            "    except OSError as e:\n"
            "        r = 'errno%s' % e.errno\n"
            "    s.close()\n"
            "    print('vsock-result %d:%s' % (cid, r))\n"
        )
        encoded = base64.b64encode(script.encode()).decode()
        res = self.runner.exec(f"python3 -c 'import base64;exec(base64.b64decode(\"{encoded}\"))'",
                               self.limit, enclave)
        results = dict(re.findall(r"vsock-result (\d+):(ok|errno\d+)",
                                  without_kernel_messages(res.output)))
        if res.status != 0 or len(results) != len(targets):
            raise StepFailed(f"guest vsock probe (needs python3 in the image) exited {res.status}:\n"
                             f"{indent(res.output)}")
        return {int(k): v for k, v in results.items()}


def _guest_network(probe: _Probe) -> str:
    names = probe.guest_value("NET", "ls /sys/class/net").split()
    if names != ["lo"]:
        raise StepFailed(f"guest network interfaces {names}; only 'lo' may exist")
    return "only lo"


def _guest_block_devices(probe: _Probe) -> str:
    names = probe.guest_value("BLK", "ls /sys/block").split()
    # Loop, RAM and zram devices are the guest kernel's own memory, not host-provided disks.
    disks = [n for n in names if not re.fullmatch(r"(loop|ram|zram)\d+", n)]
    if disks:
        raise StepFailed(f"guest block devices {disks}; none may exist")
    return f"no disks ({len(names)} loop/ram devices)"


def _guest_cpus(probe: _Probe) -> str:
    seen = probe.guest_value("CPUS", "grep -c ^processor /proc/cpuinfo").strip()
    want = len(probe.enclave.cpu_ids)
    if seen != str(want):
        raise StepFailed(f"guest sees {seen!r} CPUs, configured {want}")
    return f"{want} CPUs"


def _guest_memory(probe: _Probe) -> str:
    value = probe.guest_value("MEM", "grep MemTotal /proc/meminfo")
    found = re.search(r"MemTotal:\s+(\d+) kB", value)
    if not found:
        raise StepFailed(f"cannot read MemTotal: {value!r}")
    total_mib = int(found.group(1)) / 1024
    want, tolerance = probe.enclave.memory_mib, probe.tolerance
    if not (want * (1 - tolerance) <= total_mib <= want):
        raise StepFailed(f"guest MemTotal {total_mib:.1f} MiB is not within "
                         f"[{want * (1 - tolerance):.0f}, {want}] MiB of the configured {want} MiB")
    return f"MemTotal {total_mib:.1f} MiB of {want} MiB"


def _guest_vsock_cids(probe: _Probe) -> str:
    port = 47000 + secrets.randbelow(1000)
    listener = probe.enclave.vsock_listen(port)
    try:
        others = [2, 1, probe.enclave.cid + 1000]
        results = probe.connect_results([(c, port) for c in others] + [(3, port)])
    finally:
        with contextlib.suppress(Exception):
            listener.close()
    if results.get(3) != "ok":
        raise StepFailed(f"the guest could not reach the parent (CID 3) port {port}: {results[3]}")
    reached = [c for c in others if results.get(c) == "ok"]
    if reached:
        raise StepFailed(f"the guest reached CID(s) {reached}; only CID 3 may be reachable")
    return "only CID 3 reachable: " + ", ".join(f"{c}->{r}" for c, r in sorted(results.items()))


def _host_cmdline(probe: _Probe) -> str:
    argv = probe.enclave.qemu_cmdline
    if not argv:
        raise StepFailed("the QEMU command line is not known")
    (probe.runner.artifacts_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
    bad = []
    for i, arg in enumerate(argv):
        if arg in ("-netdev", "-net", "-drive", "-blockdev", "-hda", "-hdb", "-cdrom", "-sd",
                   "-mtdblock", "-pflash", "-usb"):
            bad.append(arg)
        elif arg == "-nic" and (i + 1 >= len(argv) or argv[i + 1] != "none"):
            bad.append(arg)
        elif re.search(r"virtio-net|virtio-blk|virtio-scsi|e1000|rtl8139|vhost-net|nvme|"
                       r"usb-storage|scsi-hd|ide-hd|ide-cd", arg):
            bad.append(arg)
    if "-nodefaults" not in argv:
        bad.append("(missing -nodefaults: QEMU would add default devices)")
    if bad:
        raise StepFailed(f"QEMU command line has network/disk devices: {bad}")
    return "no network or disk device, -nodefaults"


def _host_vcpu_affinity(probe: _Probe) -> str:
    enclave = probe.enclave
    pid = enclave.qemu_pid
    cpus = set(enclave.cpu_ids)
    vcpus = list(enclave.vcpu_thread_ids)
    if len(vcpus) != len(enclave.cpu_ids):
        raise StepFailed(f"{len(vcpus)} vCPU threads known, {len(enclave.cpu_ids)} configured")
    problems, seen = [], {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError as exc:
        raise StepFailed(f"cannot list QEMU {pid}'s threads: {exc.strerror}") from None
    for tid in tids:
        try:
            affinity = os.sched_getaffinity(tid)
        except OSError:
            continue  # the thread ended meanwhile
        seen[tid] = sorted(affinity)
        if tid in vcpus and not affinity <= cpus:
            problems.append(f"vCPU thread {tid} may run on {sorted(affinity)}, not only {sorted(cpus)}")
        if tid not in vcpus and affinity & cpus:
            problems.append(f"QEMU thread {tid} ({_thread_name(pid, tid)}) may run on enclave "
                            f"CPUs {sorted(affinity & cpus)}")
    missing = [t for t in vcpus if t not in tids]
    if missing:
        problems.append(f"vCPU threads {missing} are not threads of QEMU {pid}")
    # The harness's own per-enclave threads (device back ends, console reader) must stay off too.
    own = [getattr(b, "native_id", None) for b in getattr(enclave, "_backends", [])]
    with contextlib.suppress(Exception):
        own.append(getattr(enclave.console, "native_id", None))
    for tid in filter(None, own):
        with contextlib.suppress(OSError):
            affinity = os.sched_getaffinity(tid)
            if affinity & cpus:
                problems.append(f"harness thread {tid} ({_thread_name(os.getpid(), tid)}) may run "
                                f"on enclave CPUs {sorted(affinity & cpus)}")
    (probe.runner.artifacts_dir / "affinity.json").write_text(json.dumps(
        {"enclave_cpus": sorted(cpus), "vcpu_threads": vcpus, "qemu_threads": seen}, indent=2) + "\n")
    if problems:
        raise StepFailed("; ".join(problems))
    others = len(set(seen) - set(vcpus))
    return f"vCPU threads {sorted(set(vcpus))} on {sorted(cpus)}; {others} other QEMU threads off them"


def _host_memory(probe: _Probe) -> str:
    enclave = probe.enclave
    argv = " ".join(enclave.qemu_cmdline)
    if "prealloc=on" not in argv:
        raise StepFailed("guest memory is not preallocated (no prealloc=on on the memory backend)")
    try:
        status = Path(f"/proc/{enclave.qemu_pid}/status").read_text()
    except OSError as exc:
        raise StepFailed(f"cannot read QEMU's status: {exc.strerror}") from None
    fields = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", status, re.MULTILINE)}
    resident_mib = (fields.get("RssShmem", 0) + fields.get("HugetlbPages", 0)) / 1024
    want = enclave.memory_mib
    if resident_mib < want * 0.95:
        raise StepFailed(f"only {resident_mib:.0f} MiB of the {want} MiB guest memory is resident")
    seen = f"{resident_mib:.0f} MiB resident (prealloc)"
    if "mem-lock=on" in argv:
        locked_mib = fields.get("VmLck", 0) / 1024
        if locked_mib < want * 0.95:
            raise StepFailed(f"mem-lock=on but only {locked_mib:.0f} MiB locked of {want} MiB")
        seen += f", {locked_mib:.0f} MiB locked"
    return seen


def _peer_unreachable(probe: _Probe) -> str:
    # A second enclave from the same EIF; each tries to reach the other's CID, which the vsock
    # device must refuse (RST) whatever the port: only CID 3 is routed (docs/boot.md).
    runner, enclave = probe.runner, probe.enclave
    peer = runner.factory.start(runner.factory.config(eif=runner.eif_path, **{
        k: v for k, v in runner.settings().items() if k not in ("cid", "name", "cpu_ids")}))
    try:
        port = 5005
        mine = probe.connect_results([(peer.cid, port)])
        theirs = probe.connect_results([(enclave.cid, port)], peer)
    finally:
        peer.terminate()
    if mine.get(peer.cid) == "ok" or theirs.get(enclave.cid) == "ok":
        raise StepFailed(f"enclaves reached each other: {mine} / {theirs}")
    return f"CID {enclave.cid} -> {peer.cid}: {mine[peer.cid]}; back: {theirs[enclave.cid]}"


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


_CHECKS: dict[str, Callable[[_Probe], str]] = {
    "guest_network": _guest_network,
    "guest_block_devices": _guest_block_devices,
    "guest_cpus": _guest_cpus,
    "guest_memory": _guest_memory,
    "guest_vsock_cids": _guest_vsock_cids,
    "host_cmdline": _host_cmdline,
    "host_vcpu_affinity": _host_vcpu_affinity,
    "host_memory": _host_memory,
    "peer_unreachable": _peer_unreachable,
}

#: Isolation checks in the order they run; ``peer_unreachable`` (boots a second enclave) only on request.
ISOLATION_CHECKS = tuple(_CHECKS)

STEP = register("isolation", needs_enclave=True, label=kind_only, run=run)
