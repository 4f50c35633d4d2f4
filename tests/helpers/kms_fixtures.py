"""Fixtures of the asymmetric-key and HMAC-key tests, a pytest plugin: one KMS emulator per test session whose
keys are made once per (spec, usage), since RSA_4096 keys take seconds to make. A test module
takes them with ``pytest_plugins = ["helpers.kms_fixtures"]`` (and never imports this module,
so that pytest loads it as a plugin)."""

from __future__ import annotations

import pytest

from harness.kms import KmsServer
from helpers.kms import ALICE, boto_client


@pytest.fixture(scope="session")
def kms_server():
    """A KMS emulator for the session; Alice signs the requests."""
    with KmsServer(credentials=[ALICE]) as srv:
        yield srv


@pytest.fixture(scope="session")
def kms(kms_server):
    return boto_client(kms_server)


@pytest.fixture(scope="session")
def make(kms):
    """(spec, usage) -> KeyMetadata of a key made once per session."""
    made: dict[tuple[str, str], dict] = {}

    def key(spec: str, usage: str) -> dict:
        if (spec, usage) not in made:
            made[(spec, usage)] = kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
        return made[(spec, usage)]

    return key
