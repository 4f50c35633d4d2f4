"""Ciphertexts under a KMS key, by its key spec: the emulator's blob or raw RSAES-OAEP.

docs/kms.md#ciphertext-blobs. A SYMMETRIC_DEFAULT key seals into the emulator's own blob
(:mod:`harness.kms.blob`, which names its key and binds the encryption context); an RSA
ENCRYPT_DECRYPT key gives the bare RSAES-OAEP ciphertext, as long as the modulus, exactly what
a client makes with the key's public key (so Decrypt needs ``KeyId`` and the algorithm, and an
encryption context is refused). The caller has checked key usage and algorithm.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from harness.kms import asymmetric
from harness.kms.blob import seal, unseal
from harness.kms.key_specs import spec_of
from harness.kms.wire import KmsError

__all__ = ["decrypt_with", "encrypt_for"]


def _refuse_context(key: Mapping[str, Any], context: Mapping[str, str] | None) -> None:
    if context:
        raise KmsError(
            "ValidationException",
            f"EncryptionContext is not supported with asymmetric keys ({key['Arn']} is {spec_of(key)})",
        )


def encrypt_for(
    key: Mapping[str, Any], algorithm: str, plaintext: bytes, context: Mapping[str, str] | None
) -> bytes:
    """The ciphertext of ``plaintext`` under ``key`` with ``algorithm``.

    ValidationException for an encryption context with an RSA key, or a plaintext longer than
    RSAES-OAEP takes (RSA_2048: 214 bytes with SHA-1, 190 with SHA-256; docs/kms.md#key-specs).
    """
    if spec_of(key) == "SYMMETRIC_DEFAULT":
        return seal(key, plaintext, context)
    _refuse_context(key, context)
    public = asymmetric.load_private_key(key["PrivateKey"]).public_key()
    limit = asymmetric.max_oaep_plaintext(public, algorithm)
    if len(plaintext) > limit:
        raise KmsError(
            "ValidationException",
            f"Plaintext of {len(plaintext)} bytes is too long for {algorithm} with {spec_of(key)} "
            f"(at most {limit} bytes)",
        )
    return asymmetric.encrypt_oaep(public, algorithm, plaintext)


def decrypt_with(
    key: Mapping[str, Any], algorithm: str, ciphertext: bytes, context: Mapping[str, str] | None
) -> bytes:
    """The plaintext of ``ciphertext`` under ``key`` with ``algorithm``.

    InvalidCiphertextException when it does not decrypt (altered, another key's, another
    encryption context, another OAEP hash); ValidationException for an encryption context with
    an RSA key.
    """
    if spec_of(key) == "SYMMETRIC_DEFAULT":
        return unseal(key, ciphertext, context)
    _refuse_context(key, context)
    try:
        return asymmetric.decrypt_oaep(asymmetric.load_private_key(key["PrivateKey"]), algorithm, ciphertext)
    except ValueError:
        raise KmsError(
            "InvalidCiphertextException",
            f"The ciphertext is not an {algorithm} ciphertext under {key['Arn']}",
        ) from None
