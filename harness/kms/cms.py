"""CiphertextForRecipient: the CMS EnvelopedData that KMS returns to an attested enclave.

docs/kms.md fixes the bytes. Real KMS writes BER, not DER: ContentInfo, its ``[0]``, EnvelopedData,
EncryptedContentInfo and the ``[0]`` encryptedContent use indefinite lengths (``30 80`` /
``a0 80`` ... ``00 00``) while the RecipientInfos SET, the KeyTransRecipientInfo and every
AlgorithmIdentifier use definite lengths. The Nitro Enclaves SDK's parser
(aws-nitro-enclaves-sdk-c) rejects plain DER, so :func:`build_ciphertext_for_recipient` writes
this exact layout by hand (no ASN.1 library emits this BER mix); reading goes through
``asn1crypto``, which accepts BER, plus :func:`ber_structure` for checking the length forms.

Layout written (``L`` = definite length, ``80`` = indefinite)::

    30 80                                   ContentInfo
      06 09 2a864886f70d010703              id-envelopedData
      a0 80                                 [0] EXPLICIT
        30 80                               EnvelopedData
          02 01 02                          version 2
          31 L                              RecipientInfos (SET, definite)
            30 L                            KeyTransRecipientInfo
              02 01 02                      version 2
              80 20 <32 bytes>              rid [0] subjectKeyIdentifier = SHA-256(SPKI DER)
              30 3c                         RSAES-OAEP {SHA-256 + NULL, MGF1(SHA-256 + NULL)}
              04 82 0100 <256 bytes>        encryptedKey (RSA-2048)
          30 80                             EncryptedContentInfo
            06 09 2a864886f70d010701        id-data
            30 1d 06 09 60864801650304012a 04 10 <IV>    AES-256-CBC
            a0 80 04 L <ciphertext> 00 00   [0] encryptedContent
          00 00
        00 00
      00 00
    00 00
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from collections.abc import Callable

from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives import hashes, padding as sym_padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "CmsError",
    "BerNode",
    "KeyTransRecipient",
    "EnvelopedData",
    "subject_key_identifier",
    "build_ciphertext_for_recipient",
    "parse_ciphertext_for_recipient",
    "decrypt_ciphertext_for_recipient",
    "ber_structure",
]

# DER encodings of the OIDs and AlgorithmIdentifiers docs/kms.md fixes.
_OID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_AES256_CBC = bytes.fromhex("060960864801650304012a")  # 2.16.840.1.101.3.4.1.42
_SHA256_ALG = bytes.fromhex("300d06096086480165030402010500")  # sha256 with NULL parameters
_MGF1_OID = bytes.fromhex("06092a864886f70d010108")  # 1.2.840.113549.1.1.8
_OAEP_OID = bytes.fromhex("06092a864886f70d010107")  # 1.2.840.113549.1.1.7
_EOC = b"\x00\x00"

_OAEP_SHA256 = rsa_padding.OAEP(
    mgf=rsa_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


class CmsError(ValueError):
    """A CiphertextForRecipient that cannot be built, parsed or decrypted.

    The message names the field and the rule (docs/kms.md) that failed.
    """


def _der_len(n: int) -> bytes:
    """DER definite length octets for ``n`` bytes of content."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    """One definite-length TLV."""
    return bytes([tag]) + _der_len(len(content)) + content


def _oaep_algorithm_identifier() -> bytes:
    """RSAES-OAEP AlgorithmIdentifier with SHA-256 and MGF1-SHA-256, NULL hash parameters.

    docs/kms.md: parameters are written with NULLs, as in the real KMS blobs (``30 3c ...``); the
    pSourceAlgorithm is left at its DEFAULT (omitted).
    """
    hash_field = _tlv(0xA0, _SHA256_ALG)  # [0] hashAlgorithm
    mgf_field = _tlv(0xA1, _tlv(0x30, _MGF1_OID + _SHA256_ALG))  # [1] maskGenAlgorithm
    return _tlv(0x30, _OAEP_OID + _tlv(0x30, hash_field + mgf_field))


def subject_key_identifier(spki_der: bytes) -> bytes:
    """Return the rid KMS writes for a recipient: SHA-256 of its DER SubjectPublicKeyInfo.

    ``spki_der``: the attestation document's ``public_key`` (DER SPKI). 32 bytes out.
    Source: docs/kms.md (the SDK's kmstool matches the recipient by this digest).
    """
    return hashlib.sha256(spki_der).digest()


def _load_rsa_spki(spki_der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError) as err:
        raise CmsError(f"recipient public_key: not a DER SubjectPublicKeyInfo ({err})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise CmsError(
            "recipient public_key: must be an RSA key (docs/kms.md: KeyEncryptionAlgorithm RSAES_OAEP_SHA_256)"
        )
    return key


def build_ciphertext_for_recipient(
    plaintext: bytes,
    recipient_spki_der: bytes,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Encrypt ``plaintext`` to an enclave's RSA key as KMS's BER CiphertextForRecipient.

    ``plaintext``: the secret (data key, random bytes, private key; any length).
    ``recipient_spki_der``: RSA public key as DER SubjectPublicKeyInfo (the attestation
    document's ``public_key``; RSA-2048 in the SDK, any RSA size accepted here).
    ``random_bytes(n)``: source of the 32-byte content key and 16-byte IV (tests may pin it).
    Returns the BER bytes laid out exactly as docs/kms.md says (see the module docstring).
    Raises :class:`CmsError` when the key is not an RSA SPKI.
    """
    public_key = _load_rsa_spki(recipient_spki_der)
    content_key = random_bytes(32)
    iv = random_bytes(16)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted_content = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = public_key.encrypt(content_key, _OAEP_SHA256)

    ktri = _tlv(
        0x30,
        b"\x02\x01\x02"  # version 2: rid is a subjectKeyIdentifier (RFC 5652 6.2.1)
        + _tlv(0x80, subject_key_identifier(recipient_spki_der))
        + _oaep_algorithm_identifier()
        + _tlv(0x04, encrypted_key),
    )
    recipient_infos = _tlv(0x31, ktri)
    content_alg = _tlv(0x30, _OID_AES256_CBC + _tlv(0x04, iv))
    encrypted_content_info = (
        b"\x30\x80" + _OID_DATA + content_alg + b"\xa0\x80" + _tlv(0x04, encrypted_content) + _EOC + _EOC
    )
    enveloped = b"\x30\x80" + b"\x02\x01\x02" + recipient_infos + encrypted_content_info + _EOC
    return b"\x30\x80" + _OID_ENVELOPED_DATA + b"\xa0\x80" + enveloped + _EOC + _EOC


@dataclass(frozen=True)
class KeyTransRecipient:
    """One KeyTransRecipientInfo of a parsed blob.

    ``version`` (int, 2 for an SKI rid), ``subject_key_identifier`` (bytes; 32 bytes in KMS
    blobs), ``key_encryption_algorithm`` (asn1crypto name, e.g. ``"rsaes_oaep"``),
    ``oaep_hash`` and ``mgf1_hash`` (names, e.g. ``"sha256"``; None if not OAEP),
    ``encrypted_key`` (bytes, RSA modulus size).
    """

    version: int
    subject_key_identifier: bytes
    key_encryption_algorithm: str
    oaep_hash: str | None
    mgf1_hash: str | None
    encrypted_key: bytes


@dataclass(frozen=True)
class EnvelopedData:
    """A parsed CiphertextForRecipient (CMS EnvelopedData).

    ``version`` (int), ``recipients`` (list of :class:`KeyTransRecipient`), ``content_type``
    (``"data"``), ``content_encryption_algorithm`` (``"aes256_cbc"``), ``iv`` (16 bytes),
    ``encrypted_content`` (bytes, a multiple of 16).
    """

    version: int
    recipients: list[KeyTransRecipient] = field(default_factory=list)
    content_type: str = ""
    content_encryption_algorithm: str = ""
    iv: bytes = b""
    encrypted_content: bytes = b""


def parse_ciphertext_for_recipient(blob: bytes) -> EnvelopedData:
    """Parse a CiphertextForRecipient (BER or DER) into an :class:`EnvelopedData`.

    Accepts real KMS output (``tests/vectors/kms/input_ber*.der``) and this module's own.
    Raises :class:`CmsError` naming the field when the blob is not a ContentInfo holding an
    EnvelopedData with KeyTransRecipientInfos and AES-CBC content (docs/kms.md).
    """
    try:
        info = asn1_cms.ContentInfo.load(bytes(blob), strict=True)
        if info["content_type"].native != "enveloped_data":
            raise CmsError(
                f"ContentInfo.contentType: {info['content_type'].dotted}, expected "
                "1.2.840.113549.1.7.3 (envelopedData)"
            )
        enveloped = info["content"]
        recipients = []
        for index, choice in enumerate(enveloped["recipient_infos"]):
            if choice.name != "ktri":
                raise CmsError(f"RecipientInfos[{index}]: {choice.name}, expected a KeyTransRecipientInfo")
            ktri = choice.chosen
            rid = ktri["rid"]
            if rid.name != "subject_key_identifier":
                raise CmsError(f"RecipientInfos[{index}].rid: {rid.name}, expected [0] subjectKeyIdentifier")
            algorithm = ktri["key_encryption_algorithm"]
            oaep_hash = mgf1_hash = None
            if algorithm["algorithm"].native == "rsaes_oaep":
                params = algorithm["parameters"]
                oaep_hash = params["hash_algorithm"]["algorithm"].native
                mgf1_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
            recipients.append(
                KeyTransRecipient(
                    version=int(ktri["version"].native[1:]),
                    subject_key_identifier=rid.chosen.native,
                    key_encryption_algorithm=algorithm["algorithm"].native,
                    oaep_hash=oaep_hash,
                    mgf1_hash=mgf1_hash,
                    encrypted_key=ktri["encrypted_key"].native,
                )
            )
        content_info = enveloped["encrypted_content_info"]
        content_alg = content_info["content_encryption_algorithm"]
        encrypted_content = content_info["encrypted_content"].native
        result = EnvelopedData(
            version=int(enveloped["version"].native[1:]),
            recipients=recipients,
            content_type=content_info["content_type"].native,
            content_encryption_algorithm=content_alg["algorithm"].native,
            iv=content_alg["parameters"].native,
            encrypted_content=encrypted_content or b"",
        )
    except CmsError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise CmsError(f"CiphertextForRecipient: not a CMS EnvelopedData ({err})") from None
    except (AttributeError, IndexError):
        # asn1crypto parses lazily: a field of another universal type than CMS puts there (an
        # INSTANCE OF, an ObjectDescriptor where the IV belongs) fails only when it is read.
        raise CmsError("CiphertextForRecipient: not a CMS EnvelopedData (a field holds another "
                       "ASN.1 type than CMS defines there)") from None
    if not result.recipients:
        raise CmsError("EnvelopedData.recipientInfos: empty, expected one recipient")
    if (not result.content_encryption_algorithm.startswith("aes")
            or not isinstance(result.iv, bytes) or len(result.iv) != 16):
        raise CmsError(
            "EncryptedContentInfo.contentEncryptionAlgorithm: expected AES-CBC with a "
            f"16-byte IV, got {result.content_encryption_algorithm}"
        )
    return result


def decrypt_ciphertext_for_recipient(blob: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt a CiphertextForRecipient with the enclave's RSA private key.

    Picks the recipient whose subjectKeyIdentifier equals SHA-256 of ``private_key``'s public
    SPKI (docs/kms.md), unwraps the content key with RSAES-OAEP (SHA-256/MGF1-SHA-256) and removes
    AES-CBC + PKCS#7. Returns the plaintext bytes. Raises :class:`CmsError` when no recipient
    matches the key, the algorithms are not KMS's, or the key or padding is wrong.
    """
    parsed = parse_ciphertext_for_recipient(blob)
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ski = subject_key_identifier(spki)
    for recipient in parsed.recipients:
        if recipient.subject_key_identifier == ski:
            break
    else:
        raise CmsError(
            "RecipientInfos: no recipient's subjectKeyIdentifier equals SHA-256 of this key's "
            f"SubjectPublicKeyInfo ({ski.hex()})"
        )
    if (recipient.key_encryption_algorithm, recipient.oaep_hash, recipient.mgf1_hash) != (
        "rsaes_oaep",
        "sha256",
        "sha256",
    ):
        raise CmsError(
            "KeyTransRecipientInfo.keyEncryptionAlgorithm: expected RSAES-OAEP with SHA-256 "
            f"and MGF1-SHA-256, got {recipient.key_encryption_algorithm}/"
            f"{recipient.oaep_hash}/{recipient.mgf1_hash}"
        )
    try:
        content_key = private_key.decrypt(recipient.encrypted_key, _OAEP_SHA256)
    except ValueError:
        raise CmsError(
            "KeyTransRecipientInfo.encryptedKey: RSAES-OAEP decryption failed (wrong key)"
        ) from None
    if len(parsed.encrypted_content) % 16 or not parsed.encrypted_content:
        raise CmsError("EncryptedContentInfo.encryptedContent: not a whole number of blocks")
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(parsed.iv)).decryptor()
    padded = decryptor.update(parsed.encrypted_content) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CmsError("EncryptedContentInfo.encryptedContent: bad PKCS#7 padding") from None


#: How deep :func:`ber_structure` follows constructed TLVs: a CiphertextForRecipient nests 11
#: levels (docs/kms.md); the bound keeps a hostile blob from exhausting the stack.
MAX_BER_DEPTH = 32


@dataclass
class BerNode:
    """One BER TLV: ``tag`` (identifier octet, e.g. 0x30), ``indefinite`` (bool),
    ``length`` (content bytes, EOC excluded), ``children`` (constructed only)."""

    tag: int
    indefinite: bool
    length: int
    children: list[BerNode] = field(default_factory=list)

    def shape(self) -> tuple:
        """Tags and length forms, without lengths: ``(tag, indefinite, (child shapes...))``.

        Two blobs with equal shapes use the same BER structure (docs/kms.md's mix of
        indefinite and definite lengths)."""
        return (self.tag, self.indefinite, tuple(child.shape() for child in self.children))


def ber_structure(blob: bytes) -> BerNode:
    """Walk ``blob`` as BER (single-byte tags) and return its TLV tree.

    Used to check that a CiphertextForRecipient keeps docs/kms.md's indefinite/definite layout.
    Raises :class:`CmsError` on truncation, a bad length, trailing bytes, or nesting deeper than
    :data:`MAX_BER_DEPTH`.
    """

    def parse(offset: int, end: int, depth: int = 0) -> tuple[BerNode, int]:
        if depth > MAX_BER_DEPTH:
            raise CmsError(f"BER: nesting deeper than {MAX_BER_DEPTH} levels at offset {offset}")
        if offset + 2 > end:
            raise CmsError(f"BER: truncated TLV at offset {offset}")
        tag = blob[offset]
        if tag & 0x1F == 0x1F:
            raise CmsError(f"BER: multi-byte tag at offset {offset} is not used by CMS here")
        first = blob[offset + 1]
        pos = offset + 2
        constructed = bool(tag & 0x20)
        if first == 0x80:
            if not constructed:
                raise CmsError(f"BER: indefinite length on a primitive at offset {offset}")
            node = BerNode(tag, True, 0)
            while True:
                if pos + 2 > end:
                    raise CmsError(f"BER: missing end-of-contents for offset {offset}")
                if blob[pos] == 0 and blob[pos + 1] == 0:
                    node.length = pos - (offset + 2)
                    return node, pos + 2
                child, pos = parse(pos, end, depth + 1)
                node.children.append(child)
        if first & 0x80:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + count > end:
                raise CmsError(f"BER: bad length octets at offset {offset}")
            length = int.from_bytes(blob[pos : pos + count], "big")
            pos += count
        else:
            length = first
        if pos + length > end:
            raise CmsError(f"BER: length {length} at offset {offset} runs past the end")
        node = BerNode(tag, False, length)
        if constructed:
            child_pos = pos
            while child_pos < pos + length:
                child, child_pos = parse(child_pos, pos + length, depth + 1)
                node.children.append(child)
        return node, pos + length

    root, end = parse(0, len(blob))
    if end != len(blob):
        raise CmsError(f"BER: {len(blob) - end} trailing bytes after the ContentInfo")
    return root
