"""PCR arithmetic of Nitro Enclaves: the ``ext`` measurement, NSM extend, and nitro-cli's JSON.

docs/pcrs.md#extend-rule: ``ext(d) = SHA384(48 zero bytes || d)``; the NSM extends a PCR as
``new = SHA384(old || data)`` starting from 48 zero bytes. PCR0/1/2 are ``ext`` of a SHA-384 over
EIF section data, PCR3 is ``ext`` of the parent's IAM role ARN, PCR4 ``ext`` of the parent
instance ID, PCR8 ``ext`` of SHA-384 over the signing certificate's DER.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: Size of every PCR in bytes (SHA-384).
PCR_SIZE = 48

#: The value every PCR starts from (docs/pcrs.md#extend-rule), and the value debug mode reports
#: for PCR0-2.
ZERO_PCR = bytes(PCR_SIZE)

#: nitro-cli's ``HashAlgorithm`` string: the Rust ``Debug`` of its hasher, as printed by every
#: ``build-enclave`` / ``describe-eif`` (checked against aws-nitro-enclaves-cli's docs).
HASH_ALGORITHM = "Sha384 { ... }"


def extend(old: bytes, data: bytes) -> bytes:
    """Return the NSM extend of a PCR: ``SHA384(old || data)`` (48 bytes).

    ``old`` must be 48 bytes (a PCR value); ``data`` is any byte string. Raises ``ValueError``
    when ``old`` is not 48 bytes. Source: docs/pcrs.md#extend-rule.
    """
    if len(old) != PCR_SIZE:
        raise ValueError(f"PCR value must be {PCR_SIZE} bytes, got {len(old)}")
    return hashlib.sha384(bytes(old) + bytes(data)).digest()


def ext(data: bytes) -> bytes:
    """Return ``SHA384(48 zero bytes || data)``: one extend of a fresh PCR (48 bytes).

    Source: docs/pcrs.md#extend-rule. ``data`` is usually a 48-byte digest (PCR0/1/2/8) or a UTF-8
    string (PCR3/PCR4).
    """
    return extend(ZERO_PCR, data)


def pcr_for_role_arn(arn: str) -> bytes:
    """Return PCR3 for the parent's IAM role ARN: ``ext(arn.encode('utf-8'))`` (48 bytes).

    Source: docs/pcrs.md#parent-pcrs (check value for ``arn:aws:iam::123456789012:role/Webserver``).
    """
    return ext(arn.encode("utf-8"))


def pcr_for_instance_id(instance_id: str) -> bytes:
    """Return PCR4 for the parent's EC2 instance ID: ``ext(id.encode('utf-8'))`` (48 bytes).

    Source: docs/pcrs.md#parent-pcrs (check value for ``i-1234567890abcdef0``).
    """
    return ext(instance_id.encode("utf-8"))


def pcr_for_file_digest(sha384_digest: bytes) -> bytes:
    """Return ``ext(digest)`` for a SHA-384 digest of some content (what ``nitro-cli pcr`` prints).

    Source: docs/pcrs.md#nitro-cli-output (``pcr --input F`` prints ``ext(SHA384(file))``).
    """
    return ext(sha384_digest)


def pcr_for_certificate_der(der: bytes) -> bytes:
    """Return PCR8 for a signing certificate given as DER: ``ext(SHA384(der))``.

    Source: docs/pcrs.md#pcr8 (PCR8 = ext(SHA384(DER of the first certificate in the PEM))).
    """
    return ext(hashlib.sha384(der).digest())


@dataclass(frozen=True)
class Measurements:
    """The PCRs nitro-cli reports for an EIF: PCR0, PCR1, PCR2 (48 bytes each) and PCR8 when signed.

    Source: docs/pcrs.md#image-pcrs. ``to_json()`` gives nitro-cli's ``Measurements`` object.
    """

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None

    def to_json(self) -> dict[str, str]:
        """Return nitro-cli's ``Measurements`` dict (insertion-ordered, lower-case hex).

        Keys in order: ``HashAlgorithm`` (``"Sha384 { ... }"``), ``PCR0``, ``PCR1``, ``PCR2``,
        then ``PCR8`` only when signed (docs/pcrs.md#nitro-cli-output).
        """
        out = {
            "HashAlgorithm": HASH_ALGORITHM,
            "PCR0": self.pcr0.hex(),
            "PCR1": self.pcr1.hex(),
            "PCR2": self.pcr2.hex(),
        }
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8.hex()
        return out

    def as_dict(self) -> dict[int, bytes]:
        """Return ``{index: value}`` for the PCRs present (0, 1, 2 and 8 when signed)."""
        out = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            out[8] = self.pcr8
        return out
