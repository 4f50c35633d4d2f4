"""PCR arithmetic against the check values of docs/pcrs.md#parent-pcrs and independently
computed hashes."""

import hashlib

import pytest

from harness import pcr


def test_pcr3_role_arn_check_value():
    # Check value for PCR3 (docs/pcrs.md#parent-pcrs).
    assert pcr.pcr_for_role_arn("arn:aws:iam::123456789012:role/Webserver").hex() == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef"
        "4fc1f1a452e315b9e98f9e312e6921e6")


def test_pcr4_instance_id_check_value():
    # Check value for PCR4 (docs/pcrs.md#parent-pcrs).
    assert pcr.pcr_for_instance_id("i-1234567890abcdef0").hex() == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812"
        "719327281c401a67a10fcba87ae79ce0")


def test_ext_is_extend_of_zero_pcr():
    data = b"some measured bytes"
    assert pcr.ext(data) == hashlib.sha384(b"\0" * 48 + data).digest()
    assert pcr.ZERO_PCR == bytes(48)


def test_extend_chains():
    a = pcr.extend(pcr.ZERO_PCR, b"one")
    b = pcr.extend(a, b"two")
    assert b == hashlib.sha384(hashlib.sha384(bytes(48) + b"one").digest() + b"two").digest()
    with pytest.raises(ValueError):
        pcr.extend(b"short", b"x")


def test_pcr8_from_certificate_der():
    der = b"0\x82fake-der"
    assert pcr.pcr_for_certificate_der(der) == pcr.ext(hashlib.sha384(der).digest())


def test_measurements_json_shape():
    m = pcr.Measurements(b"\x01" * 48, b"\x02" * 48, b"\xab" * 48)
    j = m.to_json()
    assert list(j) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert j["HashAlgorithm"] == "Sha384 { ... }"
    assert j["PCR2"] == "ab" * 48  # lower-case hex
    signed = pcr.Measurements(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\xcd" * 48)
    assert list(signed.to_json()) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert signed.as_dict()[8] == b"\xcd" * 48
