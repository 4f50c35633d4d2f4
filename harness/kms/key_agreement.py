"""KMS key agreement: DeriveSharedSecret with KEY_AGREEMENT keys (ECDH on NIST curves).

The key's private key and the peer's public key (DER SubjectPublicKeyInfo on the same curve,
else ValidationException) give the raw ECDH shared secret. With a verified ``Recipient`` the
secret is returned only as ``CiphertextForRecipient``, encrypted to the attestation document's
key exactly as Decrypt and GenerateDataKey do it, and the policy sees the
``kms:RecipientAttestation:*`` keys (docs/kms.md#key-agreement, docs/kms.md#recipient).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.kms import asymmetric
from harness.kms.credentials import Caller
from harness.kms.key_specs import check_algorithm, spec_of
from harness.kms.key_use import dry_run, key_for_use
from harness.kms.recipient import deliver
from harness.kms.wire import KmsError

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]


def derive_shared_secret(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """DeriveSharedSecret: the ECDH secret of the key and ``PublicKey`` (or CiphertextForRecipient)."""
    algorithm = p["KeyAgreementAlgorithm"]
    spki, attestation = svc.recipients.verify(p.get("Recipient"))
    key = key_for_use(
        svc,
        p,
        caller,
        "DeriveSharedSecret",
        "KEY_AGREEMENT",
        attestation=attestation,
        extra={"kms:KeyAgreementAlgorithm": algorithm},
    )
    check_algorithm(key, algorithm)
    try:
        secret = asymmetric.derive_shared_secret(
            asymmetric.load_private_key(key["PrivateKey"]), p["PublicKey"]
        )
    except ValueError:
        raise KmsError(
            "ValidationException",
            f"PublicKey must be a DER SubjectPublicKeyInfo of an {spec_of(key)} public key, "
            "the curve of the KMS key",
        ) from None
    dry_run(p)
    out: dict[str, Any] = {"KeyId": key["Arn"], "KeyAgreementAlgorithm": algorithm, "KeyOrigin": "AWS_KMS"}
    out.update(deliver(secret, spki, "SharedSecret"))
    return out


OPERATIONS = {"DeriveSharedSecret": derive_shared_secret}
