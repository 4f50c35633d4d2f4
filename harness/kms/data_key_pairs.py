"""KMS data key pairs: GenerateDataKeyPair and GenerateDataKeyPairWithoutPlaintext.

A fresh key pair per request, unrelated to the KMS key: the public key as DER
SubjectPublicKeyInfo, the private key as PKCS#8 DER sealed under a symmetric ENCRYPT_DECRYPT
key (a blob Decrypt opens) and, from GenerateDataKeyPair, in the clear or, with a verified
Recipient, only as CiphertextForRecipient (docs/kms.md#data-keys). Pair specs: RSA_2048/3072/4096,
ECC_NIST_P256/P384/P521, ECC_SECG_P256K1 and ECC_NIST_EDWARDS25519; SM2 and ML-KEM are
UnsupportedOperationException.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from harness.kms import asymmetric
from harness.kms.blob import seal
from harness.kms.credentials import Caller
from harness.kms.key_use import dry_run, key_for_use
from harness.kms.recipient import deliver
from harness.kms.wire import KmsError

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]


def _key_pair(
    svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str, attestation=None
) -> tuple[dict[str, Any], bytes]:
    """A fresh key pair: (response without the private key in the clear, PKCS#8 DER private key)."""
    spec = p["KeyPairSpec"]
    key = key_for_use(
        svc,
        p,
        caller,
        action,
        "ENCRYPT_DECRYPT",
        symmetric=True,
        attestation=attestation,
        extra={"kms:DataKeyPairSpec": spec},
    )
    if spec not in asymmetric.PAIR_SPECS:
        raise KmsError(
            "UnsupportedOperationException", f"KeyPairSpec {spec} is not supported by the KMS emulator"
        )
    dry_run(p)
    private = asymmetric.generate_private_key(spec)
    private_der = asymmetric.private_der(private)
    out = {
        "PrivateKeyCiphertextBlob": seal(key, private_der, p.get("EncryptionContext")),
        "PublicKey": asymmetric.public_der(private),
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


OPERATIONS = {
    "GenerateDataKeyPair": generate_data_key_pair,
    "GenerateDataKeyPairWithoutPlaintext": generate_data_key_pair_without_plaintext,
}
