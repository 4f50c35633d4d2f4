"""KMS HMAC keys (docs/kms.md#hmac) through boto3: every HMAC key spec, GenerateMac checked
against Python's hmac with the key's material, VerifyMac, and the errors KMS answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from botocore.exceptions import ClientError

from helpers.kms import ALICE, error_of

SPECS = {
    "HMAC_224": (28, "sha224"),
    "HMAC_256": (32, "sha256"),
    "HMAC_384": (48, "sha384"),
    "HMAC_512": (64, "sha512"),
}
MESSAGE = b"GET /orders/42 2025-01-06T10:00:00Z"

#: The session's emulator and its keys: fixtures ``kms_server``, ``kms`` and ``make``.
pytest_plugins = ["helpers.kms_fixtures"]


@pytest.mark.parametrize("spec", SPECS)
def test_hmac_of_every_spec_matches_pythons_hmac(kms, kms_server, spec):
    size, digest = SPECS[spec]
    algorithm = f"HMAC_SHA_{spec[5:]}"
    meta = kms.create_key(KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    assert (meta["KeySpec"], meta["KeyUsage"], meta["MacAlgorithms"]) == (
        spec,
        "GENERATE_VERIFY_MAC",
        [algorithm],
    )
    assert "EncryptionAlgorithms" not in meta and "SigningAlgorithms" not in meta
    material = base64.b64decode(kms_server.service.store.keys[meta["KeyId"]]["Material"])
    assert len(material) == size

    out = kms.generate_mac(KeyId=meta["KeyId"], Message=MESSAGE, MacAlgorithm=algorithm)
    assert (out["MacAlgorithm"], out["KeyId"]) == (algorithm, meta["Arn"])
    assert out["Mac"] == hmac.new(material, MESSAGE, getattr(hashlib, digest)).digest()
    assert len(out["Mac"]) == hashlib.new(digest).digest_size
    verified = kms.verify_mac(KeyId=meta["Arn"], Message=MESSAGE, Mac=out["Mac"], MacAlgorithm=algorithm)
    assert (verified["MacValid"], verified["MacAlgorithm"], verified["KeyId"]) == (
        True,
        algorithm,
        meta["Arn"],
    )

    tampered = bytes([out["Mac"][0] ^ 1]) + out["Mac"][1:]
    for message, mac in ((MESSAGE, tampered), (MESSAGE + b"!", out["Mac"]), (MESSAGE, out["Mac"][:-1])):
        with pytest.raises(ClientError) as exc:
            kms.verify_mac(KeyId=meta["KeyId"], Message=message, Mac=mac, MacAlgorithm=algorithm)
        assert error_of(exc)[0] == "KMSInvalidMacException"
    other = "HMAC_SHA_512" if spec != "HMAC_512" else "HMAC_SHA_256"
    with pytest.raises(ClientError) as exc:
        kms.generate_mac(KeyId=meta["KeyId"], Message=MESSAGE, MacAlgorithm=other)
    assert error_of(exc) == (
        "InvalidKeyUsageException",
        f"Algorithm {other} is incompatible with key spec {spec}.",
    )


def test_hmac_errors(kms):
    mac_key = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    symmetric = kms.create_key()["KeyMetadata"]
    cases = [
        (
            kms.generate_mac,
            dict(KeyId=symmetric["KeyId"], Message=MESSAGE, MacAlgorithm="HMAC_SHA_256"),
            (
                "InvalidKeyUsageException",
                f"{symmetric['Arn']} key usage is ENCRYPT_DECRYPT which is not valid for GenerateMac.",
            ),
        ),
        (
            kms.verify_mac,
            dict(KeyId=symmetric["KeyId"], Message=MESSAGE, Mac=b"m", MacAlgorithm="HMAC_SHA_256"),
            (
                "InvalidKeyUsageException",
                f"{symmetric['Arn']} key usage is ENCRYPT_DECRYPT which is not valid for VerifyMac.",
            ),
        ),
        (
            kms.encrypt,
            dict(KeyId=mac_key["KeyId"], Plaintext=b"x"),
            (
                "InvalidKeyUsageException",
                f"{mac_key['Arn']} key usage is GENERATE_VERIFY_MAC which is not valid for Encrypt.",
            ),
        ),
        (
            kms.sign,
            dict(KeyId=mac_key["KeyId"], Message=b"x", SigningAlgorithm="ECDSA_SHA_256"),
            (
                "InvalidKeyUsageException",
                f"{mac_key['Arn']} key usage is GENERATE_VERIFY_MAC which is not valid for Sign.",
            ),
        ),
        (
            kms.generate_mac,
            dict(KeyId=mac_key["KeyId"], Message=b"x" * 4097, MacAlgorithm="HMAC_SHA_256"),
            (
                "ValidationException",
                "1 validation error detected: Value at 'message' failed to satisfy constraint: "
                "Member must have length less than or equal to 4096",
            ),
        ),
        (
            kms.generate_mac,
            dict(KeyId=mac_key["KeyId"], Message=MESSAGE, MacAlgorithm="HMAC_SHA_256", DryRun=True),
            ("DryRunOperationException", "The request would have succeeded, but the DryRun option is set."),
        ),
    ]
    for call, params, expected in cases:
        with pytest.raises(ClientError) as exc:
            call(**params)
        assert error_of(exc) == expected, params
    with pytest.raises(ClientError) as exc:
        kms.generate_mac(KeyId=mac_key["KeyId"], Message=MESSAGE, MacAlgorithm="HMAC_SHA_1")
    assert error_of(exc)[0] == "ValidationException"  # not in the model's enum


def test_mac_algorithm_and_key_spec_condition_keys(kms):
    policy = json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE.principal_arn},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:VerifyMac",
                    "Resource": "*",
                    "Condition": {
                        "StringEquals": {
                            "kms:MacAlgorithm": "HMAC_SHA_384",
                            "kms:KeySpec": "HMAC_384",
                            "kms:KeyUsage": "GENERATE_VERIFY_MAC",
                        }
                    },
                },
            ]
        }
    )
    key = kms.create_key(KeySpec="HMAC_384", KeyUsage="GENERATE_VERIFY_MAC", Policy=policy)["KeyMetadata"][
        "KeyId"
    ]
    mac = kms.generate_mac(KeyId=key, Message=MESSAGE, MacAlgorithm="HMAC_SHA_384")["Mac"]
    with pytest.raises(ClientError) as exc:
        kms.verify_mac(KeyId=key, Message=MESSAGE, Mac=mac, MacAlgorithm="HMAC_SHA_384")
    assert error_of(exc)[0] == "AccessDeniedException" and "explicit deny" in error_of(exc)[1]
