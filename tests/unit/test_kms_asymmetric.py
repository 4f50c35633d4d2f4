"""KMS asymmetric keys (docs/kms.md#key-specs) through boto3: CreateKey and DescribeKey for every
key spec and usage, GetPublicKey read by `cryptography` and openssl, the key spec and usage pairs
KMS refuses, and asymmetric and HMAC keys kept in the state file across a restart."""

from __future__ import annotations

import base64
import json

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.errors import NitroError
from harness.kms import KmsServer
from helpers.kms import boto_client, error_of, openssl
from helpers.kms_keys import ECDSA, MESSAGE, RSA_SIGNING, RSA_SPECS, cryptography_verifies

#: The session's emulator and its keys: fixtures ``kms_server``, ``kms`` and ``make``.
pytest_plugins = ["helpers.kms_fixtures"]


# -- key specs and GetPublicKey ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, usage, member, algorithms",
    [(s, "SIGN_VERIFY", "SigningAlgorithms", RSA_SIGNING) for s in RSA_SPECS]
    + [
        (s, "ENCRYPT_DECRYPT", "EncryptionAlgorithms", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
        for s in RSA_SPECS
    ]
    + [(s, "SIGN_VERIFY", "SigningAlgorithms", [alg]) for s, (alg, _, _) in ECDSA.items()]
    + [(s, "KEY_AGREEMENT", "KeyAgreementAlgorithms", ["ECDH"]) for s in list(ECDSA)[:3]],
)
def test_asymmetric_key_metadata_and_public_key(kms, make, spec, usage, member, algorithms):
    meta = make(spec, usage)
    described = kms.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]
    assert (described["KeySpec"], described["CustomerMasterKeySpec"], described["KeyUsage"]) == (
        spec,
        spec,
        usage,
    )
    assert described[member] == algorithms
    others = {"EncryptionAlgorithms", "SigningAlgorithms", "KeyAgreementAlgorithms", "MacAlgorithms"} - {
        member
    }
    assert not others & set(described)

    out = kms.get_public_key(KeyId=meta["Arn"])
    assert (out["KeyId"], out["KeySpec"], out["KeyUsage"], out[member]) == (
        meta["Arn"],
        spec,
        usage,
        algorithms,
    )
    public = serialization.load_der_public_key(out["PublicKey"])
    if spec.startswith("RSA_"):
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == int(spec[4:])
        assert public.public_numbers().e == 65537
    else:
        assert public.curve.name == ECDSA[spec][1]
    # openssl reads the same SubjectPublicKeyInfo.
    text = openssl("pkey", "-pubin", "-inform", "DER", "-noout", "-text", data=out["PublicKey"])
    assert text.returncode == 0
    assert (
        f"{spec[4:]} bit" if spec.startswith("RSA_") else ECDSA[spec][1].replace("secp256r1", "prime256v1")
    ).encode() in text.stdout


@pytest.mark.parametrize(
    "spec, usage, code",
    [
        ("ECC_SECG_P256K1", "KEY_AGREEMENT", "ValidationException"),  # SIGN_VERIFY only on AWS
        ("RSA_2048", "KEY_AGREEMENT", "ValidationException"),
        ("RSA_2048", "GENERATE_VERIFY_MAC", "ValidationException"),
        ("ECC_NIST_P256", "ENCRYPT_DECRYPT", "ValidationException"),
        ("HMAC_256", "ENCRYPT_DECRYPT", "ValidationException"),
        ("SYMMETRIC_DEFAULT", "SIGN_VERIFY", "ValidationException"),
        ("ML_DSA_44", "SIGN_VERIFY", "UnsupportedOperationException"),
        ("SM2", "SIGN_VERIFY", "UnsupportedOperationException"),
    ],
)
def test_create_key_refuses_what_kms_refuses(kms, spec, usage, code):
    with pytest.raises(ClientError) as exc:
        kms.create_key(KeySpec=spec, KeyUsage=usage)
    assert error_of(exc)[0] == code
    if code == "ValidationException":
        assert error_of(exc)[1].startswith(f"KeyUsage {usage} is not compatible with KeySpec {spec}.")


def test_create_key_takes_one_spec_member(kms):
    legacy = kms.create_key(CustomerMasterKeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert legacy["KeySpec"] == "ECC_NIST_P256"
    with pytest.raises(ClientError) as exc:
        kms.create_key(KeySpec="RSA_2048", CustomerMasterKeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    assert error_of(exc)[0] == "ValidationException"


def test_get_public_key_of_symmetric_keys_is_unsupported(kms, make):
    for spec, usage in (("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"), ("HMAC_256", "GENERATE_VERIFY_MAC")):
        with pytest.raises(ClientError) as exc:
            kms.get_public_key(KeyId=make(spec, usage)["KeyId"])
        assert error_of(exc)[0] == "UnsupportedOperationException"


# -- persistence -------------------------------------------------------------------------------------------


def test_asymmetric_and_hmac_keys_survive_a_restart(tmp_path):
    state = tmp_path / "kms-state.json"
    with KmsServer(state) as first:
        client = boto_client(first, None)
        signer = client.create_key(KeySpec="ECC_SECG_P256K1", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        crypt = client.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
        mac_key = client.create_key(KeySpec="HMAC_512", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"][
            "KeyId"
        ]
        public = client.get_public_key(KeyId=signer)["PublicKey"]
        sealed = client.encrypt(KeyId=crypt, Plaintext=b"kept", EncryptionAlgorithm="RSAES_OAEP_SHA_1")[
            "CiphertextBlob"
        ]
        mac = client.generate_mac(KeyId=mac_key, Message=MESSAGE, MacAlgorithm="HMAC_SHA_512")["Mac"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kms-state.json"]  # written atomically
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    with KmsServer(state) as second:
        client = boto_client(second, None)
        assert client.get_public_key(KeyId=signer)["PublicKey"] == public
        signature = client.sign(KeyId=signer, Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256")["Signature"]
        assert cryptography_verifies(public, "ECDSA_SHA_256", MESSAGE, signature)
        out = client.decrypt(CiphertextBlob=sealed, KeyId=crypt, EncryptionAlgorithm="RSAES_OAEP_SHA_1")
        assert out["Plaintext"] == b"kept"
        assert client.generate_mac(KeyId=mac_key, Message=MESSAGE, MacAlgorithm="HMAC_SHA_512")["Mac"] == mac
        assert client.describe_key(KeyId=mac_key)["KeyMetadata"]["MacAlgorithms"] == ["HMAC_SHA_512"]


def test_state_files_from_before_asymmetric_keys_load_and_bad_key_records_are_reported(tmp_path):
    state = tmp_path / "kms-state.json"
    with KmsServer(state) as srv:
        key = boto_client(srv, None).create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")[
            "KeyMetadata"
        ]["KeyId"]
    saved = json.loads(state.read_text())
    old_id = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    old = {
        **saved["keys"][key],
        "KeyId": old_id,
        "Arn": saved["keys"][key]["Arn"].replace(key, old_id),
        "Material": base64.b64encode(b"k" * 32).decode(),
    }
    for name in ("KeySpec", "KeyUsage", "PrivateKey"):
        old.pop(name)
    saved["keys"][old["KeyId"]] = old
    state.write_text(json.dumps(saved))
    with KmsServer(state) as srv:
        meta = boto_client(srv, None).describe_key(KeyId=old["KeyId"])["KeyMetadata"]
        assert (meta["KeySpec"], meta["KeyUsage"], meta["EncryptionAlgorithms"]) == (
            "SYMMETRIC_DEFAULT",
            "ENCRYPT_DECRYPT",
            ["SYMMETRIC_DEFAULT"],
        )

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = base64.b64encode(
        rsa_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    ).decode()
    for change, message in (
        (
            {"PrivateKey": wrong},
            rf"keys\.{key}\.PrivateKey must be a ECC_NIST_P256 private key, not RSA_2048",
        ),
        (
            {"PrivateKey": "bm90IGEga2V5"},
            rf"keys\.{key}\.PrivateKey must be base64 of a PKCS#8 DER private key",
        ),
        (
            {"KeyUsage": "KEY_AGREEMENT", "KeySpec": "ECC_SECG_P256K1"},
            rf"keys\.{key}\.KeyUsage must be one of SIGN_VERIFY",
        ),
        ({"KeySpec": "SM2"}, rf"keys\.{key}\.KeySpec must be one of"),
    ):
        broken = json.loads(json.dumps(saved))
        broken["keys"][key].update(change)
        state.write_text(json.dumps(broken))
        with pytest.raises(NitroError, match=message):
            KmsServer(state)
