"""Fixtures of the KMS Recipient tests, a pytest plugin: the PKI that signs their attestation
documents and the enclave's RSA recipient key, one of each per test module. A test module takes
them with ``pytest_plugins = ["helpers.kms_recipient_fixtures"]`` (and never imports this module,
so that pytest loads it as a plugin)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.pki import Pki


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A fresh root and intermediates for the module's attestation documents."""
    return Pki.create()


@pytest.fixture(scope="module")
def recipient_key() -> rsa.RSAPrivateKey:
    """The enclave's RSA-2048 key pair whose public key goes in the attestation document."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
