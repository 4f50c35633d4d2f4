"""``attest``: get an attestation document from inside the guest and verify it on the host.

The guest's NSM helper asks /dev/nsm for a document (docs/nsm.md); the host verifies its
COSE signature and certificate chain against the harness root, then the PCRs, debug-mode
zeros, nonce, user data and public key (docs/attestation.md, docs/pcrs.md).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.scenario.errors import StepFailed, StepSkipped
from harness.scenario.steps.registry import StepCall, kind_only, register
from harness.scenario.steps.report import indent

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

    from harness.attestation import Expectations
    from harness.enclave_factory import RunningEnclave
    from harness.scenario.runner import ScenarioRunner

#: The in-guest NSM helper the python image ships, driven over the console shell.
GUEST_NSM_TOOL = "python3 /opt/nitro-harness/nsm_tool.py"


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Run the guest helper (or ``command``), keep the document (``attestation-<n>.cbor``,
    ``-tampered`` after ``tamper``, ``.json`` once verified) and verify it.

    StepSkipped without an NSM; StepFailed when the helper fails, prints no document, the
    verification fails (unless ``expect_verify_error`` matches) or the module ID is not the
    enclave ID.
    """
    from harness import attestation

    body = call.body
    enclave = runner.ensure_enclave()
    if enclave.nsm is None:
        raise StepSkipped(f"attest needs the NSM: {getattr(enclave, 'nsm_status', 'no NSM device')}")
    within = min(float(body.get("within", call.limit)), call.limit)
    command = body.get("command") or _guest_attest_command(body)
    res = runner.exec(command, within)
    if res.status != 0:
        raise StepFailed(f"guest attestation command {command!r} exited {res.status}:\n{indent(res.output)}")
    document = document_from_output(res.output)
    if document is None:
        raise StepFailed(f"no attestation document in the output of {command!r}:\n{indent(res.output)}")
    number = runner.next_number("attestation")
    (runner.artifacts_dir / f"attestation-{number}.cbor").write_bytes(document)
    if body.get("tamper"):
        document = attestation.tamper_document(document, body["tamper"])
        (runner.artifacts_dir / f"attestation-{number}-tampered.cbor").write_bytes(document)
    expect = _expectations(enclave, body)
    try:
        doc = attestation.verify_document(document, roots=[_root(runner, enclave, body)], expect=expect)
    except attestation.AttestationError as exc:
        if "expect_verify_error" in body and re.search(body["expect_verify_error"], str(exc)):
            return
        raise StepFailed(f"attestation document failed verification: {exc}") from None
    if "expect_verify_error" in body:
        raise StepFailed(f"the document verified, expected a failure matching {body['expect_verify_error']!r}")
    (runner.artifacts_dir / f"attestation-{number}.json").write_text(
        json.dumps(doc.to_json(), indent=2, default=str) + "\n")
    if doc.module_id != enclave.enclave_id:
        raise StepFailed(f"module_id {doc.module_id!r} is not the enclave ID {enclave.enclave_id!r}")


def _root(runner: ScenarioRunner, enclave: RunningEnclave, body: dict) -> Certificate:
    from cryptography import x509

    if body.get("root"):
        path = Path(body["root"])
        if not path.is_absolute():
            path = runner.scenario.path.parent / path
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StepFailed(f"attest root {path}: {exc}") from None
    pki = getattr(enclave.nsm, "pki", None)
    if pki is None:
        from harness.pki import Pki

        pki = Pki.load_or_create(getattr(enclave.config, "pki_dir", None))
    return pki.root_certificate


def _expectations(enclave: RunningEnclave, body: dict) -> Expectations:
    from harness import attestation
    from harness.pcr import ZERO_PCR, pcr_for_instance_id, pcr_for_role_arn

    if enclave.measurements is None:
        raise StepFailed("the enclave has no EIF measurements to check the PCRs against")
    measured = enclave.measurements.as_dict()
    debug = bool(body.get("debug_zeros", enclave.debug_mode))
    pcrs: dict[int, bytes] = {}
    if debug:
        # docs/pcrs.md: debug-mode documents carry PCR0-2 (and PCR8) as zeros, PCR3/4 unchanged.
        pcrs.update({i: ZERO_PCR for i in measured})
    role = getattr(enclave.config, "parent_role_arn", None)
    if role:
        pcrs[3] = pcr_for_role_arn(role)
    pcrs[4] = pcr_for_instance_id(enclave.instance_id)
    for index, value in (body.get("pcrs") or {}).items():
        index = int(index)
        if value == "eif":
            if index not in measured:
                raise StepFailed(f"pcrs.{index}: the EIF has no PCR{index} measurement")
            pcrs[index] = measured[index]
        elif value == "zero":
            pcrs[index] = ZERO_PCR
        else:
            pcrs[index] = bytes.fromhex(value)
    nonce = body.get("verify_nonce", body.get("nonce"))
    return attestation.Expectations(
        pcrs=pcrs,
        nonce=bytes.fromhex(nonce) if nonce is not None else None,
        user_data=bytes.fromhex(body["user_data"]) if "user_data" in body else None,
        public_key=bytes.fromhex(body["public_key"]) if "public_key" in body else None,
        allow_debug=debug,
    )


def _guest_attest_command(body: dict[str, Any]) -> str:
    parts = [GUEST_NSM_TOOL, "attest"]
    for key, flag in (("nonce", "--nonce"), ("user_data", "--user-data"), ("public_key", "--public-key")):
        if key in body:
            parts += [flag, body[key]]
    return " ".join(parts)


def document_from_output(output: str) -> bytes | None:
    """The attestation document in a guest helper's output: JSON ``{"document": b64}``, or the
    longest base64 / hex token (COSE_Sign1 starts with 0x84 or tag 18 0xd2)."""
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError, TypeError):
                value = json.loads(line).get("document")
                if value:
                    return base64.b64decode(value)
    best = None
    for token in re.findall(r"[A-Za-z0-9+/=]{64,}", output):
        for decode in (bytes.fromhex, base64.b64decode):
            with contextlib.suppress(ValueError):
                data = decode(token)
                if data[:1] in (b"\x84", b"\xd2") and (best is None or len(data) > len(best)):
                    best = data
    return best


STEP = register("attest", needs_enclave=True, label=kind_only, run=run)
