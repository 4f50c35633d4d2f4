"""A production-mode (not debug) enclave asks its NSM for a document through the PyPI
`aws-nsm-interface` package and hands it to the parent over vsock; the harness verifier accepts
it with PCR0-2 equal to describe-eif (docs/nsm.md#clients). Without debug mode there is no
console, so the application itself ships the document, as a real enclave application would.
"""

from __future__ import annotations

import base64
import json

from harness.attestation import Expectations, verify_document
from harness.eif import measure_eif
from harness.enclave import Enclave, EnclaveConfig
from harness.images.recipes import build_image
from harness.pcr import pcr_for_instance_id, pcr_for_role_arn
from harness.pki import Pki

PORT = 7100
ROLE = "arn:aws:iam::123456789012:role/Webserver"
INSTANCE = "i-1234567890abcdef0"
# The guest retries until the parent listens: it may be faster than the test's listen().
SENDER = (
    "import socket, time\n"
    "data = open('/tmp/attest.json', 'rb').read()\n"
    "for _ in range(600):\n"
    "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
    "    try:\n"
    f"        s.connect((3, {PORT}))\n"
    "    except OSError:\n"
    "        s.close(); time.sleep(0.1); continue\n"
    "    s.sendall(data); s.close(); break\n"
)


def test_production_document_carries_the_eif_pcrs(tmp_path):
    pki = Pki.load_or_create(tmp_path / "pki")
    # The EIF's cmd file holds one argument per line, so the sender travels as hex.
    app = (
        "python3 /opt/nitro-harness/nsm_tool.py attest --nonce 00112233 --user-data 77 --gen-rsa "
        f"> /tmp/attest.json && python3 -c \"exec(bytes.fromhex('{SENDER.encode().hex()}').decode())\"; "
        "sleep 3600"
    )
    eif = build_image("python", cmd=["/bin/sh", "-c", app])
    with Enclave.start(
        EnclaveConfig(
            eif_path=eif, memory_mib=1024, cpu_count=2, debug_mode=False,
            parent_role_arn=ROLE, instance_id=INSTANCE, pki_dir=pki.directory,
        ),
        artifacts_dir=tmp_path / "art",
    ) as enclave:
        listener = enclave.vsock_listen(PORT)
        conn = listener.accept(timeout=300)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        listener.close()
        enclave_id = enclave.enclave_id
    result = json.loads(data.decode().strip().splitlines()[-1])
    document = verify_document(
        base64.b64decode(result["document"]),
        roots=[pki.root_certificate],
        expect=Expectations(nonce=bytes.fromhex("00112233"), user_data=bytes.fromhex("77")),
    )
    measured = measure_eif(eif)
    assert document.module_id == enclave_id
    assert not document.debug_mode
    assert document.pcrs[0] == measured.pcr0
    assert document.pcrs[1] == measured.pcr1
    assert document.pcrs[2] == measured.pcr2
    assert document.pcrs[3] == pcr_for_role_arn(ROLE)
    assert document.pcrs[4] == pcr_for_instance_id(INSTANCE)
    assert len(document.public_key) == 294
