"""For the asymmetric-key tests (docs/kms.md#key-specs): the key specs and algorithms they walk
through, and the independent verifiers they check the emulator's signatures with. Their
fixtures are in :mod:`helpers.kms_fixtures`."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import ecdsa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from helpers.kms import openssl

RSA_SPECS = ["RSA_2048", "RSA_3072", "RSA_4096"]
RSA_SIGNING = [
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
]
#: ECC key spec -> (its signing algorithm, the curve's name in `cryptography`, in `ecdsa`).
ECDSA = {
    "ECC_NIST_P256": ("ECDSA_SHA_256", "secp256r1", ecdsa.NIST256p),
    "ECC_NIST_P384": ("ECDSA_SHA_384", "secp384r1", ecdsa.NIST384p),
    "ECC_NIST_P521": ("ECDSA_SHA_512", "secp521r1", ecdsa.NIST521p),
    "ECC_SECG_P256K1": ("ECDSA_SHA_256", "secp256k1", ecdsa.SECP256k1),
}
MESSAGE = b"transfer 10 units to account 42"


def hash_name(algorithm: str) -> str:
    """``RSASSA_PSS_SHA_384`` -> ``sha384``."""
    return "sha" + algorithm.rsplit("_", 1)[1]


def private_der(server, key_id: str) -> bytes:
    """A KMS key's PKCS#8 private key from the emulator's store (for openssl to decrypt with)."""
    return base64.b64decode(server.service.store.keys[key_id]["PrivateKey"])


def openssl_encrypt(public_der: Path, options: list[str], data: bytes) -> subprocess.CompletedProcess:
    """``openssl pkeyutl -encrypt`` of ``data`` to the DER public key in ``public_der`` with ``options``."""
    return openssl(
        "pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", public_der, *options, data=data
    )  # fmt: skip


def openssl_decrypt(private_der: Path, options: list[str], data: bytes) -> subprocess.CompletedProcess:
    """``openssl pkeyutl -decrypt`` of ``data`` with the DER private key in ``private_der`` and ``options``."""
    return openssl("pkeyutl", "-decrypt", "-keyform", "DER", "-inkey", private_der, *options, data=data)


def openssl_verifies(tmp_path, spki: bytes, algorithm: str, digest: bytes, signature: bytes) -> bool:
    """``openssl pkeyutl -verify`` of a signature over a digest with a DER public key."""
    (tmp_path / "pub.der").write_bytes(spki)
    (tmp_path / "digest").write_bytes(digest)
    (tmp_path / "sig").write_bytes(signature)
    options = ["-pkeyopt", f"digest:{hash_name(algorithm)}"]
    if algorithm.startswith("RSASSA_PSS"):
        options += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
    result = openssl(
        "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", tmp_path / "pub.der",
        "-in", tmp_path / "digest", "-sigfile", tmp_path / "sig", *options,
    )  # fmt: skip
    return result.returncode == 0 and b"Signature Verified Successfully" in result.stdout


def cryptography_verifies(spki: bytes, algorithm: str, message: bytes, signature: bytes) -> bool:
    """`cryptography`'s verdict on a signature over a RAW message with a DER public key."""
    public = serialization.load_der_public_key(spki)
    chosen = getattr(hashes, hash_name(algorithm).upper())()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(chosen))
        elif algorithm.startswith("RSASSA_PSS"):
            public.verify(signature, message, padding.PSS(padding.MGF1(chosen), chosen.digest_size), chosen)
        else:
            public.verify(signature, message, padding.PKCS1v15(), chosen)
    except Exception:  # noqa: BLE001 - InvalidSignature
        return False
    return True
