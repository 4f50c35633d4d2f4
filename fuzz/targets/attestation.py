"""Fuzz target: the attestation document verifier, on any bytes a caller hands it.

One input is one document (COSE_Sign1 bytes). It is decoded (:func:`harness.attestation.
decode_document`) and verified against the AWS Nitro root G1 at its own timestamp
(:func:`harness.attestation.verify_document`: chain, root, constraints, validity, ES384
signature, then expectations on PCR0, the nonce and debug mode), and what passes is rendered as
the CLI prints it (``to_json``). docs/attestation.md. Declared errors: ``AttestationError``
(naming the failed check).
"""

from __future__ import annotations

from harness.attestation import (
    AT_DOCUMENT_TIME, AttestationError, Expectations, aws_root_g1, decode_document,
    verify_document,
)

NAME = "attestation"
DECLARED = (AttestationError,)
#: The real documents are 4.4-4.6 KiB.
MAX_LEN = 8192

#: PCR0 all zero: the debug-mode seed document meets it and the others do not, so both
#: outcomes of the PCR check are reached.
_EXPECT = Expectations(pcrs={0: bytes(48)}, nonce=None, allow_debug=True)


def one_input(data: bytes) -> None:
    """Decode, verify and render ``data`` as an attestation document."""
    decode_document(data).to_json()
    root = aws_root_g1()
    verify_document(data, roots=[root], at=AT_DOCUMENT_TIME).to_json()
    verify_document(data, roots=[root], at=AT_DOCUMENT_TIME, expect=_EXPECT)
