"""KMS emulator: AWS JSON 1.1 over HTTP(S), key policies, attestation, CiphertextForRecipient.

docs/kms.md is the contract. boto3 (and any SigV4 client) talks to :class:`KmsServer` unchanged:
``POST /`` with ``X-Amz-Target: TrentService.<Operation>``. The package, one idea per module:

* ``wire``: AWS JSON 1.1 by botocore's KMS model (request checks, response shapes) and errors
  as KMS returns them (:class:`KmsError`).
* ``store``: keys and aliases, persisted to a JSON file with :mod:`harness.atomic_file`.
* ``service``: :class:`KmsService`, one request dispatched to its operation, key-policy checks.
* ``keys``, ``aliases``, ``crypto``, ``data_key_pairs``, ``signing``, ``mac``, ``key_agreement``:
  the operations, one function each; ``key_use``: the checks every key operation makes.
* ``key_specs``: key specs, their key usages and algorithms; ``asymmetric``: key pairs and their
  primitives (signatures, RSAES-OAEP, ECDH).
* ``blob``: the emulator's opaque symmetric ciphertext blob; ``ciphertext``: blob or RSAES-OAEP
  by key spec.
* ``recipient``: ``Recipient`` attestation documents and ``CiphertextForRecipient``.
* ``cms``: the CMS EnvelopedData bytes of a CiphertextForRecipient.
* ``policy``: IAM-style key policy evaluation.
* ``credentials``, ``sigv4``: access keys and AWS Signature Version 4 checks.
* ``tls``: the TLS identity for ``kms.<region>.amazonaws.com``; ``server``: :class:`KmsServer`.
"""

from __future__ import annotations

from harness.kms.credentials import KmsCredential
from harness.kms.server import KmsServer
from harness.kms.service import KmsService
from harness.kms.sigv4 import SigV4Verifier
from harness.kms.tls import TlsIdentity, ensure_tls_identity
from harness.kms.wire import KmsError, service_model

# The name benchmarks/bench_kms.py imports the SigV4 check by.
_SigV4 = SigV4Verifier

__all__ = [
    "KmsError",
    "KmsCredential",
    "KmsServer",
    "KmsService",
    "TlsIdentity",
    "ensure_tls_identity",
    "service_model",
]
