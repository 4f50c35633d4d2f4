"""Key pairs of asymmetric KMS keys and data key pairs: generation, storage, the primitives.

docs/kms.md#key-specs. Private keys are kept as PKCS#8 DER (what GenerateDataKeyPair returns
and what the state file stores, base64), public keys leave as DER SubjectPublicKeyInfo (what
GetPublicKey returns). The primitives follow KMS's definitions:

* RSASSA_PSS_SHA_n: PSS with MGF1 over the same hash and a salt as long as the digest;
  RSASSA_PKCS1_V1_5_SHA_n: PKCS #1 v1.5 with the DigestInfo of SHA-n;
* ECDSA_SHA_n: ECDSA over SHA-n, the signature DER-encoded (``ECDSA-Sig-Value``);
* ``DIGEST`` messages are the digest itself (not hashed again), of exactly the hash's length;
* RSAES_OAEP_SHA_1 / _256: OAEP with MGF1 over the same hash and an empty label;
* ECDH: the raw shared secret (the x coordinate), as DeriveSharedSecret returns it.

Errors are plain ``ValueError``; the operations turn them into KMS errors.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

__all__ = [
    "CURVES",
    "PAIR_SPECS",
    "decrypt_oaep",
    "derive_shared_secret",
    "digest_length",
    "encrypt_oaep",
    "generate_private_key",
    "load_private_key",
    "max_oaep_plaintext",
    "private_der",
    "public_der",
    "sign",
    "spec_of_private_key",
    "verify",
]

#: ECC key spec -> curve.
CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
#: Key pair specs :func:`generate_private_key` makes (GenerateDataKeyPair's KeyPairSpec).
PAIR_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", *CURVES, "ECC_NIST_EDWARDS25519")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA_1": hashes.SHA1,
    "SHA_256": hashes.SHA256,
    "SHA_384": hashes.SHA384,
    "SHA_512": hashes.SHA512,
}


def _hash_of(algorithm: str) -> hashes.HashAlgorithm:
    """``RSASSA_PSS_SHA_384`` -> SHA384(); the hash is named by the algorithm's last two parts."""
    return _HASHES["_".join(algorithm.split("_")[-2:])]()


def digest_length(algorithm: str) -> int:
    """Bytes of the digest a ``DIGEST`` message must have for a signing algorithm (SHA_256 -> 32)."""
    return _hash_of(algorithm).digest_size


def generate_private_key(spec: str) -> Any:
    """A fresh private key for a key spec or data key pair spec: ``RSA_<bits>`` (exponent
    65537), a curve of :data:`CURVES`, or ``ECC_NIST_EDWARDS25519`` (data key pairs only).
    ValueError for any other spec."""
    if spec in PAIR_SPECS and spec.startswith("RSA_"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(spec[4:]))
    if spec in CURVES:
        return ec.generate_private_key(CURVES[spec]())
    if spec == "ECC_NIST_EDWARDS25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no key pair for spec {spec}")


def private_der(private: Any) -> bytes:
    """PKCS#8 DER of a private key (RFC 5958, unencrypted)."""
    return private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_der(private_or_public: Any) -> bytes:
    """DER SubjectPublicKeyInfo (RFC 5280) of a private key's public key, or of a public key."""
    public = (
        private_or_public.public_key() if hasattr(private_or_public, "private_bytes") else private_or_public
    )
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spec_of_private_key(private: Any) -> str | None:
    """The key spec a private key belongs to (``RSA_3072``, ``ECC_SECG_P256K1`` ...), None if none."""
    if isinstance(private, rsa.RSAPrivateKey):
        return f"RSA_{private.key_size}"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        for spec, curve in CURVES.items():
            if private.curve.name == curve.name:
                return spec
    return None


@lru_cache(maxsize=128)
def load_private_key(private_b64: str) -> Any:
    """The private key object of a key record's base64 PKCS#8 ``PrivateKey`` (cached: a key is
    parsed once, not per request). ValueError when it does not parse."""
    return serialization.load_der_private_key(base64.b64decode(private_b64, validate=True), None)


def _signature_scheme(public: Any, algorithm: str, digest: bool) -> tuple[Any, ...]:
    """The ``cryptography`` arguments after the message for sign/verify with ``algorithm``."""
    chosen = _hash_of(algorithm)
    prehashed = utils.Prehashed(chosen) if digest else chosen
    if algorithm.startswith("ECDSA_"):
        return (ec.ECDSA(prehashed),)
    if algorithm.startswith("RSASSA_PSS_"):
        return (padding.PSS(mgf=padding.MGF1(_hash_of(algorithm)), salt_length=chosen.digest_size), prehashed)
    return (padding.PKCS1v15(), prehashed)


def sign(private: Any, algorithm: str, message: bytes, digest: bool) -> bytes:
    """Sign ``message`` (or, with ``digest``, the digest ``message``) with ``algorithm``.

    ValueError when a digest's length does not match the algorithm's hash."""
    if digest and len(message) != digest_length(algorithm):
        raise ValueError(f"digest of {len(message)} bytes, {algorithm} needs {digest_length(algorithm)}")
    return private.sign(message, *_signature_scheme(private, algorithm, digest))


def verify(public: Any, algorithm: str, message: bytes, signature: bytes, digest: bool) -> bool:
    """True when ``signature`` is ``algorithm``'s signature of ``message`` (or digest) under ``public``."""
    try:
        public.verify(signature, message, *_signature_scheme(public, algorithm, digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def _oaep(algorithm: str) -> padding.OAEP:
    chosen = _hash_of(algorithm)
    return padding.OAEP(mgf=padding.MGF1(chosen), algorithm=chosen, label=None)


def max_oaep_plaintext(public: rsa.RSAPublicKey, algorithm: str) -> int:
    """Largest plaintext RSAES-OAEP takes: key bytes - 2 * hash bytes - 2 (RSA_2048 with SHA-256: 190)."""
    return public.key_size // 8 - 2 * _hash_of(algorithm).digest_size - 2


def encrypt_oaep(public: rsa.RSAPublicKey, algorithm: str, plaintext: bytes) -> bytes:
    """RSAES-OAEP ciphertext (as long as the modulus) of ``plaintext``."""
    return public.encrypt(plaintext, _oaep(algorithm))


def decrypt_oaep(private: rsa.RSAPrivateKey, algorithm: str, ciphertext: bytes) -> bytes:
    """The plaintext of an RSAES-OAEP ciphertext; ValueError when it does not decrypt."""
    return private.decrypt(ciphertext, _oaep(algorithm))


def derive_shared_secret(private: ec.EllipticCurvePrivateKey, peer_spki: bytes) -> bytes:
    """ECDH between ``private`` and the peer's DER SubjectPublicKeyInfo: the raw shared secret
    (the x coordinate, as long as the field). ValueError when ``peer_spki`` is not an EC public
    key on the same curve."""
    try:
        peer = serialization.load_der_public_key(peer_spki)
    except UnsupportedAlgorithm as err:
        raise ValueError(str(err)) from None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != private.curve.name:
        raise ValueError(f"not a public key on {private.curve.name}")
    return private.exchange(ec.ECDH(), peer)
