"""``kms``: Decrypt through the KMS emulator with a key whose policy names a PCR0 (docs/kms.md).

For the step only, it starts the two services a scenario's ``services:`` block starts
(:mod:`harness.scenario.services`, the same classes): a KMS emulator over TLS (a certificate for
``kms.<region>.amazonaws.com`` from a CA kept in ``<artifacts>/kms-tls``) checking SigV4 and
verifying attestation documents against the enclave NSM's PKI root, and a vsock-proxy on the
parent's vsock port 8000 in front of it; their logs go to ``<artifacts>/kms/``. The step creates a key whose policy allows ``kms:Decrypt`` only with
``kms:RecipientAttestation:ImageSha384`` equal to ``pcr0``, encrypts a known plaintext and
decrypts it ``from: enclave`` (the guest's kms_client over the console: TLS through the proxy,
Recipient from /dev/nsm, CMS), ``from: production`` (the same client in a production-mode
enclave, :mod:`~harness.scenario.steps.kms_production`) or ``from: host`` (boto3 without
attestation). ``expect: allowed`` needs the plaintext back, ``denied`` an
AccessDeniedException. Everything started is stopped at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
import time
from typing import TYPE_CHECKING, Any

from harness.console import without_kernel_messages
from harness.enclave_factory import resolve_eif
from harness.scenario.errors import StepFailed, StepSkipped
from harness.scenario.twins import image_for
from harness.scenario.steps.kms_production import run_in_production, start_production_enclave
from harness.scenario.steps.registry import StepCall, kind_only, register
from harness.scenario.steps.report import indent

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

    from harness.console import ExecResult
    from harness.enclave_factory import RunningEnclave
    from harness.kms import TlsIdentity
    from harness.scenario.runner import ScenarioRunner

#: Where the guest keeps the emulator's CA certificate.
GUEST_CA_PATH = "/tmp/nitro-harness-kms-ca.pem"
#: The parent's vsock port of the step's vsock-proxy (KMS's conventional port, docs/kms.md).
KMS_PROXY_PORT = 8000


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Decrypt as ``from`` says and compare the outcome with ``expect``; StepSkipped when the
    caller's enclave has no NSM, StepFailed on another outcome (allowed / denied / error)."""
    body = call.body
    origin = body.get("from", "enclave")
    within = min(float(body.get("within", call.limit)), call.limit)
    production = None
    if origin == "production":
        production = start_production_enclave(runner, within)
        enclave = production
    else:
        enclave = runner.ensure_enclave() if origin == "enclave" else runner.enclave
    try:
        _decrypt_with_policy(runner, body, origin, within, enclave, production)
    finally:
        if production is not None:
            production.terminate()


def _decrypt_with_policy(runner: ScenarioRunner, body: dict, origin: str, within: float,
                         enclave: RunningEnclave | None, production: RunningEnclave | None) -> None:
    # The step's own services, as a scenario's services: block would start them (the same
    # classes): an emulator with a fresh access key and a vsock-proxy on port 8000.
    from harness.scenario.services import KmsEmulator, VsockProxyService
    from harness.scenario.services.kms import KmsServiceError

    region = body.get("region", "us-east-1")
    expect = body["expect"]
    plaintext = str(body.get("plaintext", "nitro-harness kms step secret")).encode()
    if origin != "host" and (enclave is None or enclave.nsm is None):
        raise StepSkipped(f"kms from the enclave needs the NSM: "
                          f"{getattr(enclave, 'nsm_status', 'no NSM device')}")
    spec = str(body.get("pcr0", "eif"))
    if spec == "eif" and production is not None and production.measurements is not None:
        pcr0 = production.measurements.as_dict()[0].hex()
    else:
        pcr0 = _pcr0(runner, spec)
    folder = runner.artifacts_dir / "kms"
    emulator = KmsEmulator({"region": region}, folder, tls_dir=runner.artifacts_dir / "kms-tls",
                           attestation_roots=[_root(enclave)])
    with contextlib.ExitStack() as cleanup:
        emulator.start()
        cleanup.callback(emulator.stop)
        if origin != "host" and enclave is not None:
            proxy = VsockProxyService({"port": KMS_PROXY_PORT, "remote": "kms"}, folder, emulator)
            proxy.check()
            proxy.attach(enclave.vsock)
            cleanup.callback(proxy.stop)
        assert emulator.identity is not None
        credential = emulator.credential
        policy = kms_policy(credential.principal_arn, pcr0)
        try:
            key_id = emulator.create_key(policy=json.dumps(policy),
                                         description=f"scenario {runner.scenario.id} kms step")["key_id"]
        except KmsServiceError as err:
            raise StepFailed(f"creating the step's key: {err.message}") from None
        client = emulator.boto3_client()
        blob = client.encrypt(KeyId=key_id, Plaintext=plaintext)["CiphertextBlob"]
        record = {"from": origin, "expect": expect, "policy_image_sha384": pcr0, "key_id": key_id,
                  "policy": policy, "plaintext_b64": base64.b64encode(plaintext).decode()}
        if origin == "host":
            outcome, detail = _host_decrypt(client, blob)
        else:
            argv = ["python3", "/opt/nitro-harness/kms_client.py", "decrypt", "--region", region,
                    "--ca-file", GUEST_CA_PATH, "--aws-access-key-id", credential.access_key_id,
                    "--aws-secret-access-key", credential.secret_access_key,
                    "--key-id", key_id, "--ciphertext", base64.b64encode(blob).decode()]
            outcome, detail = _guest_decrypt(runner, emulator.identity, argv, plaintext, within,
                                             production)
        record.update(outcome=outcome, detail=detail)
        with open(folder / "kms-steps.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    if outcome != expect:
        raise StepFailed(f"Decrypt from the {origin} with a policy requiring ImageSha384 "
                         f"{pcr0[:16]}...: {outcome}, expected {expect}:\n{indent(detail)}")


def _pcr0(runner: ScenarioRunner, spec: str) -> str:
    """The policy's ImageSha384 value (lower-case hex) for a step's ``pcr0``."""
    from harness.eif import measure_eif

    if spec == "zero":
        return "0" * 96
    if re.fullmatch(r"[0-9a-fA-F]{96}", spec):
        return spec.lower()
    if spec == "eif":
        if runner.enclave is not None and runner.enclave.measurements is not None:
            return runner.enclave.measurements.as_dict()[0].hex()
        return measure_eif(runner.scenario_eif()).as_dict()[0].hex()
    if spec.startswith("image:"):
        image = image_for(spec[len("image:"):], runner.scenario.kernel,
                          runner.scenario.arch)
        return measure_eif(resolve_eif(image)).as_dict()[0].hex()
    if spec.startswith("eif:"):
        return measure_eif(resolve_eif(eif=spec[len("eif:"):], base=runner.eif_bases())
                           ).as_dict()[0].hex()
    raise StepFailed(f"pcr0: {spec!r} is not eif, zero, image:<recipe>, eif:<path> or 96 hex digits")


def _root(enclave: RunningEnclave | None) -> Certificate:
    pki = getattr(getattr(enclave, "nsm", None), "pki", None)
    if pki is None:
        from harness.pki import Pki

        pki = Pki.load_or_create(getattr(getattr(enclave, "config", None), "pki_dir", None))
    return pki.root_certificate


def _host_decrypt(client: Any, blob: bytes) -> tuple[str, str]:
    from botocore.exceptions import ClientError

    try:
        answer = client.decrypt(CiphertextBlob=blob)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        text = f"{error.get('Code')}: {error.get('Message')}"
        return ("denied" if error.get("Code") == "AccessDeniedException" else "error"), text
    return "allowed", f"Plaintext of {len(answer.get('Plaintext', b''))} bytes from key {answer.get('KeyId')}"


def _guest_decrypt(runner: ScenarioRunner, identity: TlsIdentity, argv: list[str], plaintext: bytes,
                   within: float, production: RunningEnclave | None) -> tuple[str, str]:
    deadline = time.monotonic() + within
    if production is not None:
        res = run_in_production(production, identity.ca_certificate.read_bytes(), argv, deadline)
        return _outcome(res, plaintext)
    ca_b64 = base64.b64encode(identity.ca_certificate.read_bytes()).decode()
    # The guest shell's line editor takes about 1 KiB a line: send the CA in pieces.
    for n in range(0, len(ca_b64), 512):
        redirect = ">" if n == 0 else ">>"
        res = runner.exec(f"printf %s {ca_b64[n:n + 512]} {redirect} {GUEST_CA_PATH}.b64",
                          max(1.0, deadline - time.monotonic()))
        if res.status != 0:
            raise StepFailed(f"writing the KMS CA into the guest failed (status {res.status}):\n"
                             f"{indent(res.output)}")
    res = runner.exec(f"base64 -d {GUEST_CA_PATH}.b64 > {GUEST_CA_PATH} && grep -c CERTIFICATE {GUEST_CA_PATH}",
                      max(1.0, deadline - time.monotonic()))
    if res.status != 0:
        raise StepFailed(f"writing the KMS CA into the guest failed (status {res.status}):\n"
                         f"{indent(res.output)}")
    res = runner.exec(shlex.join(argv) + " 2>&1", max(1.0, deadline - time.monotonic()))
    return _outcome(res, plaintext)


def _outcome(res: ExecResult, plaintext: bytes) -> tuple[str, str]:
    """allowed / denied / error from the guest kms_client's status and output."""
    found = re.search(r"^PLAINTEXT: (\S+)", without_kernel_messages(res.output), re.MULTILINE)
    if res.status == 0 and found:
        try:
            got = base64.b64decode(found.group(1), validate=True)
        except ValueError:
            return "error", f"PLAINTEXT is not base64:\n{res.output}"
        if got != plaintext:
            return "error", f"PLAINTEXT decodes to {got!r}, not the encrypted {plaintext!r}"
        return "allowed", res.output
    if res.status != 0 and re.search(r"^kms_client: AccessDeniedException: ", res.output, re.MULTILINE):
        return "denied", res.output
    return "error", f"kms_client exited {res.status}:\n{res.output}"


def kms_policy(principal: str, pcr0: str) -> dict:
    """Key policy of a kms step: ``principal`` administers the key and may use it, except that
    ``kms:Decrypt`` needs ``kms:RecipientAttestation:ImageSha384`` equal to ``pcr0`` (docs/kms.md)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ParentAdministers", "Effect": "Allow", "Principal": {"AWS": principal},
             "NotAction": "kms:Decrypt", "Resource": "*"},
            {"Sid": "DecryptOnlyFromTheImage", "Effect": "Allow", "Principal": {"AWS": principal},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0}}},
        ],
    }


STEP = register("kms", needs_enclave=False, label=kind_only, run=run)
