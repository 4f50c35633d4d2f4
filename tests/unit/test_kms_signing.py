"""KMS Sign and Verify (docs/kms.md#signatures) through boto3: every signing algorithm of every
SIGN_VERIFY key spec in RAW and DIGEST form, each signature checked by KMS Verify, `cryptography`,
`openssl pkeyutl -verify` and, for ECDSA (secp256k1 included), the pure-Python `ecdsa`; the
errors KMS answers and the signing condition keys."""

from __future__ import annotations

import hashlib
import json

import ecdsa
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import utils

from helpers.kms import ALICE, error_of
from helpers.kms_keys import (
    ECDSA,
    MESSAGE,
    RSA_SIGNING,
    RSA_SPECS,
    cryptography_verifies,
    hash_name,
    openssl_verifies,
)

#: The session's emulator and its keys: fixtures ``kms_server``, ``kms`` and ``make``.
pytest_plugins = ["helpers.kms_fixtures"]

SIGNING_CASES = [(spec, alg) for spec in RSA_SPECS for alg in RSA_SIGNING] + [
    (spec, alg) for spec, (alg, _, _) in ECDSA.items()
]


@pytest.mark.parametrize("spec, algorithm", SIGNING_CASES)
def test_sign_and_verify_every_algorithm(kms, make, tmp_path, spec, algorithm):
    key = make(spec, "SIGN_VERIFY")["KeyId"]
    spki = kms.get_public_key(KeyId=key)["PublicKey"]
    digest = hashlib.new(hash_name(algorithm), MESSAGE).digest()

    raw = kms.sign(KeyId=key, Message=MESSAGE, SigningAlgorithm=algorithm)
    pre = kms.sign(KeyId=key, Message=digest, MessageType="DIGEST", SigningAlgorithm=algorithm)
    assert raw["SigningAlgorithm"] == algorithm and raw["KeyId"].endswith(key)
    for signature in (raw["Signature"], pre["Signature"]):
        assert cryptography_verifies(spki, algorithm, MESSAGE, signature)
        assert openssl_verifies(tmp_path, spki, algorithm, digest, signature)
        # A RAW signature verifies as DIGEST and the reverse: the same hash was signed.
        for message, kind in ((MESSAGE, "RAW"), (digest, "DIGEST")):
            out = kms.verify(
                KeyId=key, Message=message, MessageType=kind, Signature=signature, SigningAlgorithm=algorithm
            )
            assert (out["SignatureValid"], out["SigningAlgorithm"]) == (True, algorithm)
    if spec.startswith("RSA_"):
        assert len(raw["Signature"]) == int(spec[4:]) // 8
        if algorithm.startswith("RSASSA_PKCS1"):
            assert raw["Signature"] == pre["Signature"]  # deterministic padding
    else:
        utils.decode_dss_signature(raw["Signature"])  # DER ECDSA-Sig-Value, as KMS returns it
        # The pure-Python ecdsa library is an implementation independent of OpenSSL.
        verifying = ecdsa.VerifyingKey.from_der(spki)
        assert verifying.curve == ECDSA[spec][2]
        assert verifying.verify(
            raw["Signature"],
            MESSAGE,
            hashfunc=getattr(hashlib, hash_name(algorithm)),
            sigdecode=ecdsa.util.sigdecode_der,
        )
        assert verifying.verify_digest(pre["Signature"], digest, sigdecode=ecdsa.util.sigdecode_der)

    # Every verifier refuses the signature for another message.
    other = hashlib.new(hash_name(algorithm), b"transfer 99 units").digest()
    assert not openssl_verifies(tmp_path, spki, algorithm, other, raw["Signature"])
    assert not cryptography_verifies(spki, algorithm, b"transfer 99 units", raw["Signature"])
    with pytest.raises(ClientError) as exc:
        kms.verify(
            KeyId=key, Message=b"transfer 99 units", Signature=raw["Signature"], SigningAlgorithm=algorithm
        )
    assert error_of(exc)[0] == "KMSInvalidSignatureException"


def test_secp256k1_signature_is_a_wallet_signature(kms, make):
    """A wallet signs a 32-byte hash it made itself; the pure-Python ecdsa library recovers the
    KMS key's public key from the signature, as a blockchain node would."""
    key = make("ECC_SECG_P256K1", "SIGN_VERIFY")["KeyId"]
    spki = kms.get_public_key(KeyId=key)["PublicKey"]
    digest = hashlib.sha3_256(b"tx: nonce=7 to=0xabc value=1").digest()  # any 32-byte hash
    signature = kms.sign(KeyId=key, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256")[
        "Signature"
    ]
    r, s = utils.decode_dss_signature(signature)
    candidates = ecdsa.VerifyingKey.from_public_key_recovery_with_digest(
        ecdsa.util.sigencode_string(r, s, ecdsa.SECP256k1.order), digest, ecdsa.SECP256k1
    )
    assert ecdsa.VerifyingKey.from_der(spki).to_string() in [c.to_string() for c in candidates]


def test_signing_errors(kms, make):
    p256 = make("ECC_NIST_P256", "SIGN_VERIFY")
    rsa_sign = make("RSA_2048", "SIGN_VERIFY")
    rsa_crypt = make("RSA_2048", "ENCRYPT_DECRYPT")
    cases = [
        (
            dict(KeyId=p256["KeyId"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_384"),
            (
                "InvalidKeyUsageException",
                "Algorithm ECDSA_SHA_384 is incompatible with key spec ECC_NIST_P256.",
            ),
        ),
        (
            dict(KeyId=p256["KeyId"], Message=MESSAGE, SigningAlgorithm="RSASSA_PSS_SHA_256"),
            (
                "InvalidKeyUsageException",
                "Algorithm RSASSA_PSS_SHA_256 is incompatible with key spec ECC_NIST_P256.",
            ),
        ),
        (
            dict(KeyId=rsa_sign["KeyId"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256"),
            ("InvalidKeyUsageException", "Algorithm ECDSA_SHA_256 is incompatible with key spec RSA_2048."),
        ),
        (
            dict(KeyId=rsa_crypt["KeyId"], Message=MESSAGE, SigningAlgorithm="RSASSA_PSS_SHA_256"),
            (
                "InvalidKeyUsageException",
                f"{rsa_crypt['Arn']} key usage is ENCRYPT_DECRYPT which is not valid for Sign.",
            ),
        ),
        (
            dict(
                KeyId=p256["KeyId"], Message=b"x" * 31, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
            ),
            ("ValidationException", "Digest is invalid length for algorithm ECDSA_SHA_256."),
        ),
        (
            dict(
                KeyId=rsa_sign["KeyId"],
                Message=b"x" * 32,
                MessageType="DIGEST",
                SigningAlgorithm="RSASSA_PSS_SHA_512",
            ),
            ("ValidationException", "Digest is invalid length for algorithm RSASSA_PSS_SHA_512."),
        ),
        (
            dict(
                KeyId=p256["KeyId"],
                Message=b"x" * 64,
                MessageType="EXTERNAL_MU",
                SigningAlgorithm="ECDSA_SHA_256",
            ),
            ("ValidationException", "Message type EXTERNAL_MU is incompatible with key spec ECC_NIST_P256."),
        ),
        (
            dict(KeyId=p256["KeyId"], Message=b"x" * 4097, SigningAlgorithm="ECDSA_SHA_256"),
            (
                "ValidationException",
                "1 validation error detected: Value at 'message' failed to satisfy constraint: "
                "Member must have length less than or equal to 4096",
            ),
        ),
    ]
    for params, expected in cases:
        with pytest.raises(ClientError) as exc:
            kms.sign(**params)
        assert error_of(exc) == expected, params
    assert (
        len(kms.sign(KeyId=p256["KeyId"], Message=b"x" * 4096, SigningAlgorithm="ECDSA_SHA_256")["Signature"])
        > 0
    )
    with pytest.raises(ClientError) as exc:
        kms.verify(
            KeyId=rsa_crypt["KeyId"], Message=MESSAGE, Signature=b"s", SigningAlgorithm="RSASSA_PSS_SHA_256"
        )
    assert (
        error_of(exc)[1] == f"{rsa_crypt['Arn']} key usage is ENCRYPT_DECRYPT which is not valid for Verify."
    )
    with pytest.raises(ClientError) as exc:
        kms.verify(
            KeyId=p256["KeyId"], Message=MESSAGE, Signature=b"\x30\x00", SigningAlgorithm="ECDSA_SHA_256"
        )
    assert error_of(exc)[0] == "KMSInvalidSignatureException"
    with pytest.raises(ClientError) as exc:
        kms.sign(KeyId=p256["KeyId"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256", DryRun=True)
    assert error_of(exc)[0] == "DryRunOperationException"

    disabled = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    kms.disable_key(KeyId=disabled["KeyId"])
    with pytest.raises(ClientError) as exc:
        kms.sign(KeyId=disabled["KeyId"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256")
    assert error_of(exc) == ("DisabledException", f"{disabled['Arn']} is disabled.")


def test_signing_algorithm_condition_key(kms):
    """kms:SigningAlgorithm and kms:MessageType decide as key policy conditions."""
    statement = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE.principal_arn},
        "Resource": "*",
    }
    policy = json.dumps(
        {
            "Statement": [
                {**statement, "Sid": "admin", "NotAction": ["kms:Sign"]},
                {
                    **statement,
                    "Sid": "pss digests only",
                    "Action": "kms:Sign",
                    "Condition": {
                        "StringLike": {"kms:SigningAlgorithm": "RSASSA_PSS_*"},
                        "StringEquals": {"kms:MessageType": "DIGEST"},
                    },
                },
            ]
        }
    )
    key = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY", Policy=policy)["KeyMetadata"]["KeyId"]
    digest = hashlib.sha256(MESSAGE).digest()
    assert kms.sign(KeyId=key, Message=digest, MessageType="DIGEST", SigningAlgorithm="RSASSA_PSS_SHA_256")[
        "Signature"
    ]
    for algorithm, kind, message in (
        ("RSASSA_PKCS1_V1_5_SHA_256", "DIGEST", digest),
        ("RSASSA_PSS_SHA_256", "RAW", MESSAGE),
    ):
        with pytest.raises(ClientError) as exc:
            kms.sign(KeyId=key, Message=message, MessageType=kind, SigningAlgorithm=algorithm)
        assert error_of(exc)[0] == "AccessDeniedException"
