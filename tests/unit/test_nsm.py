"""NSM codec (golden vectors, docs/nsm.md#encoding), state machine (AWS's self-check), API and
fault injection."""

from __future__ import annotations

import datetime as dt
import hashlib

import cbor2
import pytest

from harness import nsm
from harness.attestation import AT_DOCUMENT_TIME, AttestationError, Expectations, verify_document
from harness.nsm import (
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    Nsm,
    NsmCodecError,
    NsmErrorCode,
    NsmFaults,
    NsmState,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from harness.pcr import Measurements
from harness.pki import Pki

# docs/nsm.md#encoding: hex of the CBOR the Rust reference (nsm-api) produces.
REQUEST_VECTORS = [
    (DescribePCR(index=3), "a16b4465736372696265504352a165696e64657803"),
    (ExtendPCR(index=4, data=bytes([1, 2, 3])), "a169457874656e64504352a265696e64657804646461746143010203"),
    (LockPCR(index=5), "a1674c6f636b504352a165696e64657805"),
    (LockPCRs(range=16), "a1684c6f636b50435273a16572616e676510"),
    (DescribeNSM(), "6b44657363726962654e534d"),
    (GetRandom(), "6947657452616e646f6d"),
    (
        Attestation(user_data=bytes.fromhex("0909"), nonce=None, public_key=bytes.fromhex("07")),
        "a16b4174746573746174696f6ea369757365725f64617461420909656e6f6e6365f66a7075626c69635f6b65794107",
    ),
]
RESPONSE_VECTORS = [
    (DescribePCRResponse(lock=True, data=bytes.fromhex("aabb")), "a16b4465736372696265504352a2646c6f636bf5646461746142aabb"),
    (ExtendPCRResponse(data=bytes.fromhex("01")), "a169457874656e64504352a164646174614101"),
    (LockPCRResponse(), "674c6f636b504352"),
    (LockPCRsResponse(), "684c6f636b50435273"),
    (
        DescribeNSMResponse(1, 2, 3, "i-abc", 32, [0, 1], "SHA384"),
        "a16b44657363726962654e534da76d76657273696f6e5f6d616a6f72016d76657273696f6e5f6d696e6f72026d"
        "76657273696f6e5f706174636803696d6f64756c655f696465692d616263686d61785f7063727318206b6c6f63"
        "6b65645f706372738200016664696765737466534841333834",
    ),
    (AttestationResponse(document=bytes.fromhex("d284")), "a16b4174746573746174696f6ea168646f63756d656e7442d284"),
    (GetRandomResponse(random=bytes.fromhex("040404")), "a16947657452616e646f6da16672616e646f6d43040404"),
    (ErrorResponse(NsmErrorCode.InvalidIndex), "a1654572726f726c496e76616c6964496e646578"),
]

MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
ROLE = "arn:aws:iam::123456789012:role/Webserver"
INSTANCE = "i-1234567890abcdef0"


def _sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def _ext(data: bytes) -> bytes:
    # docs/pcrs.md#extend-rule, computed here independently of harness.pcr.
    return _sha384(bytes(48) + data)


MEASUREMENTS = Measurements(
    pcr0=_ext(_sha384(b"kernel+cmdline+ramdisks")),
    pcr1=_ext(_sha384(b"kernel+cmdline+ramdisk0")),
    pcr2=_ext(_sha384(b"ramdisk1")),
    pcr8=_ext(_sha384(b"certificate")),
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture()
def device(pki) -> Nsm:
    state = NsmState(MEASUREMENTS, module_id=MODULE_ID, parent_role_arn=ROLE, instance_id=INSTANCE)
    return Nsm(state, pki)


def call(device: Nsm, request):
    return decode_response(device.handle(encode_request(request)))


@pytest.mark.parametrize("obj,hexdata", REQUEST_VECTORS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_request_golden_vectors_both_ways(obj, hexdata):
    assert encode_request(obj).hex() == hexdata
    assert decode_request(bytes.fromhex(hexdata)) == obj


@pytest.mark.parametrize("obj,hexdata", RESPONSE_VECTORS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_response_golden_vectors_both_ways(obj, hexdata):
    assert encode_response(obj).hex() == hexdata
    assert decode_response(bytes.fromhex(hexdata)) == obj


def test_decoder_accepts_what_serde_accepts():
    # Fields in another order, a missing optional, byte strings as arrays of u8.
    raw = cbor2.dumps({"Attestation": {"nonce": b"n", "user_data": [1, 2]}})
    assert decode_request(raw) == Attestation(user_data=b"\x01\x02", nonce=b"n", public_key=None)
    assert decode_request(cbor2.dumps({"ExtendPCR": {"data": b"x", "index": 17}})) == ExtendPCR(17, b"x")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\x00",  # not CBOR
        cbor2.dumps("Reboot"),  # unknown unit variant
        cbor2.dumps({"DescribePCR": {}}),  # missing field
        cbor2.dumps({"DescribePCR": {"index": -1}}),  # not a u16
        cbor2.dumps({"DescribePCR": {"index": 70000}}),  # not a u16
        cbor2.dumps({"ExtendPCR": {"index": 16, "data": "text"}}),
        cbor2.dumps(["DescribeNSM"]),
    ],
)
def test_bad_requests_are_codec_errors_and_invalid_operation(raw, device):
    with pytest.raises(NsmCodecError):
        decode_request(raw)
    assert device.handle(raw) == cbor2.dumps({"Error": "InvalidOperation"})


def test_request_over_0x1000_is_input_too_large(device):
    raw = encode_request(ExtendPCR(16, bytes(0x1000)))
    assert len(raw) > 0x1000
    assert call(device, ExtendPCR(16, bytes(0x1000))) == ErrorResponse(NsmErrorCode.InputTooLarge)
    # One byte under the limit is served.
    data = bytes(0x1000 - (len(raw) - 0x1000) - 1)
    assert len(encode_request(ExtendPCR(16, data))) == 0x1000 - 1
    assert isinstance(call(device, ExtendPCR(16, data)), ExtendPCRResponse)


def test_self_check_like_aws(device):
    """The state machine as AWS's nsm-check exercises it (docs/nsm.md)."""
    desc = call(device, DescribeNSM())
    assert desc == DescribeNSMResponse(1, 0, 0, MODULE_ID, 32, list(range(16)), "SHA384")
    # 0-15 locked at boot: DescribePCR says so, ExtendPCR and LockPCR fail.
    for index in range(16):
        resp = call(device, DescribePCR(index))
        assert resp.lock is True
        assert call(device, ExtendPCR(index, b"x")) == ErrorResponse(NsmErrorCode.ReadOnlyIndex)
        assert call(device, LockPCR(index)) == ErrorResponse(NsmErrorCode.ReadOnlyIndex)
    # Boot values: PCR0/1/2/8 from the EIF, PCR3/4 from the parent (check values of
    # docs/pcrs.md#parent-pcrs).
    assert call(device, DescribePCR(0)).data == MEASUREMENTS.pcr0
    assert call(device, DescribePCR(8)).data == MEASUREMENTS.pcr8
    assert call(device, DescribePCR(3)).data.hex() == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
    )
    assert call(device, DescribePCR(4)).data.hex() == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"
    )
    # 16-31 start at zero, unlocked; ExtendPCR returns the new value SHA384(old || data).
    for index in range(16, 32):
        assert call(device, DescribePCR(index)) == DescribePCRResponse(False, bytes(48))
        value = bytes(48)
        for chunk in (b"a", b"\x00" * 100, bytes(range(256))):
            value = _sha384(value + chunk)
            assert call(device, ExtendPCR(index, chunk)) == ExtendPCRResponse(value)
        assert call(device, DescribePCR(index)) == DescribePCRResponse(False, value)
    # Lock one, then it is read-only.
    assert call(device, LockPCR(20)) == LockPCRResponse()
    assert call(device, DescribePCR(20)).lock is True
    assert call(device, ExtendPCR(20, b"y")) == ErrorResponse(NsmErrorCode.ReadOnlyIndex)
    # Out of range.
    assert call(device, DescribePCR(32)) == ErrorResponse(NsmErrorCode.InvalidIndex)
    assert call(device, ExtendPCR(32, b"z")) == ErrorResponse(NsmErrorCode.InvalidIndex)
    assert call(device, LockPCR(32)) == ErrorResponse(NsmErrorCode.InvalidIndex)
    # LockPCRs{33} fails, LockPCRs{32} locks all.
    assert call(device, LockPCRs(33)) == ErrorResponse(NsmErrorCode.InvalidIndex)
    assert call(device, LockPCRs(32)) == LockPCRsResponse()
    assert call(device, DescribeNSM()).locked_pcrs == list(range(32))
    assert call(device, ExtendPCR(31, b"q")) == ErrorResponse(NsmErrorCode.ReadOnlyIndex)


def test_get_random_is_256_fresh_bytes(device):
    first, second = call(device, GetRandom()), call(device, GetRandom())
    assert len(first.random) == 256 and len(second.random) == 256
    assert first.random != second.random
    # The Linux hwrng driver requires a definite map {"GetRandom": {"random": bstr}}.
    raw = device.handle(encode_request(GetRandom()))
    assert raw[:1] == b"\xa1" and raw[1:11] == b"\x69GetRandom" and raw[11:12] == b"\xa1"


def test_attestation_document_carries_request_and_state(device, pki):
    ext = call(device, ExtendPCR(16, b"app"))
    resp = call(device, Attestation(user_data=b"ud", nonce=b"nonce-1", public_key=b"pk"))
    doc = verify_document(
        resp.document,
        roots=[pki.root_certificate],
        expect=Expectations(pcrs={0: MEASUREMENTS.pcr0, 8: MEASUREMENTS.pcr8}, nonce=b"nonce-1", user_data=b"ud", public_key=b"pk"),
    )
    assert doc.module_id == MODULE_ID
    # PCR16 is not in documents (docs/attestation.md#payload).
    assert sorted(doc.pcrs) == list(range(16))
    assert ext.data not in doc.pcrs.values()
    assert doc.pcrs[1] == MEASUREMENTS.pcr1 and doc.pcrs[2] == MEASUREMENTS.pcr2
    assert doc.pcrs[3] == _ext(ROLE.encode()) and doc.pcrs[4] == _ext(INSTANCE.encode())
    assert doc.pcrs[5] == bytes(48)
    assert doc.indefinite and resp.document[:4] == bytes.fromhex("8444a101")
    assert not doc.debug_mode


def test_debug_mode_zeroes_pcr0_1_2_8_keeps_3_4(pki):
    state = NsmState(MEASUREMENTS, module_id=MODULE_ID, debug_mode=True, parent_role_arn=ROLE, instance_id=INSTANCE)
    device = Nsm(state, pki)
    # DescribePCR still reports the real values; only documents zero them.
    assert call(device, DescribePCR(0)).data == MEASUREMENTS.pcr0
    document = call(device, Attestation()).document
    with pytest.raises(AttestationError) as err:
        verify_document(document, roots=[pki.root_certificate], expect=Expectations())
    assert err.value.check == "debug-mode"
    doc = verify_document(document, roots=[pki.root_certificate], expect=Expectations(allow_debug=True))
    assert doc.debug_mode
    for index in (0, 1, 2, 8):
        assert doc.pcrs[index] == bytes(48)
    assert doc.pcrs[3] == _ext(ROLE.encode()) and doc.pcrs[4] == _ext(INSTANCE.encode())


def test_strict_mode_limits_attestation_fields(pki):
    lenient = Nsm(NsmState(MEASUREMENTS, module_id=MODULE_ID), pki)
    strict = Nsm(NsmState(MEASUREMENTS, module_id=MODULE_ID, strict=True), pki)
    big = Attestation(nonce=bytes(1025))
    # The real NSM signed a 1025-byte nonce (docs/nsm.md#limits); strict mode follows the
    # documentation.
    assert isinstance(call(lenient, big), AttestationResponse)
    assert call(strict, big) == ErrorResponse(NsmErrorCode.InvalidArgument)
    assert isinstance(call(strict, Attestation(nonce=bytes(512))), AttestationResponse)


def test_faults_error_count_and_wildcard(device):
    faults = device.faults
    faults.fail("DescribeNSM", NsmErrorCode.InternalError, count=2)
    assert call(device, DescribeNSM()) == ErrorResponse(NsmErrorCode.InternalError)
    assert call(device, GetRandom()).random  # other types untouched
    assert call(device, DescribeNSM()) == ErrorResponse(NsmErrorCode.InternalError)
    assert isinstance(call(device, DescribeNSM()), DescribeNSMResponse)  # count used up
    faults.fail("*", "BufferTooSmall")
    assert call(device, GetRandom()) == ErrorResponse(NsmErrorCode.BufferTooSmall)
    faults.clear()
    assert isinstance(call(device, GetRandom()), GetRandomResponse)
    with pytest.raises(ValueError):
        faults.fail("Reboot", NsmErrorCode.InternalError)


@pytest.mark.parametrize("part,check", [("payload", "signature"), ("signature", "signature"), ("certificate", "chain")])
def test_fault_tampered_document(device, pki, part, check):
    device.faults.tamper(part, count=1)
    tampered = call(device, Attestation(nonce=b"n")).document
    with pytest.raises(AttestationError) as err:
        verify_document(tampered, roots=[pki.root_certificate])
    assert err.value.check == check
    # The next document is intact.
    verify_document(call(device, Attestation(nonce=b"n")).document, roots=[pki.root_certificate])


def test_fault_expired_document(device, pki):
    device.faults.expire(count=1)
    document = call(device, Attestation(nonce=b"n")).document
    with pytest.raises(AttestationError) as err:
        verify_document(document, roots=[pki.root_certificate])
    assert err.value.check == "certificate-expired"
    doc = verify_document(document, roots=[pki.root_certificate], at=AT_DOCUMENT_TIME)
    assert dt.datetime.now(dt.timezone.utc) - doc.timestamp > dt.timedelta(hours=3)


def test_fault_delay_is_applied_and_traced(pki):
    events = []
    faults = NsmFaults()
    device = Nsm(NsmState(MEASUREMENTS, module_id=MODULE_ID), pki, faults=faults, trace=events.append)
    faults.delay("GetRandom", 0.2, count=1)
    call(device, GetRandom())
    call(device, DescribePCR(40))
    device.handle(b"\x00garbage")
    assert [e.request_type for e in events] == ["GetRandom", "DescribePCR", "?"]
    # The delay shows in the handling time the trace reports (it is a fault, not a benchmark).
    assert events[0].duration_s >= 0.2
    assert events[1].error is NsmErrorCode.InvalidIndex
    assert events[2].error is NsmErrorCode.InvalidOperation


def test_state_rejects_bad_measurements():
    with pytest.raises(ValueError):
        NsmState({0: b"short"}, module_id=MODULE_ID)
    assert nsm.MAX_REQUEST_SIZE == 0x1000 and nsm.MAX_RESPONSE_SIZE == 0x3000


def test_trace_writer_json_lines(pki, tmp_path):
    import json

    path = tmp_path / "nsm.trace"
    device = Nsm(NsmState(MEASUREMENTS, module_id=MODULE_ID), pki, trace=nsm.trace_writer(path))
    call(device, ExtendPCR(3, b"x"))
    call(device, Attestation(nonce=b"n" * 20))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["request"], e["error"]) for e in lines] == [("ExtendPCR", "ReadOnlyIndex"), ("Attestation", None)]
    assert lines[0]["index"] == 3 and lines[1]["nonce"] == 20 and lines[1]["user_data"] is None
    assert lines[1]["response_bytes"] > 3000
