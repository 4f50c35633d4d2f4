"""Scenario schema, loading with file:line errors, matrix expansion, and the runner without QEMU.

Each malformed scenario is checked one by one for the exact ``file:line: key: rule`` message.
Runner tests here use failures the engine detects before QEMU starts (missing EIF, corrupt EIF,
memory below 4 x EIF size), so they drive the real engine without a boot; booting scenarios run
from scenarios/ (pytest scenarios/) and tests/boot/test_pytest_plugin_boot.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import pytest

from harness import scenario as scn
from harness.errors import ErrorCode, NitroError
from helpers import REPO


def write(tmp_path: Path, text: str, name: str = "case.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_error(tmp_path: Path, text: str) -> scn.ScenarioError:
    path = write(tmp_path, text)
    with pytest.raises(scn.ScenarioError) as info:
        scn.load_scenarios(path)
    return info.value


# -- the schema itself ---------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(scn.schema())
    assert set(scn.schema()["$defs"]["step"]["properties"]) == set(scn.STEP_KINDS)


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path):
    cases = scn.load_scenarios(path)
    assert cases, path
    assert all(case.steps for case in cases)


def test_hello_scenario_shape():
    (case,) = scn.load_scenarios(REPO / "scenarios" / "hello.yaml")
    assert case.id == "hello"
    assert case.data["image"] == "hello"
    assert case.enclave == {"cpu_count": 2, "memory_mib": 512, "debug_mode": True}
    kind, body = scn.step_kind(case.steps[0])
    assert (kind, body["expect"], body["count"]) == ("console", "Hello from the enclave side!", 3)
    assert scn.step_kind(case.steps[-1]) == ("terminate", {})


# -- errors, one by one, each with file and line ---------------------------------------------


def test_unknown_key_names_file_line_and_key(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console:
              expect: x
              cuont: 3
        """)
    assert err.code == ErrorCode.InvalidArgument
    assert err.line == 5
    assert err.message.endswith(
        "case.yaml:5: steps[0].console.cuont: unknown key 'cuont' "
        "(allowed: name, timeout, send, expect, expect_not, count, within, fail_pattern)")
    assert str(err).startswith("[ E03 ] InvalidArgument: ")


def test_unknown_top_level_key(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        memory: 512
        steps: [{sleep: 1}]
        """)
    assert err.line == 2
    assert "memory: unknown key 'memory'" in err.message


def test_wrong_type(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console:
              expect: x
              count: three
        """)
    assert err.line == 5
    assert err.message.endswith("steps[0].console.count: must be of type integer, not string")


def test_wrong_type_in_enclave_settings(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        enclave:
          memory_mib: 512
          debug_mode: "yes please"
        steps: [{sleep: 1}]
        """)
    assert err.line == 4
    assert "enclave.debug_mode: must be of type boolean, not string" in err.message


def test_bad_regex(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - sleep: 1
          - console: {expect: 'Hello ('}
        """)
    assert err.line == 4
    assert "steps[1].console.expect: bad regex 'Hello (': missing ), unterminated subpattern" in err.message


def test_unknown_step_kind(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console: {expect: x}
          - reboot: {}
        """)
    assert err.line == 4
    assert "steps[1].reboot: unknown step kind 'reboot' (known: boot, console, exec," in err.message


def test_step_with_two_kinds(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console: {expect: x}
            exec: {command: ls}
        """)
    assert err.line == 3
    assert "steps[0]: a step has exactly one kind key" in err.message


def test_step_body_not_indented(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console:
            expect: x
        """)
    assert err.line == 3
    assert "steps[0].console: must be of type object, not null (indent its keys under it)" in err.message


def test_missing_required_key(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - exec: {status: 0}
        """)
    assert err.line == 3
    assert "steps[0].exec: missing required key 'command'" in err.message


def test_missing_steps(tmp_path):
    err = load_error(tmp_path, "image: hello\n")
    assert err.line == 1
    assert "<top>: missing required key 'steps'" in err.message


def test_image_and_eif_both_given(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        eif: hello.eif
        steps: [{sleep: 1}]
        """)
    assert "names exactly one of 'image'" in err.message


def test_cpu_count_and_cpu_ids_conflict(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        enclave: {cpu_count: 2, cpu_ids: [1, 2]}
        steps: [{sleep: 1}]
        """)
    assert err.line == 2
    assert "enclave: give cpu_count or cpu_ids, not both" in err.message


def test_bad_error_code_and_hex_and_sleep(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - expect_failure: {code: E3}
        """)
    assert "steps[0].expect_failure.code: must be a nitro-cli error code such as E26 (got 'E3')" in err.message
    err = load_error(tmp_path, """
        image: hello
        steps:
          - attest: {nonce: abc}
        """)
    assert "steps[0].attest.nonce: must be an even number of hex digits (got 'abc')" in err.message
    err = load_error(tmp_path, """
        image: hello
        steps:
          - sleep: -1
        """)
    assert "steps[0].sleep: sleep is a number of seconds (> 0) or {seconds: N} (got -1)" in err.message


def test_vsock_needs_exactly_one_direction(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - vsock: {connect: 5000, accept: 7000, send: hi}
        """)
    assert "steps[0].vsock: a vsock step has exactly one of 'connect'" in err.message
    err = load_error(tmp_path, """
        image: hello
        steps:
          - vsock: {connect: 5000, send: hi, send_hex: "00"}
        """)
    assert "give at most one of send, send_hex, send_file, send_random" in err.message


def test_nested_steps_are_validated(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - expect_failure:
              code: E36
              steps:
                - console: {expect: x, within: 0}
        """)
    assert err.line == 6
    assert "steps[0].expect_failure.steps[0].console.within" in err.message


def test_duplicate_key_is_an_error(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        image: python
        steps: [{sleep: 1}]
        """)
    assert err.line == 2
    assert "duplicate key 'image'" in err.message


def test_yaml_syntax_error_has_a_line(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - console: {expect: x
          - sleep: 1
        """)
    assert err.line is not None and err.line >= 3
    assert "YAML:" in err.message


def test_unknown_placeholder(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - exec: {command: "echo ${enclave_id} ${nope}"}
        """)
    assert err.line == 3
    assert "steps[0].exec.command: unknown placeholder ${nope}" in err.message


def test_duplicate_scenario_names_in_one_file(tmp_path):
    err = load_error(tmp_path, """
        name: a
        image: hello
        steps: [{sleep: 1}]
        ---
        name: a
        image: hello
        steps: [{sleep: 2}]
        """)
    assert err.line == 5
    assert "name: 'a' is already used at line 1" in err.message


def test_unreadable_file_is_e19(tmp_path):
    with pytest.raises(NitroError) as info:
        scn.load_scenarios(tmp_path / "absent.yaml")
    assert info.value.code == ErrorCode.FileOperationFailure


# -- matrix expansion -----------------------------------------------------------------------


def test_matrix_mapping_expands_to_the_product(tmp_path):
    path = write(tmp_path, """
        name: m
        image: hello
        matrix:
          enclave.cpu_count: [1, 2]
          enclave.memory_mib: [256, 512]
        steps:
          - exec: {command: "echo ${cpu_count} ${memory_mib}"}
        """)
    cases = scn.load_scenarios(path)
    assert [c.id for c in cases] == [
        "m[cpu_count=1,memory_mib=256]", "m[cpu_count=1,memory_mib=512]",
        "m[cpu_count=2,memory_mib=256]", "m[cpu_count=2,memory_mib=512]",
    ]
    assert [(c.enclave["cpu_count"], c.enclave["memory_mib"]) for c in cases] == [
        (1, 256), (1, 512), (2, 256), (2, 512)]
    assert all("matrix" not in c.data for c in cases)
    assert cases[3].matrix_values == {"enclave.cpu_count": 2, "enclave.memory_mib": 512}
    assert "memory_mib: 512" in cases[3].to_yaml()


def test_matrix_list_of_cases_and_top_level_keys(tmp_path):
    path = write(tmp_path, """
        image: hello
        matrix:
          - {image: hello, enclave.debug_mode: true}
          - {image: python, enclave.debug_mode: false}
        steps: [{sleep: 1}]
        """)
    cases = scn.load_scenarios(path)
    assert [(c.data["image"], c.enclave["debug_mode"]) for c in cases] == [("hello", True), ("python", False)]
    assert cases[1].id == "case[image=python,debug_mode=false]"


def test_kernels_run_each_case_on_the_debian_twin_of_its_image(tmp_path):
    # Every scenario on both kernels (docs/scenarios.md#kernels). The debian case boots
    # <image>-debian; an eif: scenario and an image that already names its kernel run once.
    path = write(tmp_path, """
        name: a
        image: python
        matrix:
          enclave.cpu_count: [1, 2]
        steps: [{sleep: 1}]
        ---
        name: b
        eif: x.eif
        steps: [{sleep: 1}]
        ---
        name: c
        image: hello-debian
        steps: [{sleep: 1}]
        """)
    cases = scn.load_scenarios(path, kernels=("nitro", "debian"))
    assert [(c.id, c.data.get("image"), c.kernel) for c in cases] == [
        ("a[cpu_count=1]", "python", "nitro"),
        ("a[cpu_count=1,kernel=debian]", "python-debian", "debian"),
        ("a[cpu_count=2]", "python", "nitro"),
        ("a[cpu_count=2,kernel=debian]", "python-debian", "debian"),
        ("b", None, "nitro"),
        ("c", "hello-debian", "debian"),
    ]
    assert [(c.id, c.kernel) for c in scn.load_scenarios(path, kernels=("debian",))] == [
        ("a[cpu_count=1,kernel=debian]", "debian"), ("a[cpu_count=2,kernel=debian]", "debian"),
        ("b", "debian"), ("c", "debian")]
    assert [c.id for c in scn.load_scenarios(path, kernels=("nitro", "nitro"))] == [
        "a[cpu_count=1]", "a[cpu_count=2]", "b"]
    assert "image: python-debian" in cases[1].to_yaml()
    # Every shipped scenario image has its Debian-kernel twin recipe.
    from harness.images.recipes import recipe_path
    for shipped in sorted((REPO / "scenarios").glob("*.yaml")):
        for case in scn.load_scenarios(shipped, kernels=("debian",)):
            if "image" in case.data:
                assert recipe_path(case.data["image"]).is_file(), case.id
    with pytest.raises(NitroError, match="kernel: unknown kernel 'ubuntu'") as info:
        scn.load_scenarios(path, kernels=("ubuntu",))
    assert info.value.code == ErrorCode.InvalidArgument
    with pytest.raises(NitroError, match="kernel: no kernel chosen"):
        scn.load_scenarios(path, kernels=())


def test_debian_twin_recipes_differ_only_in_kernel():
    # The Debian-kernel cases must test the same root filesystem and application.
    import yaml

    twins = sorted((REPO / "harness" / "data" / "recipes").glob("*-debian.yaml"))
    assert [t.name for t in twins] == ["hello-debian.yaml", "python-debian.yaml"]
    for twin in twins:
        nitro = yaml.safe_load((twin.parent / twin.name.replace("-debian", "")).read_text())
        debian = yaml.safe_load(twin.read_text())
        differs = {k for k in set(nitro) | set(debian) if nitro.get(k) != debian.get(k)}
        assert differs <= {"name", "kernel"}, (twin.name, differs)


def test_a_matrix_over_both_twins_runs_each_image_once_per_kernel(tmp_path):
    path = write(tmp_path, """
        name: m
        image: hello
        matrix:
          image: [hello, hello-debian]
        steps: [{sleep: 1}]
        """)
    cases = scn.load_scenarios(path, kernels=("nitro", "debian"))
    assert [(c.id, c.data["image"], c.kernel) for c in cases] == [
        ("m[image=hello]", "hello", "nitro"),
        ("m[image=hello,kernel=debian]", "hello-debian", "debian"),
    ]


def test_matrix_value_of_the_wrong_type_points_at_the_value(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        matrix:
          enclave.memory_mib:
            - 256
            - lots
        steps: [{sleep: 1}]
        """)
    assert err.line == 5
    assert "enclave.memory_mib: must be of type integer, not string (in matrix case memory_mib=lots)" in err.message


def test_matrix_key_must_be_a_scenario_key(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        matrix:
          enclave.memroy_mib: [256]
        steps: [{sleep: 1}]
        """)
    assert err.line == 3
    assert "enclave.memroy_mib: unknown key 'memroy_mib'" in err.message


# -- small pieces -------------------------------------------------------------------------------


def test_subset_matching():
    actual = [{"EnclaveID": "i-1-enc2", "EnclaveCID": 16, "Flags": "DEBUG_MODE"}]
    assert scn._subset_mismatch([{"EnclaveCID": "16"}], actual, "json") is None
    assert scn._subset_mismatch({"Flags": "NONE"}, actual[0], "d") == "d.Flags: 'DEBUG_MODE' != 'NONE'"
    assert scn._subset_mismatch([{"EnclaveCID": 17}], actual, "json").startswith("json[0]: no item matches")
    assert scn._subset_mismatch({"State": "RUNNING"}, actual[0], "d").startswith("d.State: missing")


def test_document_is_found_in_helper_output():
    doc = bytes([0x84, 0x44]) + bytes(range(60))
    import base64

    assert scn._document_from_output("noise\n" + base64.b64encode(doc).decode() + "\n") == doc
    assert scn._document_from_output(f'{{"document": "{base64.b64encode(doc).decode()}"}}') == doc
    assert scn._document_from_output("x" * 10) is None


def test_step_labels():
    assert scn.step_label({"console": {"expect": "Hello"}}) == "console Hello"
    assert scn.step_label({"vsock": {"connect": 5005}}) == "vsock connect 5005"
    assert scn.step_label({"sleep": 2}) == "sleep 2 s"
    assert scn.step_label({"exec": {"command": "ls", "name": "list"}}) == "list"


# -- the runner, on failures the engine finds before QEMU starts -----------------------------


def run_case(tmp_path: Path, text: str) -> scn.ScenarioResult:
    (case,) = scn.load_scenarios(write(tmp_path, text))
    artifacts = tmp_path / "artifacts"
    factory = scn.EnclaveFactory(artifacts)
    events: list[tuple[str, str, str]] = []
    runner = scn.ScenarioRunner(case, factory, artifacts_dir=artifacts,
                                on_step=lambda ev, r: events.append((ev, r.kind, r.status)))
    result = runner.run()
    result.events = events  # type: ignore[attr-defined]
    return result


def test_runner_expected_failure_missing_eif(tmp_path):
    result = run_case(tmp_path, """
        eif: missing.eif
        steps:
          - expect_failure: {code: E19, message: "EIF file not found"}
          - sleep: 0.01
        """)
    assert result.status == "passed", result.message
    assert [s.kind for s in result.steps] == ["expect_failure", "boot", "sleep"]
    assert [s.status for s in result.steps] == ["passed", "xfailed", "passed"]
    assert result.events[0] == ("start", "expect_failure", "running")
    assert (tmp_path / "artifacts" / "scenario.yaml").read_text().startswith("eif: missing.eif")


def test_runner_wrong_expected_code_fails_with_location(tmp_path):
    result = run_case(tmp_path, """
        eif: missing.eif
        steps:
          - expect_failure: {code: E26}
        """)
    assert result.status == "failed"
    assert "case.yaml:3: step 1 (expect_failure E26) failed: expected failure E26, got E19" in result.message
    assert result.artifacts == tmp_path / "artifacts"
    assert f"artifacts: {tmp_path / 'artifacts'}" in result.failure_report()


def test_runner_boot_failure_is_a_step_failure(tmp_path):
    (tmp_path / "bad.eif").write_bytes(b"not an eif at all" * 64)
    result = run_case(tmp_path, """
        eif: bad.eif
        steps:
          - console: {expect: Hello}
        """)
    assert result.status == "failed"
    assert "step 1 (console Hello) failed: [ E35 ]" in result.message


def test_runner_memory_below_four_times_the_eif_is_e26(tmp_path):
    from harness.eif import write_eif

    # 17 MiB of ramdisk: 4 x the EIF size is above the 64 MiB asked for (E26:
    # docs/nitro-cli.md#validation-rules).
    write_eif(tmp_path / "big.eif", b"\0" * 4096, "console=ttyS0", [b"\0" * (17 << 20)], None)
    result = run_case(tmp_path, """
        eif: big.eif
        enclave: {memory_mib: 64, cpu_count: 1}
        steps:
          - expect_failure: {code: E26}
        """)
    assert result.status == "passed", result.message


def test_runner_scenario_timeout_stops_the_steps(tmp_path):
    result = run_case(tmp_path, """
        image: hello
        timeout: 3
        steps:
          - sleep: 2
          - sleep: 2
          - sleep: 2
        """)  # margins of a second either way: a loaded machine must not change the verdict
    assert result.status == "failed"
    assert [s.status for s in result.steps] == ["passed", "failed"]
    assert "exceeds the time left" in result.message


def test_kms_step_needs_an_expectation(tmp_path):
    err = load_error(tmp_path, """
        image: hello
        steps:
          - kms: {}
        """)
    assert "kms: missing required key 'expect'" in str(err)
    assert "case.yaml:3: steps[0].kms" in str(err)


# -- step runners against a stand-in engine ------------------------------------------------------
#
# These check the runner's own logic (console cursor, exec checks, vsock exchanges and digests,
# cli save, expect_failure) without QEMU. The stand-in is not presented as an enclave: its
# console is a real harness.console.Console whose "guest" is a host /bin/sh on the console socket,
# and its "vsock" is TCP on 127.0.0.1 with ports the system assigns (see HostStandIn). Real boots
# run the same steps in scenarios/.

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

from harness.console import Console

class _TcpListener:
    """A parent's vsock listener, as TCP on 127.0.0.1 on a port the system assigns (``port``)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def accept(self, timeout: float) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(None)
        return conn

    def close(self) -> None:
        self.sock.close()


class HostStandIn:
    """Engine-shaped object over host resources (see the section comment).

    vsock is TCP on 127.0.0.1: ``guest_listeners`` maps a guest vsock port to the TCP port of
    the host server standing for the guest's listener there (fixtures fill it); a connection to
    any other port is refused at once, as a guest without a listener answers with an RST. A
    parent listener on vsock port P gets a free TCP port, written to ``vsock-P.port`` in the
    stand-in's folder, the "guest" shell's working directory.
    """

    guest_listeners: dict[int, int] = {}

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.console = Console(folder / "c.sock", folder / "console.log")
        self.console.listen()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(folder / "c.sock"))
        self.shell = subprocess.Popen(["sh"], stdin=peer.fileno(), stdout=peer.fileno(),
                                      stderr=subprocess.STDOUT, cwd=folder)
        peer.close()
        self.console.attach(5)
        self.enclave_id, self.name, self.cid = "i-0123456789abcdef0-enc0000000000000001", "standin", 4242
        self.debug_mode, self.nsm, self.measurements, self.qemu_pid = True, None, None, None
        self.cpu_ids, self.memory_mib, self.state, self.config = [1], 512, "RUNNING", None

    @property
    def running(self) -> bool:
        return self.shell.poll() is None

    def exec(self, command: str, *, timeout: float):
        return self.console.exec(command, timeout=timeout)

    def vsock_connect(self, port: int, timeout: float = 10) -> socket.socket:
        tcp_port = self.guest_listeners.get(port)
        if tcp_port is None:
            raise ConnectionRefusedError(f"stand-in guest CID {self.cid} has no listener on port {port}")
        return socket.create_connection(("127.0.0.1", tcp_port), timeout=timeout)

    def vsock_listen(self, port: int) -> _TcpListener:
        listener = _TcpListener()
        (self.folder / f"vsock-{port}.port").write_text(f"{listener.port}\n")
        return listener

    def describe(self) -> dict:
        return {"EnclaveID": self.enclave_id, "EnclaveCID": self.cid, "State": self.state, "Flags": "DEBUG_MODE"}

    def wait(self, timeout: float) -> bool:
        try:
            self.shell.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def terminate(self) -> None:
        if self.shell.poll() is None:
            self.shell.kill()
            self.shell.wait()
        self.console.close()
        self.state = "EMPTY"


class StandInFactory(scn.EnclaveFactory):
    def start(self, config=None, **settings):
        enclave = HostStandIn(self.artifacts_dir / f"standin-{len(self.enclaves)}")
        self.enclaves.append(enclave)
        return enclave


def run_standin(tmp_path: Path, steps: str) -> scn.ScenarioResult:
    (tmp_path / "any.eif").write_bytes(b"stand-in: never read")
    text = "eif: any.eif\nsteps:\n" + textwrap.indent(textwrap.dedent(steps).strip("\n"), "  ") + "\n"
    (case,) = scn.load_scenarios(write(tmp_path, text))
    artifacts = tmp_path / "artifacts"
    return scn.ScenarioRunner(case, StandInFactory(artifacts), artifacts_dir=artifacts).run()


@pytest.fixture
def echo_port(monkeypatch):
    """A TCP echo server standing for a guest echo program on vsock port 5005."""
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setitem(HostStandIn.guest_listeners, 5005, server.getsockname()[1])
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield 5005
    stop.set()
    thread.join()
    server.close()


def test_console_cursor_send_and_exec_checks(tmp_path):
    result = run_standin(tmp_path, """
        - exec: {command: "echo one; echo two; echo one", output: '^two$'}
        - console: {expect: '^one$', count: 2}
        - console: {send: "echo three\\n", expect: '^three$', within: 10}
        - console: {expect_not: 'Kernel panic'}
        - exec: {command: "exit_status() { return 3; }; exit_status", status: 3}
        - exec: {command: "printf 'a\\nb\\n'", output_not: '^c$'}
        - exec: {command: "sleep 0.1 > /dev/null 2>&1 &"}
        """)
    assert result.status == "passed", result.failure_report()
    assert [s.status for s in result.steps] == ["passed"] * 7


def test_console_expectation_failure_has_the_excerpt(tmp_path):
    result = run_standin(tmp_path, """
        - exec: {command: "echo Hello from the stand-in"}
        - console: {expect: 'Goodbye', within: 0.5}
        """)
    assert result.status == "failed"
    assert "step 2 (console Goodbye) failed: 'Goodbye' did not appear within 0.5 s" in result.message
    assert "Hello from the stand-in" in result.excerpt


def test_exec_status_mismatch_shows_output(tmp_path):
    result = run_standin(tmp_path, """
        - exec: {command: "echo oops; false"}
        """)
    assert result.status == "failed"
    assert "exit status 1, expected 0; output:\n    oops" in result.message


def test_vsock_echo_integrity_and_many_connections(tmp_path, echo_port):
    result = run_standin(tmp_path, f"""
        - vsock: {{connect: {echo_port}, send_random: 3000000, expect_echo: true, within: 60}}
        - vsock: {{connect: {echo_port}, connections: 20, send: "ping\\n", expect: "^ping$"}}
        - vsock: {{connect: {echo_port}, send_hex: "00ff10", expect_hex: "00ff10"}}
        - vsock: {{connect: 5999, expect_refused: true, within: 2}}
        """)
    assert result.status == "passed", result.failure_report()


def test_vsock_refusal_expected_but_connected_fails(tmp_path, echo_port):
    result = run_standin(tmp_path, f"""
        - vsock: {{connect: {echo_port}, expect_refused: true}}
        """)
    assert result.status == "failed"
    assert f"vsock connect to port {echo_port} succeeded; expected it to be refused" in result.message


# "Guest" programs run by the stand-in's shell: the parent's port comes from its vsock-P.port file.
GUEST_SEND = (
    "import hashlib, socket, sys\n"
    "data = bytes(range(256)) * 4000\n"
    "port = int(open('vsock-7000.port').read())\n"
    "s = socket.create_connection(('127.0.0.1', port)); s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
    "reply = s.makefile().readline().split()\n"
    "sys.exit(0 if reply == [str(len(data)), hashlib.sha256(data).hexdigest()] else 1)\n"
)
GUEST_RECV = (
    "import hashlib, socket\n"
    "port = int(open('vsock-7001.port').read())\n"
    "s = socket.create_connection(('127.0.0.1', port)); data = b''\n"
    "while chunk := s.recv(65536): data += chunk\n"
    "s.sendall(f'{len(data)} {hashlib.sha256(data).hexdigest()}\\n'.encode())\n"
)


def test_vsock_accept_with_trigger_and_digests(tmp_path):
    (tmp_path / "send.py").write_text(GUEST_SEND)
    (tmp_path / "recv.py").write_text(GUEST_RECV)
    py = sys.executable
    result = run_standin(tmp_path, f"""
        - vsock: {{accept: 7000, trigger: "{py} {tmp_path}/send.py", reply_digest: true, within: 60}}
        - vsock: {{accept: 7001, trigger: "{py} {tmp_path}/recv.py", send_random: 500000,
                   expect_digest: true, within: 60}}
        """)
    assert result.status == "passed", result.failure_report()


def test_expect_failure_on_a_nested_step_and_cli_save(tmp_path):
    data = tmp_path / "blob"
    data.write_bytes(b"nitro")
    want = hashlib.sha384(bytes(48) + hashlib.sha384(b"nitro").digest()).hexdigest()
    result = run_standin(tmp_path, f"""
        - expect_failure:
            message: 'exit status 2, expected 0'
            steps:
              - exec: {{command: "sh -c 'exit 2'"}}
        - cli: {{args: [pcr, --input, "{data}"], save: {{pcr: PCR}}}}
        - exec: {{command: "echo ${{pcr}}", output: '^{want}$'}}
        - cli: {{args: [describe-enclaves], stdout: '^\\[\\]\\s*$'}}
        - describe: {{expect: {{State: RUNNING, EnclaveCID: "4242"}}}}
        - terminate:
        """)
    assert result.status == "passed", result.failure_report()
    assert [(s.number, s.status) for s in result.steps] == [
        ("1", "passed"), ("1.1", "xfailed"), ("2", "passed"), ("3", "passed"), ("4", "passed"),
        ("5", "passed"), ("6", "passed")]
    assert "$ nitro-harness pcr --input" in (tmp_path / "artifacts" / "cli.log").read_text()


def test_expect_failure_that_does_not_fail_is_a_failure(tmp_path):
    result = run_standin(tmp_path, """
        - expect_failure:
            message: 'anything'
            steps:
              - exec: {command: "true"}
        """)
    assert result.status == "failed"
    assert "expected a failure (anything) but the steps succeeded" in result.message


# -- nitro-harness run ------------------------------------------------------------------------


def test_run_command_reports_table_junit_and_json(tmp_path, capsys):
    import json
    import xml.etree.ElementTree as ET

    from harness.cli import main

    write(tmp_path, "name: good\neif: missing.eif\nsteps:\n  - expect_failure: {code: E19}\n", "good.yaml")
    write(tmp_path, "name: bad\neif: missing.eif\nsteps:\n  - expect_failure: {code: E35}\n", "bad.yaml")
    junit, report, art = tmp_path / "junit.xml", tmp_path / "results.json", tmp_path / "art"
    status = main(["run", str(tmp_path / "good.yaml"), str(tmp_path / "bad.yaml"),
                   "--junitxml", str(junit), "--json", str(report), "--artifacts-dir", str(art)])
    out, err = capsys.readouterr()
    assert status == 1
    assert "[1/2] good (" in err and "[2/2] bad (" in err
    assert "step 1.1  boot" in err and "failed as expected" in err
    lines = out.splitlines()
    assert lines[1].split() == ["SCENARIO", "RESULT", "TIME", "STEPS", "NOTE"]
    assert lines[2].split()[:2] == ["good", "passed"]
    assert lines[3].split()[:2] == ["bad", "failed"]
    assert lines[3].split()[-1] == str(art / "002-bad")
    assert "1 passed, 1 failed" in out
    assert "bad.yaml:4: step 1 (expect_failure E35) failed: expected failure E35, got E19" in out
    # The passing case's folder is gone, the failing one's kept.
    assert sorted(p.name for p in art.iterdir()) == ["002-bad"]
    results = json.loads(report.read_text())
    assert [(r["scenario"], r["status"]) for r in results] == [("good", "passed"), ("bad", "failed")]
    assert results[1]["steps"][0]["step"] == "1"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["good"].find("failure") is None
    assert "expected failure E35, got E19" in cases["bad"].find("failure").get("message")


def test_run_command_refuses_a_malformed_scenario_before_running(tmp_path, capsys):
    from harness.cli import main

    write(tmp_path, "name: fine\neif: missing.eif\nsteps:\n  - sleep: 0.01\n", "a.yaml")
    write(tmp_path, "image: hello\nsteps:\n  - console: {expect: x, count: three}\n", "b.yaml")
    status = main(["run", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    out, err = capsys.readouterr()
    assert status == 3
    assert err.strip().endswith("b.yaml:3: steps[0].console.count: must be of type integer, not string")
    assert "running" not in err  # nothing ran: every file is validated first


def test_isolation_guest_checks_read_framed_values(tmp_path, monkeypatch):
    # The stand-in's "guest" is this host: give it the host's CPU count and memory, so these
    # checks must pass, and expect guest_network to fail naming the host's interfaces.
    cpus = os.cpu_count()
    mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    original = HostStandIn.__init__

    def shaped_like_host(self, folder):
        original(self, folder)
        self.cpu_ids, self.memory_mib = list(range(cpus)), mem_kib // 1024 + 1

    monkeypatch.setattr(HostStandIn, "__init__", shaped_like_host)
    result = run_standin(tmp_path, """
        - isolation: {checks: [guest_cpus, guest_memory]}
        """)
    assert result.status == "passed", result.failure_report()
    report = json.loads((tmp_path / "artifacts" / "isolation.json").read_text())
    assert report["guest_cpus"] == f"{cpus} CPUs"
    assert report["guest_memory"].startswith(f"MemTotal {mem_kib / 1024:.1f} MiB")
    host_net = os.listdir("/sys/class/net")
    result = run_standin(tmp_path, """
        - isolation: {checks: [guest_network]}
        """)
    if sorted(host_net) == ["lo"]:
        assert result.status == "passed"
    else:
        assert result.status == "failed"
        assert "only 'lo' may exist" in result.message
        assert all(repr(name) in result.message for name in host_net)
