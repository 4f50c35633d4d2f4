"""Symmetric ciphertext blobs: the emulator's own opaque format (docs/kms.md).

``b"NHK" 0x01`` || key id (36 ASCII bytes) || 12-byte IV || AES-256-GCM ciphertext and tag,
with the key id and the encryption context (canonical JSON) as additional authenticated data.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any
from collections.abc import Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness.kms.wire import KmsError

__all__ = ["blob_key_id", "seal", "unseal"]

_BLOB_MAGIC = b"NHK\x01"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _encryption_context_aad(context: Mapping[str, str] | None) -> bytes:
    """Canonical bytes of an encryption context (order-independent, as KMS treats it)."""
    return json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":")).encode()


def seal(key: Mapping[str, Any], plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
    """Encrypt ``plaintext`` under ``key`` (a key record: ``KeyId``, base64 ``Material``)
    bound to the encryption ``context``; returns the blob (52 + len(plaintext) + 16 bytes)."""
    material = base64.b64decode(key["Material"])
    iv = os.urandom(12)
    key_id = key["KeyId"].encode()
    sealed = AESGCM(material).encrypt(iv, plaintext, key_id + _encryption_context_aad(context))
    return _BLOB_MAGIC + key_id + iv + sealed


def blob_key_id(blob: bytes) -> str:
    """The key id a blob names; InvalidCiphertextException when ``blob`` is not one of ours."""
    if len(blob) < 4 + 36 + 12 + 16 or blob[:4] != _BLOB_MAGIC:
        raise KmsError("InvalidCiphertextException", "The ciphertext is not a ciphertext blob of this KMS")
    key_id = blob[4:40].decode("ascii", "replace")
    if not _KEY_ID_RE.match(key_id):
        raise KmsError("InvalidCiphertextException", "The ciphertext is not a ciphertext blob of this KMS")
    return key_id


def unseal(key: Mapping[str, Any], blob: bytes, context: Mapping[str, str] | None) -> bytes:
    """The plaintext of ``blob`` under ``key`` and ``context``; InvalidCiphertextException when
    the tag does not verify (wrong key, altered blob or different encryption context)."""
    material = base64.b64decode(key["Material"])
    try:
        return AESGCM(material).decrypt(
            blob[40:52], blob[52:], key["KeyId"].encode() + _encryption_context_aad(context)
        )
    except Exception:  # cryptography raises InvalidTag
        raise KmsError(
            "InvalidCiphertextException",
            "The ciphertext or its encryption context does not match (authentication failed)",
        ) from None
