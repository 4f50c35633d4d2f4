"""KMS encryption operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey*, GenerateRandom.

One function per operation, ``(service, decoded params, caller) -> response dict``, registered
by KMS name in :data:`OPERATIONS`. Each goes through :func:`harness.kms.key_use.key_for_use`
(resolve, policy with the encryption context and, for a ``Recipient``, the attestation keys,
Enabled, KeyUsage ENCRYPT_DECRYPT), checks the algorithm against the key and honours DryRun.
SYMMETRIC_DEFAULT keys take SYMMETRIC_DEFAULT; RSA keys take RSAES_OAEP_SHA_1/256 and need
``KeyId`` to decrypt (:mod:`harness.kms.ciphertext`). Data keys come from symmetric keys only.
With a verified Recipient the secret comes back only as ``CiphertextForRecipient``
(:mod:`harness.kms.recipient`; docs/kms.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from harness.kms.blob import blob_key_id, seal
from harness.kms.ciphertext import decrypt_with, encrypt_for
from harness.kms.credentials import Caller
from harness.kms.key_specs import check_algorithm, check_usage, spec_of
from harness.kms.key_use import alias_of, dry_run, key_for_use, require_member
from harness.kms.recipient import deliver
from harness.kms.store import require_usable
from harness.kms.wire import KmsError

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS", "open_ciphertext"]


def open_ciphertext(
    svc: KmsService,
    p: Mapping[str, Any],
    caller: Caller,
    action: str,
    *,
    operation: str | None = None,
    blob_field: str = "CiphertextBlob",
    key_field: str = "KeyId",
    context_field: str = "EncryptionContext",
    algorithm_field: str = "EncryptionAlgorithm",
    attestation: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], bytes, str]:
    """Resolve, authorize and decrypt a ciphertext (Decrypt, ReEncrypt's source).

    Returns (key record, plaintext, algorithm). Without ``key_field`` the ciphertext must be a
    symmetric blob, which names its key (InvalidCiphertextException otherwise: an RSA ciphertext
    carries no key id); with it, IncorrectKeyException when a symmetric blob names another key.
    InvalidKeyUsageException for a key that is not ENCRYPT_DECRYPT or does not take the
    algorithm; InvalidCiphertextException when the ciphertext does not decrypt.
    """
    require_member(p, blob_field)  # optional in the current model (DryRun-era change)
    blob = p[blob_field]
    algorithm = p.get(algorithm_field, "SYMMETRIC_DEFAULT")
    with svc.store.lock:
        if p.get(key_field):
            key = svc.store.resolve(p[key_field])
            if spec_of(key) == "SYMMETRIC_DEFAULT" and key["KeyId"] != blob_key_id(blob):
                raise KmsError(
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a KMS key that can perform this operation.",
                )
        else:
            key = svc.store.keys.get(blob_key_id(blob))
            if key is None:
                raise KmsError(
                    "InvalidCiphertextException", "The ciphertext refers to a KMS key that does not exist"
                )
        context = p.get(context_field)
        svc.authorize(
            key,
            action,
            caller,
            encryption_context=context,
            attestation=attestation,
            extra={"kms:RequestAlias": alias_of(p.get(key_field)), "kms:EncryptionAlgorithm": algorithm},
        )
        require_usable(key)
    check_usage(key, operation or action, "ENCRYPT_DECRYPT")
    check_algorithm(key, algorithm)
    return key, decrypt_with(key, algorithm, blob, context), algorithm


def encrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Encrypt: ``Plaintext`` under the key (and encryption context, symmetric keys only)."""
    algorithm = p.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
    key = key_for_use(
        svc, p, caller, "Encrypt", "ENCRYPT_DECRYPT", extra={"kms:EncryptionAlgorithm": algorithm}
    )
    check_algorithm(key, algorithm)
    ciphertext = encrypt_for(key, algorithm, p["Plaintext"], p.get("EncryptionContext"))
    dry_run(p)
    return {"CiphertextBlob": ciphertext, "KeyId": key["Arn"], "EncryptionAlgorithm": algorithm}


def decrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Decrypt: the plaintext, or CiphertextForRecipient with a Recipient."""
    spki, attestation = svc.recipients.verify(p.get("Recipient"))
    key, plaintext, algorithm = open_ciphertext(svc, p, caller, "Decrypt", attestation=attestation)
    dry_run(p)
    out: dict[str, Any] = {"KeyId": key["Arn"], "EncryptionAlgorithm": algorithm}
    out.update(deliver(plaintext, spki))
    return out


def re_encrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ReEncrypt: decrypt under the source key (kms:ReEncryptFrom), encrypt under the
    destination key (kms:ReEncryptTo); the plaintext never leaves the service."""
    source, plaintext, source_algorithm = open_ciphertext(
        svc,
        p,
        caller,
        "ReEncryptFrom",
        operation="ReEncrypt",
        key_field="SourceKeyId",
        context_field="SourceEncryptionContext",
        algorithm_field="SourceEncryptionAlgorithm",
    )
    algorithm = p.get("DestinationEncryptionAlgorithm", "SYMMETRIC_DEFAULT")
    destination = key_for_use(
        svc,
        p,
        caller,
        "ReEncryptTo",
        "ENCRYPT_DECRYPT",
        operation="ReEncrypt",
        key_field="DestinationKeyId",
        context_field="DestinationEncryptionContext",
        extra={"kms:EncryptionAlgorithm": algorithm},
    )
    check_algorithm(destination, algorithm)
    ciphertext = encrypt_for(destination, algorithm, plaintext, p.get("DestinationEncryptionContext"))
    dry_run(p)
    return {
        "CiphertextBlob": ciphertext,
        "SourceKeyId": source["Arn"],
        "KeyId": destination["Arn"],
        "SourceEncryptionAlgorithm": source_algorithm,
        "DestinationEncryptionAlgorithm": algorithm,
    }


def _data_key_length(p: Mapping[str, Any]) -> int:
    """docs/kms.md: exactly one of KeySpec (AES_128 -> 16, AES_256 -> 32) or NumberOfBytes."""
    spec, count = p.get("KeySpec"), p.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise KmsError("ValidationException", "Please specify either number of bytes or key spec.")
    return count if count is not None else {"AES_128": 16, "AES_256": 32}[spec]


def generate_data_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateDataKey: random bytes, as a blob and in the clear (or CiphertextForRecipient)."""
    length = _data_key_length(p)
    spki, attestation = svc.recipients.verify(p.get("Recipient"))
    key = key_for_use(
        svc, p, caller, "GenerateDataKey", "ENCRYPT_DECRYPT", symmetric=True, attestation=attestation
    )
    dry_run(p)
    plaintext = os.urandom(length)
    out: dict[str, Any] = {
        "CiphertextBlob": seal(key, plaintext, p.get("EncryptionContext")),
        "KeyId": key["Arn"],
    }
    out.update(deliver(plaintext, spki))
    return out


def generate_data_key_without_plaintext(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateDataKeyWithoutPlaintext: random bytes as a blob only."""
    length = _data_key_length(p)
    key = key_for_use(svc, p, caller, "GenerateDataKeyWithoutPlaintext", "ENCRYPT_DECRYPT", symmetric=True)
    dry_run(p)
    return {
        "CiphertextBlob": seal(key, os.urandom(length), p.get("EncryptionContext")),
        "KeyId": key["Arn"],
    }


def generate_random(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateRandom: NumberOfBytes random bytes (or CiphertextForRecipient)."""
    if p.get("CustomKeyStoreId"):
        raise KmsError("CustomKeyStoreNotFoundException", "The KMS emulator has no custom key stores")
    require_member(p, "NumberOfBytes")
    # GenerateRandom is not a key operation: IAM alone authorizes it, no key policy applies.
    spki, _ = svc.recipients.verify(p.get("Recipient"))
    return deliver(os.urandom(p["NumberOfBytes"]), spki)


OPERATIONS = {
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "ReEncrypt": re_encrypt,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "GenerateRandom": generate_random,
}
