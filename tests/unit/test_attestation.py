"""Attestation documents: real AWS documents, harness-signed documents, tampering, policy, openssl."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import cbor2
import pytest
from asn1crypto.algos import DSASignature
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.attestation import (
    AT_DOCUMENT_TIME,
    AttestationError,
    Expectations,
    aws_root_g1,
    build_document,
    decode_document,
    encode_payload,
    sign_payload,
    verify_document,
)
from harness.pki import Pki
from helpers import REPO

VECTORS = REPO / "tests" / "vectors" / "attestation"
# file -> (module_id, timestamp ms, indefinite payload map, debug mode)
AWS_DOCUMENTS = {
    "anjuna_attestdoc_sample_prod_doc.bin": ("i-078824548edcf6519-enc01784234ec227b58", 1616018515685, False, False),
    "evervault_beta_debug-mode-attestation-doc-bytes": ("i-03ad7cdb817437eeb-enc0183cc7569b3f6e1", 1665582606081, False, True),
    "yawn_attestation.cose": ("i-0bee92034f3d60691-enc01943c5eaab3ad6a", 1736179625472, False, False),
    "tempo_aws_attestation_2026_01_03.bin": ("i-0368fa67e156d6d23-enc019b8596b1a9dad6", 1767472867402, True, False),
}
P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
# A day ago, to the millisecond: inside a fresh harness root's validity.
TIMESTAMP_MS = int((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).timestamp()) * 1000 + 402


def _aws(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _check(data: bytes, **kwargs) -> str:
    with pytest.raises(AttestationError) as err:
        verify_document(data, **kwargs)
    return err.value.check


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


PCRS = {i: hashlib.sha384(b"pcr%d" % i).digest() if i in (0, 1, 2, 3, 4) else bytes(48) for i in range(16)}


# -- real AWS documents ------------------------------------------------------------------------


def test_shipped_root_is_aws_root_g1():
    root = aws_root_g1()
    assert root.fingerprint(hashes.SHA256()).hex() == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    assert root.public_bytes(serialization.Encoding.PEM) == x509.load_pem_x509_certificate(
        _aws("aws_nitro_root_g1.pem")
    ).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("name", sorted(AWS_DOCUMENTS))
def test_aws_document_verifies_at_its_timestamp_and_is_expired_today(name):
    module_id, ms, indefinite, debug = AWS_DOCUMENTS[name]
    data = _aws(name)
    doc = verify_document(data, at=AT_DOCUMENT_TIME, expect=Expectations(allow_debug=True))
    assert doc.module_id == module_id
    assert doc.timestamp_ms == ms
    assert doc.indefinite is indefinite and (data[10:11] == b"\xbf") is indefinite
    assert doc.debug_mode is debug
    assert sorted(doc.pcrs) == list(range(16))
    assert doc.root.fingerprint(hashes.SHA256()).hex().startswith("641a0321")
    # docs/pcrs.md#debug-mode: debug documents zero PCR0-2 and keep PCR3/4 (set here: the parent
    # has a role).
    if debug:
        assert doc.pcrs[0] == doc.pcrs[1] == doc.pcrs[2] == bytes(48)
        assert any(doc.pcrs[3]) and any(doc.pcrs[4])
    # Today (and the default "now"), the 3-hour leaf has expired: the message names it.
    with pytest.raises(AttestationError) as err:
        verify_document(data)
    assert err.value.check == "certificate-expired"
    assert module_id in err.value.message and "expired at" in err.value.message


def test_aws_documents_include_high_s_signatures():
    # Verifiers must not require low-S (docs/attestation.md#signature): two of the four real
    # signatures are high-S.
    high = [n for n in AWS_DOCUMENTS if int.from_bytes(cbor2.loads(_aws(n))[3][48:], "big") > P384_ORDER // 2]
    assert len(high) == 2
    for name in high:
        verify_document(_aws(name), at=AT_DOCUMENT_TIME, expect=Expectations(allow_debug=True))


def test_aws_document_fields():
    doc = verify_document(_aws("yawn_attestation.cose"), at=AT_DOCUMENT_TIME)
    assert len(doc.public_key) == 294 and doc.user_data is None and doc.nonce is None
    assert doc.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.endswith(".eu-central-1.aws")
    out = doc.to_json()
    assert out["module_id"] == "i-0bee92034f3d60691-enc01943c5eaab3ad6a"
    assert out["timestamp"] == 1736179625472 and out["timestamp_utc"] == "2025-01-06T16:07:05.472Z"
    assert out["pcrs"]["0"] == doc.pcrs[0].hex() and len(out["cabundle"]) == 4
    assert out["verified"]["root_sha256"].startswith("641a0321")


def _payload_offset(data: bytes) -> int:
    # 84 44 a1013822 a0 59 LLLL <payload>
    assert data[7:8] == b"\x59"
    return 10


@pytest.mark.parametrize("name", sorted(AWS_DOCUMENTS))
def test_aws_document_one_byte_change_in_payload_fails_signature(name):
    data = _aws(name)
    doc = decode_document(data)
    for needle in (doc.pcrs[0][-8:], doc.module_id.encode()[-4:], b"\x1b" + doc.timestamp_ms.to_bytes(8, "big")):
        offset = data.index(needle, _payload_offset(data)) + len(needle) - 1
        assert _check(_flip(data, offset), at=AT_DOCUMENT_TIME, expect=Expectations(allow_debug=True)) == "signature"


@pytest.mark.parametrize("name", sorted(AWS_DOCUMENTS))
def test_aws_document_one_byte_change_in_signature_fails_signature(name):
    data = _aws(name)
    for offset in (len(data) - 96, len(data) - 48, len(data) - 1):
        assert _check(_flip(data, offset), at=AT_DOCUMENT_TIME, expect=Expectations(allow_debug=True)) == "signature"


@pytest.mark.parametrize("name", sorted(AWS_DOCUMENTS))
@pytest.mark.parametrize("which", ["leaf", "instance", "zonal", "regional", "root"])
def test_aws_document_one_byte_change_in_any_certificate_fails_chain(name, which):
    data = _aws(name)
    payload = cbor2.loads(cbor2.loads(data)[2])
    der = {
        "leaf": payload["certificate"],
        "instance": payload["cabundle"][3],
        "zonal": payload["cabundle"][2],
        "regional": payload["cabundle"][1],
        "root": payload["cabundle"][0],
    }[which]
    start = data.index(der)
    cert = x509.load_der_x509_certificate(der)
    # A byte of the subject's CN (inside the signed part) and the last byte (the signature value).
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.encode()
    for offset in (start + der.index(cn) + 2, start + len(der) - 1):
        check = _check(_flip(data, offset), at=AT_DOCUMENT_TIME, expect=Expectations(allow_debug=True))
        # A changed root copy in the bundle is caught as "not the pinned root".
        assert check == ("root" if which == "root" else "chain"), (which, offset - start)


def test_aws_document_against_a_harness_root_fails_root(pki):
    data = _aws("tempo_aws_attestation_2026_01_03.bin")
    assert _check(data, roots=[pki.root_certificate], at=AT_DOCUMENT_TIME) == "root"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_agrees_on_the_aws_chain(tmp_path):
    doc = decode_document(_aws("tempo_aws_attestation_2026_01_03.bin"))
    _openssl_chain(tmp_path, aws_root_g1(), doc)


def _openssl_chain(tmp_path: Path, root: x509.Certificate, doc) -> None:
    pem = serialization.Encoding.PEM
    (tmp_path / "root.pem").write_bytes(root.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in doc.cabundle[1:]))
    (tmp_path / "leaf.pem").write_bytes(doc.certificate.public_bytes(pem))

    def run(when: dt.datetime) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["openssl", "verify", "-attime", str(int(when.timestamp())), "-CAfile", "root.pem",
             "-untrusted", "chain.pem", "leaf.pem"],
            cwd=tmp_path, capture_output=True, text=True, check=False,
        )

    ok = run(doc.timestamp)
    assert ok.returncode == 0 and ok.stdout.strip() == "leaf.pem: OK", ok.stdout + ok.stderr
    late = run(doc.certificate.not_valid_after_utc + dt.timedelta(minutes=1))
    assert late.returncode != 0 and "certificate has expired" in late.stdout + late.stderr


def _openssl_signature(tmp_path: Path, data: bytes) -> subprocess.CompletedProcess:
    """Check a COSE_Sign1 ES384 signature with openssl, building Sig_structure by hand
    (docs/attestation.md#signature)."""
    protected, _, payload, signature = cbor2.loads(data)
    assert len(payload) > 0xFF
    signed = b"\x84\x6aSignature1" + b"\x44" + protected + b"\x40" + b"\x59" + len(payload).to_bytes(2, "big") + payload
    der_sig = DSASignature({"r": int.from_bytes(signature[:48], "big"), "s": int.from_bytes(signature[48:], "big")}).dump()
    leaf = x509.load_der_x509_certificate(cbor2.loads(payload)["certificate"])
    (tmp_path / "pub.pem").write_bytes(
        leaf.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "sig.der").write_bytes(der_sig)
    (tmp_path / "signed.bin").write_bytes(signed)
    return subprocess.run(
        ["openssl", "dgst", "-sha384", "-verify", "pub.pem", "-signature", "sig.der", "signed.bin"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_agrees_on_an_aws_signature(tmp_path):
    data = _aws("yawn_attestation.cose")
    assert _openssl_signature(tmp_path, data).stdout.strip() == "Verified OK"
    assert _openssl_signature(tmp_path, _flip(data, len(data) - 5)).returncode != 0


# -- harness-signed documents ------------------------------------------------------------------


@pytest.mark.parametrize("indefinite", [True, False])
def test_harness_document_layout_is_spec_7(pki, indefinite):
    data = build_document(
        pki, module_id=MODULE_ID, pcrs=PCRS, public_key=b"pk", user_data=b"ud", nonce=b"nn",
        timestamp=TIMESTAMP_MS, indefinite=indefinite,
    )
    # 84 44 a1013822 a0 59 LLLL <payload> 58 60 <r||s>
    assert data[:6] == bytes.fromhex("8444a1013822") and data[6:8] == bytes.fromhex("a059")
    length = int.from_bytes(data[8:10], "big")
    payload = data[10 : 10 + length]
    assert data[10 + length : 12 + length] == bytes.fromhex("5860") and len(data) == 12 + length + 96
    assert payload[:1] == (b"\xbf" if indefinite else b"\xa9")
    if indefinite:
        assert payload[-1:] == b"\xff"
    body = cbor2.loads(payload)
    assert list(body) == ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce"]
    assert body["timestamp"] == TIMESTAMP_MS and body["digest"] == "SHA384"
    # pcrs and cabundle are definite, pcrs keys ascending.
    pcrs_at = payload.index(b"\x64pcrs") + 5
    assert payload[pcrs_at] == 0xB0 and list(body["pcrs"]) == list(range(16))
    cab_at = payload.index(b"\x68cabundle") + 9
    assert payload[cab_at] == 0x84
    assert body["cabundle"][0] == pki.root_certificate.public_bytes(serialization.Encoding.DER)
    doc = verify_document(data, roots=[pki.root_certificate], at=AT_DOCUMENT_TIME,
                          expect=Expectations(pcrs={0: PCRS[0], 4: PCRS[4]}, nonce=b"nn", user_data=b"ud", public_key=b"pk"))
    assert doc.pcrs == PCRS


def test_harness_document_verifies_now_and_not_against_aws_root(pki):
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS, nonce=b"x")
    doc = verify_document(data, roots=[aws_root_g1(), pki.root_certificate])
    assert doc.root == pki.root_certificate
    assert _check(data) == "root"  # default roots: AWS only


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_agrees_on_harness_documents(pki, tmp_path):
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS, nonce=b"x")
    _openssl_chain(tmp_path, pki.root_certificate, decode_document(data))
    assert _openssl_signature(tmp_path, data).stdout.strip() == "Verified OK"


def test_high_s_and_tag_18_are_accepted(pki):
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS)
    protected, unprotected, payload, signature = cbor2.loads(data)
    s = int.from_bytes(signature[48:], "big")
    flipped = signature[:48] + (P384_ORDER - s).to_bytes(48, "big")  # the other valid S
    other = cbor2.dumps([protected, unprotected, payload, flipped])
    verify_document(other, roots=[pki.root_certificate])
    verify_document(cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, signature])), roots=[pki.root_certificate])
    assert _check(cbor2.dumps(cbor2.CBORTag(61, [protected, unprotected, payload, signature])), roots=[pki.root_certificate]) == "structure"


def test_expectations_name_the_failed_check(pki):
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS, public_key=b"pk", user_data=b"ud", nonce=b"nn")
    roots = [pki.root_certificate]
    assert _check(data, roots=roots, expect=Expectations(pcrs={0: PCRS[1]})) == "pcr"
    assert _check(data, roots=roots, expect=Expectations(pcrs={20: bytes(48)})) == "pcr"
    assert _check(data, roots=roots, expect=Expectations(nonce=b"other")) == "nonce"
    assert _check(data, roots=roots, expect=Expectations(user_data=b"other")) == "user-data"
    assert _check(data, roots=roots, expect=Expectations(public_key=b"other")) == "public-key"
    debug = build_document(pki, module_id=MODULE_ID, pcrs={**PCRS, 0: bytes(48), 1: bytes(48), 2: bytes(48)})
    assert _check(debug, roots=roots, expect=Expectations()) == "debug-mode"
    assert verify_document(debug, roots=roots).debug_mode  # no expectations: no policy


def test_validity_window(pki):
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS)
    doc = decode_document(data)
    leaf = doc.certificate
    roots = [pki.root_certificate]
    assert _check(data, roots=roots, at=leaf.not_valid_before_utc - dt.timedelta(seconds=1)) == "certificate-not-yet-valid"
    assert _check(data, roots=roots, at=leaf.not_valid_after_utc + dt.timedelta(seconds=1)) == "certificate-expired"
    verify_document(data, roots=roots, at=leaf.not_valid_after_utc)
    # A timestamp outside the leaf's validity, signed properly, is still refused.
    signer = pki.signer_for(MODULE_ID)
    der = serialization.Encoding.DER
    payload = encode_payload(
        module_id=MODULE_ID, timestamp_ms=int((leaf.not_valid_after_utc + dt.timedelta(hours=1)).timestamp() * 1000),
        pcrs=PCRS, certificate=signer.certificate.public_bytes(der), cabundle=[c.public_bytes(der) for c in signer.cabundle],
        public_key=None, user_data=None, nonce=None,
    )
    assert _check(sign_payload(signer.key, payload), roots=roots) == "timestamp"


def test_structure_algorithm_and_fields(pki):
    roots = [pki.root_certificate]
    assert _check(b"\x00\x01", roots=roots) == "structure"
    assert _check(cbor2.dumps([b"", {}, b""]), roots=roots) == "structure"
    data = build_document(pki, module_id=MODULE_ID, pcrs=PCRS)
    protected, unprotected, payload, signature = cbor2.loads(data)
    # QEMU's virtio-nsm: {1: -1} and 64 zero bytes for signature and certificate
    # (docs/attestation.md#qemu-documents).
    qemu = cbor2.dumps([bytes.fromhex("a10120"), {}, payload, bytes(64)])
    assert _check(qemu, roots=roots) == "algorithm"
    assert _check(cbor2.dumps([bytes.fromhex("a10126"), {}, payload, signature]), roots=roots) == "algorithm"
    body = cbor2.loads(payload)
    for key, value in (("digest", "SHA256"), ("pcrs", {0: b"short"}), ("timestamp", -1), ("nonce", "text"), ("cabundle", [])):
        bad = cbor2.dumps([protected, {}, cbor2.dumps({**body, key: value}), signature])
        assert _check(bad, roots=roots) == "fields", key
    missing = {k: v for k, v in body.items() if k != "nonce"}
    assert _check(cbor2.dumps([protected, {}, cbor2.dumps(missing), signature]), roots=roots) == "fields"
    junk_cert = cbor2.dumps([protected, {}, cbor2.dumps({**body, "certificate": b"\x30\x03junk"}), signature])
    assert _check(junk_cert, roots=roots) == "certificate"


def _ca(name: str, key, issuer_name, issuer_key, *, ca: bool, pathlen, cert_sign: bool, now):
    ku = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen), critical=True)
        .add_extension(ku, critical=True)
        .sign(issuer_key or key, hashes.SHA384())
    )


@pytest.mark.parametrize("flaw", ["leaf-is-ca", "instance-no-keycertsign", "zonal-pathlen-0", "regional-not-ca"])
def test_constraints(flaw):
    now = dt.datetime.now(dt.timezone.utc)
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(5)]
    names = ["root", "regional", "zonal", "instance", "leaf"]
    certs: list[x509.Certificate] = []
    for depth, name in enumerate(names):
        is_leaf = name == "leaf"
        pathlen = {"root": None, "regional": 2, "zonal": 1, "instance": 0, "leaf": None}[name]
        ca = not is_leaf
        cert_sign = ca
        if flaw == "leaf-is-ca" and is_leaf:
            ca = True
        if flaw == "instance-no-keycertsign" and name == "instance":
            cert_sign = False
        if flaw == "zonal-pathlen-0" and name == "zonal":
            pathlen = 0
        if flaw == "regional-not-ca" and name == "regional":
            ca, pathlen = False, None
        issuer = certs[depth - 1] if depth else None
        certs.append(_ca(name, keys[depth], issuer.subject if issuer else None, keys[depth - 1] if depth else None,
                         ca=ca, pathlen=pathlen, cert_sign=cert_sign, now=now))
    der = serialization.Encoding.DER
    payload = encode_payload(
        module_id=MODULE_ID, timestamp_ms=int(now.timestamp() * 1000), pcrs=PCRS,
        certificate=certs[4].public_bytes(der), cabundle=[c.public_bytes(der) for c in certs[:4]],
        public_key=None, user_data=None, nonce=None,
    )
    data = sign_payload(keys[4], payload)
    assert _check(data, roots=[certs[0]]) == "constraints"


# -- CLI -----------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from harness.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def tiny_eif(tmp_path):
    from harness.eif import write_eif

    kernel, cmdline, ramdisks = b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap" * 50, b"customer" * 70]
    path = tmp_path / "tiny.eif"
    write_eif(path, kernel, cmdline, ramdisks, None)
    sha = lambda b: hashlib.sha384(b).digest()  # noqa: E731
    ext = lambda d: hashlib.sha384(bytes(48) + d).digest()  # noqa: E731
    pcrs = {
        0: ext(sha(kernel + cmdline.encode() + ramdisks[0] + ramdisks[1])),
        1: ext(sha(kernel + cmdline.encode() + ramdisks[0])),
        2: ext(sha(ramdisks[1])),
    }
    return path, pcrs


def test_cli_pki_init_show_export(capsys, tmp_path):
    import json

    directory = tmp_path / "pki"
    status, out, _ = _cli(capsys, "pki", "init", "--pki-dir", str(directory))
    first = json.loads(out)
    assert status == 0 and first["Created"] is True and first["Subject"] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    status, out, err = _cli(capsys, "pki", "init", "--pki-dir", str(directory))
    assert status == 0 and json.loads(out)["SHA256"] == first["SHA256"] and "keeping" in err
    status, out, _ = _cli(capsys, "pki", "show", "--pki-dir", str(directory))
    assert json.loads(out)["SHA256"] == first["SHA256"]
    status, out, _ = _cli(capsys, "pki", "export-root", "--pki-dir", str(directory))
    assert hashlib.sha256(x509.load_pem_x509_certificate(out.encode()).public_bytes(serialization.Encoding.DER)).hexdigest() == first["SHA256"]
    status, _, err = _cli(capsys, "pki", "show", "--pki-dir", str(tmp_path / "none"))
    assert status == 19 and "root.pem" in err and "Traceback" not in err


def test_cli_attest_then_verify(capsys, tmp_path, tiny_eif):
    import json

    eif, pcrs = tiny_eif
    directory, out_doc = tmp_path / "pki", tmp_path / "doc.cbor"
    (tmp_path / "pub.der").write_bytes(b"\x30\x82pubkey")
    status, out, err = _cli(
        capsys, "attest", "--eif-path", str(eif), "--pki-dir", str(directory), "--instance-id", "i-1234567890abcdef0",
        "--parent-role", "arn:aws:iam::123456789012:role/Webserver", "--nonce", "00ff", "--user-data", "abcd",
        "--public-key", str(tmp_path / "pub.der"), "--output", str(out_doc),
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["ModuleId"].startswith("i-1234567890abcdef0-enc") and summary["Measurements"]["PCR0"] == pcrs[0].hex()
    _cli(capsys, "pki", "export-root", "--pki-dir", str(directory), "--output", str(tmp_path / "root.pem"))
    status, out, err = _cli(
        capsys, "verify-attestation", str(out_doc), "--root", str(tmp_path / "root.pem"),
        "--expect-pcr", f"0={pcrs[0].hex()}", "--expect-pcr", f"1={pcrs[1].hex()}", "--expect-pcr", f"2={pcrs[2].hex()}",
        "--nonce", "00ff",
    )
    assert status == 0, err
    doc = json.loads(out)
    assert doc["nonce"] == "00ff" and doc["user_data"] == "abcd" and doc["public_key"] == b"\x30\x82pubkey".hex()
    # Check values for PCR3 and PCR4 (docs/pcrs.md#parent-pcrs).
    assert doc["pcrs"]["3"].startswith("78fce75db17cd4e0") and doc["pcrs"]["4"].startswith("08f996b5d43e047a")
    assert doc["payload_map"] == "indefinite"
    # Wrong PCR, wrong root, debug mode: one line naming the check, exit 59.
    status, _, err = _cli(capsys, "verify-attestation", str(out_doc), "--root", str(tmp_path / "root.pem"),
                          "--expect-pcr", f"0={pcrs[1].hex()}")
    assert status == 59 and ": pcr: PCR0 is" in err and len(err.strip().splitlines()) == 1
    status, _, err = _cli(capsys, "verify-attestation", str(out_doc))
    assert status == 59 and ": root: " in err
    debug_doc = tmp_path / "debug.cbor"
    _cli(capsys, "attest", "--eif-path", str(eif), "--pki-dir", str(directory), "--debug-mode", "--definite", "--output", str(debug_doc))
    status, _, err = _cli(capsys, "verify-attestation", str(debug_doc), "--root", str(tmp_path / "root.pem"))
    assert status == 59 and ": debug-mode: " in err
    status, out, _ = _cli(capsys, "verify-attestation", str(debug_doc), "--root", str(tmp_path / "root.pem"), "--allow-debug")
    assert status == 0 and json.loads(out)["pcrs"]["0"] == "00" * 48 and json.loads(out)["payload_map"] == "definite"


def test_cli_verify_aws_documents(capsys, tmp_path):
    import base64
    import json

    path = VECTORS / "tempo_aws_attestation_2026_01_03.bin"
    status, out, err = _cli(capsys, "verify-attestation", str(path), "--at", "document")
    assert status == 0, err
    assert json.loads(out)["module_id"] == "i-0368fa67e156d6d23-enc019b8596b1a9dad6"
    status, _, err = _cli(capsys, "verify-attestation", str(path))
    assert status == 59 and "certificate-expired" in err and "Traceback" not in err
    status, _, err = _cli(capsys, "verify-attestation", str(path), "--at", "2026-01-03T20:41:00Z")
    assert status == 0, err
    # Base64 input, as carried in KMS requests.
    b64 = tmp_path / "doc.b64"
    b64.write_text(base64.b64encode(path.read_bytes()).decode())
    status, _, err = _cli(capsys, "verify-attestation", str(b64), "--at", "document")
    assert status == 0, err
    status, _, err = _cli(capsys, "verify-attestation", str(path), "--at", "yesterday")
    assert status == 3 and "--at" in err
    status, _, err = _cli(capsys, "verify-attestation", str(path), "--expect-pcr", "0=abcd")
    assert status == 3 and "48 bytes" in err


def test_cli_attest_errors_are_one_line_and_write_nothing(capsys, tmp_path, tiny_eif):
    eif, _ = tiny_eif
    out_doc = tmp_path / "doc.cbor"
    status, _, err = _cli(capsys, "attest", "--eif-path", str(tmp_path / "missing.eif"), "--pki-dir",
                          str(tmp_path / "pki"), "--output", str(out_doc))
    assert status in (19, 35) and "missing.eif" in err and "Traceback" not in err
    status, _, err = _cli(capsys, "attest", "--eif-path", str(eif), "--pki-dir", str(tmp_path / "pki"),
                          "--timestamp", "2001-01-01T00:00:00Z", "--output", str(out_doc))
    assert status == 3 and "--timestamp" in err and len(err.strip().splitlines()) == 1
    status, _, err = _cli(capsys, "attest", "--eif-path", str(eif), "--pki-dir", str(tmp_path / "pki"),
                          "--nonce", "xyz", "--output", str(out_doc))
    assert status == 3 and "--nonce" in err
    assert not out_doc.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".doc")] == []
    # A past timestamp inside the root's validity: the document verifies at its own time only.
    status, _, err = _cli(capsys, "attest", "--eif-path", str(eif), "--pki-dir", str(tmp_path / "pki"),
                          "--timestamp", str(int(time.time()) - 7 * 86400), "--output", str(out_doc))
    assert status == 0, err
    _cli(capsys, "pki", "export-root", "--pki-dir", str(tmp_path / "pki"), "--output", str(tmp_path / "root.pem"))
    status, _, err = _cli(capsys, "verify-attestation", str(out_doc), "--root", str(tmp_path / "root.pem"))
    assert status == 59 and "certificate-expired" in err
    status, _, err = _cli(capsys, "verify-attestation", str(out_doc), "--root", str(tmp_path / "root.pem"), "--at", "document")
    assert status == 0, err
