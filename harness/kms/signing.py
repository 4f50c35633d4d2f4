"""KMS signatures: Sign and Verify with SIGN_VERIFY keys (RSA and ECC key pairs).

One function per operation, registered by KMS name in :data:`OPERATIONS`. ``MessageType``
``RAW`` (the default) is hashed by the signing algorithm; ``DIGEST`` is the digest itself and
must be as long as the algorithm's hash (ValidationException ``Digest is invalid length for
algorithm X.``); ``EXTERNAL_MU`` belongs to ML-DSA keys, which the emulator does not make. The
algorithm must be one the key lists (InvalidKeyUsageException); a signature that does not verify
is KMSInvalidSignatureException, never ``SignatureValid: false`` (docs/kms.md#signatures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from harness.kms import asymmetric
from harness.kms.credentials import Caller
from harness.kms.key_specs import check_algorithm, spec_of
from harness.kms.key_use import dry_run, key_for_use
from harness.kms.wire import KmsError

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]


def _signing_request(
    svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str
) -> tuple[dict[str, Any], str, bool]:
    """(key, signing algorithm, message is a digest) after every check of Sign and Verify."""
    algorithm = p["SigningAlgorithm"]
    message_type = p.get("MessageType", "RAW")
    key = key_for_use(
        svc,
        p,
        caller,
        action,
        "SIGN_VERIFY",
        extra={"kms:SigningAlgorithm": algorithm, "kms:MessageType": message_type},
    )
    check_algorithm(key, algorithm)
    if message_type not in ("RAW", "DIGEST"):
        raise KmsError(
            "ValidationException",
            f"Message type {message_type} is incompatible with key spec {spec_of(key)}.",
        )
    digest = message_type == "DIGEST"
    if digest and len(p["Message"]) != asymmetric.digest_length(algorithm):
        raise KmsError("ValidationException", f"Digest is invalid length for algorithm {algorithm}.")
    return key, algorithm, digest


def sign(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Sign: the signature of ``Message`` (RSA: as long as the modulus; ECDSA: DER)."""
    key, algorithm, digest = _signing_request(svc, p, caller, "Sign")
    dry_run(p)
    private = asymmetric.load_private_key(key["PrivateKey"])
    return {
        "KeyId": key["Arn"],
        "Signature": asymmetric.sign(private, algorithm, p["Message"], digest),
        "SigningAlgorithm": algorithm,
    }


def verify(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """Verify: ``SignatureValid: true``, or KMSInvalidSignatureException."""
    key, algorithm, digest = _signing_request(svc, p, caller, "Verify")
    public = asymmetric.load_private_key(key["PrivateKey"]).public_key()
    if not asymmetric.verify(public, algorithm, p["Message"], p["Signature"], digest):
        raise KmsError(
            "KMSInvalidSignatureException",
            f"The signature does not verify as {algorithm} over the message with {key['Arn']}",
        )
    dry_run(p)
    return {"KeyId": key["Arn"], "SignatureValid": True, "SigningAlgorithm": algorithm}


OPERATIONS = {"Sign": sign, "Verify": verify}
