"""KMS data key pairs (docs/kms.md#data-keys) through boto3: GenerateDataKeyPair and
GenerateDataKeyPairWithoutPlaintext with every pair spec, the private keys read by `cryptography`
and openssl (which derives the same public key and, for RSA, decrypts what it encrypted), the
kms:DataKeyPairSpec condition and the specs the emulator does not make."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from helpers.kms import ACCOUNT, error_of, openssl
from helpers.kms_keys import ECDSA, RSA_SPECS, openssl_decrypt, openssl_encrypt

#: The session's emulator and its keys: fixtures ``kms_server``, ``kms`` and ``make``.
pytest_plugins = ["helpers.kms_fixtures"]


@pytest.mark.parametrize("spec", RSA_SPECS + list(ECDSA) + ["ECC_NIST_EDWARDS25519"])
def test_data_key_pairs_of_every_spec(kms, make, tmp_path, spec):
    wrapping = make("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")["KeyId"]
    pair = kms.generate_data_key_pair(KeyId=wrapping, KeyPairSpec=spec, EncryptionContext={"app": "wallet"})
    assert pair["KeyPairSpec"] == spec
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], None)
    if spec.startswith("RSA_"):
        assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == int(spec[4:])
    elif spec in ECDSA:
        assert private.curve.name == ECDSA[spec][1]
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
    opened = kms.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"], EncryptionContext={"app": "wallet"})
    assert opened["Plaintext"] == pair["PrivateKeyPlaintext"]

    # openssl reads the PKCS#8 private key and derives the same SubjectPublicKeyInfo.
    (tmp_path / "key.der").write_bytes(pair["PrivateKeyPlaintext"])
    public = openssl("pkey", "-inform", "DER", "-in", tmp_path / "key.der", "-pubout", "-outform", "DER")
    assert (public.returncode, public.stdout) == (0, pair["PublicKey"])
    if spec.startswith("RSA_"):
        (tmp_path / "pub.der").write_bytes(pair["PublicKey"])
        oaep = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"]
        sealed = openssl_encrypt(tmp_path / "pub.der", oaep, b"pair")
        opened = openssl_decrypt(tmp_path / "key.der", oaep, sealed.stdout)
        assert (opened.returncode, opened.stdout) == (0, b"pair")

    without = kms.generate_data_key_pair_without_plaintext(KeyId=wrapping, KeyPairSpec=spec)
    assert "PrivateKeyPlaintext" not in without and without["KeyPairSpec"] == spec
    hidden = serialization.load_der_private_key(
        kms.decrypt(CiphertextBlob=without["PrivateKeyCiphertextBlob"])["Plaintext"], None
    )
    assert (
        hidden.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == without["PublicKey"]
        != pair["PublicKey"]
    )


def test_data_key_pair_spec_condition_and_unsupported_specs(kms):
    policy = json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:GenerateDataKeyPair*",
                    "Resource": "*",
                    "Condition": {"StringLike": {"kms:DataKeyPairSpec": "RSA_*"}},
                },
            ]
        }
    )
    key = kms.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
    assert (
        kms.generate_data_key_pair(KeyId=key, KeyPairSpec="ECC_SECG_P256K1")["KeyPairSpec"]
        == "ECC_SECG_P256K1"
    )
    with pytest.raises(ClientError) as exc:
        kms.generate_data_key_pair_without_plaintext(KeyId=key, KeyPairSpec="RSA_2048")
    assert error_of(exc)[0] == "AccessDeniedException" and "explicit deny" in error_of(exc)[1]
    for spec in ("SM2", "ML_KEM_512"):
        with pytest.raises(ClientError) as exc:
            kms.generate_data_key_pair(KeyId=key, KeyPairSpec=spec)
        assert error_of(exc)[0] == "UnsupportedOperationException"
