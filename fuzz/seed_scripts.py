"""Seeds laid out by hand for the targets whose input is a script or a protocol exchange: KMS
HTTP requests (over a fixed key store), vsock guest/parent scripts and virtqueue rings. The
layouts are the ones the target modules document; ``fuzz/make_seeds.py`` calls :data:`MAKERS`.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds"
VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors"


def _write(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# -- KMS ---------------------------------------------------------------------------------------

#: Fixed key ids of the fuzz key store, by kind.
KEY_IDS = {
    "sym": "0f0f0f0f-0000-4000-8000-000000000001",
    "rsa": "0f0f0f0f-0000-4000-8000-000000000002",
    "sign": "0f0f0f0f-0000-4000-8000-000000000003",
    "hmac": "0f0f0f0f-0000-4000-8000-000000000004",
    "agree": "0f0f0f0f-0000-4000-8000-000000000005",
}
_SPECS = {"sym": {}, "rsa": {"KeySpec": "RSA_2048", "KeyUsage": "ENCRYPT_DECRYPT"},
          "sign": {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"},
          "hmac": {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
          "agree": {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"}}
HOST = "kms.us-east-1.amazonaws.com"
AMZ_DATE = "20250101T000000Z"


def _kms_service():
    """The fuzz target's service with the fixed key store (made and saved once)."""
    from fuzz.targets import kms

    open_server, _signed, _template, _internal = kms._setup()
    return open_server.service, kms


def make_kms_state() -> None:
    """Create one key of each kind and an alias, under fixed ids, into fuzz/keys/kms_state.json."""
    from harness.kms.credentials import Caller
    from harness.kms.service import KmsService

    from fuzz.targets import kms

    svc = KmsService(None)
    caller = Caller(kms.PRINCIPAL, None)
    for kind, spec in _SPECS.items():
        meta = svc.handle("CreateKey", json.dumps({**spec, "Description": f"fuzz {kind}"}).encode(),
                          caller)["KeyMetadata"]
        key = svc.store.keys.pop(meta["KeyId"])
        key["KeyId"], key["Arn"] = KEY_IDS[kind], svc.store.arn(KEY_IDS[kind])
        key["CreationDate"] = 1735689600.0
        svc.store.keys[KEY_IDS[kind]] = key
    svc.handle("CreateAlias", json.dumps({"AliasName": "alias/fuzz",
                                          "TargetKeyId": KEY_IDS["sym"]}).encode(), caller)
    for alias in svc.store.aliases.values():
        alias["CreationDate"] = alias["LastUpdatedDate"] = 1735689600.0
    kms.STATE_PATH.parent.mkdir(parents=True, exist_ok=True)
    kms.STATE_PATH.write_text(json.dumps(svc.store.state, indent=1, sort_keys=True) + "\n")


def _http(op: str, body: dict | bytes, *, sign: bool = False, target: str | None = None,
          extra: list[tuple[str, str]] = ()) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("Host", HOST), ("Content-Type", "application/x-amz-json-1.1"),
               ("X-Amz-Target", target or f"TrentService.{op}"), ("Content-Length", str(len(raw)))]
    headers += list(extra)
    if sign:
        headers.append(("X-Amz-Date", AMZ_DATE))
        headers.append(("Authorization", _authorization(headers, raw)))
    head = "POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + raw


def _authorization(headers: list[tuple[str, str]], body: bytes) -> str:
    """SigV4 over exactly the listed headers at the fixed date (botocore's signer, as the
    emulator's verifier recomputes it)."""
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from harness.kms.sigv4 import _ListedHeadersSigV4

    from fuzz.targets import kms

    signed = {k.lower(): v for k, v in headers if k.lower() != "content-length"}
    request = AWSRequest(method="POST", url=f"http://{HOST}/", data=body, headers=signed)
    request.context["timestamp"] = AMZ_DATE
    signer = _ListedHeadersSigV4(Credentials(kms.ACCESS_KEY, kms.SECRET_KEY), "kms", "us-east-1",
                                 signed)
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    return (f"AWS4-HMAC-SHA256 Credential={kms.ACCESS_KEY}/{AMZ_DATE[:8]}/us-east-1/kms/"
            f"aws4_request, SignedHeaders={';'.join(sorted(signed))}, Signature={signature}")


def kms_seeds() -> None:
    from fuzz.targets import kms

    if not kms.STATE_PATH.exists():
        make_kms_state()
    svc, _ = _kms_service()
    import copy

    from harness.kms.credentials import Caller

    state = json.loads(kms.STATE_PATH.read_text())
    svc.store.state = copy.deepcopy(state)
    caller = Caller(kms.PRINCIPAL, None)
    sym, rsa, sign, hmac_key, agree = (KEY_IDS[k] for k in ("sym", "rsa", "sign", "hmac", "agree"))
    ctx = {"purpose": "fuzz"}
    blob = svc.handle("Encrypt", json.dumps({"KeyId": sym, "Plaintext": base64.b64encode(b"secret").decode(),
                                             "EncryptionContext": ctx}).encode(), caller)["CiphertextBlob"]
    blob = base64.b64encode(blob).decode() if isinstance(blob, bytes) else blob
    doc = base64.b64encode((VECTORS / "attestation" / "yawn_attestation.cose").read_bytes()).decode()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    requests = {
        "create-key": _http("CreateKey", {"Description": "k", "Tags": [{"TagKey": "a", "TagValue": "b"}]}),
        "describe-key-alias": _http("DescribeKey", {"KeyId": "alias/fuzz"}),
        "encrypt": _http("Encrypt", {"KeyId": sym, "Plaintext": b64(b"hello"), "EncryptionContext": ctx}),
        "decrypt": _http("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": ctx}),
        "decrypt-recipient": _http("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": ctx,
                                               "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                                             "AttestationDocument": doc}}),
        "re-encrypt": _http("ReEncrypt", {"CiphertextBlob": blob, "SourceEncryptionContext": ctx,
                                          "DestinationKeyId": rsa,
                                          "DestinationEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}),
        "generate-data-key": _http("GenerateDataKey", {"KeyId": sym, "KeySpec": "AES_256"}),
        "generate-random": _http("GenerateRandom", {"NumberOfBytes": 32}),
        "sign": _http("Sign", {"KeyId": sign, "Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256"}),
        "generate-mac": _http("GenerateMac", {"KeyId": hmac_key, "Message": b64(b"m"),
                                              "MacAlgorithm": "HMAC_SHA_256"}),
        "get-public-key": _http("GetPublicKey", {"KeyId": agree}),
        "list-keys": _http("ListKeys", {"Limit": 2}),
        "put-key-policy": _http("PutKeyPolicy", {"KeyId": sym, "PolicyName": "default", "Policy": json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                 "Action": "kms:*", "Resource": "*"},
                {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
                 "Condition": {"StringNotEqualsIgnoreCase": {
                     "kms:RecipientAttestation:ImageSha384": "00" * 48}}}]})}),
        "schedule-deletion": _http("ScheduleKeyDeletion", {"KeyId": rsa, "PendingWindowInDays": 7}),
        "signed-describe": _http("DescribeKey", {"KeyId": sym}, sign=True),
        "pipelined": _http("ListAliases", {}) + _http("GenerateRandom", {"NumberOfBytes": 8}),
        "get": f"GET / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
        "no-length": f"POST / HTTP/1.1\r\nHost: {HOST}\r\nX-Amz-Target: TrentService.ListKeys\r\n\r\n".encode(),
        "bad-target": _http("Nothing", {}, target="Trent.Nothing"),
    }
    for name, data in requests.items():
        _write("kms", name, data)


# -- vsock -------------------------------------------------------------------------------------

_VHDR = struct.Struct("<QQIIIHHIII")
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)


def _rec(op: int, body: bytes = b"") -> bytes:
    return bytes([op]) + struct.pack("<H", len(body)) + body


def _pkt(src_port: int, dst_port: int, op: int, payload: bytes = b"", *, src_cid: int = 21,
         dst_cid: int = 3, typ: int = 1, flags: int = 0, buf_alloc: int = 65536,
         fwd_cnt: int = 0, length: int | None = None) -> bytes:
    return _VHDR.pack(src_cid, dst_cid, src_port, dst_port,
                      len(payload) if length is None else length, typ, op, flags, buf_alloc,
                      fwd_cnt) + payload


def _tx(pkt: bytes, *, kick: bool = True, oversized: bool = False) -> bytes:
    return _rec(0 | (16 if kick else 0) | (8 if oversized else 0), pkt)


KICK, RX = _rec(1), _rec(2, bytes([31]))
LOOP, TIMERS = _rec(6), _rec(6 | 8)


def vsock_seeds() -> None:
    scripts = {
        "accept-exchange": [
            _tx(_pkt(1234, 5000, REQUEST)), RX, _rec(3, b"\0pong"), LOOP, RX,
            _tx(_pkt(1234, 5000, RW, b"hello")), _rec(4, b"\0"),
            _tx(_pkt(1234, 5000, CREDIT_REQUEST)), _tx(_pkt(1234, 5000, CREDIT_UPDATE, fwd_cnt=4)),
            _tx(_pkt(1234, 5000, SHUTDOWN, flags=2)), LOOP,
            _tx(_pkt(1234, 5000, SHUTDOWN, flags=3)), TIMERS, RX],
        "heartbeat": [_tx(_pkt(999, 9000, REQUEST)), _tx(_pkt(999, 9000, RW, b"\xb7")), LOOP, RX,
                      _tx(_pkt(998, 9000, REQUEST)), _tx(_pkt(999, 9000, RST))],
        "parent-connect": [_rec(7, struct.pack("<I", 7000)), RX, LOOP,
                           _tx(_pkt(7000, 49152, RESPONSE)), _rec(3, b"\0from parent"), LOOP, RX,
                           _tx(_pkt(7000, 49152, RW, b"from guest")), _rec(4, b"\0"),
                           _tx(_pkt(7000, 49152, RST))],
        "refusals": [_tx(_pkt(1, 6000, REQUEST)), _tx(_pkt(2, 5000, REQUEST, dst_cid=2)),
                     _tx(_pkt(3, 5000, REQUEST, src_cid=22)), _tx(_pkt(4, 5000, REQUEST, typ=2)),
                     _tx(_pkt(5, 5000, RW, b"abc", length=9)), _tx(_pkt(6, 5000, RW, b"x"), oversized=True),
                     _tx(b"short"), _tx(_pkt(7, 5000, RW, b"nobody")), RX],
        "backlog-and-limit": [*(_tx(_pkt(100 + i, 5000, REQUEST), kick=False) for i in range(5)),
                              KICK, RX, *(_tx(_pkt(200 + i, 9000 if i == 0 else 5000, REQUEST), kick=False)
                                          for i in range(10)), KICK, RX, LOOP],
        "window": [_tx(_pkt(10, 5000, REQUEST, buf_alloc=16)), RX, _rec(3, b"\0" + b"p" * 64), LOOP, RX,
                   _tx(_pkt(10, 5000, CREDIT_UPDATE, buf_alloc=2048, fwd_cnt=16)), LOOP, RX,
                   *(_tx(_pkt(10, 5000, RW, b"g" * 1500)) for _ in range(4)), RX],
        "ring-restart": [_tx(_pkt(20, 5000, REQUEST)), RX, _rec(7 | 8, b"\1"),
                         _tx(_pkt(20, 5000, RW, b"after")), _rec(7 | 8, b"\0"), RX, LOOP],
        "parent-close": [_tx(_pkt(30, 5000, REQUEST)), RX, _rec(5, b"\0\0"), LOOP, RX,
                         _tx(_pkt(31, 5000, REQUEST)), _tx(_pkt(31, 5000, RW, b"late")),
                         _rec(5, b"\0\1"), LOOP, RX, _rec(5, b"\0\2"), TIMERS],
        "small-rx-buffer": [_tx(_pkt(40, 5000, REQUEST)), _rec(2 | 8, bytes([0, 20]))],
    }
    for name, records in scripts.items():
        _write("vsock", name, b"".join(records))


# -- virtqueue ---------------------------------------------------------------------------------

_DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4


def _ring(order: int, descs: list[tuple[int, int, int, int]], heads: list[int], data: bytes = b"",
          *, base: int = 0, mode: int = 0, used_idx: int = 0, avail_idx: int | None = None) -> bytes:
    num = 1 << order
    table = b"".join(_DESC.pack(*d) for d in descs).ljust(16 * num, b"\0")
    idx = (base + len(heads)) & 0xFFFF if avail_idx is None else avail_idx
    ring = [0] * num
    for k, h in enumerate(heads):
        ring[(base + k) % num] = h
    avail = struct.pack("<HH", 0, idx) + struct.pack(f"<{num}H", *ring)
    return struct.pack("<BHBH", order, base, mode, used_idx) + table + avail + data


def virtqueue_seeds() -> None:
    rings = {
        "direct": _ring(2, [(0x3000, 16, NEXT, 1), (0x3100, 32, WRITE, 0), (0x3010, 8, 0, 0)],
                        [0, 2], b"readable bytes..readable"),
        "indirect-spanning": _ring(3, [(0x3200, 48, INDIRECT, 0)], [0], b"r" * 0x200 + b"".join(
            _DESC.pack(*d) for d in [(0x3000, 10, NEXT, 1), (0xFFF8, 16, NEXT, 2),
                                     (0x10100, 64, WRITE, 0)])),
        "wrap": _ring(8, [(0x3000, 4, 0, 0)] * 6, [5], b"wrap", base=0xFFFF, used_idx=0xFFFF),
        "malformed-then-good": _ring(2, [(0x3000, 4, NEXT, 0), (0x200000, 4, 0, 0),
                                         (0x3000, 4, 0, 0), (0x100000, 0x4000, WRITE, 0)],
                                     [0, 1, 2, 3], b"good", mode=4),
        "restart-small-limit": _ring(1, [(0x3000, 100, 0, 0), (0x3000, 10, 0, 0)], [0, 1],
                                     b"x" * 100, mode=3),
    }
    for name, data in rings.items():
        _write("virtqueue", name, data)


MAKERS = {"kms": kms_seeds, "vsock": vsock_seeds, "virtqueue": virtqueue_seeds}
