"""KMS key specs: which key usages each allows, its algorithms, and the checks operations make.

docs/kms.md#key-specs. A key record carries ``KeySpec`` and ``KeyUsage`` (records written
before asymmetric keys existed have neither and are SYMMETRIC_DEFAULT / ENCRYPT_DECRYPT). The
algorithms a key allows follow from the pair, as KMS lists them in ``KeyMetadata`` and
``GetPublicKey``; an operation on a key of the wrong usage, or with an algorithm the key does not
allow, is ``InvalidKeyUsageException`` with KMS's wording.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from harness.kms.wire import KmsError

__all__ = [
    "ASYMMETRIC_SPECS",
    "HMAC_KEY_BYTES",
    "KEY_USAGES",
    "SUPPORTED_SPECS",
    "algorithm_fields",
    "check_algorithm",
    "check_new_key",
    "check_usage",
    "spec_of",
    "usage_of",
]

_RSA_SIGNING = [
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
]
_RSA_ENCRYPTION = ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
#: ECDSA curve key spec -> its one signing algorithm (the hash sized to the curve; secp256k1 uses SHA-256).
_ECDSA = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
}
#: HMAC key spec -> key material length in bytes (the digest length of its hash).
HMAC_KEY_BYTES = {"HMAC_224": 28, "HMAC_256": 32, "HMAC_384": 48, "HMAC_512": 64}

#: KeySpec -> KeyUsage -> the KeyMetadata member listing its algorithms and their names
#: (docs/kms.md#key-specs; botocore's KMS model: "For asymmetric KMS keys with ECC_SECG_P256K1
#: key pairs, specify SIGN_VERIFY", and only NIST curves take KEY_AGREEMENT).
KEY_USAGES: dict[str, dict[str, tuple[str, list[str]]]] = {
    "SYMMETRIC_DEFAULT": {"ENCRYPT_DECRYPT": ("EncryptionAlgorithms", ["SYMMETRIC_DEFAULT"])},
    **{
        f"RSA_{bits}": {
            "ENCRYPT_DECRYPT": ("EncryptionAlgorithms", _RSA_ENCRYPTION),
            "SIGN_VERIFY": ("SigningAlgorithms", _RSA_SIGNING),
        }
        for bits in (2048, 3072, 4096)
    },
    **{
        spec: {"SIGN_VERIFY": ("SigningAlgorithms", [algorithm])}
        | ({"KEY_AGREEMENT": ("KeyAgreementAlgorithms", ["ECDH"])} if spec.startswith("ECC_NIST_") else {})
        for spec, algorithm in _ECDSA.items()
    },
    **{spec: {"GENERATE_VERIFY_MAC": ("MacAlgorithms", [f"HMAC_SHA_{spec[5:]}"])} for spec in HMAC_KEY_BYTES},
}
SUPPORTED_SPECS = tuple(KEY_USAGES)
#: Key specs with a key pair (GetPublicKey works on them).
ASYMMETRIC_SPECS = tuple(s for s in SUPPORTED_SPECS if s.startswith(("RSA_", "ECC_")))


def spec_of(key: Mapping[str, Any]) -> str:
    """A key record's KeySpec (SYMMETRIC_DEFAULT for records that predate asymmetric keys)."""
    return key.get("KeySpec", "SYMMETRIC_DEFAULT")


def usage_of(key: Mapping[str, Any]) -> str:
    """A key record's KeyUsage (ENCRYPT_DECRYPT for records that predate asymmetric keys)."""
    return key.get("KeyUsage", "ENCRYPT_DECRYPT")


def check_new_key(spec: str, usage: str) -> None:
    """CreateKey's rule: ``spec`` must be one the emulator makes (UnsupportedOperationException
    for the rest of the model's enum: SM2, ML-DSA, ML-KEM, ECC_NIST_EDWARDS25519) and ``usage``
    one that spec allows (ValidationException), docs/kms.md#key-specs."""
    if spec not in KEY_USAGES:
        raise KmsError(
            "UnsupportedOperationException",
            f"KeySpec {spec} is not supported by the KMS emulator (supported: {', '.join(SUPPORTED_SPECS)})",
        )
    if usage not in KEY_USAGES[spec]:
        raise KmsError(
            "ValidationException",
            f"KeyUsage {usage} is not compatible with KeySpec {spec}. "
            f"{spec} allows {' or '.join(KEY_USAGES[spec])}.",
        )


def algorithm_fields(key: Mapping[str, Any]) -> dict[str, list[str]]:
    """The algorithm list of a key as KeyMetadata and GetPublicKey carry it, e.g.
    ``{"SigningAlgorithms": ["ECDSA_SHA_256"]}``."""
    member, algorithms = KEY_USAGES[spec_of(key)][usage_of(key)]
    return {member: list(algorithms)}


def check_usage(key: Mapping[str, Any], operation: str, usage: str, *, symmetric: bool = False) -> None:
    """InvalidKeyUsageException unless ``key`` has KeyUsage ``usage`` (and, with ``symmetric``,
    KeySpec SYMMETRIC_DEFAULT: data keys are wrapped by symmetric keys only), worded as KMS
    words it: ``<arn> key usage is SIGN_VERIFY which is not valid for Encrypt.``"""
    if usage_of(key) != usage:
        raise KmsError(
            "InvalidKeyUsageException",
            f"{key['Arn']} key usage is {usage_of(key)} which is not valid for {operation}.",
        )
    if symmetric and spec_of(key) != "SYMMETRIC_DEFAULT":
        raise KmsError(
            "InvalidKeyUsageException",
            f"{key['Arn']} key spec is {spec_of(key)} which is not valid for {operation}; "
            "it needs a SYMMETRIC_DEFAULT key.",
        )


def check_algorithm(key: Mapping[str, Any], algorithm: str) -> None:
    """InvalidKeyUsageException unless the key allows ``algorithm`` (an encryption, signing, MAC
    or key agreement algorithm name): ``Algorithm X is incompatible with key spec Y.``"""
    if algorithm not in KEY_USAGES[spec_of(key)][usage_of(key)][1]:
        raise KmsError(
            "InvalidKeyUsageException", f"Algorithm {algorithm} is incompatible with key spec {spec_of(key)}."
        )
