"""Scenario services (docs/scenarios.md#services) without QEMU: a stand-in enclave factory runs
the hooks a real start runs (keys before the boot, vsock-proxies on the enclave's device), and
the guest's kms_client.py, as the enclave's application would, calls GenerateDataKey through the
proxy with attestation documents carrying the signed EIF's PCRs or others."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import attestation, eif
from harness import scenario as scn
from harness.pki import Pki
from helpers.eif_files import make_signer, random_parts
from helpers.kms import GUEST_CLIENT, GUEST_PYTHON, MODULE_ID, spki_of

ACCESS_KEY, SECRET = "AKIASCENARIOSERVICES", "scenario-services-secret"



@pytest.fixture()
def pki(tmp_path, monkeypatch):
    """The harness PKI the emulator trusts by default, private to the test."""
    monkeypatch.setenv("NITRO_HARNESS_PKI_DIR", str(tmp_path / "pki"))
    return Pki.load_or_create()


def signed_eif(tmp_path: Path, name: str = "app.eif", *, signed: bool = True) -> tuple[Path, dict[int, bytes]]:
    parts = random_parts()
    signer = None
    if signed:
        cert_pem, key_pem, _ = make_signer()
        signer = eif.Signer(cert_pem, key_pem)
    path = tmp_path / name
    m = eif.write_eif(path, parts["kernel"], "console=ttyS0", [parts["boot"], parts["app"]], None, signer)
    return path, m.as_dict()


def write_scenario(tmp_path: Path, services: str, steps: str = "  - boot:\n", *, eif_name="app.eif") -> Path:
    path = tmp_path / "case.yaml"
    path.write_text(f"eif: {eif_name}\nservices:\n{services}steps:\n{steps}")
    return path


class FakeVsock:
    """The parent side of an enclave's vsock device: each ``listen`` is a TCP listener here
    (a vsock-proxy takes either)."""

    guest_cid = 4343

    def __init__(self):
        self.listeners: dict[int, socket.socket] = {}

    def listen(self, port):
        if port in self.listeners:
            from harness.errors import ErrorCode, NitroError
            raise NitroError(ErrorCode.InvalidArgument, f"vsock port {port} is taken")
        self.listeners[port] = socket.create_server(("127.0.0.1", 0))
        return self.listeners[port]


class Console:
    """A console that printed ``text``: ``expect`` searches it, as the real one would."""

    def __init__(self, text: str):
        self._text = text

    def text(self) -> str:
        return self._text

    def expect(self, pattern, *, timeout, fail_pattern=None, count=1, start=0):
        import re

        from harness.console import ConsoleError

        found = re.compile(pattern, re.MULTILINE).search(self._text, start)
        if found is None:
            raise ConsoleError(f"{pattern!r} not seen", self._text)
        return found

    def watch(self, pattern, start=0):
        """``expect_not``'s watch: ``poll`` gives the first match (or None), ``close`` ends it."""
        import re
        from types import SimpleNamespace

        found = re.compile(pattern, re.MULTILINE).search(self._text, start)
        return SimpleNamespace(poll=lambda: found, close=lambda: None)


class Guest:
    """Enough of a running enclave for the boot, console and terminate steps."""

    def __init__(self, console: str = ""):
        self.enclave_id, self.name, self.cid, self.debug_mode = "i-0-enc1", "app", 4343, False
        self.state, self.running, self.measurements, self.nsm, self.machine = "RUNNING", True, None, None, None
        self.qemu_pid, self.console = None, Console(console)

    def terminate(self):
        self.state, self.running = "EMPTY", False


def run_case(path: Path, application) -> tuple[scn.ScenarioResult, list]:
    """Run the scenario; every enclave start runs the factory's hooks, then
    ``application(vsock, pcrs)`` with the PCRs the EIF measures (what its documents carry)."""
    (case,) = scn.load_scenarios(path)
    outputs: list = []

    class Factory(scn.EnclaveFactory):
        def start(self, config=None, **settings):
            for hook in self.start_hooks:
                hook(config)
            device = FakeVsock()
            for hook in self.vsock_hooks:
                hook(device)
            output = application(device, eif.measure_eif(config.eif_path).as_dict())
            outputs.append(output)
            guest = Guest(output if isinstance(output, str) else "")
            self.enclaves.append(guest)
            return guest

    artifacts = path.parent / "artifacts"
    return scn.ScenarioRunner(case, Factory(artifacts), artifacts_dir=artifacts).run(), outputs


def genkey(pki, ca_file: Path, port: int, pcrs: dict[int, bytes], key_id: str = "alias/app"):
    """The guest's kms_client genkey through the proxy at 127.0.0.1:port, its Recipient document
    carrying ``pcrs``; returns (exit status, output)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    all_pcrs = {i: bytes(48) for i in range(16)} | pcrs
    folder = ca_file.parent
    doc = folder / "doc.cbor"
    doc.write_bytes(attestation.build_document(pki, module_id=MODULE_ID, pcrs=all_pcrs, public_key=spki_of(key)))
    pem = folder / "recipient.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    out = subprocess.run(
        [GUEST_PYTHON, str(GUEST_CLIENT), "genkey", "--region", "us-east-1", "--key-id", key_id,
         "--key-spec", "AES-256", "--endpoint", f"127.0.0.1:{port}", "--ca-file", str(ca_file),
         "--aws-access-key-id", ACCESS_KEY, "--aws-secret-access-key", SECRET,
         "--attestation-doc", str(doc), "--private-key", str(pem)],
        capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


KMS_BLOCK = f"""\
  kms:
    tls_dir: tls
    credentials: {{access_key_id: {ACCESS_KEY}, secret_access_key: {SECRET}}}
    keys:
      - alias: alias/app
        key_spec: SYMMETRIC_DEFAULT
        key_usage: ENCRYPT_DECRYPT
        policy:
          Version: "2012-10-17"
          Statement:
            - Sid: ParentAdministers
              Effect: Allow
              Principal: {{AWS: "arn:aws:iam::111122223333:root"}}
              NotAction: [kms:GenerateDataKey, kms:Decrypt]
              Resource: "*"
            - Sid: OnlyTheSignedImage
              Effect: Allow
              Principal: {{AWS: "${{kms.principal_arn}}"}}
              Action: [kms:GenerateDataKey, kms:Decrypt]
              Resource: "*"
              Condition:
                StringEqualsIgnoreCase:
                  kms:RecipientAttestation:PCR0: "${{eif.pcr0}}"
                  kms:RecipientAttestation:PCR8: "${{eif.pcr8}}"
  vsock_proxy:
    - {{port: 8000, remote: kms}}
"""


def test_keys_policies_and_proxy_serve_the_signed_image_and_refuse_other_pcrs(tmp_path, pki):
    path_eif, pcrs = signed_eif(tmp_path)
    path = write_scenario(tmp_path, KMS_BLOCK, "  - boot:\n  - terminate:\n  - boot:\n")
    ca = tmp_path / "tls" / "kms-ca.pem"
    calls = iter([pcrs, pcrs | {8: bytes(range(48))}])

    def application(vsock, measured):
        assert measured == pcrs
        return genkey(pki, ca, vsock.listeners[8000].getsockname()[1], next(calls))

    result, outputs = run_case(path, application)
    assert result.status == "passed", result.failure_report()
    (status_ok, out_ok), (status_denied, out_denied) = outputs
    assert status_ok == 0 and "PLAINTEXT: " in out_ok, out_ok
    assert status_denied == 1, out_denied
    assert "kms_client: AccessDeniedException: " in out_denied
    assert "because no resource-based policy allows the kms:GenerateDataKey action" in out_denied
    # The key as created: its policy names this EIF's PCR0 and PCR8, lower-case hex.
    services = tmp_path / "artifacts" / "services"
    (key,) = json.loads((services / "kms-keys.json").read_text())
    condition = key["policy"]["Statement"][1]["Condition"]["StringEqualsIgnoreCase"]
    assert condition == {"kms:RecipientAttestation:PCR0": pcrs[0].hex(),
                         "kms:RecipientAttestation:PCR8": pcrs[8].hex()}
    assert key["alias"] == "alias/app" and key["arn"].endswith(":key/" + key["key_id"])
    requests = [json.loads(line) for line in (services / "kms.log").read_text().splitlines()]
    generate = [r for r in requests if r.get("operation") == "GenerateDataKey"]
    assert [(r["status"], r.get("error")) for r in generate] == [(200, None), (400, "AccessDeniedException")]
    proxy_log = (services / "vsock-proxy-8000.log").read_text()
    assert proxy_log.count("CID 4343: listening on vsock port 8000") == 2
    assert "CID 4343: connection 1 accepted" in proxy_log and "stopped (2 connections in all)" in proxy_log


def test_placeholders_give_steps_the_services_values(tmp_path, pki):
    path_eif, pcrs = signed_eif(tmp_path)
    path = write_scenario(tmp_path, KMS_BLOCK, "  - sleep: 0.01\n")
    (case,) = scn.load_scenarios(path)
    artifacts = tmp_path / "artifacts"
    runner = scn.ScenarioRunner(case, scn.EnclaveFactory(artifacts), artifacts_dir=artifacts)
    from harness.scenario.services import start_services

    runner.services = start_services(runner)
    try:
        values = runner._substitute({
            "endpoint": "${kms.endpoint}", "ca": "${kms.ca_file}", "arn": "${kms.keys.app.arn}",
            "id": "${kms.keys.app.key_id}", "pcrs": "${eif.pcr0} ${eif.pcr8}", "ak": "${kms.access_key_id}"})
        kms = runner.services.kms
        assert values["endpoint"] == f"https://localhost:{kms.port}"
        assert values["ca"] == str(tmp_path / "tls" / "kms-ca.pem")
        assert values["arn"] == f"arn:aws:kms:us-east-1:111122223333:key/{values['id']}"
        assert values["pcrs"] == f"{pcrs[0].hex()} {pcrs[8].hex()}"
        assert values["ak"] == ACCESS_KEY
        # boto3 on the parent reaches the emulator at ${kms.endpoint} with ${kms.ca_file}.
        client = kms.boto3_client()
        assert client.describe_key(KeyId="alias/app")["KeyMetadata"]["Arn"] == values["arn"]
    finally:
        assert runner.services.stop() == []


def test_unknown_service_placeholders_are_load_errors(tmp_path):
    signed_eif(tmp_path)
    path = write_scenario(tmp_path, KMS_BLOCK, "  - exec: {command: 'echo ${kms.keys.other.arn}'}\n")
    with pytest.raises(scn.ScenarioError, match=r"steps\[0\]\.exec\.command: unknown placeholder "
                                                r"\$\{kms\.keys\.other\.arn\}"):
        scn.load_scenarios(path)
    path = write_scenario(tmp_path, "  vsock_proxy: [{port: 8000, remote: 'example.com:443'}]\n",
                          "  - exec: {command: 'echo ${kms.endpoint}'}\n")
    with pytest.raises(scn.ScenarioError, match=r"unknown placeholder \$\{kms\.endpoint\}"):
        scn.load_scenarios(path)
    path = write_scenario(tmp_path, KMS_BLOCK.replace("${eif.pcr8}", "${eif.pcr3}"))
    with pytest.raises(scn.ScenarioError, match=r"case.yaml:\d+: services\.kms\.keys\[0\]\.policy\."
                                                r".*unknown placeholder \$\{eif\.pcr3\}"):
        scn.load_scenarios(path)
    path = write_scenario(tmp_path, "  kms:\n    keys: [{alias: app}]\n")
    with pytest.raises(scn.ScenarioError, match=r"case.yaml:4: services.kms.keys\[0\].alias: alias must be"):
        scn.load_scenarios(path)


def test_an_unsigned_eif_has_no_pcr8_and_the_boot_fails_naming_the_key(tmp_path, pki):
    signed_eif(tmp_path, signed=False)
    path = write_scenario(tmp_path, KMS_BLOCK)
    result, outputs = run_case(path, lambda vsock, pcrs: None)
    assert result.status == "failed" and outputs == []
    assert "step 1 (boot) failed:" in result.message
    assert "services.kms.keys[0].policy" in result.message
    assert "is not signed, so it has no PCR8" in result.message


def test_a_remote_off_the_allowlist_stops_the_case_before_any_step(tmp_path, pki):
    signed_eif(tmp_path)
    path = write_scenario(tmp_path, textwrap.indent(textwrap.dedent("""\
          kms: {}
          vsock_proxy:
            - port: 8000
              remote: kms
              allowlist: [{address: 127.0.0.1, port: 1}]
        """), "  "))
    result, outputs = run_case(path, lambda vsock, pcrs: None)
    assert result.status == "failed" and outputs == [] and result.steps == []
    assert "case.yaml:7: services.vsock_proxy[0].allowlist: vsock-proxy: 127.0.0.1:" in result.message
    assert "is not in the allowlist (127.0.0.1:1)" in result.message


def test_a_policy_the_emulator_refuses_fails_the_boot_with_its_error(tmp_path, pki):
    signed_eif(tmp_path)
    path = write_scenario(tmp_path, textwrap.indent(textwrap.dedent("""\
          kms:
            keys:
              - alias: alias/app
                policy: '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                  "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}]}'
        """), "  "))
    result, _ = run_case(path, lambda vsock, pcrs: None)
    assert result.status == "failed"
    assert "services.kms.keys[0].policy: PutKeyPolicy: MalformedPolicyDocumentException: " \
           "The new key policy will not allow you to update the key policy in the future." in result.message


def test_the_kms_step_from_the_host_uses_the_same_services(tmp_path, pki):
    # The kms step starts its own KmsEmulator (with the services' key creation) for the step.
    signed_eif(tmp_path)
    path = tmp_path / "case.yaml"
    path.write_text("eif: app.eif\nsteps:\n  - kms: {from: host, pcr0: zero, expect: denied}\n")
    result, _ = run_case(path, lambda vsock, pcrs: None)
    assert result.status == "passed", result.failure_report()
    record = json.loads((tmp_path / "artifacts" / "kms" / "kms-steps.jsonl").read_text())
    assert record["outcome"] == "denied" and record["detail"].startswith("AccessDeniedException: ")
    operations = [json.loads(line).get("operation") for line in
                  (tmp_path / "artifacts" / "kms" / "kms.log").read_text().splitlines()]
    assert operations[1:] == ["CreateKey", "PutKeyPolicy", "Encrypt", "Decrypt", None]  # None: "stopped"
    path.write_text("eif: app.eif\nsteps:\n  - kms: {from: host, pcr0: zero, expect: allowed}\n")
    result, _ = run_case(path, lambda vsock, pcrs: None)
    assert result.status == "failed"
    assert "Decrypt from the host with a policy requiring ImageSha384 000000" in result.message
    assert "denied, expected allowed" in result.message


def test_the_engine_calls_on_vsock_with_a_serving_device_before_qemu(tmp_path):
    # Enclave._start runs start_vsock before it launches QEMU: a listener made in the hook
    # exists before the guest can connect.
    from harness.enclave_devices import EnclaveDevices

    seen = []
    devices = EnclaveDevices(on_vsock=lambda device: seen.append((device, device.listen(8000))))
    try:
        devices.start_vsock(tmp_path, 4343)
        ((device, listener),) = seen
        assert device is devices.vsock and device.guest_cid == 4343
        assert listener.port == 8000 and not listener.closed
    finally:
        assert devices.stop() == []


def test_the_documented_example_loads_and_creates_both_keys(tmp_path, pki):
    # docs/scenarios.md#services: the example a user copies for their own EIF.
    import re

    from helpers import REPO

    text = (REPO / "docs" / "scenarios.md").read_text().split("\n## Services\n", 1)[1]
    (example,) = re.findall(r"```yaml\n(name: my-app-kms\n.*?)```", text, re.DOTALL)
    signed_eif(tmp_path, "my-app.eif")
    path = tmp_path / "my-app.yaml"
    path.write_text(example)
    result, outputs = run_case(path, lambda vsock, pcrs: f"listening: {sorted(vsock.listeners)}\n"
                                                         "data key ready\n")
    assert result.status == "passed", result.failure_report()
    assert outputs == ["listening: [8000]\ndata key ready\n"]
    keys = json.loads((tmp_path / "artifacts" / "services" / "kms-keys.json").read_text())
    assert [k["alias"] for k in keys] == ["alias/my-app", "alias/my-app-by-pcr2"]
    measured = eif.measure_eif(tmp_path / "my-app.eif").as_dict()
    conditions = [k["policy"]["Statement"][1]["Condition"]["StringEqualsIgnoreCase"] for k in keys]
    assert conditions == [{"kms:RecipientAttestation:PCR0": measured[0].hex(),
                           "kms:RecipientAttestation:PCR8": measured[8].hex()},
                          {"kms:RecipientAttestation:PCR2": measured[2].hex()}]
    assert (tmp_path / "kms-tls" / "kms-ca.pem").is_file()  # tls_dir: next to the scenario
