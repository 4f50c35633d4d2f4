"""KMS emulator (docs/kms.md) driven by real clients: boto3, raw HTTP, the guest kms_client, openssl."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import subprocess

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import attestation
from harness.errors import NitroError
from harness.kms import KmsCredential, KmsServer, cms, ensure_tls_identity
from harness.pki import Pki
from helpers import REPO
from helpers.kms import (ACCOUNT, ALICE, BOB, GUEST_CLIENT, GUEST_PYTHON, IMAGE_PCR0, MODULE_ID,
                         REGION, boto_client, document, enclave_policy, error_of, make_tls, pcrs_with,
                         spki_of)

#: Fixtures ``pki`` and ``recipient_key``.
pytest_plugins = ["helpers.kms_recipient_fixtures"]

OTHER_PCR0 = bytes([7]) * 48
VECTORS = REPO / "tests" / "vectors"


# -- fixtures -------------------------------------------------------------------------------------


def recipient(doc: bytes) -> dict:
    return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": doc}


@pytest.fixture(scope="module")
def server(pki):
    with KmsServer(attestation_roots=[pki.root_certificate], credentials=[ALICE, BOB]) as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server):
    return boto_client(server)


@pytest.fixture(scope="module")
def key_id(kms):
    return kms.create_key(Description="shared test key")["KeyMetadata"]["KeyId"]


def raw_post(server, target: str | None, body: bytes, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    hdrs = {"Content-Type": "application/x-amz-json-1.1"}
    if target:
        hdrs["X-Amz-Target"] = f"TrentService.{target}"
    hdrs.update(headers or {})
    conn.request("POST", "/", body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


# -- every operation through boto3 -------------------------------------------------------------------


def test_key_lifecycle_operations(kms):
    meta = kms.create_key(Description="lifecycle", Tags=[{"TagKey": "team", "TagValue": "enclaves"}])[
        "KeyMetadata"
    ]
    key = meta["KeyId"]
    assert meta["Arn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key}"
    assert (meta["KeyState"], meta["Enabled"], meta["KeySpec"], meta["KeyUsage"]) == (
        "Enabled",
        True,
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
    )
    assert kms.describe_key(KeyId=meta["Arn"])["KeyMetadata"]["Description"] == "lifecycle"

    kms.create_alias(AliasName="alias/lifecycle", TargetKeyId=key)
    assert kms.describe_key(KeyId="alias/lifecycle")["KeyMetadata"]["KeyId"] == key
    aliases = kms.list_aliases(KeyId=key)["Aliases"]
    assert [(a["AliasName"], a["TargetKeyId"], a["AliasArn"]) for a in aliases] == [
        ("alias/lifecycle", key, f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/lifecycle")
    ]
    with pytest.raises(ClientError) as exc:
        kms.create_alias(AliasName="alias/lifecycle", TargetKeyId=key)
    assert error_of(exc)[0] == "AlreadyExistsException"

    kms.disable_key(KeyId=key)
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as exc:
        kms.encrypt(KeyId=key, Plaintext=b"x")
    assert error_of(exc) == ("DisabledException", f"{meta['Arn']} is disabled.")
    kms.enable_key(KeyId=key)
    assert kms.encrypt(KeyId=key, Plaintext=b"x")["KeyId"] == meta["Arn"]

    scheduled = kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert (scheduled["KeyState"], scheduled["PendingWindowInDays"], scheduled["KeyId"]) == (
        "PendingDeletion",
        7,
        meta["Arn"],
    )
    with pytest.raises(ClientError) as exc:
        kms.encrypt(KeyId=key, Plaintext=b"x")
    assert error_of(exc)[0] == "KMSInvalidStateException"
    described = kms.describe_key(KeyId=key)["KeyMetadata"]
    assert described["PendingDeletionWindowInDays"] == 7 and "DeletionDate" in described
    assert kms.cancel_key_deletion(KeyId=key)["KeyId"] == meta["Arn"]
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Disabled"  # as KMS does

    assert kms.list_resource_tags(KeyId=key)["Tags"] == [{"TagKey": "team", "TagValue": "enclaves"}]
    assert kms.list_key_policies(KeyId=key)["PolicyNames"] == ["default"]


def test_list_keys_paginates(kms):
    made = {kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(3)}
    seen, marker, pages = [], None, 0
    while True:
        kwargs = {"Limit": 2} | ({"Marker": marker} if marker else {})
        page = kms.list_keys(**kwargs)
        pages += 1
        seen += [k["KeyId"] for k in page["Keys"]]
        assert all(k["KeyArn"].endswith(k["KeyId"]) for k in page["Keys"])
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert made <= set(seen) and len(seen) == len(set(seen)) and pages >= 2


def test_policies_get_put_and_lockout_check(kms):
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    default = json.loads(kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    assert default["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    kms.put_key_policy(KeyId=key, PolicyName="default", Policy=enclave_policy(IMAGE_PCR0.hex()))
    assert json.loads(kms.get_key_policy(KeyId=key)["Policy"])["Statement"][1]["Sid"] == "EnclaveDecrypt"

    locked_out = json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": BOB.principal_arn},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ]
        }
    )
    with pytest.raises(ClientError) as exc:
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy=locked_out)
    assert error_of(exc) == (
        "MalformedPolicyDocumentException",
        "The new key policy will not allow you to update the key policy in the future.",
    )
    with pytest.raises(ClientError) as exc:
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy='{"Statement": [{"Effect": "Allow"}]}')
    assert error_of(exc)[0] == "MalformedPolicyDocumentException" and "Principal" in error_of(exc)[1]
    kms.put_key_policy(
        KeyId=key, PolicyName="default", Policy=locked_out, BypassPolicyLockoutSafetyCheck=True
    )
    with pytest.raises(ClientError) as exc:
        kms.get_key_policy(KeyId=key)
    code, message = error_of(exc)
    assert code == "AccessDeniedException"
    assert message == (
        f"User: {ALICE.principal_arn} is not authorized to perform: kms:GetKeyPolicy on resource: "
        f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key} because no resource-based policy allows the kms:GetKeyPolicy action"
    )


def test_encrypt_decrypt_reencrypt(kms, key_id):
    context = {"purpose": "test", "tenant": "a"}
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"attack at dawn", EncryptionContext=context)["CiphertextBlob"]
    out = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "a", "purpose": "test"})
    assert (out["Plaintext"], out["EncryptionAlgorithm"]) == (b"attack at dawn", "SYMMETRIC_DEFAULT")
    assert out["KeyId"].endswith(key_id)
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob)
    assert error_of(exc)[0] == "InvalidCiphertextException"
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=b"\x01" * 80, EncryptionContext=context)
    assert error_of(exc)[0] == "InvalidCiphertextException"

    other = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=context, KeyId=other)
    assert error_of(exc)[0] == "IncorrectKeyException"
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=context,
        DestinationKeyId=other,
        DestinationEncryptionContext={"moved": "yes"},
    )
    assert moved["SourceKeyId"].endswith(key_id) and moved["KeyId"].endswith(other)
    assert (
        kms.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"moved": "yes"})["Plaintext"]
        == b"attack at dawn"
    )


def test_data_keys_and_random(kms, key_id):
    gdk = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert len(gdk["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=gdk["CiphertextBlob"])["Plaintext"] == gdk["Plaintext"]
    assert len(kms.generate_data_key(KeyId=key_id, KeySpec="AES_128")["Plaintext"]) == 16
    assert len(kms.generate_data_key(KeyId=key_id, NumberOfBytes=7)["Plaintext"]) == 7
    with pytest.raises(ClientError) as exc:
        kms.generate_data_key(KeyId=key_id)
    assert error_of(exc)[0] == "ValidationException"
    without = kms.generate_data_key_without_plaintext(KeyId=key_id, NumberOfBytes=24)
    assert "Plaintext" not in without
    assert len(kms.decrypt(CiphertextBlob=without["CiphertextBlob"])["Plaintext"]) == 24

    pair = kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    assert spki_of(private) == pair["PublicKey"]
    assert (
        kms.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"])["Plaintext"]
        == pair["PrivateKeyPlaintext"]
    )
    assert "PrivateKeyPlaintext" not in kms.generate_data_key_pair_without_plaintext(
        KeyId=key_id, KeyPairSpec="ECC_NIST_P384"
    )

    assert len(kms.generate_random(NumberOfBytes=1024)["Plaintext"]) == 1024


def test_model_validation_errors(kms, key_id):
    with pytest.raises(ClientError) as exc:
        kms.generate_data_key(KeyId=key_id, NumberOfBytes=2000)
    assert error_of(exc) == (
        "ValidationException",
        "1 validation error detected: Value '2000' at 'numberOfBytes' failed to satisfy constraint: Member must have value less than or equal to 1024",
    )
    with pytest.raises(ClientError) as exc:
        kms.generate_random(NumberOfBytes=1025)
    assert error_of(exc)[0] == "ValidationException"
    with pytest.raises(ClientError) as exc:
        kms.encrypt(KeyId=key_id, Plaintext=b"x" * 4097)
    # Plaintext is sensitive in the model: its value is never echoed.
    assert (
        error_of(exc)[1]
        == "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: Member must have length less than or equal to 4096"
    )


def test_errors_on_the_wire(server, key_id):
    status, body = raw_post(server, "DescribeKey", json.dumps({"KeyId": key_id}).encode())
    assert (status, body) == (
        400,
        {"__type": "MissingAuthenticationTokenException", "message": "Missing Authentication Token"},
    )


@pytest.fixture(scope="module")
def open_server(pki):
    """No credentials configured: unsigned requests, every caller is the default principal."""
    with KmsServer(attestation_roots=[pki.root_certificate]) as srv:
        yield srv


def test_raw_json_protocol(open_server):
    status, body = raw_post(open_server, "CreateKey", b"{}")
    assert status == 200 and body["KeyMetadata"]["KeyState"] == "Enabled"
    assert isinstance(body["KeyMetadata"]["CreationDate"], float)
    key = body["KeyMetadata"]["KeyId"]
    status, body = raw_post(
        open_server,
        "Encrypt",
        json.dumps({"KeyId": key, "Plaintext": base64.b64encode(b"hi").decode()}).encode(),
    )
    assert status == 200 and base64.b64decode(body["CiphertextBlob"])[:4] == b"NHK\x01"
    assert raw_post(open_server, "Decrypt", b"{}") == (
        400,
        {
            "__type": "ValidationException",
            "message": "1 validation error detected: Value at 'ciphertextBlob' failed to satisfy constraint: Member must not be null",
        },
    )
    assert (
        raw_post(open_server, "GenerateDataKey", json.dumps({"KeyId": key, "NumberOfBytes": "8"}).encode())[
            1
        ]["__type"]
        == "SerializationException"
    )
    assert (
        raw_post(open_server, "Encrypt", json.dumps({"KeyId": key, "Plaintext": "%%%"}).encode())[1]["__type"]
        == "SerializationException"
    )
    assert raw_post(open_server, "Encrypt", b"{nope")[1]["__type"] == "SerializationException"
    assert raw_post(open_server, "Frobnicate", b"{}")[1]["__type"] == "UnknownOperationException"
    assert raw_post(open_server, None, b"{}")[1]["__type"] == "UnknownOperationException"
    status, body = raw_post(
        open_server,
        "Sign",
        json.dumps({"KeyId": key, "Message": "eA==", "SigningAlgorithm": "ECDSA_SHA_256"}).encode(),
    )
    assert (status, body) == (
        400,
        {
            "__type": "InvalidKeyUsageException",
            "message": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key} key usage is ENCRYPT_DECRYPT which is not valid for Sign.",
        },
    )
    status, body = raw_post(open_server, "RetireGrant", json.dumps({"GrantToken": "t"}).encode())
    assert (status, body["__type"]) == (400, "UnsupportedOperationException")  # in the model, not emulated
    status, body = raw_post(open_server, "DescribeKey", json.dumps({"KeyId": "alias/missing"}).encode())
    assert (status, body) == (
        400,
        {
            "__type": "NotFoundException",
            "message": f"Alias arn:aws:kms:{REGION}:{ACCOUNT}:alias/missing is not found.",
        },
    )


def test_dry_run(kms, key_id):
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob, DryRun=True)
    assert error_of(exc)[0] == "DryRunOperationException"


# -- SigV4 -----------------------------------------------------------------------------------------------


def test_sigv4_principals_and_failures(server, kms):
    key = kms.create_key(
        Policy=json.dumps(
            {
                "Statement": [
                    {
                        "Sid": "AliceOnly",
                        "Effect": "Allow",
                        "Principal": {"AWS": ALICE.principal_arn},
                        "Action": "kms:*",
                        "Resource": "*",
                    }
                ]
            }
        )
    )["KeyMetadata"]["KeyId"]
    bob = boto_client(server, BOB)
    with pytest.raises(ClientError) as exc:
        bob.describe_key(KeyId=key)
    assert error_of(exc)[1].startswith(
        f"User: {BOB.principal_arn} is not authorized to perform: kms:DescribeKey"
    )
    wrong_secret = boto_client(server, KmsCredential(ALICE.access_key_id, "nope", ""))
    with pytest.raises(ClientError) as exc:
        wrong_secret.describe_key(KeyId=key)
    assert error_of(exc)[0] == "InvalidSignatureException"
    stranger = boto_client(server, KmsCredential("AKIDSTRANGER", "x", ""))
    with pytest.raises(ClientError) as exc:
        stranger.list_keys()
    assert error_of(exc) == (
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    )
    elsewhere = boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name="eu-west-1",
        aws_access_key_id=ALICE.access_key_id,
        aws_secret_access_key=ALICE.secret_access_key,
    )
    with pytest.raises(ClientError) as exc:
        elsewhere.list_keys()
    assert error_of(exc)[0] == "InvalidSignatureException" and "region" in error_of(exc)[1]


# -- Recipient (attestation) ------------------------------------------------------------------------------


def test_recipient_operations_return_only_ciphertext_for_recipient(kms, key_id, pki, recipient_key):
    doc = document(pki, recipient_key)
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"enclave secret")["CiphertextBlob"]
    out = kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert "Plaintext" not in out and out["KeyId"].endswith(key_id)
    assert (
        cms.decrypt_ciphertext_for_recipient(out["CiphertextForRecipient"], recipient_key)
        == b"enclave secret"
    )
    rid = (
        cms.parse_ciphertext_for_recipient(out["CiphertextForRecipient"]).recipients[0].subject_key_identifier
    )
    assert rid == cms.subject_key_identifier(spki_of(recipient_key))

    gdk = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", Recipient=recipient(doc))
    assert "Plaintext" not in gdk
    data_key = cms.decrypt_ciphertext_for_recipient(gdk["CiphertextForRecipient"], recipient_key)
    assert len(data_key) == 32 and kms.decrypt(CiphertextBlob=gdk["CiphertextBlob"])["Plaintext"] == data_key

    pair = kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="RSA_2048", Recipient=recipient(doc))
    assert "PrivateKeyPlaintext" not in pair
    private = serialization.load_der_private_key(
        cms.decrypt_ciphertext_for_recipient(pair["CiphertextForRecipient"], recipient_key), None
    )
    assert spki_of(private) == pair["PublicKey"]

    rnd = kms.generate_random(NumberOfBytes=64, Recipient=recipient(doc))
    assert "Plaintext" not in rnd
    assert len(cms.decrypt_ciphertext_for_recipient(rnd["CiphertextForRecipient"], recipient_key)) == 64


def test_pcr0_policy_cases(kms, pki, recipient_key):
    """The four PCR0 policy cases of docs/kms.md at the KMS level: right image allowed, host without
    attestation denied, another image denied, debug mode denied unless 96 zeros are listed."""
    key = kms.create_key(Policy=enclave_policy(IMAGE_PCR0.hex().upper()))["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"only for the image")["CiphertextBlob"]
    allowed = kms.decrypt(CiphertextBlob=blob, Recipient=recipient(document(pki, recipient_key)))
    assert (
        cms.decrypt_ciphertext_for_recipient(allowed["CiphertextForRecipient"], recipient_key)
        == b"only for the image"
    )
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key}"
    denial = (
        f"User: {ALICE.principal_arn} is not authorized to perform: kms:Decrypt on resource: {arn} "
        "because no resource-based policy allows the kms:Decrypt action"
    )
    for doc in (None, document(pki, recipient_key, OTHER_PCR0), document(pki, recipient_key, bytes(48))):
        with pytest.raises(ClientError) as exc:
            kms.decrypt(CiphertextBlob=blob, **({"Recipient": recipient(doc)} if doc else {}))
        assert error_of(exc) == ("AccessDeniedException", denial)
    kms.put_key_policy(KeyId=key, PolicyName="default", Policy=enclave_policy(IMAGE_PCR0.hex(), "0" * 96))
    debug = kms.decrypt(CiphertextBlob=blob, Recipient=recipient(document(pki, recipient_key, bytes(48))))
    assert (
        cms.decrypt_ciphertext_for_recipient(debug["CiphertextForRecipient"], recipient_key)
        == b"only for the image"
    )


def test_bad_attestation_documents_are_rejected(kms, key_id, pki, recipient_key):
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    good = document(pki, recipient_key)
    tampered = attestation.tamper_document(good, "signature")
    foreign = document(Pki.create(), recipient_key)
    for bad, check in ((tampered, "signature"), (foreign, "root"), (b"\xa0", "structure")):
        with pytest.raises(ClientError) as exc:
            kms.decrypt(CiphertextBlob=blob, Recipient=recipient(bad))
        code, message = error_of(exc)
        assert code == "ValidationException" and message.startswith(
            f"The attestation document is not valid: {check}"
        )
    no_key = attestation.build_document(pki, module_id=MODULE_ID, pcrs=pcrs_with(IMAGE_PCR0))
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob, Recipient=recipient(no_key))
    assert error_of(exc)[0] == "ValidationException" and "public_key" in error_of(exc)[1]
    ec_key = attestation.build_document(
        pki,
        module_id=MODULE_ID,
        pcrs=pcrs_with(IMAGE_PCR0),
        public_key=spki_of(ec.generate_private_key(ec.SECP384R1())),
    )
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=blob, Recipient=recipient(ec_key))
    assert "RSA" in error_of(exc)[1]


def test_bad_attestation_exception_is_configurable(pki, recipient_key):
    expired_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=6)
    with KmsServer(
        attestation_roots=[pki.root_certificate],
        bad_attestation_exception="AccessDeniedException",
        attestation_at=expired_at,
    ) as srv:
        client = boto_client(srv, None)
        with pytest.raises(ClientError) as exc:
            client.generate_random(NumberOfBytes=8, Recipient=recipient(document(pki, recipient_key)))
        code, message = error_of(exc)
        assert code == "AccessDeniedException" and message.startswith(
            "The attestation document is not valid: certificate-expired"
        )
    with pytest.raises(NitroError, match="bad_attestation_exception"):
        KmsServer(bad_attestation_exception="NotFoundException")


def test_real_aws_document_with_aws_root():
    """A real AWS attestation document (eu-central-1, 2025-01-06, RSA-2048 public key) is
    accepted against the AWS root at its own timestamp; the answer is encrypted to its key."""
    doc = (VECTORS / "attestation" / "yawn_attestation.cose").read_bytes()
    public_key = attestation.decode_document(doc).public_key
    with KmsServer(
        attestation_roots=[VECTORS / "attestation" / "aws_nitro_root_g1.pem"], attestation_at="document"
    ) as srv:
        out = boto_client(srv, None).generate_random(NumberOfBytes=32, Recipient=recipient(doc))
    parsed = cms.parse_ciphertext_for_recipient(out["CiphertextForRecipient"])
    assert parsed.recipients[0].subject_key_identifier == cms.subject_key_identifier(public_key)
    assert len(parsed.encrypted_content) == 48  # 32 bytes + a full block of PKCS#7 padding


# -- persistence -------------------------------------------------------------------------------------------


def test_state_survives_restart(tmp_path):
    state = tmp_path / "kms-state.json"
    with KmsServer(state) as first:
        client = boto_client(first, None)
        key = client.create_key(Description="persisted")["KeyMetadata"]["KeyId"]
        client.create_alias(AliasName="alias/persisted", TargetKeyId=key)
        blob = client.encrypt(KeyId="alias/persisted", Plaintext=b"kept")["CiphertextBlob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms-state.json"]  # no temp files left
    assert oct(state.stat().st_mode & 0o777) == "0o600"  # it holds key material
    with KmsServer(state) as second:
        client = boto_client(second, None)
        assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
        assert client.describe_key(KeyId="alias/persisted")["KeyMetadata"]["Description"] == "persisted"


def test_failed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    state = tmp_path / "kms-state.json"
    with KmsServer(state) as srv:
        client = boto_client(srv, None)
        client.create_key(Description="first")
        before = state.read_bytes()

        def crash(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(ClientError) as exc:
            client.create_key(Description="second")
        assert error_of(exc)[0] == "KMSInternalException"
        monkeypatch.undo()
    assert state.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms-state.json"]


def test_corrupt_state_file_is_reported_and_left_alone(tmp_path):
    state = tmp_path / "kms-state.json"
    state.write_text('{"version": 1, "keys": {')
    with pytest.raises(NitroError, match=r"kms-state.json: not valid JSON .* left untouched"):
        KmsServer(state)
    assert state.read_text() == '{"version": 1, "keys": {'


# -- TLS and the guest client ------------------------------------------------------------------------------


def test_tls_identity_is_reused_and_renewed_under_the_same_ca(tmp_path):
    first = ensure_tls_identity(tmp_path, region=REGION)
    cert = x509.load_pem_x509_certificate(first.certificate.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"kms.{REGION}.amazonaws.com", "localhost"]
    assert oct(first.private_key.stat().st_mode & 0o777) == "0o600"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert ensure_tls_identity(tmp_path, region=REGION) == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # reused as is
    wider = ensure_tls_identity(tmp_path, region="eu-west-1")
    assert wider.ca_certificate.read_bytes() == before["kms-ca.pem"]  # images keep trusting it
    assert wider.certificate.read_bytes() != before["kms-cert.pem"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kms-ca.key",
        "kms-ca.pem",
        "kms-cert.pem",
        "kms-key.pem",
    ]


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    ca, cert, key = make_tls(tmp_path_factory.mktemp("tls"))
    with KmsServer(tls=(cert, key), attestation_roots=[pki.root_certificate], credentials=[ALICE]) as srv:
        yield srv, ca


def tls_client(srv, ca):
    """boto3's KMS client for the TLS server, as Alice."""
    return boto3.client("kms", endpoint_url=f"https://localhost:{srv.port}", region_name=REGION,
                        verify=str(ca), aws_access_key_id=ALICE.access_key_id,
                        aws_secret_access_key=ALICE.secret_access_key)


def test_boto3_over_tls(tls_server):
    srv, ca = tls_server
    assert srv.endpoint_url.startswith("https://127.0.0.1:")
    client = tls_client(srv, ca)
    assert len(client.generate_random(NumberOfBytes=16)["Plaintext"]) == 16


def run_guest_client(srv, ca, *args: str) -> subprocess.CompletedProcess:
    command = [
        GUEST_PYTHON,
        str(GUEST_CLIENT),
        *args[:1],
        "--region",
        REGION,
        "--endpoint",
        f"127.0.0.1:{srv.port}",
        "--ca-file",
        str(ca),
        "--aws-access-key-id",
        ALICE.access_key_id,
        "--aws-secret-access-key",
        ALICE.secret_access_key,
        *args[1:],
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_guest_client_decrypts_through_tls_sigv4_and_cms(tls_server, pki, recipient_key, tmp_path):
    srv, ca = tls_server
    admin = tls_client(srv, ca)
    key = admin.create_key(Policy=enclave_policy(IMAGE_PCR0.hex()))["KeyMetadata"]["KeyId"]
    blob = base64.b64encode(admin.encrypt(KeyId=key, Plaintext=b"kmstool secret")["CiphertextBlob"]).decode()
    (tmp_path / "doc.bin").write_bytes(document(pki, recipient_key))
    (tmp_path / "key.pem").write_bytes(
        recipient_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files = ["--attestation-doc", str(tmp_path / "doc.bin"), "--private-key", str(tmp_path / "key.pem")]

    ok = run_guest_client(srv, ca, "decrypt", "--ciphertext", blob, *files)
    assert (ok.returncode, ok.stdout) == (
        0,
        f"PLAINTEXT: {base64.b64encode(b'kmstool secret').decode()}\n",
    ), ok.stderr

    denied = run_guest_client(srv, ca, "decrypt", "--ciphertext", blob, "--no-recipient")
    assert denied.returncode == 1 and denied.stdout == ""
    assert denied.stderr.startswith(
        f"kms_client: AccessDeniedException: User: {ALICE.principal_arn} is not authorized to perform: kms:Decrypt"
    )

    genkey = run_guest_client(srv, ca, "genkey", "--key-id", key, "--key-spec", "AES-256", *files)
    assert genkey.returncode == 0, genkey.stderr
    lines = dict(line.split(": ", 1) for line in genkey.stdout.splitlines())
    again = run_guest_client(srv, ca, "decrypt", "--ciphertext", lines["CIPHERTEXT"], *files)
    assert (
        again.stdout == f"PLAINTEXT: {lines['PLAINTEXT']}\n"
        and len(base64.b64decode(lines["PLAINTEXT"])) == 32
    )

    rnd = run_guest_client(srv, ca, "genrandom", "--length", "48", *files)
    assert rnd.returncode == 0 and len(base64.b64decode(rnd.stdout.split(": ", 1)[1])) == 48

    untrusted = run_guest_client(
        srv, VECTORS / "attestation" / "aws_nitro_root_g1.pem", "genrandom", "--length", "8", "--no-recipient"
    )
    assert untrusted.returncode == 1 and untrusted.stderr.startswith("kms_client: TLSError:")
