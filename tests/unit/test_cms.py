"""CiphertextForRecipient (docs/kms.md): our BER writer against real KMS blobs and real openssl."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from harness.kms import cms
from helpers import REPO, guest_programs

VECTORS = REPO / "tests" / "vectors" / "kms"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def spki(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_real_vector_parses_with_sdk_test_values():
    blob = (VECTORS / "input_ber.der").read_bytes()
    parsed = cms.parse_ciphertext_for_recipient(blob)
    assert parsed.version == 2
    assert len(parsed.recipients) == 1
    ktri = parsed.recipients[0]
    assert ktri.version == 2
    assert ktri.subject_key_identifier.hex() == (
        "7087b55df94ba3255cdf3c01840a2aa3ec93620625d601cf56f97bde7a3d2eb1"
    )
    assert (ktri.key_encryption_algorithm, ktri.oaep_hash, ktri.mgf1_hash) == (
        "rsaes_oaep",
        "sha256",
        "sha256",
    )
    assert len(ktri.encrypted_key) == 256
    assert parsed.content_type == "data"
    assert parsed.content_encryption_algorithm == "aes256_cbc"
    assert parsed.iv.hex() == "688c6d5f7f31b0fecedf09f2e7c99ac9"
    assert len(parsed.encrypted_content) == 48


def test_real_vector_with_context_parses():
    blob = (VECTORS / "input_ber_w_ctx.der").read_bytes()
    # This real blob carries its 16-byte encryptedContent as a primitive [0] (80 10 ...),
    # not the constructed indefinite a0 80 04 .. 00 00 of input_ber.der: readers take both.
    eci = cms.ber_structure(blob).children[1].children[0].children[2]
    assert eci.indefinite and (eci.children[2].tag, eci.children[2].indefinite) == (0x80, False)
    parsed = cms.parse_ciphertext_for_recipient(blob)
    assert parsed.recipients[0].subject_key_identifier.hex().startswith("4e61df69e443b8e2")
    assert parsed.iv.hex() == "e66c1172aee0f2f7be34e3afc6b0e4fe"
    assert len(parsed.encrypted_content) == 16


def test_writer_keeps_real_kms_ber_structure(rsa_key):
    real = (VECTORS / "input_ber.der").read_bytes()
    ours = cms.build_ciphertext_for_recipient(b"x" * 40, spki(rsa_key))
    assert cms.ber_structure(ours).shape() == cms.ber_structure(real).shape()
    # Indefinite where docs/kms.md says so: ContentInfo, [0], EnvelopedData, EncryptedContentInfo,
    # [0] encryptedContent; definite RecipientInfos SET and content AlgorithmIdentifier.
    root = cms.ber_structure(ours)
    enveloped = root.children[1].children[0]
    eci = enveloped.children[2]
    assert [root.indefinite, root.children[1].indefinite, enveloped.indefinite, eci.indefinite] == [True] * 4
    assert enveloped.children[1].tag == 0x31 and not enveloped.children[1].indefinite
    assert eci.children[1].tag == 0x30 and not eci.children[1].indefinite
    assert eci.children[2].tag == 0xA0 and eci.children[2].indefinite


def test_writer_bytes_match_real_kms_outside_key_material(rsa_key):
    real = (VECTORS / "input_ber.der").read_bytes()
    ours = cms.build_ciphertext_for_recipient(b"y" * 33, spki(rsa_key))  # 48 bytes, like the vector
    assert ours[:0x21] == real[:0x21]  # up to the SKI: version, SET, KTRI v2, rid [0] len 32
    assert ours[0x41:0x83] == real[0x41:0x83]  # RSAES-OAEP AlgorithmIdentifier + key length
    assert ours[0x183:0x19B] == real[0x183:0x19B]  # EncryptedContentInfo head, AES-256-CBC OID
    assert ours[0x1AF:0x1B3] == real[0x1AF:0x1B3] == bytes.fromhex("a0800430")
    assert ours[-10:] == real[-10:] == b"\x00" * 10  # five end-of-contents
    assert len(ours) == len(real)


def test_rid_is_sha256_of_recipient_spki(rsa_key):
    blob = cms.build_ciphertext_for_recipient(b"secret", spki(rsa_key))
    rid = cms.parse_ciphertext_for_recipient(blob).recipients[0].subject_key_identifier
    assert rid == hashlib.sha256(spki(rsa_key)).digest()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1024])
def test_round_trip(rsa_key, size):
    plaintext = bytes(range(256)) * 4
    blob = cms.build_ciphertext_for_recipient(plaintext[:size], spki(rsa_key))
    assert cms.decrypt_ciphertext_for_recipient(blob, rsa_key) == plaintext[:size]


def test_openssl_cms_decrypts_our_ber(rsa_key, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    secret = b"the data key \x00\x01\x02 for the enclave"
    (tmp_path / "ct.der").write_bytes(cms.build_ciphertext_for_recipient(secret, spki(rsa_key)))
    (tmp_path / "key.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    # With no -recip, OpenSSL tries the key on every KeyTransRecipientInfo: that is how a
    # subjectKeyIdentifier rid (SHA-256, not the certificate's SKI) is decrypted.
    result = subprocess.run(
        [
            openssl,
            "cms",
            "-decrypt",
            "-inform",
            "DER",
            "-in",
            str(tmp_path / "ct.der"),
            "-inkey",
            str(tmp_path / "key.pem"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == secret


def test_guest_client_decoder_decrypts_our_blob(rsa_key):
    guest = guest_programs.load("kms_client")
    blob = cms.build_ciphertext_for_recipient(b"guest side", spki(rsa_key))
    assert guest.decrypt_for_recipient(blob, rsa_key) == b"guest side"


def test_wrong_key_names_the_rid(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    blob = cms.build_ciphertext_for_recipient(b"secret", spki(rsa_key))
    with pytest.raises(cms.CmsError, match="subjectKeyIdentifier"):
        cms.decrypt_ciphertext_for_recipient(blob, other)


def test_tampered_content_fails(rsa_key):
    blob = bytearray(cms.build_ciphertext_for_recipient(b"secret" * 5, spki(rsa_key)))
    blob[-14] ^= 0xFF  # last ciphertext byte: padding breaks
    with pytest.raises(cms.CmsError):
        cms.decrypt_ciphertext_for_recipient(bytes(blob), rsa_key)


def test_non_rsa_recipient_rejected():
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(cms.CmsError, match="RSA"):
        cms.build_ciphertext_for_recipient(b"x", spki(key))


def test_garbage_is_a_cms_error():
    with pytest.raises(cms.CmsError):
        cms.parse_ciphertext_for_recipient(b"\x30\x80\x06\x03abc")
    with pytest.raises(cms.CmsError, match="truncated|missing end-of-contents|runs past"):
        cms.ber_structure((VECTORS / "input_ber.der").read_bytes()[:-4])
