"""KMS RSA encryption keys (docs/kms.md#ciphertext-blobs) through boto3: RSAES_OAEP_SHA_1 and
_256 with every RSA key spec, ciphertexts made by `openssl pkeyutl -encrypt` from GetPublicKey's
key decrypted by the emulator and the emulator's opened by `openssl pkeyutl -decrypt`, ReEncrypt
across key kinds, and the errors KMS answers."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from helpers.kms import error_of
from helpers.kms_keys import RSA_SPECS, openssl_decrypt, openssl_encrypt, private_der

#: The session's emulator and its keys: fixtures ``kms_server``, ``kms`` and ``make``.
pytest_plugins = ["helpers.kms_fixtures"]


@pytest.mark.parametrize("spec", RSA_SPECS)
@pytest.mark.parametrize("algorithm, md", [("RSAES_OAEP_SHA_1", "sha1"), ("RSAES_OAEP_SHA_256", "sha256")])
def test_rsa_oaep_with_openssl_both_ways(kms, make, kms_server, tmp_path, spec, algorithm, md):
    meta = make(spec, "ENCRYPT_DECRYPT")
    (tmp_path / "pub.der").write_bytes(kms.get_public_key(KeyId=meta["KeyId"])["PublicKey"])
    oaep = [
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        f"rsa_oaep_md:{md}",
        "-pkeyopt",
        f"rsa_mgf1_md:{md}",
    ]

    made = openssl_encrypt(tmp_path / "pub.der", oaep, b"made by openssl")
    assert made.returncode == 0 and len(made.stdout) == int(spec[4:]) // 8
    out = kms.decrypt(CiphertextBlob=made.stdout, KeyId=meta["KeyId"], EncryptionAlgorithm=algorithm)
    assert (out["Plaintext"], out["EncryptionAlgorithm"], out["KeyId"]) == (
        b"made by openssl",
        algorithm,
        meta["Arn"],
    )

    sealed = kms.encrypt(
        KeyId=meta["KeyId"], Plaintext=b"made by the emulator", EncryptionAlgorithm=algorithm
    )
    assert (sealed["EncryptionAlgorithm"], len(sealed["CiphertextBlob"])) == (algorithm, int(spec[4:]) // 8)
    (tmp_path / "key.der").write_bytes(private_der(kms_server, meta["KeyId"]))
    opened = openssl_decrypt(tmp_path / "key.der", oaep, sealed["CiphertextBlob"])
    assert (opened.returncode, opened.stdout) == (0, b"made by the emulator")

    other = "RSAES_OAEP_SHA_256" if algorithm == "RSAES_OAEP_SHA_1" else "RSAES_OAEP_SHA_1"
    with pytest.raises(ClientError) as exc:
        kms.decrypt(CiphertextBlob=made.stdout, KeyId=meta["KeyId"], EncryptionAlgorithm=other)
    assert error_of(exc)[0] == "InvalidCiphertextException"


def test_rsa_encryption_errors(kms, make):
    meta = make("RSA_2048", "ENCRYPT_DECRYPT")
    key, arn = meta["KeyId"], meta["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"p" * 190, EncryptionAlgorithm="RSAES_OAEP_SHA_256")[
        "CiphertextBlob"
    ]
    assert (
        len(
            kms.encrypt(KeyId=key, Plaintext=b"p" * 214, EncryptionAlgorithm="RSAES_OAEP_SHA_1")[
                "CiphertextBlob"
            ]
        )
        == 256
    )
    symmetric = make("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    signing = make("RSA_2048", "SIGN_VERIFY")
    cases = [
        (
            kms.decrypt,
            dict(CiphertextBlob=blob, EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
            "InvalidCiphertextException",
            None,
        ),
        (
            kms.decrypt,
            dict(CiphertextBlob=blob, KeyId=key),
            "InvalidKeyUsageException",
            "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048.",
        ),
        (
            kms.encrypt,
            dict(KeyId=key, Plaintext=b"x"),
            "InvalidKeyUsageException",
            "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048.",
        ),
        (
            kms.encrypt,
            dict(KeyId=key, Plaintext=b"p" * 191, EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
            "ValidationException",
            "Plaintext of 191 bytes is too long for RSAES_OAEP_SHA_256 with RSA_2048 (at most 190 bytes)",
        ),
        (
            kms.encrypt,
            dict(
                KeyId=key,
                Plaintext=b"x",
                EncryptionAlgorithm="RSAES_OAEP_SHA_256",
                EncryptionContext={"a": "b"},
            ),
            "ValidationException",
            None,
        ),
        (
            kms.encrypt,
            dict(KeyId=symmetric["KeyId"], Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
            "InvalidKeyUsageException",
            "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT.",
        ),
        (
            kms.encrypt,
            dict(KeyId=signing["KeyId"], Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
            "InvalidKeyUsageException",
            f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for Encrypt.",
        ),
        (
            kms.decrypt,
            dict(CiphertextBlob=blob, KeyId=symmetric["KeyId"]),
            "InvalidCiphertextException",
            None,
        ),
        (
            kms.generate_data_key,
            dict(KeyId=key, KeySpec="AES_256"),
            "InvalidKeyUsageException",
            f"{arn} key spec is RSA_2048 which is not valid for GenerateDataKey; it needs a SYMMETRIC_DEFAULT key.",
        ),
        (
            kms.generate_data_key_pair,
            dict(KeyId=signing["KeyId"], KeyPairSpec="ECC_NIST_P256"),
            "InvalidKeyUsageException",
            f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for GenerateDataKeyPair.",
        ),
    ]
    for call, params, code, message in cases:
        with pytest.raises(ClientError) as exc:
            call(**params)
        assert error_of(exc)[0] == code, params
        assert message is None or error_of(exc)[1] == message

    # ReEncrypt moves a ciphertext from a symmetric key to the RSA key and back.
    to_rsa = kms.re_encrypt(
        CiphertextBlob=kms.encrypt(KeyId=symmetric["KeyId"], Plaintext=b"moving")["CiphertextBlob"],
        DestinationKeyId=key,
        DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256",
    )
    assert (to_rsa["SourceEncryptionAlgorithm"], to_rsa["DestinationEncryptionAlgorithm"]) == (
        "SYMMETRIC_DEFAULT",
        "RSAES_OAEP_SHA_256",
    )
    back = kms.re_encrypt(
        CiphertextBlob=to_rsa["CiphertextBlob"],
        SourceKeyId=key,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        DestinationKeyId=symmetric["KeyId"],
    )
    assert kms.decrypt(CiphertextBlob=back["CiphertextBlob"])["Plaintext"] == b"moving"
