"""``Recipient``: an enclave's attestation document in a KMS request, and CiphertextForRecipient.

``Recipient`` (Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom,
DeriveSharedSecret) carries an
attestation document; it is verified with ``harness.attestation.verify_document`` against the
configured roots (the harness PKI's root by default), its PCRs become the
``kms:RecipientAttestation:*`` condition keys, and the secret is returned only as
``CiphertextForRecipient`` (:mod:`harness.kms.cms`), encrypted to the document's RSA public key
(docs/kms.md).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.errors import ErrorCode, NitroError
from harness.kms import cms
from harness.kms.wire import KmsError

__all__ = ["RecipientVerifier", "deliver", "load_roots"]


def load_roots(roots: Iterable[Any]) -> list[Any]:
    """Turn PEM/DER bytes, paths or certificate objects into ``x509.Certificate`` objects.

    Raises NitroError: FileOperationFailure for an unreadable path, InvalidArgument for bytes
    that are not a PEM or DER certificate.
    """
    from cryptography import x509

    out = []
    for item in roots:
        if isinstance(item, x509.Certificate):
            out.append(item)
            continue
        data = item
        if isinstance(item, (str, os.PathLike)):
            try:
                data = Path(item).read_bytes()
            except OSError as err:
                raise NitroError(
                    ErrorCode.FileOperationFailure, f"attestation root {item}: cannot read ({err.strerror})"
                ) from None
        try:
            if b"-----BEGIN" in data:
                out.extend(x509.load_pem_x509_certificates(data))
            else:
                out.append(x509.load_der_x509_certificate(data))
        except ValueError as err:
            # A path is named whole (the user must find the file); raw bytes only by their size.
            what = (str(item) if isinstance(item, (str, os.PathLike))
                    else f"of {len(data)} bytes")
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"attestation root {what}: not a PEM or DER certificate ({err})",
            ) from None
    return out


def _default_roots() -> list[Any]:
    """The harness PKI's root, the default trust anchor for Recipient documents (docs/attestation.md)."""
    from harness import pki

    return [pki.Pki.load_or_create().root_certificate]


class RecipientVerifier:
    """Verifies the attestation document of a request's ``Recipient``.

    ``roots``: certificates (objects, PEM/DER bytes or paths) the document must chain to; None =
    the harness PKI's root, resolved on first use. ``at``: verification time (None = now; a
    datetime, or ``"document"`` for each document's own timestamp). ``bad_exception``: the
    KmsError name for a document that does not verify (ValidationException or
    AccessDeniedException; AWS's choice is undocumented).
    """

    def __init__(self, roots: Sequence[Any] | None, at: _dt.datetime | str | None, bad_exception: str):
        self._roots = load_roots(roots) if roots is not None else None
        self._at = at
        self._bad_exception = bad_exception

    def verify(self, recipient: Mapping[str, Any] | None) -> tuple[bytes | None, dict[str, str]]:
        """Verify a Recipient's attestation document.

        Returns (recipient SPKI DER, condition keys ``kms:RecipientAttestation:PCR<n>`` and
        ``kms:RecipientAttestation:ImageSha384`` as lower-case hex), or (None, {}) without a
        Recipient. A document that does not verify raises the configured exception; a missing
        document, or a public_key that is not an RSA key of at least 2048 bits, raises
        ValidationException.
        """
        if not recipient:
            return None, {}
        document = recipient.get("AttestationDocument")
        if not document:
            raise KmsError(
                "ValidationException", "Recipient.AttestationDocument is required when Recipient is given"
            )
        from harness import attestation  # the NSM area's verifier; imported on first use

        roots = self._roots
        if roots is None:
            roots = self._roots = _default_roots()
        try:
            doc = attestation.verify_document(document, roots=roots, at=self._at)
        except attestation.AttestationError as err:
            raise KmsError(self._bad_exception, f"The attestation document is not valid: {err}") from None
        public_key = doc.public_key
        if not public_key:
            raise KmsError(
                "ValidationException",
                "The attestation document has no public_key to encrypt the CiphertextForRecipient to",
            )
        try:
            key = serialization.load_der_public_key(public_key)
        except ValueError:
            raise KmsError(
                "ValidationException",
                "The attestation document's public_key is not a DER SubjectPublicKeyInfo",
            ) from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise KmsError(
                "ValidationException",
                "The attestation document's public_key must be an RSA key of at least 2048 bits (RSAES_OAEP_SHA_256)",
            )
        keys = {f"kms:RecipientAttestation:PCR{index}": value.hex() for index, value in doc.pcrs.items()}
        if 0 in doc.pcrs:
            keys["kms:RecipientAttestation:ImageSha384"] = doc.pcrs[0].hex()
        return public_key, keys


def deliver(secret: bytes, spki: bytes | None, plaintext_field: str = "Plaintext") -> dict[str, bytes]:
    """The response member carrying ``secret``: ``CiphertextForRecipient`` (CMS to ``spki``)
    when the request had a Recipient, otherwise ``secret`` in the clear under ``plaintext_field``."""
    if spki is not None:
        return {"CiphertextForRecipient": cms.build_ciphertext_for_recipient(secret, spki)}
    return {plaintext_field: secret}
