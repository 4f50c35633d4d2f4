"""COSE_Sign1 (RFC 9052) as Nitro uses it: ECDSA over a Sig_structure, raw r||s signatures.

Two things in the harness are COSE_Sign1 documents: attestation documents (ES384, signed by
the NSM's leaf certificate; docs/attestation.md) and the ``signature`` inside an EIF's
signature section (ES256/384/512, signed by the image's signing key; docs/eif-format.md).
Both are ``[protected = bstr(CBOR map {1: alg}), unprotected = {}, payload = bstr,
signature = bstr(r || s)]``, untagged when written; readers also accept tag 18.

This module builds and decodes that shape and checks signatures; what the payload means and
which headers are acceptable is left to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import cbor2

#: COSE_Sign1 tag; AWS omits it, verifiers accept it (docs/attestation.md).
COSE_SIGN1_TAG = 18


class Algorithm(NamedTuple):
    """A COSE ECDSA algorithm: ``alg`` (COSE id), ``hash`` (a cryptography ``hashes`` class
    name) and ``size`` (bytes per coordinate, so a signature is ``2 * size`` bytes)."""

    alg: int
    hash: str
    size: int


ES256 = Algorithm(-7, "SHA256", 32)
ES384 = Algorithm(-35, "SHA384", 48)
ES512 = Algorithm(-36, "SHA512", 66)

#: The algorithm for each EC curve (cryptography's curve names), RFC 9053 2.1.
ALGORITHMS = {"secp256r1": ES256, "secp384r1": ES384, "secp521r1": ES512}


class CoseError(ValueError):
    """Bytes that are not a COSE_Sign1 array; the message is one line saying why."""


@dataclass(frozen=True)
class Sign1:
    """A decoded COSE_Sign1: ``protected`` header bytes, ``unprotected`` map, ``payload`` and
    ``signature`` bytes, and whether it carried tag 18 (``tagged``)."""

    protected: bytes
    unprotected: Mapping
    payload: bytes
    signature: bytes
    tagged: bool = False


def protected_header(algorithm: Algorithm) -> bytes:
    """The protected header bytes ``bstr(CBOR {1: alg})``, e.g. ``a1013822`` for ES384."""
    return cbor2.dumps({1: algorithm.alg})


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The COSE Sig_structure the signature covers: ``["Signature1", protected, h'', payload]``
    (RFC 9052 4.4; docs/attestation.md)."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(key: Any, payload: bytes, algorithm: Algorithm) -> bytes:
    """Return the untagged COSE_Sign1 ``[protected {1: alg}, {}, payload, r || s]`` for
    ``payload`` signed with ``key`` (a cryptography EC private key) using ``algorithm``.

    ``r`` and ``s`` are big-endian, ``algorithm.size`` bytes each (RFC 9053 2.1). Errors from
    ``key.sign`` propagate.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    protected = protected_header(algorithm)
    der = key.sign(sig_structure(protected, payload), ec.ECDSA(getattr(hashes, algorithm.hash)()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(algorithm.size, "big") + s.to_bytes(algorithm.size, "big")
    return cbor2.dumps([protected, {}, payload, signature])


def decode_sign1(data: bytes) -> Sign1:
    """Decode a COSE_Sign1, untagged or with tag 18, checking only its shape: a 4-element array
    of bstr, map, bstr, bstr. Headers and signature are not interpreted.

    Raises :class:`CoseError` (one line) for bytes that are not CBOR, another tag, or another
    shape.
    """
    try:
        outer = cbor2.loads(bytes(data))
    except Exception as err:  # cbor2 raises several types for malformed input
        raise CoseError(f"not CBOR: {err}") from None
    tagged = isinstance(outer, cbor2.CBORTag)
    if tagged:
        if outer.tag != COSE_SIGN1_TAG:
            raise CoseError(f"CBOR tag {outer.tag} is not COSE_Sign1 (18)")
        outer = outer.value
    # cbor2 decodes a tagged array as a tuple (and maps inside as frozendict).
    if not isinstance(outer, (list, tuple)) or len(outer) != 4:
        raise CoseError("not a COSE_Sign1 array of 4 elements")
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise CoseError("COSE_Sign1 headers must be a bstr and a map")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise CoseError("COSE_Sign1 payload and signature must be byte strings")
    return Sign1(protected, unprotected, payload, signature, tagged)


def signature_valid(public_key: Any, protected: bytes, payload: bytes, signature: bytes,
                    algorithm: Algorithm) -> bool:
    """True when ``signature`` (raw ``r || s``, ``algorithm.size`` bytes each) is a valid ECDSA
    signature by ``public_key`` (a cryptography EC public key) over the Sig_structure of
    ``protected`` and ``payload`` (RFC 9052 4.4). Never raises for a bad signature or a
    signature of the wrong length: both are False."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(signature) != 2 * algorithm.size:
        return False
    r = int.from_bytes(signature[:algorithm.size], "big")
    s = int.from_bytes(signature[algorithm.size:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), sig_structure(protected, payload),
                          ec.ECDSA(getattr(hashes, algorithm.hash)()))
    except (InvalidSignature, ValueError):
        return False
    return True
