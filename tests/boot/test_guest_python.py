"""Real clients inside a booted `python` enclave: vsock integrity and the NSM.

One enclave is booted for the module (a TCG boot costs seconds) and shared by the tests, which
run in an order that keeps them independent: NSM PCR state is only read before the self-check
that extends PCRs 16-31.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time

import pytest

from harness.attestation import Expectations, verify_document
from harness.eif import measure_eif
from harness.enclave import Enclave, EnclaveConfig
from harness.pcr import pcr_for_instance_id, pcr_for_role_arn
from harness.pki import Pki
from helpers import guest_programs
from helpers.boot_images import recipe_eif

ROLE = "arn:aws:iam::123456789012:role/Webserver"
INSTANCE = "i-1234567890abcdef0"
ECHO = "python3 /opt/nitro-harness/vsock_echo.py"
MIB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A PKI of this test module's own, so the root the verifier pins is the one that signed."""
    return Pki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def guest(tmp_path_factory, pki):
    eif = recipe_eif("python")
    enclave = Enclave.start(
        EnclaveConfig(
            eif_path=eif, memory_mib=1024, cpu_count=2, debug_mode=True,
            parent_role_arn=ROLE, instance_id=INSTANCE, pki_dir=pki.directory,
        ),
        artifacts_dir=tmp_path_factory.mktemp("python-enclave"),
    )
    # The shell on the console is ready once it runs a command.
    assert enclave.exec("true", timeout=120).status == 0
    yield enclave
    enclave.terminate()


def _connect_when_listening(guest, port: int, timeout: float = 120):
    """Connect to a guest port whose server was just started in the background (python starts
    slowly under TCG): refused attempts are retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return guest.vsock_connect(port, timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _json_line(output: str) -> dict:
    line = [l for l in output.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def test_parent_to_guest_64mib_roundtrip_by_hash(guest):
    assert guest.exec(f"{ECHO} serve 5005 --count 1 > /tmp/echo.log 2>&1 &", timeout=30).status == 0
    size = 64 * MIB
    payload_hash = hashlib.sha256()
    echoed = hashlib.sha256()
    sock = _connect_when_listening(guest, 5005)
    received = 0

    def reader():
        nonlocal received
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return
            echoed.update(data)
            received += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    chunk = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, not compressible in a trivial way
    sent = 0
    while sent < size:
        block = bytes((b + (sent >> 16)) & 0xFF for b in chunk[:256]) * 256
        sock.sendall(block)
        payload_hash.update(block)
        sent += len(block)
    sock.shutdown(1)
    thread.join(600)
    sock.close()
    assert received == size
    assert echoed.hexdigest() == payload_hash.hexdigest()


def test_guest_to_parent_64mib_by_hash(guest):
    listener = guest.vsock_listen(7000)
    size = 64 * MIB
    result = {}

    def parent():
        conn = listener.accept(timeout=300)
        digest, total = hashlib.sha256(), 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            total += len(data)
        conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
        conn.close()
        result["total"], result["digest"] = total, digest.hexdigest()

    thread = threading.Thread(target=parent)
    thread.start()
    out = guest.exec(f"{ECHO} send 7000 {size} --seed 11", timeout=600)
    thread.join(60)
    listener.close()
    assert out.status == 0, out.output
    assert "SEND OK" in out.output
    assert result == {"total": size, "digest": guest_programs.load("vsock_echo").stream_digest(size, 11)}


def test_many_short_connections(guest):
    assert guest.exec(f"{ECHO} serve 5006 > /tmp/echo2.log 2>&1 &", timeout=30).status == 0
    _connect_when_listening(guest, 5006).close()
    for i in range(40):
        with guest.vsock_connect(5006, timeout=30) as sock:
            sock.sendall(f"ping {i}\n".encode())
            sock.shutdown(1)
            data = b""
            while chunk := sock.recv(100):
                data += chunk
            assert data == f"ping {i}\n".encode()


def test_unlistened_ports_refuse_at_once(guest):
    out = guest.exec(f"{ECHO} connect 7999", timeout=60)
    assert "CONNECT FAILED" in out.output
    failed_ms = float(out.output.split()[-1])
    assert failed_ms < 1000  # an RST, not a timeout (Linux would wait 2 s+ for a lost packet)
    with pytest.raises(OSError):
        guest.vsock_connect(5999, timeout=10)
    to_host = guest.exec(f"{ECHO} connect 9000 --cid 2", timeout=60)
    assert "CONNECT FAILED" in to_host.output


def test_nsm_from_the_guest_with_aws_nsm_interface(guest, pki):
    out = guest.exec(
        "python3 /opt/nitro-harness/nsm_tool.py all --nonce 0a0b0c --user-data cafe --gen-rsa", timeout=300
    )
    assert out.status == 0, out.output
    r = _json_line(out.output)
    measurements = measure_eif(recipe_eif("python"))
    assert r["describe"]["locked_pcrs"] == list(range(16))
    assert r["describe"]["module_id"] == guest.enclave_id
    assert r["describe_pcr"]["0"]["data"] == measurements.pcr0.hex()
    assert r["describe_pcr"]["0"]["lock"] is True
    assert r["describe_pcr"]["3"]["data"] == pcr_for_role_arn(ROLE).hex()
    assert r["describe_pcr"]["4"]["data"] == pcr_for_instance_id(INSTANCE).hex()
    assert r["random"]["length"] == 256
    assert r["selfcheck"]["passed"] is True, r["selfcheck"]
    document = verify_document(
        base64.b64decode(r["attest"]["document"]),
        roots=[pki.root_certificate],
        expect=Expectations(nonce=bytes.fromhex("0a0b0c"), user_data=bytes.fromhex("cafe"), allow_debug=True),
    )
    assert document.module_id == guest.enclave_id
    # Debug mode: PCR0-2 are zero in documents while DescribePCR shows the EIF's values
    # (docs/pcrs.md#debug-mode).
    assert document.pcrs[0] == bytes(48) and document.pcrs[1] == bytes(48) and document.pcrs[2] == bytes(48)
    assert document.pcrs[3] == pcr_for_role_arn(ROLE)
    assert document.pcrs[4] == pcr_for_instance_id(INSTANCE)
    assert len(document.public_key) == 294
