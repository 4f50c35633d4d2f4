"""Fuzz target: the CMS EnvelopedData parser for KMS's CiphertextForRecipient.

One input is one blob. It goes through :func:`harness.kms.cms.ber_structure` (the BER length
forms), :func:`harness.kms.cms.parse_ciphertext_for_recipient` and
:func:`harness.kms.cms.decrypt_ciphertext_for_recipient` with a fixed RSA-2048 key (the
generated seeds are addressed to it, so unwrapping and unpadding are reached);
docs/kms.md#ciphertextforrecipient. Declared errors: ``CmsError``. Each of the three runs
whatever the others said, since one refusing the blob does not stop the next from reading it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from harness.kms.cms import (
    CmsError, ber_structure, decrypt_ciphertext_for_recipient, parse_ciphertext_for_recipient,
)

NAME = "cms"
DECLARED = (CmsError,)
#: The real KMS blobs are 457 and 493 bytes.
MAX_LEN = 2048

#: The recipient key of the generated seeds. Fixed so that seeds written once keep
#: decrypting; it protects nothing.
KEY_PATH = Path(__file__).resolve().parents[1] / "keys" / "cms_recipient.pem"


@functools.cache
def recipient_key() -> rsa.RSAPrivateKey:
    """The fixed RSA-2048 recipient key the generated seeds are encrypted to."""
    key = load_pem_private_key(KEY_PATH.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def one_input(data: bytes) -> None:
    """Walk, parse and decrypt ``data`` as a CiphertextForRecipient."""
    with contextlib.suppress(CmsError):
        ber_structure(data)
    with contextlib.suppress(CmsError):
        parse_ciphertext_for_recipient(data)
    decrypt_ciphertext_for_recipient(data, recipient_key())
