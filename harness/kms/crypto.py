"""KMS cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey*, GenerateRandom.

One function per operation, ``(service, decoded params, caller) -> response dict``, registered
by KMS name in :data:`OPERATIONS`. Each resolves the key, evaluates its policy (with the
encryption context and, for a ``Recipient``, the attestation keys), needs the key Enabled and
honours DryRun. With a verified Recipient the secret comes back only as
``CiphertextForRecipient`` (:mod:`harness.kms.recipient`; docs/kms.md).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness.kms.blob import blob_key_id, seal, unseal
from harness.kms.credentials import Caller
from harness.kms.recipient import deliver
from harness.kms.store import require_usable
from harness.kms.wire import KmsError, Validation

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]


def _alias_of(ref: str | None) -> str | None:
    """``kms:RequestAlias``: the alias the request named the key by, if any."""
    if not ref:
        return None
    if ref.startswith("alias/"):
        return ref
    match = re.match(r"^arn:aws[\w-]*:kms:[^:]*:\d{12}:(alias/.+)$", ref)
    return match.group(1) if match else None


def _check_algorithm(params: Mapping[str, Any], name: str = "EncryptionAlgorithm") -> None:
    algorithm = params.get(name)
    if algorithm not in (None, "SYMMETRIC_DEFAULT"):
        raise KmsError(
            "InvalidKeyUsageException", f"{name} {algorithm} is not valid for a SYMMETRIC_DEFAULT key"
        )


def _dry_run(params: Mapping[str, Any]) -> None:
    if params.get("DryRun"):
        raise KmsError(
            "DryRunOperationException", "The request would have succeeded, but the DryRun option is set."
        )


def _require_member(params: Mapping[str, Any], name: str) -> None:
    """ValidationException for a member the current model marks optional but KMS still needs."""
    if params.get(name) is None:
        check = Validation()
        check.add(name, None, "Member must not be null")
        check.raise_if_any()


def _key_for_secret_op(
    svc: KmsService,
    params: Mapping[str, Any],
    caller: Caller,
    action: str,
    *,
    attestation: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The request's ``KeyId``, resolved, authorized for ``action``, Enabled, past DryRun."""
    key = svc.store.resolve(params["KeyId"])
    svc.authorize(
        key,
        action,
        caller,
        encryption_context=params.get("EncryptionContext"),
        attestation=attestation,
        extra={"kms:RequestAlias": _alias_of(params.get("KeyId")), **(extra or {})},
    )
    require_usable(key)
    _dry_run(params)
    return key


def _open_blob(
    svc: KmsService,
    p: Mapping[str, Any],
    caller: Caller,
    action: str,
    *,
    blob_field: str = "CiphertextBlob",
    key_field: str = "KeyId",
    context_field: str = "EncryptionContext",
    attestation: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Resolve, authorize and decrypt a ciphertext blob (Decrypt, ReEncrypt's source).

    Returns (key record, plaintext). IncorrectKeyException when ``key_field`` names another
    key than the blob's; InvalidCiphertextException for a foreign or altered blob.
    """
    _require_member(p, blob_field)  # optional in the current model (DryRun-era change)
    blob = p[blob_field]
    with svc.store.lock:
        blob_key = blob_key_id(blob)
        if p.get(key_field):
            key = svc.store.resolve(p[key_field])
            if key["KeyId"] != blob_key:
                raise KmsError(
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a KMS key that can perform this operation.",
                )
        else:
            key = svc.store.keys.get(blob_key)
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
            extra={
                "kms:RequestAlias": _alias_of(p.get(key_field)),
                "kms:EncryptionAlgorithm": p.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT"),
            },
        )
        require_usable(key)
    return key, unseal(key, blob, context)


def encrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Encrypt: ``Plaintext`` under the key and encryption context, as a ciphertext blob."""
    _check_algorithm(p)
    with svc.store.lock:
        key = _key_for_secret_op(
            svc,
            p,
            caller,
            "Encrypt",
            extra={"kms:EncryptionAlgorithm": p.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")},
        )
    return {
        "CiphertextBlob": seal(key, p["Plaintext"], p.get("EncryptionContext")),
        "KeyId": key["Arn"],
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }


def decrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Decrypt: the blob's plaintext, or CiphertextForRecipient with a Recipient."""
    _check_algorithm(p)
    spki, attestation = svc.recipients.verify(p.get("Recipient"))
    key, plaintext = _open_blob(svc, p, caller, "Decrypt", attestation=attestation)
    _dry_run(p)
    out: dict[str, Any] = {"KeyId": key["Arn"], "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
    out.update(deliver(plaintext, spki))
    return out


def re_encrypt(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ReEncrypt: decrypt under the source key (kms:ReEncryptFrom), encrypt under the
    destination key (kms:ReEncryptTo); the plaintext never leaves the service."""
    _check_algorithm(p, "SourceEncryptionAlgorithm")
    _check_algorithm(p, "DestinationEncryptionAlgorithm")
    source, plaintext = _open_blob(
        svc, p, caller, "ReEncryptFrom", key_field="SourceKeyId", context_field="SourceEncryptionContext"
    )
    with svc.store.lock:
        destination = svc.store.resolve(p["DestinationKeyId"])
        svc.authorize(
            destination, "ReEncryptTo", caller, encryption_context=p.get("DestinationEncryptionContext")
        )
        require_usable(destination)
    _dry_run(p)
    return {
        "CiphertextBlob": seal(destination, plaintext, p.get("DestinationEncryptionContext")),
        "SourceKeyId": source["Arn"],
        "KeyId": destination["Arn"],
        "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
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
    with svc.store.lock:
        key = _key_for_secret_op(svc, p, caller, "GenerateDataKey", attestation=attestation)
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
    with svc.store.lock:
        key = _key_for_secret_op(svc, p, caller, "GenerateDataKeyWithoutPlaintext")
    return {
        "CiphertextBlob": seal(key, os.urandom(length), p.get("EncryptionContext")),
        "KeyId": key["Arn"],
    }


def _generate_private_key(spec: str):
    """A fresh private key for GenerateDataKeyPair's KeyPairSpec."""
    if spec.startswith("RSA_"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(spec[4:]))
    curves = {
        "ECC_NIST_P256": ec.SECP256R1,
        "ECC_NIST_P384": ec.SECP384R1,
        "ECC_NIST_P521": ec.SECP521R1,
        "ECC_SECG_P256K1": ec.SECP256K1,
    }
    if spec in curves:
        return ec.generate_private_key(curves[spec]())
    if spec == "ECC_NIST_EDWARDS25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PrivateKey.generate()
    raise KmsError("UnsupportedOperationException", f"KeyPairSpec {spec} is not supported by the KMS emulator")


def _key_pair(
    svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str, attestation=None
) -> tuple[dict[str, Any], bytes]:
    """A fresh key pair: (response without the private key in the clear, PKCS#8 DER private key)."""
    spec = p["KeyPairSpec"]
    with svc.store.lock:
        key = _key_for_secret_op(
            svc, p, caller, action, attestation=attestation, extra={"kms:DataKeyPairSpec": spec}
        )
    private = _generate_private_key(spec)
    private_der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = {
        "PrivateKeyCiphertextBlob": seal(key, private_der, p.get("EncryptionContext")),
        "PublicKey": public_der,
        "KeyId": key["Arn"],
        "KeyPairSpec": spec,
    }
    return out, private_der


def generate_data_key_pair(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateDataKeyPair: the private key as a blob and in the clear (or CiphertextForRecipient)."""
    spki, attestation = svc.recipients.verify(p.get("Recipient"))
    out, private_der = _key_pair(svc, p, caller, "GenerateDataKeyPair", attestation)
    out.update(deliver(private_der, spki, "PrivateKeyPlaintext"))
    return out


def generate_data_key_pair_without_plaintext(
    svc: KmsService, p: dict[str, Any], caller: Caller
) -> dict[str, Any]:
    """GenerateDataKeyPairWithoutPlaintext: the private key as a blob only."""
    out, _ = _key_pair(svc, p, caller, "GenerateDataKeyPairWithoutPlaintext")
    return out


def generate_random(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateRandom: NumberOfBytes random bytes (or CiphertextForRecipient)."""
    if p.get("CustomKeyStoreId"):
        raise KmsError("CustomKeyStoreNotFoundException", "The KMS emulator has no custom key stores")
    _require_member(p, "NumberOfBytes")
    # GenerateRandom is not a key operation: IAM alone authorizes it, no key policy applies.
    spki, _ = svc.recipients.verify(p.get("Recipient"))
    return deliver(os.urandom(p["NumberOfBytes"]), spki)


OPERATIONS = {
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "ReEncrypt": re_encrypt,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "GenerateDataKeyPair": generate_data_key_pair,
    "GenerateDataKeyPairWithoutPlaintext": generate_data_key_pair_without_plaintext,
    "GenerateRandom": generate_random,
}
