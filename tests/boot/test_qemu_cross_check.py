"""Cross-check against an independent implementation: QEMU's own ``nitro-enclave`` machine.

QEMU's machine loads the EIF itself (``-kernel`` takes the EIF), measures it with its own EIF
loader and serves PCR0-2 through its own unsigned virtio-nsm device; the harness only serves
vsock (the heartbeat) over vhost-user and the serial console. From inside that guest,
/dev/nsm's PCR0, PCR1 and PCR2 must equal :func:`harness.eif.measure_eif` of the same file.
The same EIF is then booted by the harness itself, and init's ``nitro-init:`` step lines must
appear in the same order on both consoles.

PCRs are read from inside each guest with the image's own tool: ``python`` runs
``nsm_tool.py describe-pcr`` through its debug console shell; ``hello`` (busybox, no python)
prints them itself at start with the static ``nsm-pcr`` (``harness/data/programs/nsm-pcr``), one JSON line per
PCR before its first greeting, and the test reads those lines from the console.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.console import Console
from harness.eif import measure_eif
from harness.enclave import Enclave, EnclaveConfig
from harness.qemu import find_firmware, find_qemu, probe_qemu
from harness.vhost_user import VhostUserBackend
from harness.vsock import VsockDevice
from helpers.boot_images import recipe_eif

GUEST_CID = 7  # any CID >= 4; this VsockDevice is private to the test
MEMORY_MIB = 1024
BOOT_TIMEOUT = 120
NSM_TOOL = "python3 /opt/nitro-harness/nsm_tool.py"
# One line of nsm-pcr (and nsm_tool's describe-pcr) output, found anywhere in a console line.
PCR_LINE = re.compile(r'\{"index": \d+, "lock": (?:true|false), "data": "[0-9a-f]*"\}')
# "nitro-init: <message> (t=<seconds>s)": the timestamp differs between boots.
INIT_LINE = re.compile(r"^nitro-init: (.*?)(?: \(t=[0-9.]+s\))?\s*$", re.MULTILINE)
READY = r"nitro-init: starting application"


@pytest.fixture(scope="module")
def qemu_path() -> Path:
    path = find_qemu()
    info = probe_qemu(path)
    if not info.has_nitro_enclave:
        pytest.skip(f"{path} has no nitro-enclave machine (QEMU >= 9.2 built with libcbor and gnutls)")
    return path


def init_steps(console_text: str) -> list[str]:
    """init's step lines, timestamps dropped; heartbeat connect retries are timing, not steps."""
    steps = [m.group(1) for m in INIT_LINE.finditer(console_text)]
    return [s for s in steps if not (s.startswith("heartbeat: connect") and "retrying" in s)]


def nitro_enclave_command(qemu: Path, eif: Path, console_sock: Path, vsock_sock: Path) -> list[str]:
    cmd = [
        str(qemu),
        "-machine", "nitro-enclave,vsock=vsock,id=cross-check,memory-backend=mem",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "2",
        "-m", f"{MEMORY_MIB}M",
        "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(eif),
        # Appended to the EIF's own command line by QEMU (not measured), as the harness does
        # for TCG guests on the Nitro layout (harness.machine._guest_cmdline).
        "-append", "no_timer_check",
        "-chardev", f"socket,id=con,path={console_sock}",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=vsock,path={vsock_sock}",
    ]
    firmware = find_firmware(qemu)
    if firmware:
        cmd += ["-bios", str(firmware)]
    return cmd


def read_pcrs(console: Console) -> dict[int, str]:
    """PCR0-2 (lower-case hex) read inside a ``python`` guest through /dev/nsm."""
    result = console.exec(" && ".join(f"{NSM_TOOL} describe-pcr {i}" for i in (0, 1, 2)), timeout=90)
    assert result.status == 0, f"nsm_tool on QEMU's NSM failed:\n{result.output}"
    pcrs: dict[int, str] = {}
    for line in result.output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            doc = json.loads(line)
            pcrs[int(doc["index"])] = doc["data"].lower()
    return pcrs


def pcrs_from_console(console_text: str) -> dict[int, str]:
    """PCRs that ``nsm-pcr`` printed on a console (``{"index": N, "lock": .., "data": hex}``
    lines); fails on a ``nsm-pcr: ...`` error line."""
    errors = [line for line in console_text.splitlines() if line.startswith("nsm-pcr: ")]
    assert not errors, f"nsm-pcr failed in the guest: {errors}"
    pcrs: dict[int, str] = {}
    for match in PCR_LINE.finditer(console_text):
        doc = json.loads(match.group(0))
        assert doc["index"] not in pcrs, f"PCR{doc['index']} printed twice"
        pcrs[doc["index"]] = doc["data"]
    return pcrs


def boot_on_qemu_nitro_enclave(qemu: Path, eif: Path, work: Path, ready: str, in_guest=None):
    """Boot ``eif`` on QEMU's nitro-enclave machine until ``ready`` appears on its console;
    return ``in_guest(console)`` (None without it), the console text and the seconds to the
    heartbeat."""
    console_sock, vsock_sock = work / "con.sock", work / "vsock.sock"
    stderr_path = work / "qemu.stderr"
    dev = backend = console = process = None
    stderr = open(stderr_path, "wb")
    try:
        dev = VsockDevice(GUEST_CID)
        heartbeat = dev.heartbeat(9000)
        backend = VhostUserBackend(str(vsock_sock), dev, offer_config=True)
        backend.start()
        console = Console(console_sock, work / "console.log")
        console.listen()
        started = time.monotonic()
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--"]
            + nitro_enclave_command(qemu, eif, console_sock, vsock_sock),
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, close_fds=True,
        )

        def qemu_said() -> str:
            stderr.flush()
            return stderr_path.read_text(errors="replace").strip() or "(nothing on stderr)"

        try:
            console.attach(timeout=30)
        except OSError as err:
            pytest.fail(f"QEMU nitro-enclave did not connect its console ({err}); qemu: {qemu_said()}")
        deadline = started + BOOT_TIMEOUT
        while not heartbeat.wait(0.2):
            assert process.poll() is None, (
                f"QEMU exited with {process.returncode} before the heartbeat; qemu: {qemu_said()}\n"
                + console.text()[-3000:]
            )
            assert backend.error is None, f"vsock back end failed: {backend.error}"
            assert time.monotonic() < deadline, "no heartbeat from the nitro-enclave guest\n" + console.text()[-3000:]
        heartbeat_s = time.monotonic() - started
        console.expect(ready, timeout=60)
        found = in_guest(console) if in_guest else None
        return found, console.text(), heartbeat_s
    finally:
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait(10)
        if console is not None:
            console.close()
        if backend is not None:
            backend.stop()
        if dev is not None:
            dev.close()
        stderr.close()


def boot_on_harness(eif: Path, work: Path, ready: str, shell: bool) -> str:
    """Boot ``eif`` with the harness's own machine and return its console text once ``ready``
    appeared (and, with ``shell``, the application's shell answers)."""
    enclave = Enclave.start(
        EnclaveConfig(eif_path=eif, memory_mib=MEMORY_MIB, cpu_count=2, debug_mode=True),
        artifacts_dir=work,
    )
    try:
        enclave.console.expect(ready, timeout=60)
        if shell:
            assert enclave.exec("true", timeout=60).status == 0
        return enclave.console.text()
    finally:
        enclave.terminate()


@contextlib.contextmanager
def nitro_enclave_workdir(tmp_path: Path):
    """A short private directory for the nitro-enclave boot's sockets (Unix socket paths must
    stay under 108 bytes); its console log and QEMU stderr are kept with the test's artifacts."""
    work = Path(tempfile.mkdtemp(prefix="nxc-"))
    try:
        yield work
    finally:
        for name in ("console.log", "qemu.stderr"):
            with contextlib.suppress(OSError):
                shutil.copyfile(work / name, tmp_path / f"nitro-enclave-{name}")
        shutil.rmtree(work, ignore_errors=True)


def assert_pcrs_equal_measure_eif(qemu_pcrs: dict[int, str], eif: Path, context: str) -> None:
    """PCR0-2 served by QEMU's NSM equal the harness's measure_eif of the same file."""
    assert sorted(qemu_pcrs) == [0, 1, 2], f"{qemu_pcrs}\n{context}"
    # QEMU's NSM serves the EIF's PCRs (not debug-mode zeros): a zero PCR would mean nothing
    # was measured.
    for index in (0, 1, 2):
        assert qemu_pcrs[index] != "00" * 48, f"PCR{index} from QEMU's NSM is all zeros"
    expected = measure_eif(eif)
    harness_pcrs = {0: expected.pcr0.hex(), 1: expected.pcr1.hex(), 2: expected.pcr2.hex()}
    assert qemu_pcrs == harness_pcrs, f"QEMU nitro-enclave: {qemu_pcrs}\nharness measure_eif: {harness_pcrs}"


def assert_same_init_steps(qemu_console: str, harness_console: str, application: str) -> list[str]:
    """init's step lines are the same on both machines and end with starting ``application``."""
    qemu_steps, harness_steps = init_steps(qemu_console), init_steps(harness_console)
    assert any(s.startswith("heartbeat: sent") for s in qemu_steps), qemu_steps
    assert qemu_steps and qemu_steps[-1].startswith(f"starting application{application}"), qemu_steps
    assert qemu_steps == harness_steps, (
        "init's steps differ between QEMU's nitro-enclave machine and the harness:\n"
        f"qemu:    {qemu_steps}\nharness: {harness_steps}"
    )
    return qemu_steps


def test_python_image_pcrs_and_console_match_qemu_nitro_enclave(qemu_path, tmp_path):
    eif = recipe_eif("python")
    with nitro_enclave_workdir(tmp_path) as work:
        def shell_then_pcrs(console: Console) -> dict[int, str]:
            assert console.exec("true", timeout=60).status == 0
            return read_pcrs(console)

        qemu_pcrs, qemu_console, heartbeat_s = boot_on_qemu_nitro_enclave(
            qemu_path, eif, work, READY, shell_then_pcrs
        )
        assert_pcrs_equal_measure_eif(qemu_pcrs, eif, "nsm_tool.py on QEMU's NSM")
        harness_console = boot_on_harness(eif, tmp_path / "harness", READY, shell=True)
        steps = assert_same_init_steps(qemu_console, harness_console, "")
        print(f"nitro-enclave heartbeat after {heartbeat_s:.1f} s; PCRs {qemu_pcrs}; steps {steps}")


def test_hello_image_pcrs_and_console_match_qemu_nitro_enclave(qemu_path, tmp_path):
    """hello prints PCR0-2 with nsm-pcr before its first greeting: on QEMU's machine they are
    QEMU's measurement and must equal measure_eif's; init's steps must match the harness's."""
    eif = recipe_eif("hello")
    greeting = r"\[   1\] Hello from the enclave side!"
    with nitro_enclave_workdir(tmp_path) as work:
        _, qemu_console, heartbeat_s = boot_on_qemu_nitro_enclave(qemu_path, eif, work, greeting)
        qemu_pcrs = pcrs_from_console(qemu_console)
        assert_pcrs_equal_measure_eif(qemu_pcrs, eif, "nsm-pcr's lines on QEMU's console:\n"
                                      + qemu_console[-3000:])
        # The PCR lines come before the greeting, which is unchanged.
        assert qemu_console.index('{"index": 0,') < re.search(greeting, qemu_console).start()

        harness_console = boot_on_harness(eif, tmp_path / "harness", greeting, shell=False)
        # nsm-pcr reads the harness's own NSM device too (its values are not compared here:
        # this test is about QEMU's independent implementation). A QEMU that cannot create
        # vhost-user-device boots the harness's enclave without an NSM (nsm: auto).
        if probe_qemu(qemu_path).vhost_user_device:
            assert sorted(pcrs_from_console(harness_console)) == [0, 1, 2], harness_console[-3000:]
        steps = assert_same_init_steps(qemu_console, harness_console, ": '/usr/bin/hello'")
        print(f"nitro-enclave heartbeat after {heartbeat_s:.1f} s; PCRs {qemu_pcrs}; steps {steps}")
