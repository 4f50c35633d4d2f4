"""KMS DeriveSharedSecret (docs/kms.md#key-agreement) through boto3: ECDH on every NIST curve
checked against `cryptography` and `openssl pkeyutl -derive`, the Recipient path that returns the
secret only as CiphertextForRecipient, and ``kms:RecipientAttestation:PCR<n>`` conditions for
every PCR an NSM holds (0 to 31, docs/kms.md#condition-keys)."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import attestation
from harness.kms import KmsServer, cms
from helpers.kms import ALICE, MODULE_ID, boto_client, error_of, openssl, spki_of

#: Fixtures ``pki`` and ``recipient_key``.
pytest_plugins = ["helpers.kms_recipient_fixtures"]

CURVES = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1}
#: PCR0-31 of an enclave: every PCR an NSM holds, each a different value.
PCRS = {index: bytes([index + 1]) * 48 for index in range(32)}


@pytest.fixture(scope="module")
def server(pki):
    with KmsServer(attestation_roots=[pki.root_certificate], credentials=[ALICE]) as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server):
    return boto_client(server)


def recipient(pki, key, pcrs=PCRS) -> dict:
    doc = attestation.build_document(pki, module_id=MODULE_ID, pcrs=pcrs, public_key=spki_of(key))
    return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": doc}


@pytest.mark.parametrize("spec", CURVES)
def test_derive_shared_secret_on_every_nist_curve(kms, tmp_path, spec):
    key = kms.create_key(KeySpec=spec, KeyUsage="KEY_AGREEMENT")["KeyMetadata"]
    kms_public = kms.get_public_key(KeyId=key["KeyId"])["PublicKey"]
    peer = ec.generate_private_key(CURVES[spec]())
    out = kms.derive_shared_secret(KeyId=key["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=spki_of(peer))
    assert (out["KeyId"], out["KeyAgreementAlgorithm"], out["KeyOrigin"]) == (key["Arn"], "ECDH", "AWS_KMS")
    assert "CiphertextForRecipient" not in out
    secret = out["SharedSecret"]
    assert secret == peer.exchange(ec.ECDH(), serialization.load_der_public_key(kms_public))
    assert len(secret) == (CURVES[spec].key_size + 7) // 8

    # The peer's side computed by openssl from the KMS key's public key.
    (tmp_path / "peer.der").write_bytes(
        peer.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "kms.der").write_bytes(kms_public)
    derived = openssl(
        "pkeyutl",
        "-derive",
        "-keyform",
        "DER",
        "-inkey",
        tmp_path / "peer.der",
        "-peerform",
        "DER",
        "-peerkey",
        tmp_path / "kms.der",
    )
    assert (derived.returncode, derived.stdout) == (0, secret)

    # Two KMS keys agree with each other.
    other = kms.create_key(KeySpec=spec, KeyUsage="KEY_AGREEMENT")["KeyMetadata"]["KeyId"]
    other_public = kms.get_public_key(KeyId=other)["PublicKey"]
    mine = kms.derive_shared_secret(KeyId=key["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=other_public)
    theirs = kms.derive_shared_secret(KeyId=other, KeyAgreementAlgorithm="ECDH", PublicKey=kms_public)
    assert mine["SharedSecret"] == theirs["SharedSecret"] != secret


def test_derive_shared_secret_errors(kms, recipient_key):
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")["KeyMetadata"]
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    p256_peer = spki_of(ec.generate_private_key(ec.SECP256R1()))
    bad_peer = (
        "ValidationException",
        "PublicKey must be a DER SubjectPublicKeyInfo of an ECC_NIST_P256 public key, "
        "the curve of the KMS key",
    )
    cases = [
        (
            dict(KeyId=signing["KeyId"], PublicKey=p256_peer),
            (
                "InvalidKeyUsageException",
                f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for DeriveSharedSecret.",
            ),
        ),
        (dict(KeyId=key["KeyId"], PublicKey=spki_of(ec.generate_private_key(ec.SECP384R1()))), bad_peer),
        (dict(KeyId=key["KeyId"], PublicKey=spki_of(ec.generate_private_key(ec.SECP256K1()))), bad_peer),
        (dict(KeyId=key["KeyId"], PublicKey=spki_of(recipient_key)), bad_peer),
        (dict(KeyId=key["KeyId"], PublicKey=b"\x30\x03\x02\x01\x01"), bad_peer),
        (
            dict(KeyId=key["KeyId"], PublicKey=p256_peer, DryRun=True),
            ("DryRunOperationException", "The request would have succeeded, but the DryRun option is set."),
        ),
    ]
    for params, expected in cases:
        with pytest.raises(ClientError) as exc:
            kms.derive_shared_secret(KeyAgreementAlgorithm="ECDH", **params)
        assert error_of(exc) == expected, params
    # The key agreement key encrypts nothing; the signing key agrees on nothing.
    with pytest.raises(ClientError) as exc:
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_of(exc) == (
        "InvalidKeyUsageException",
        f"{key['Arn']} key usage is KEY_AGREEMENT which is not valid for Encrypt.",
    )


def enclave_only_policy(conditions: dict) -> str:
    """Alice administers the key; DeriveSharedSecret only with a verified document meeting ``conditions``."""
    allow = {"Effect": "Allow", "Principal": {"AWS": ALICE.principal_arn}, "Resource": "*"}
    return json.dumps(
        {
            "Statement": [
                {**allow, "Sid": "Admin", "NotAction": "kms:DeriveSharedSecret"},
                {**allow, "Sid": "Enclave", "Action": "kms:DeriveSharedSecret", "Condition": conditions},
            ]
        }
    )


def test_recipient_gets_the_secret_only_as_ciphertext_for_recipient(kms, pki, recipient_key):
    """Conditions on PCR0, PCR8, PCR16 and PCR31 and ImageSha384 together: the attested enclave
    gets the shared secret encrypted to its key; a document differing in any one PCR, or none, is denied."""
    conditions = {
        "StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:ImageSha384": PCRS[0].hex().upper(),
            "kms:RecipientAttestation:PCR8": PCRS[8].hex(),
            "kms:RecipientAttestation:PCR16": PCRS[16].hex(),
        },
        "StringEquals": {
            "kms:RecipientAttestation:PCR31": PCRS[31].hex(),
            "kms:KeyAgreementAlgorithm": "ECDH",
        },
        "StringLike": {"kms:RecipientAttestation:PCR0": PCRS[0].hex()[:8] + "*"},
    }
    key = kms.create_key(
        KeySpec="ECC_NIST_P384", KeyUsage="KEY_AGREEMENT", Policy=enclave_only_policy(conditions)
    )
    key_id = key["KeyMetadata"]["KeyId"]
    peer = ec.generate_private_key(ec.SECP384R1())
    out = kms.derive_shared_secret(
        KeyId=key_id,
        KeyAgreementAlgorithm="ECDH",
        PublicKey=spki_of(peer),
        Recipient=recipient(pki, recipient_key),
    )
    assert "SharedSecret" not in out
    secret = cms.decrypt_ciphertext_for_recipient(out["CiphertextForRecipient"], recipient_key)
    kms_public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    assert secret == peer.exchange(ec.ECDH(), kms_public)

    for changed in (0, 8, 16, 31):
        pcrs = {**PCRS, changed: bytes(48)}
        with pytest.raises(ClientError) as exc:
            kms.derive_shared_secret(
                KeyId=key_id,
                KeyAgreementAlgorithm="ECDH",
                PublicKey=spki_of(peer),
                Recipient=recipient(pki, recipient_key, pcrs),
            )
        assert error_of(exc)[0] == "AccessDeniedException", changed
    with pytest.raises(ClientError) as exc:
        kms.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=spki_of(peer))
    assert error_of(exc)[0] == "AccessDeniedException"


@pytest.mark.parametrize("index", range(32))
def test_every_pcr_is_a_condition_key(kms, pki, recipient_key, index):
    key = kms.create_key(
        KeySpec="ECC_NIST_P256",
        KeyUsage="KEY_AGREEMENT",
        Policy=enclave_only_policy(
            {"StringEquals": {f"kms:RecipientAttestation:PCR{index}": PCRS[index].hex()}}
        ),
    )["KeyMetadata"]["KeyId"]
    peer = spki_of(ec.generate_private_key(ec.SECP256R1()))
    ok = kms.derive_shared_secret(
        KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=peer, Recipient=recipient(pki, recipient_key)
    )
    assert len(cms.decrypt_ciphertext_for_recipient(ok["CiphertextForRecipient"], recipient_key)) == 32
    with pytest.raises(ClientError) as exc:
        kms.derive_shared_secret(
            KeyId=key,
            KeyAgreementAlgorithm="ECDH",
            PublicKey=peer,
            Recipient=recipient(pki, recipient_key, {**PCRS, index: bytes([0xEE]) * 48}),
        )
    assert error_of(exc)[0] == "AccessDeniedException"


@pytest.mark.parametrize(
    "operator, key, message",
    [
        (
            "StringEquals",
            "kms:RecipientAttestation:PCR32",
            "unknown condition key 'kms:RecipientAttestation:PCR32'",
        ),
        (
            "StringEquals",
            "kms:RecipientAttestation:PCR07",
            "unknown condition key 'kms:RecipientAttestation:PCR07'",
        ),
        ("StringEquals", "kms:RecipientAttestation:ImageSha256", "unknown condition key"),
        (
            "Bool",
            "kms:RecipientAttestation:PCR4",
            "operator 'Bool' cannot compare kms:RecipientAttestation:PCR4",
        ),
        ("ArnLike", "kms:RecipientAttestation:ImageSha384", "operator 'ArnLike' cannot compare"),
    ],
)
def test_policies_with_unusable_attestation_conditions_are_refused(kms, operator, key, message):
    with pytest.raises(ClientError) as exc:
        kms.create_key(Policy=enclave_only_policy({operator: {key: "00"}}))
    assert error_of(exc)[0] == "MalformedPolicyDocumentException" and message in error_of(exc)[1]
