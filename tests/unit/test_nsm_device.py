"""The NSM virtio device over vhost-user, driven by the fake QEMU front end as the Linux nsm
driver drives it (docs/nsm.md#device: request and 0x3000 response buffer as two chains)."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import io
import json
import os
import threading
import time

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization

from harness.attestation import Expectations, verify_document
from harness.nsm import (
    Attestation,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    ErrorResponse,
    ExtendPCR,
    GetRandom,
    Nsm,
    NsmErrorCode,
    NsmState,
    decode_response,
    encode_request,
)
from harness.nsm.device import NsmDevice
from harness.pcr import Measurements
from harness.pki import Pki
from harness.vhost_user import ProtocolFeature, Request, VhostUserBackend
from helpers import guest_programs
from helpers.vhost_user_frontend import FakeFrontend

MODULE_ID = "i-0123456789abcdef0-enc0000000000000010"
MEASUREMENTS = Measurements(pcr0=bytes([1]) * 48, pcr1=bytes([2]) * 48, pcr2=bytes([3]) * 48)
RESPONSE_BUFFER = 0x3000


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
def served(tmp_path, pki):
    before = _fds()
    nsm = Nsm(NsmState(MEASUREMENTS, module_id=MODULE_ID), pki)
    device = NsmDevice(nsm)
    backend = VhostUserBackend(str(tmp_path / "nsm.sock"), device, offer_config=False)
    backend.start()
    fe = FakeFrontend(str(tmp_path / "nsm.sock"), mem_size=8 << 20)
    assert backend.wait_connected(5)
    fe.handshake()
    (queue,) = fe.start_queues([64])
    yield nsm, device, backend, fe, queue
    if backend.queues[0].started:
        fe.stop_queues()  # the driver stops the ring before QEMU disconnects
    fe.close()
    backend.stop()
    assert backend.error is None
    # Only new descriptors count: other tests' objects may be collected (and close theirs) meanwhile.
    leaked = _fds() - before
    assert not leaked, f"fd leak: {sorted(leaked)}"


def send(queue, requests: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Queue each request as the Linux driver does (request chain, then response chain)."""
    heads = []
    for raw in requests:
        heads.append((queue.add([raw], []), queue.add([], [RESPONSE_BUFFER])))
    queue.kick()
    assert queue.wait_used(2 * len(requests), timeout)
    used = {head: (length, data) for head, length, data in queue.collect()}
    out = []
    for req_head, resp_head in heads:
        assert used[req_head][0] == 0  # request returned with length 0, docs/nsm.md#device
        length, data = used[resp_head]
        assert length == len(data) > 0
        out.append(data)
    return out


def test_device_shape_and_no_config_feature(served):
    _, device, backend, fe, _ = served
    assert device.device_id == 33 and device.num_queues == 1
    assert fe.num_queues == 1
    assert not fe.protocol_features & (1 << ProtocolFeature.CONFIG)


def test_two_chain_commands_round_trip(served):
    _, device, _, _, queue = served
    (raw,) = send(queue, [encode_request(DescribeNSM())])
    assert decode_response(raw) == DescribeNSMResponse(1, 0, 0, MODULE_ID, 32, list(range(16)), "SHA384")
    (raw,) = send(queue, [encode_request(DescribePCR(0))])
    assert decode_response(raw).data == MEASUREMENTS.pcr0
    (raw,) = send(queue, [encode_request(ExtendPCR(16, b"abc"))])
    assert len(decode_response(raw).data) == 48
    assert device.requests == 3


def test_hwrng_burst_of_get_random(served):
    # The kernel's nsm-hwrng issues a burst of GetRandom at boot (7 seen, docs/nsm.md#device).
    _, _, _, _, queue = served
    answers = send(queue, [encode_request(GetRandom())] * 7)
    randoms = [cbor2.loads(a)["GetRandom"]["random"] for a in answers]
    assert all(len(r) == 256 for r in randoms) and len(set(randoms)) == 7


def test_attestation_through_the_ring_verifies(served, pki):
    _, _, _, _, queue = served
    raw = encode_request(Attestation(user_data=b"u" * 100, nonce=b"n" * 32, public_key=b"k" * 300))
    (answer,) = send(queue, [raw])
    document = decode_response(answer).document
    doc = verify_document(document, roots=[pki.root_certificate], expect=Expectations(
        pcrs={0: MEASUREMENTS.pcr0}, nonce=b"n" * 32, user_data=b"u" * 100, public_key=b"k" * 300))
    assert doc.module_id == MODULE_ID


def test_single_chain_command_is_answered_in_place(served):
    _, _, _, _, queue = served
    head = queue.add([encode_request(DescribePCR(40))], [RESPONSE_BUFFER])
    queue.kick()
    assert queue.wait_used(1, 10)
    ((got_head, length, data),) = queue.collect()
    assert got_head == head and length == len(data)
    assert decode_response(data) == ErrorResponse(NsmErrorCode.InvalidIndex)


def test_oversized_request_and_small_buffer(served):
    _, _, _, _, queue = served
    (raw,) = send(queue, [encode_request(ExtendPCR(16, bytes(0x1000)))])
    assert decode_response(raw) == ErrorResponse(NsmErrorCode.InputTooLarge)
    # A response buffer too small for a document gets BufferTooSmall, not a truncated document.
    req = queue.add([encode_request(Attestation())], [])
    resp = queue.add([], [64])
    queue.kick()
    assert queue.wait_used(2, 10)
    used = {h: (n, d) for h, n, d in queue.collect()}
    assert used[req][0] == 0
    assert decode_response(used[resp][1]) == ErrorResponse(NsmErrorCode.BufferTooSmall)


def test_delay_fault_does_not_stall_the_vhost_user_loop(served):
    nsm, _, _, fe, queue = served
    nsm.faults.delay("Attestation", 1.0, count=1)
    queue.add([encode_request(Attestation())], [])
    queue.add([], [RESPONSE_BUFFER])
    queue.kick()
    # While the NSM is held, the back end still answers QEMU's messages.
    assert fe.get_u64(Request.GET_FEATURES) == fe.features
    assert queue.used_idx() == 0  # not answered yet: the delay holds the response
    assert queue.wait_used(2, 10)
    queue.collect()


def test_stop_with_a_request_in_flight_is_clean(served):
    nsm, device, backend, fe, queue = served
    started, finished = threading.Event(), threading.Event()
    original = nsm.handle

    def slow(data: bytes) -> bytes:
        started.set()
        time.sleep(0.3)
        answer = original(data)
        finished.set()
        return answer

    nsm.handle = slow  # type: ignore[method-assign]
    queue.add([encode_request(GetRandom())], [])
    queue.add([], [RESPONSE_BUFFER])
    queue.kick()
    assert started.wait(5)
    assert fe.stop_queues() == [2]  # GET_VRING_BASE answered while the worker is busy
    assert finished.wait(5)
    device.run_on_loop(lambda: None)  # the loop has run the completion the worker queued
    assert queue.used_idx() == 0  # the late answer was dropped, not written into a stopped ring
    assert backend.error is None


# -- the PyPI client (aws-nsm-interface, unchanged) and the guest helper, over the ring ----------

@pytest.fixture
def nsm_client(served, monkeypatch):
    """aws-nsm-interface with only the kernel's part replaced: its ioctl goes through the device
    the way the Linux nsm driver does it (request chain + 0x3000 response chain), and the
    response length is written back into the caller's iovec (docs/nsm.md#device)."""
    aws_nsm_interface = pytest.importorskip("aws_nsm_interface")
    from ioctl_opt import IOC, IOC_READ, IOC_WRITE

    nsm, device, backend, fe, queue = served
    # The package computes the ioctl number the driver defines: _IOWR(0x0A, 0, 32 bytes).
    assert IOC(IOC_READ | IOC_WRITE, 0x0A, 0, ctypes.sizeof(aws_nsm_interface.NsmMessage)) == 0xC0200A00

    def driver_ioctl(file_handle, message) -> None:
        request = ctypes.string_at(message.request.iov_base, message.request.iov_len)
        (answer,) = send(queue, [request])
        assert len(answer) <= message.response.iov_len
        ctypes.memmove(message.response.iov_base, answer, len(answer))
        message.response.iov_len = len(answer)

    monkeypatch.setattr(aws_nsm_interface, "_execute_ioctl", driver_ioctl)
    monkeypatch.setattr(aws_nsm_interface, "open_nsm_device", lambda: io.StringIO())
    return aws_nsm_interface, nsm


def test_aws_nsm_interface_client_against_the_device(nsm_client, pki):
    client, nsm = nsm_client
    fh = client.open_nsm_device()
    info = client.describe_nsm(fh)
    assert info == {"version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": MODULE_ID,
                    "max_pcrs": 32, "locked_pcrs": list(range(16)), "digest": "SHA384"}
    assert client.describe_pcr(fh, 0) == {"lock": True, "data": MEASUREMENTS.pcr0}
    assert client.extend_pcr(fh, 16, b"abc")["data"] == hashlib.sha384(bytes(48) + b"abc").digest()
    assert client.lock_pcr(fh, 16) is True
    with pytest.raises(client.IoctlError, match="ReadOnlyIndex"):
        client.extend_pcr(fh, 16, b"abc")
    assert client.lock_pcrs(fh, 32) is True
    with pytest.raises(client.IoctlError, match="InvalidIndex"):
        client.lock_pcrs(fh, 33)
    assert len(client.get_random(fh, 256)) == 256
    document = client.get_attestation_doc(fh, user_data=b"ud", nonce=b"nonce", public_key=b"pk")["document"]
    verify_document(document, roots=[pki.root_certificate],
                    expect=Expectations(pcrs={0: MEASUREMENTS.pcr0}, nonce=b"nonce", user_data=b"ud", public_key=b"pk"))


def test_guest_nsm_tool_all(nsm_client, pki, capsys, tmp_path):
    tool = guest_programs.load("nsm_tool")
    assert tool.main(["--marker", "NSMTOOL", "all", "--nonce", "0a0b", "--user-data", "cafe", "--gen-rsa",
                      "--private-key-out", str(tmp_path / "key.pem")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("NSMTOOL {") and "\n" not in line
    result = json.loads(line.split(" ", 1)[1])
    assert result["describe"]["module_id"] == MODULE_ID
    assert result["describe_pcr"]["0"] == {"index": 0, "lock": True, "data": MEASUREMENTS.pcr0.hex()}
    assert result["describe_pcr"]["16"] == {"index": 16, "lock": False, "data": "00" * 48}
    assert result["random"]["length"] == 256
    assert result["selfcheck"]["passed"], result["selfcheck"]
    attest = result["attest"]
    document = base64.b64decode(attest["document"])
    doc = verify_document(document, roots=[pki.root_certificate],
                          expect=Expectations(pcrs={0: MEASUREMENTS.pcr0}, nonce=bytes.fromhex("0a0b"), user_data=bytes.fromhex("cafe")))
    # The RSA-2048 SubjectPublicKeyInfo KMS expects, matching the private key the tool wrote.
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert doc.public_key == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.key_size == 2048
    assert attest["pcrs"]["0"] == MEASUREMENTS.pcr0.hex()


def test_guest_nsm_tool_bench_and_errors(nsm_client, capsys):
    tool = guest_programs.load("nsm_tool")
    assert tool.main(["bench", "--count", "5", "--kind", "attestation"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 5 and result["min_us"] <= result["p50_us"] <= result["p99_us"] <= result["max_us"]
    assert tool.main(["describe-pcr", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == "InvalidIndex"
    assert tool.main(["lock-pcr", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == "ReadOnlyIndex"
    assert tool.main(["extend-pcr", "17", "00ff"]) == 0
    extended = json.loads(capsys.readouterr().out)
    assert extended["data"] == extended["expected"] == hashlib.sha384(bytes(48) + b"\x00\xff").hexdigest()
    # --public-key takes a file or, when no such file exists, hex (scenarios pass it inline).
    assert tool.main(["attest", "--public-key", "0a0b", "--nonce", "01"]) == 0
    attested = json.loads(capsys.readouterr().out)
    assert attested["public_key"] == "0a0b" and attested["nonce"] == "01"


def test_a_request_whose_handling_raises_gets_internal_error_and_replies_do_not_shift(served):
    # A bug in the NSM model must cost that one request an InternalError, never shift later
    # answers into earlier requests' buffers (completion is matched to its own chains).
    nsm, device, _, _, queue = served
    real = nsm.handle
    calls = []

    def flaky(data: bytes) -> bytes:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("injected model failure")
        return real(data)

    nsm.handle = flaky
    first, second, third = send(queue, [encode_request(DescribePCR(0)),
                                        encode_request(DescribePCR(1)),
                                        encode_request(DescribePCR(2))])
    assert decode_response(first) == ErrorResponse(NsmErrorCode.InternalError)
    assert decode_response(second).data == MEASUREMENTS.pcr1
    assert decode_response(third).data == MEASUREMENTS.pcr2
    assert list(device.worker_errors) == ["NSM request handling raised RuntimeError: injected model failure"]
    # and the device keeps serving in order afterwards
    (again,) = send(queue, [encode_request(DescribePCR(0))])
    assert decode_response(again).data == MEASUREMENTS.pcr0
