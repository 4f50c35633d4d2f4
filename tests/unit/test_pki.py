"""The harness PKI: persistence, the AWS-shaped chain, and an independent check with openssl."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.errors import ErrorCode, NitroError
from harness.pki import PKI_DIR_ENV, Pki, split_module_id
from helpers import REPO

VECTORS = REPO / "tests" / "vectors" / "attestation"
MODULE_ID = "i-0368fa67e156d6d23-enc019b8596b1a9dad6"  # the shape of a real AWS enclave ID
AT = dt.datetime(2026, 1, 3, 20, 40, 28, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create(now=AT - dt.timedelta(days=1))


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_load_or_create_persists_root_with_private_key_0600(tmp_path):
    directory = tmp_path / "pki"
    first = Pki.load_or_create(directory)
    assert stat.S_IMODE(os.stat(directory / "root.key").st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["root.key", "root.pem"]  # no temp files left
    second = Pki.load_or_create(directory)
    assert second.root_certificate == first.root_certificate
    assert second.root_pem() == (directory / "root.pem").read_text()
    # A document signed by one instance chains to the root loaded by the other.
    leaf = first.signer_for(MODULE_ID).certificate
    assert second.root_certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == first.root_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert leaf.issuer.rfc4514_string().startswith("CN=i-0368fa67e156d6d23.us-east-1.aws.nitro-enclaves")


def test_default_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(PKI_DIR_ENV, str(tmp_path / "env-pki"))
    pki = Pki.load_or_create()
    assert (tmp_path / "env-pki" / "root.pem").read_text() == pki.root_pem()
    monkeypatch.delenv(PKI_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Pki.default_directory() == tmp_path / ".cache" / "nitro-harness" / "pki"


def test_load_errors_name_the_file(tmp_path):
    directory = tmp_path / "broken"
    Pki.load_or_create(directory)
    (directory / "root.key").unlink()
    with pytest.raises(NitroError) as err:
        Pki.load_or_create(directory)
    assert err.value.code is ErrorCode.FileOperationFailure and "root.key" in err.value.message
    other = ec.generate_private_key(ec.SECP384R1())
    (directory / "root.key").write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(NitroError) as err:
        Pki.load(directory)
    assert err.value.code is ErrorCode.InvalidArgument and "does not match" in err.value.message


def test_chain_is_shaped_like_aws(pki):
    signer = pki.signer_for(MODULE_ID, at=AT)
    root, regional, zonal, instance = signer.cabundle
    leaf = signer.certificate
    assert root == pki.root_certificate
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert regional.subject.rfc4514_string().startswith("CN=") and _cn(regional).endswith(".us-east-1.aws.nitro-enclaves")
    assert _cn(zonal).endswith(".zonal.us-east-1.aws.nitro-enclaves")
    assert _cn(instance) == "i-0368fa67e156d6d23.us-east-1.aws.nitro-enclaves"
    assert _cn(leaf) == "i-0368fa67e156d6d23-enc019b8596b1a9dad6.us-east-1.aws"
    assert leaf.subject.rfc4514_string() == (
        "CN=i-0368fa67e156d6d23-enc019b8596b1a9dad6.us-east-1.aws,OU=AWS,O=Amazon,L=Seattle,ST=Washington,C=US"
    )
    # Issuer links.
    for child, parent in ((leaf, instance), (instance, zonal), (zonal, regional), (regional, root)):
        assert child.issuer == parent.subject
        child.verify_directly_issued_by(parent)
    # P-384 and ecdsa-with-SHA384 everywhere.
    for cert in (root, regional, zonal, instance, leaf):
        assert cert.public_key().curve.name == "secp384r1"
        assert cert.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.3"
    # Path lengths and key usages.
    pathlens = [c.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length for c in (regional, zonal, instance)]
    assert pathlens == [2, 1, 0]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.content_commitment and not ku.key_cert_sign
    iku = instance.extensions.get_extension_for_class(x509.KeyUsage)
    assert iku.critical and iku.value.key_cert_sign and not iku.value.digital_signature
    # Validity: leaf 3 h (starting 3 s before the serial's time), instance 24 h, zonal ~6 d, regional ~20 d.
    assert leaf.not_valid_before_utc == AT - dt.timedelta(seconds=3)
    assert leaf.not_valid_after_utc == AT + dt.timedelta(hours=3)
    assert instance.not_valid_after_utc - instance.not_valid_before_utc == dt.timedelta(hours=24)
    assert dt.timedelta(days=5) < zonal.not_valid_after_utc - zonal.not_valid_before_utc <= dt.timedelta(days=6)
    assert dt.timedelta(days=20) <= regional.not_valid_after_utc - regional.not_valid_before_utc <= dt.timedelta(days=21)
    # Serial = enclave id (8) || 4 zero bytes || unix time (4), as on the real 2026-01-03 leaf.
    assert leaf.serial_number.to_bytes(16, "big").hex() == "019b8596b1a9dad60000000069597ebc"


def test_leaf_reuse_per_enclave_and_per_document(pki):
    first = pki.signer_for(MODULE_ID, at=AT)
    assert pki.signer_for(MODULE_ID, at=AT + dt.timedelta(minutes=90)) is first
    # Too close to the end of the leaf: a new one.
    assert pki.signer_for(MODULE_ID, at=AT + dt.timedelta(hours=2, minutes=45)) is not first
    other = pki.signer_for("i-0368fa67e156d6d23-enc0000000000000002", at=AT)
    assert other.certificate.serial_number.to_bytes(16, "big")[:8] == bytes.fromhex("0000000000000002")
    assert other.cabundle[3] == first.cabundle[3]  # same instance CA
    per_doc = Pki(pki.root_key, pki.root_certificate, leaf_per_document=True)
    assert per_doc.signer_for(MODULE_ID, at=AT).certificate != per_doc.signer_for(MODULE_ID, at=AT).certificate


def test_region_and_module_id_shapes(pki):
    eu = Pki(pki.root_key, pki.root_certificate, region="eu-central-1")
    assert _cn(eu.signer_for(MODULE_ID, at=AT).certificate).endswith(".eu-central-1.aws")
    assert split_module_id("i-1234567890abcdef0-enc5") == ("i-1234567890abcdef0", bytes.fromhex("0000000000000005"))
    instance, enclave = split_module_id("custom")
    assert instance == "i-00000000000000000" and enclave == hashlib.sha256(b"custom").digest()[:8]
    assert split_module_id("i-1-encZZ") == ("i-1", hashlib.sha256(b"i-1-encZZ").digest()[:8])


def test_signing_before_the_root_is_refused(pki):
    with pytest.raises(ValueError):
        pki.signer_for(MODULE_ID, at=pki.root_certificate.not_valid_before_utc - dt.timedelta(days=1))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_the_chain_at_the_leaf_time(pki, tmp_path):
    signer = pki.signer_for(MODULE_ID, at=AT)
    pem = serialization.Encoding.PEM
    (tmp_path / "root.pem").write_bytes(pki.root_certificate.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in signer.cabundle[1:]))
    (tmp_path / "leaf.pem").write_bytes(signer.certificate.public_bytes(pem))

    def openssl_verify(when: dt.datetime) -> subprocess.CompletedProcess:
        return subprocess.run(
            # Not -x509_strict: it demands an AKI in the leaf, which AWS's own leaves lack.
            ["openssl", "verify", "-attime", str(int(when.timestamp())),
             "-CAfile", "root.pem", "-untrusted", "chain.pem", "leaf.pem"],
            cwd=tmp_path, capture_output=True, text=True, check=False,
        )

    ok = openssl_verify(AT + dt.timedelta(minutes=1))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "leaf.pem: OK"
    late = openssl_verify(AT + dt.timedelta(hours=3, minutes=1))
    assert late.returncode != 0 and "certificate has expired" in (late.stdout + late.stderr)
    # The AWS root does not vouch for the harness chain.
    shutil.copy(VECTORS / "aws_nitro_root_g1.pem", tmp_path / "root.pem")
    foreign = openssl_verify(AT + dt.timedelta(minutes=1))
    assert foreign.returncode != 0
