"""The boot timeline (docs/boot.md#boot-timeline): the console parser on real boot consoles, its
bounds, the JSON file, the E36 details, run-enclave --verbose and a failed scenario's report.

The consoles in tests/vectors/console/ are two real boots of the hello image through the
harness (TCG): the Nitro-style kernel, and Debian's cloud kernel in the ACPI layout.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import enclave_timeline
from harness.boot_timeline import FORMAT, BootTimeline, Phase, format_phases, load_phases
from harness.cli import main
from harness.console_timestamps import (
    MAX_EVENTS, MAX_TIMED_LINES, SCAN_LIMIT, TEXT_CHARS, LineClock, parse_console,
)
from harness.errors import ErrorCode, NitroError

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "console"
NITRO = (VECTORS / "hello-nitro-kernel.log").read_bytes()
DEBIAN = (VECTORS / "hello-debian-kernel.log").read_bytes()


def names(events):
    return [e.name for e in events]


# -- the parser on real consoles ------------------------------------------------------------------

def test_nitro_kernel_boot_milestones():
    events = parse_console(NITRO)
    assert names(events) == [
        "kernel_started", "console_enabled", "initramfs_unpacking", "initramfs_unpacked",
        "run_init", "init_step", "init_step", "init_step", "init_step", "init_heartbeat",
    ]
    by = {e.name: e for e in events}
    assert by["kernel_started"].guest_s == 0.0
    assert by["kernel_started"].text.startswith("Linux version 6.12.118-nitro-harness ")
    assert by["initramfs_unpacking"].guest_s == 0.704004
    assert by["initramfs_unpacked"].text == "Freeing initrd memory: 3472K"
    assert (by["run_init"].guest_s, by["run_init"].text) == (1.092028, "Run /init as init process")
    assert [(e.guest_s, e.text) for e in events if e.name.startswith("init_")] == [
        (1.14, "started (pid 1)"),
        (1.144, "mounted devtmpfs on /dev, console on stdio"),
        (1.144, "no /modules/order: kernel has its drivers built in"),
        (1.164, "loaded /nsm.ko"),
        (1.192, "heartbeat: sent 0xB7 to vsock 3:9000 and got it back"),
    ]
    # ``end`` is just past the line, its line feed included.
    heartbeat = events[-1]
    assert NITRO[:heartbeat.end].endswith(b"got it back (t=1.192s)\r\n")
    # Nothing after init's heartbeat line counts (the application's own lines follow).
    assert b"starting application" in NITRO[heartbeat.end:]


def test_debian_kernel_boot_milestones_with_modules_and_interleaved_kernel_lines():
    events = parse_console(DEBIAN)
    # The setup code's "Probing EDD ... ok" comes first, without a timestamp: not a kernel line.
    assert DEBIAN.startswith(b"Probing EDD")
    assert names(events)[:5] == ["kernel_started", "console_enabled", "initramfs_unpacking",
                                 "initramfs_unpacked", "run_init"]
    assert events[0].text.startswith("Linux version 6.12.118+deb12-cloud-amd64 ")
    assert (events[1].guest_s, events[2].guest_s) == (2.129252, 5.500397)
    assert events[2].text == "Trying to unpack rootfs image as initramfs..."
    assert events[4].guest_s == 11.030799
    assert [e.text for e in events if e.name == "init_step"][2:7] == [
        "loaded module virtio_mmio.ko", "loaded module vsock.ko",
        "loaded module vmw_vsock_virtio_transport_common.ko",
        "loaded module vmw_vsock_virtio_transport.ko", "loaded 4 module(s) from /modules/order",
    ]
    assert (events[-1].name, events[-1].guest_s) == ("init_heartbeat", 12.024)
    guest = [e.guest_s for e in events]
    assert guest == sorted(guest)


def test_arrival_times_come_from_the_line_clock_in_chunks():
    # The console arrives in chunks; each event gets the arrival time of its line's end.
    clock = LineClock()
    for i in range(0, len(NITRO), 1000):
        clock.feed(NITRO[i:i + 1000], 100.0 + i // 1000)
    events = parse_console(NITRO, clock)
    assert clock.first_byte_at == 100.0 and clock.size == len(NITRO)
    assert clock.copy().head == NITRO
    for e in events:
        assert e.arrived == 100.0 + (e.end - 1) // 1000
    assert parse_console(NITRO)[0].arrived is None


def test_a_fatal_init_or_a_panic_is_an_event_and_ends_init():
    console = (b"[    0.000000] Linux version x\r\n"
               b"[    0.500000] Run /init as init process\r\n"
               b"nitro-init: started (pid 1) (t=0.600s)\r\n"
               b"nitro-init: fatal: cannot read /cmd: No such file or directory; ending the enclave (t=0.700s)\r\n"
               b"nitro-init: never parsed (t=0.800s)\r\n")
    events = parse_console(console)
    assert names(events) == ["kernel_started", "run_init", "init_step", "init_fatal"]
    assert events[-1].guest_s == 0.7
    panic = parse_console(b"[    0.000000] Linux\n[    1.250000] Kernel panic - not syncing: VFS: x\n")
    assert names(panic) == ["kernel_started", "kernel_panic"] and panic[1].guest_s == 1.25


# -- bounds: the console is the guest's ------------------------------------------------------------

def test_only_complete_lines_within_the_scan_limit_count():
    line = b"[    0.100000] Run /init as init process\n"
    assert names(parse_console(b"[    0.000000] Linux\n" + line[:-1])) == ["kernel_started"]
    filler = b"x" * (SCAN_LIMIT - 30) + b"\n"
    assert names(parse_console(filler + b"[    0.000000] Linux version 6.12.118-nitro-harness\n")) == []
    assert names(parse_console(b"[    0.000000] Linux\n" + b"y" * (4 * SCAN_LIMIT))) == ["kernel_started"]


def test_events_lines_text_and_timestamps_are_bounded():
    many = b"[    0.000000] Linux\n" + b"".join(
        b"nitro-init: step %d (t=1.000s)\n" % i for i in range(1000))
    events = parse_console(many)
    assert len(events) == MAX_EVENTS
    long_line = b"nitro-init: " + b"a" * 100_000 + b" (t=1.000s)\n"
    assert parse_console(long_line) == []  # its timestamp lies past the part of a line looked at
    wide = parse_console(b"nitro-init: " + "é\x1b".encode() * 100 + b" (t=2.000s)\n")
    assert len(wide[0].text) <= TEXT_CHARS and set(wide[0].text) <= {"?"}
    # A timestamp with more digits than a kernel prints is not a timestamp.
    assert parse_console(b"[1234567.000000] Linux\n") == []
    assert parse_console(b"nitro-init: x (t=1.0000000000s)\n") == []


def test_line_clock_keeps_the_first_scan_limit_bytes_and_a_bounded_count():
    clock = LineClock()
    clock.feed(b"\n" * (MAX_TIMED_LINES + 10), 1.0)
    assert clock.arrival(MAX_TIMED_LINES) == 1.0 and clock.arrival(MAX_TIMED_LINES + 1) is None
    late = LineClock()
    late.feed(b"a" * (SCAN_LIMIT - 1) + b"\n\n", 2.0)
    assert late.arrival(SCAN_LIMIT) == 2.0 and late.arrival(SCAN_LIMIT + 1) is None
    late.feed(b"\n", 3.0)
    assert late.size == SCAN_LIMIT + 2 and late.arrival(SCAN_LIMIT + 2) is None
    assert late.copy().head == b"a" * (SCAN_LIMIT - 1) + b"\n"


# -- the timeline and its file --------------------------------------------------------------------

def made_timeline() -> BootTimeline:
    timeline = BootTimeline("/x/hello.eif")
    origin = timeline.origin
    timeline.host.append(Phase("host", "eif_measured", "EIF read, CRC-checked and measured", 0.01))
    timeline.host.append(Phase("host", "resumed", "guest resumed", 0.5))
    timeline.set_observed([("vsock_handshake", origin + 0.4), ("vsock_driver_ready", origin + 1.5)])
    clock = LineClock()
    clock.feed(NITRO[:5000], origin + 1.0)
    clock.feed(NITRO[5000:], origin + 2.0)
    timeline.add_console(parse_console(NITRO, clock), clock)
    timeline.host.append(Phase("host", "heartbeat", "heartbeat received", 2.1))
    timeline.finish()
    return timeline


def test_timeline_json_shape_and_order(tmp_path):
    data = made_timeline().to_json()
    assert set(data) == {"format", "eif", "started_at", "outcome", "error", "heartbeat_s",
                         "console_bytes", "phases"}
    assert (data["format"], data["eif"], data["outcome"], data["error"]) == (
        FORMAT, "/x/hello.eif", "heartbeat", None)
    assert data["heartbeat_s"] == 2.1 and data["console_bytes"] == len(NITRO)
    assert data["started_at"].endswith("Z")
    phases = data["phases"]
    assert all(set(p) == {"side", "name", "label", "host_s", "guest_s"} for p in phases)
    assert [p["name"] for p in phases] == [
        "eif_measured", "vsock_handshake", "resumed", "console_first_byte", "kernel_started",
        "console_enabled", "vsock_driver_ready", "initramfs_unpacking", "initramfs_unpacked",
        "run_init", "init_step", "init_step", "init_step", "init_step", "init_heartbeat",
        "heartbeat",
    ]
    assert [p["host_s"] for p in phases] == sorted(p["host_s"] for p in phases)
    assert phases[3] == {"side": "guest", "name": "console_first_byte",
                         "label": "first console byte", "host_s": 1.0, "guest_s": None}
    assert phases[9] == {"side": "guest", "name": "run_init", "label": "Run /init",
                         "host_s": 2.0, "guest_s": 1.092028}
    assert phases[14]["label"] == "init: heartbeat: sent 0xB7 to vsock 3:9000 and got it back"


def test_timeline_file_round_trip_and_text(tmp_path):
    timeline = made_timeline()
    path = tmp_path / "boot-timeline.json"
    timeline.write(path)
    assert json.loads(path.read_text()) == timeline.to_json()
    phases = load_phases(path)
    assert phases == timeline.phases()
    lines = format_phases(phases)
    assert lines[0] == "   0.010 s  host  EIF read, CRC-checked and measured"
    assert lines[9] == "   2.000 s  guest [  1.092] Run /init"
    assert timeline.lines(2) == lines[-2:]
    path.write_text(json.dumps({"format": "something else", "phases": []}))
    with pytest.raises(ValueError, match="not a 'nitro-harness boot timeline 1' file"):
        load_phases(path)


def test_a_failed_boot_keeps_its_first_outcome():
    timeline = BootTimeline("e.eif")
    timeline.finish("no heartbeat on vsock port 9000 within 25 s")
    timeline.finish()
    data = timeline.to_json()
    assert (data["outcome"], data["error"], data["heartbeat_s"]) == (
        "failed", "no heartbeat on vsock port 9000 within 25 s", None)
    assert [p["name"] for p in data["phases"]] == ["failed"]


# -- recording around Enclave.start ---------------------------------------------------------------

class Devices:
    def __init__(self, origin: float):
        self.origin = origin

    def milestones(self):
        return [("vsock_connected", self.origin + 0.2), ("vsock_handshake", self.origin + 0.3)]


def fake_enclave(tmp_path: Path, artifacts: bool = True):
    state = tmp_path / "enc0"
    state.mkdir(parents=True)
    clock = LineClock()
    timeline = BootTimeline("hello.eif")
    timeline.origin -= 10  # as if the start began 10 s ago: its own marks come last
    clock.feed(NITRO, timeline.origin + 1.0)
    console = SimpleNamespace(boot_clock=clock)
    return SimpleNamespace(timeline=timeline, state_dir=state,
                           artifacts_dir=tmp_path / "art" if artifacts else None,
                           machine=SimpleNamespace(console=console))


def test_recorded_boot_writes_the_timeline_with_the_back_ends_and_the_console(tmp_path):
    enclave = fake_enclave(tmp_path)
    with enclave_timeline.recorded(enclave, Devices(enclave.timeline.origin)) as timeline:
        timeline.mark("eif_measured")
    data = json.loads((enclave.state_dir / "boot-timeline.json").read_text())
    assert data["outcome"] == "heartbeat" and data["heartbeat_s"] is not None
    got = [p["name"] for p in data["phases"]]
    assert got == ["vsock_connected", "vsock_handshake", "console_first_byte"] + names(
        parse_console(NITRO)) + ["eif_measured", "heartbeat"]
    # Completing it again at terminate replaces, never duplicates, the observed phases.
    enclave_timeline.keep_artifacts(enclave, Devices(enclave.timeline.origin))
    again = json.loads((tmp_path / "art" / "boot-timeline.json").read_text())
    assert [p["name"] for p in again["phases"]] == got


def test_a_boot_failure_shows_the_last_phases_and_names_the_kept_file(tmp_path):
    enclave = fake_enclave(tmp_path)
    with pytest.raises(NitroError) as err:
        with enclave_timeline.recorded(enclave, Devices(enclave.timeline.origin)):
            raise NitroError(ErrorCode.EnclaveBootFailure, "no heartbeat on vsock port 9000 within 25 s",
                             details="last console lines:\nx")
    details = err.value.details.splitlines()
    kept = tmp_path / "art" / "boot-timeline.json"
    assert details[:3] == ["last console lines:", "x",
                           f"boot timeline, last phases (all of them: {kept}):"]
    assert len(details) == 3 + enclave_timeline.LAST_PHASES
    assert details[-1].endswith("host  boot failed")
    assert err.value.boot_timeline is enclave.timeline
    data = json.loads((enclave.state_dir / "boot-timeline.json").read_text())
    assert (data["outcome"], data["error"]) == ("failed", "no heartbeat on vsock port 9000 within 25 s")


def test_other_errors_keep_their_details_but_carry_the_timeline(tmp_path):
    enclave = fake_enclave(tmp_path, artifacts=False)
    with pytest.raises(NitroError) as err:
        with enclave_timeline.recorded(enclave, Devices(enclave.timeline.origin)):
            raise NitroError(ErrorCode.InsufficientMemoryAvailable, "no memory")
    assert err.value.details is None and err.value.boot_timeline.outcome == "failed"
    with pytest.raises(KeyError):
        with enclave_timeline.recorded(fake_enclave(tmp_path / "b"), Devices(0.0)):
            raise KeyError("x")


# -- run-enclave --verbose ------------------------------------------------------------------------

def supervisor_answering(monkeypatch, answer: dict):
    import io

    from harness.cli import enclave_commands

    class Supervisor:
        def __init__(self, *args, **kwargs):
            self.stdin, self.stdout, self.returncode = io.StringIO(), io.StringIO(json.dumps(answer) + "\n"), 0

        def wait(self):
            return 0

    monkeypatch.setattr(enclave_commands.subprocess, "Popen", Supervisor)


LINES = ["   0.010 s  host  EIF read, CRC-checked and measured", "   2.100 s  host  heartbeat received"]


def test_run_enclave_verbose_prints_the_timeline_on_stderr(tmp_path, capsys, monkeypatch):
    eif = tmp_path / "x.eif"
    eif.write_bytes(b"x")
    info = {"EnclaveName": "x", "EnclaveID": "i-1-enc0", "ProcessID": 1, "EnclaveCID": 16,
            "NumberOfCPUs": 1, "CPUIDs": [1], "MemoryMiB": 256}
    supervisor_answering(monkeypatch, {"ok": info, "state_dir": "/run/enc0", "control_socket": "/x",
                                       "preflight": [], "timeline": LINES})
    args = ["run-enclave", "--eif-path", str(eif), "--memory", "256", "--cpu-count", "1"]
    assert main(args + ["--verbose"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == info
    assert ("boot timeline (seconds since the start; [guest clock], also in "
            "/run/enc0/boot-timeline.json while it runs):\n" + "".join(f"  {x}\n" for x in LINES)) in err
    assert main(args) == 0
    assert "boot timeline" not in capsys.readouterr().err


def test_run_enclave_verbose_prints_the_timeline_of_a_failed_boot(tmp_path, capsys, monkeypatch):
    eif = tmp_path / "x.eif"
    eif.write_bytes(b"x")
    supervisor_answering(monkeypatch, {"error": {"code": 36, "message": "no heartbeat", "details": None},
                                       "timeline": LINES})
    status = main(["run-enclave", "-v", "--eif-path", str(eif), "--memory", "256", "--cpu-count", "1"])
    assert status == ErrorCode.EnclaveBootFailure.exit_status
    err = capsys.readouterr().err
    assert err.index("  " + LINES[1]) < err.index("no heartbeat")


# -- a failed scenario's report -------------------------------------------------------------------

def test_failed_scenario_report_shows_the_kept_timeline(tmp_path):
    import harness.scenario as scn

    (tmp_path / "any.eif").write_bytes(b"never read")
    path = tmp_path / "case.yaml"
    path.write_text(textwrap.dedent("""\
        eif: any.eif
        steps:
          - boot:
        """))
    (case,) = scn.load_scenarios(path)
    timeline = made_timeline()

    class FailingBoot(scn.EnclaveFactory):
        def start(self, config=None, **settings):
            folder = self.artifacts_dir / "1-any"
            folder.mkdir(parents=True)
            timeline.write(folder / "boot-timeline.json")
            raise NitroError(ErrorCode.EnclaveBootFailure, "no heartbeat",
                             details="last console lines:\nboom\nboot timeline, last phases:\n  x")

    artifacts = tmp_path / "artifacts"
    result = scn.ScenarioRunner(case, FailingBoot(artifacts), artifacts_dir=artifacts).run()
    assert result.status == "failed"
    report = result.failure_report().splitlines()
    kept = artifacts / "1-any" / "boot-timeline.json"
    start = report.index(f"--- boot timeline ({kept}) ---")
    assert report[start + 1:start + 1 + len(timeline.lines())] == timeline.lines()
    # The error's own short tail of the timeline is not repeated in the console excerpt.
    assert result.excerpt == "boom"
