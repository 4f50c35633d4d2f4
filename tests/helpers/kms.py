"""Shared by the KMS emulator and vsock-proxy tests: the account, principals and PCR0 they use,
attestation documents for a recipient key, an enclave-only key policy (docs/kms.md), the TLS
identity, the guest's kms_client.py with the interpreter that runs it, a boto3 client for an
emulator, the KMS error of a ClientError, and the openssl binary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.config import Config
from cryptography.hazmat.primitives import serialization

from harness import attestation
from harness.kms import KmsCredential, ensure_tls_identity
from helpers import REPO

ACCOUNT = "111122223333"
REGION = "us-east-1"
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
IMAGE_PCR0 = bytes(range(48))
GUEST_CLIENT = REPO / "harness" / "data" / "guest" / "kms_client.py"
# The guest client runs under this interpreter; point it at a venv with the image's versions
# (cryptography 38.0.4, asn1crypto 1.5.1) to check the guest's APIs on the host.
GUEST_PYTHON = os.environ.get("NITRO_HARNESS_GUEST_PYTHON", sys.executable)
ALICE = KmsCredential("AKIDALICE", "alice-secret", f"arn:aws:iam::{ACCOUNT}:user/alice")
BOB = KmsCredential("AKIDBOB", "bob-secret", f"arn:aws:iam::{ACCOUNT}:user/bob")


def spki_of(key) -> bytes:
    """DER SubjectPublicKeyInfo of ``key``'s public key."""
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pcrs_with(pcr0: bytes) -> dict[int, bytes]:
    """PCR0-15 of an enclave whose image measures ``pcr0`` (PCR1 equal, PCR2 fixed, the rest zero)."""
    pcrs = {i: bytes(48) for i in range(16)}
    pcrs[0] = pcrs[1] = pcr0
    pcrs[2] = bytes([2]) * 48
    return pcrs


def document(pki, key, pcr0=IMAGE_PCR0) -> bytes:
    """An attestation document signed by ``pki`` carrying ``key``'s public key and ``pcr0``."""
    return attestation.build_document(pki, module_id=MODULE_ID, pcrs=pcrs_with(pcr0), public_key=spki_of(key))


def enclave_policy(*pcr0_values: str) -> str:
    """Alice administers the key; Decrypt only from an enclave whose PCR0 is listed."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Admin",
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE.principal_arn},
                    "NotAction": "kms:Decrypt",
                    "Resource": "*",
                },
                {
                    "Sid": "EnclaveDecrypt",
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE.principal_arn},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {
                        "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": list(pcr0_values)}
                    },
                },
            ],
        }
    )


def make_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """CA, server certificate and key for kms.<region>.amazonaws.com (what the image trusts)."""
    identity = ensure_tls_identity(tmp_path, region=REGION)
    return identity.ca_certificate, identity.certificate, identity.private_key


def boto_client(server, cred: KmsCredential | None = ALICE):
    """A boto3 KMS client for a running ``KmsServer`` signing as ``cred`` (no retries)."""
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name=REGION,
        aws_access_key_id=cred.access_key_id if cred else "AKIDANY",
        aws_secret_access_key=cred.secret_access_key if cred else "any",
        config=Config(retries={"max_attempts": 1}),
    )


def error_of(excinfo) -> tuple[str, str]:
    """(KMS error code, message) of a ``pytest.raises(ClientError)`` result."""
    err = excinfo.value.response["Error"]
    return err["Code"], err["Message"]


def openssl(*args: str | os.PathLike, data: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the real ``openssl`` binary with ``args`` (stdin ``data``); output as bytes, never raises."""
    return subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True, timeout=60)
