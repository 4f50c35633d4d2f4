#!/usr/bin/env python3
"""Enclave-side KMS client, in the manner of the Nitro Enclaves SDK's kmstool-enclave-cli.

Runs inside the harness's ``python`` image (Debian bookworm: python3.11, python3-cryptography
38, python3-asn1crypto 1.5, PyPI ``aws-nsm-interface`` for /dev/nsm) and, for tests, on the
host. Self-contained on purpose: the image carries this one file, no harness package, no
botocore.

What it does, as the SDK does (docs/kms.md#enclave-client):

1. generates an RSA-2048 key pair in memory;
2. asks /dev/nsm (``aws_nsm_interface.get_attestation_doc``) for an attestation document whose
   ``public_key`` is that key's DER SubjectPublicKeyInfo;
3. sends the KMS request with ``Recipient = {KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256,
   AttestationDocument}``, signed with SigV4 (by hand), as HTTP/1.1 over TLS (SNI and
   certificate name ``kms.<region>.amazonaws.com``) over AF_VSOCK to CID 3 port 8000, where the
   parent's vsock-proxy forwards to KMS;
4. decrypts the ``CiphertextForRecipient`` (CMS EnvelopedData, BER: RSAES-OAEP-SHA-256 key
   transport to the recipient whose subjectKeyIdentifier = SHA-256(SPKI), AES-256-CBC content)
   and prints ``PLAINTEXT: <base64>`` like kmstool-enclave-cli.

Commands (kmstool-enclave-cli's names and options)::

    kms_client.py decrypt   --region R --ciphertext B64 [--key-id K] [--encryption-algorithm A]
                            [--encryption-context JSON]
    kms_client.py genkey    --region R --key-id K --key-spec AES-256|AES-128
    kms_client.py genrandom --region R --length N

Common options: ``--proxy-port 8000``, ``--proxy-cid 3``, ``--aws-access-key-id``,
``--aws-secret-access-key``, ``--aws-session-token`` (or the usual AWS_* environment
variables), ``--ca-file`` (trust store; default the system's). Host-testing options:
``--endpoint HOST:PORT`` (TCP instead of vsock), ``--no-tls``, ``--attestation-doc FILE`` plus
``--private-key PEM`` (a prepared document and the key it names, instead of /dev/nsm), and
``--no-recipient`` (call without attestation, the "host without attestation" case).

Exit status 0 on success; 1 with ``kms_client: <ErrorType>: <message>`` on stderr otherwise.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import socket
import ssl
import sys

SERVICE = "kms"
PARENT_CID = 3
DEFAULT_PROXY_PORT = 8000


class ClientError(Exception):
    """A failure to report as ``kms_client: <kind>: <message>``."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# --- SigV4 (AWS Signature Version 4), written out so the guest needs no botocore -----------


def _hmac(key, text):
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sign_request(headers, body, *, access_key, secret_key, session_token, region, now=None):
    """Add ``X-Amz-Date``, optional ``X-Amz-Security-Token`` and ``Authorization`` to
    ``headers`` (a dict holding at least ``Host``, ``Content-Type`` and ``X-Amz-Target``)
    for ``POST /`` with ``body`` (bytes). Signs every header present, in lower case."""
    now = now or datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers["X-Amz-Date"] = amz_date
    if session_token:
        headers["X-Amz-Security-Token"] = session_token
    lowered = sorted((name.lower(), " ".join(str(value).split())) for name, value in headers.items())
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in lowered)
    signed_headers = ";".join(name for name, _ in lowered)
    canonical_request = "\n".join(
        ["POST", "/", "", canonical_headers, signed_headers, hashlib.sha256(body).hexdigest()]
    )
    scope = f"{day}/{region}/{SERVICE}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), day)
    key = _hmac(key, region)
    key = _hmac(key, SERVICE)
    key = _hmac(key, "aws4_request")
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return headers


# --- transport: HTTP/1.1 over TLS over AF_VSOCK (or TCP for host tests) ---------------------


class _Connection(http.client.HTTPConnection):
    """http.client over a socket we open ourselves (vsock or TCP), optionally TLS-wrapped."""

    def __init__(self, opener, tls_context, server_name, timeout):
        super().__init__(server_name, timeout=timeout)
        self._opener = opener
        self._tls_context = tls_context
        self._server_name = server_name

    def connect(self):
        raw = self._opener(self.timeout)
        if self._tls_context is not None:
            raw = self._tls_context.wrap_socket(raw, server_hostname=self._server_name)
        self.sock = raw


def _vsock_opener(cid, port):
    def open_socket(timeout):
        if not hasattr(socket, "AF_VSOCK"):
            raise ClientError("ConnectionError", "this Python has no AF_VSOCK; use --endpoint HOST:PORT")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((cid, port))
        except OSError as err:
            sock.close()
            raise ClientError("ConnectionError", f"vsock {cid}:{port}: {err.strerror or err}") from None
        return sock

    return open_socket


def _tcp_opener(endpoint):
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")

    def open_socket(timeout):
        try:
            return socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as err:
            raise ClientError("ConnectionError", f"tcp {endpoint}: {err.strerror or err}") from None

    return open_socket


class KmsClient:
    """Calls KMS operations (AWS JSON 1.1) and returns the decoded JSON answers.

    ``region``: the KMS Region (SigV4 scope, Host header, SNI ``kms.<region>.amazonaws.com``).
    ``opener(timeout) -> socket``: how to reach the proxy (vsock CID 3 port 8000 by default).
    ``tls_context``: an ``ssl.SSLContext`` or None for plain HTTP (host tests only).
    """

    def __init__(self, region, credentials, opener, tls_context, timeout=30.0):
        self.region = region
        self.credentials = credentials
        self.host = f"kms.{region}.amazonaws.com"
        self.connection = _Connection(opener, tls_context, self.host, timeout)

    def call(self, operation, params):
        """POST one operation; returns the response dict or raises :class:`ClientError` with
        the KMS error type (``__type``) and message."""
        body = json.dumps(params, separators=(",", ":")).encode()
        headers = {
            "Host": self.host,
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        }
        if self.credentials.get("access_key"):
            sign_request(
                headers,
                body,
                access_key=self.credentials["access_key"],
                secret_key=self.credentials.get("secret_key") or "",
                session_token=self.credentials.get("session_token"),
                region=self.region,
            )
        try:
            self.connection.request("POST", "/", body=body, headers=headers)
            response = self.connection.getresponse()
            data = response.read()
        except ssl.SSLError as err:
            raise ClientError("TLSError", f"{self.host}: {err}") from None
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, ClientError):
                raise
            raise ClientError("ConnectionError", f"{self.host}: {err}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise ClientError("ResponseError", f"HTTP {response.status}: body is not JSON") from None
        if response.status != 200:
            kind = str(answer.get("__type", f"HTTP{response.status}")).rpartition("#")[2]
            raise ClientError(kind, answer.get("message") or answer.get("Message") or "")
        if not isinstance(answer, dict):
            raise ClientError("ResponseError", "response is not a JSON object")
        return answer

    def close(self):
        self.connection.close()


# --- attestation and the recipient key ---------------------------------------------------------


def _spki_der(private_key):
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def recipient_from_nsm():
    """Generate an RSA-2048 key and get an attestation document naming it from /dev/nsm.

    Returns (private_key, document bytes)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        import aws_nsm_interface
    except ImportError:
        raise ClientError("NsmError", "python package aws-nsm-interface is not installed") from None
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        try:
            handle = aws_nsm_interface.open_nsm_device()
        except OSError:
            # The package's buffered text open needs a seekable file; the upstream nsm driver
            # (Linux 6.8+) has no llseek, so open the descriptor unbuffered (nsm_tool.py has
            # the same fallback and explains it).
            handle = open(aws_nsm_interface.NSM_DEV_FILE, "r+b", buffering=0)
    except OSError as err:
        raise ClientError("NsmError", f"/dev/nsm: {err.strerror or err}") from None
    try:
        answer = aws_nsm_interface.get_attestation_doc(handle, public_key=_spki_der(private_key))
    except Exception as err:  # the package raises IoctlError or OSError
        raise ClientError("NsmError", f"Attestation request failed: {err}") from None
    finally:
        aws_nsm_interface.close_nsm_device(handle)
    return private_key, bytes(answer["document"])


def recipient_from_files(document_path, key_path):
    """A prepared attestation document and the PEM private key whose public half it names."""
    from cryptography.hazmat.primitives import serialization

    try:
        with open(document_path, "rb") as fh:
            document = fh.read()
        with open(key_path, "rb") as fh:
            private_key = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError) as err:
        raise ClientError("InputError", f"recipient files: {err}") from None
    return private_key, document


def decrypt_for_recipient(blob, private_key):
    """Decrypt a CiphertextForRecipient (CMS EnvelopedData, BER) with ``private_key``.

    docs/kms.md#ciphertextforrecipient: one KeyTransRecipientInfo whose rid is [0]
    subjectKeyIdentifier = SHA-256 of our SPKI; RSAES-OAEP with SHA-256 and MGF1-SHA-256; content
    AES-256-CBC with PKCS#7 padding.
    """
    from asn1crypto import cms
    from cryptography.hazmat.primitives import hashes, padding as sym_padding
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    try:
        info = cms.ContentInfo.load(blob)
        if info["content_type"].native != "enveloped_data":
            raise ValueError("ContentInfo does not hold EnvelopedData")
        enveloped = info["content"]
        wanted = hashlib.sha256(_spki_der(private_key)).digest()
        encrypted_key = None
        for choice in enveloped["recipient_infos"]:
            if choice.name != "ktri":
                continue
            ktri = choice.chosen
            rid = ktri["rid"]
            if rid.name == "subject_key_identifier" and rid.chosen.native == wanted:
                algorithm = ktri["key_encryption_algorithm"]
                if algorithm["algorithm"].native != "rsaes_oaep":
                    raise ValueError(f"key encryption {algorithm['algorithm'].native}, expected rsaes_oaep")
                params = algorithm["parameters"]
                if params["hash_algorithm"]["algorithm"].native != "sha256":
                    raise ValueError("OAEP hash is not SHA-256")
                encrypted_key = ktri["encrypted_key"].native
                break
        if encrypted_key is None:
            raise ValueError("no recipient matches SHA-256 of our public key")
        content = enveloped["encrypted_content_info"]
        algorithm = content["content_encryption_algorithm"]
        if algorithm["algorithm"].native != "aes256_cbc":
            raise ValueError(f"content encryption {algorithm['algorithm'].native}, expected aes256_cbc")
        iv = algorithm["parameters"].native
        ciphertext = content["encrypted_content"].native
    except (ValueError, KeyError, TypeError) as err:
        raise ClientError("CmsError", f"CiphertextForRecipient: {err}") from None
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    try:
        content_key = private_key.decrypt(encrypted_key, oaep)
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = sym_padding.PKCS7(128).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as err:
        raise ClientError("CmsError", f"CiphertextForRecipient: decryption failed ({err})") from None


# --- commands -----------------------------------------------------------------------------------


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _recipient(args):
    if args.no_recipient:
        return None, None
    if args.attestation_doc or args.private_key:
        if not (args.attestation_doc and args.private_key):
            raise ClientError("InputError", "--attestation-doc and --private-key go together")
        key, document = recipient_from_files(args.attestation_doc, args.private_key)
    else:
        key, document = recipient_from_nsm()
    return key, {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": _b64(document)}


def _secret(answer, private_key, field):
    """The secret of an answer: CiphertextForRecipient decrypted, or the plain field."""
    if private_key is not None:
        blob = answer.get("CiphertextForRecipient")
        if not blob:
            raise ClientError("ResponseError", "answer has no CiphertextForRecipient")
        return decrypt_for_recipient(base64.b64decode(blob), private_key)
    if field not in answer:
        raise ClientError("ResponseError", f"answer has no {field}")
    return base64.b64decode(answer[field])


def _check_algorithm(answer):
    # kmstool-enclave-cli accepts only these (docs/kms.md#enclave-client).
    algorithm = answer.get("EncryptionAlgorithm")
    if algorithm is not None and algorithm not in (
        "SYMMETRIC_DEFAULT",
        "RSAES_OAEP_SHA_1",
        "RSAES_OAEP_SHA_256",
    ):
        raise ClientError("ResponseError", f"unexpected EncryptionAlgorithm {algorithm!r}")


def run(args, out=sys.stdout):
    """Execute one parsed command; print the kmstool-style lines to ``out``; return 0."""
    credentials = {
        "access_key": args.aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": args.aws_secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": args.aws_session_token or os.environ.get("AWS_SESSION_TOKEN"),
    }
    if args.endpoint:
        opener = _tcp_opener(args.endpoint)
    else:
        opener = _vsock_opener(args.proxy_cid, args.proxy_port)
    tls_context = None
    if not args.no_tls:
        tls_context = (
            ssl.create_default_context(cafile=args.ca_file) if args.ca_file else ssl.create_default_context()
        )
    client = KmsClient(args.region, credentials, opener, tls_context)
    try:
        private_key, recipient = _recipient(args)
        if args.command == "decrypt":
            params = {"CiphertextBlob": args.ciphertext}
            if args.key_id:
                params["KeyId"] = args.key_id
            if args.encryption_algorithm:
                params["EncryptionAlgorithm"] = args.encryption_algorithm
            if args.encryption_context:
                params["EncryptionContext"] = json.loads(args.encryption_context)
            if recipient:
                params["Recipient"] = recipient
            answer = client.call("Decrypt", params)
            if "KeyId" not in answer:
                raise ClientError("ResponseError", "Decrypt answer has no KeyId")
            _check_algorithm(answer)
            out.write(f"PLAINTEXT: {_b64(_secret(answer, private_key, 'Plaintext'))}\n")
        elif args.command == "genkey":
            params = {"KeyId": args.key_id, "KeySpec": args.key_spec.replace("-", "_")}
            if recipient:
                params["Recipient"] = recipient
            answer = client.call("GenerateDataKey", params)
            if "KeyId" not in answer or "CiphertextBlob" not in answer:
                raise ClientError("ResponseError", "GenerateDataKey answer lacks KeyId or CiphertextBlob")
            out.write(f"CIPHERTEXT: {answer['CiphertextBlob']}\n")
            out.write(f"PLAINTEXT: {_b64(_secret(answer, private_key, 'Plaintext'))}\n")
        elif args.command == "genrandom":
            params = {"NumberOfBytes": args.length}
            if recipient:
                params["Recipient"] = recipient
            answer = client.call("GenerateRandom", params)
            out.write(f"PLAINTEXT: {_b64(_secret(answer, private_key, 'Plaintext'))}\n")
    finally:
        client.close()
    out.flush()
    return 0


def build_parser():
    """The argument parser (kmstool-enclave-cli's options plus the host-testing ones)."""
    parser = argparse.ArgumentParser(prog="kms_client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--region", required=True, help="KMS Region, e.g. us-east-1")
        p.add_argument(
            "--proxy-port",
            type=int,
            default=DEFAULT_PROXY_PORT,
            help="vsock port of the parent's vsock-proxy (8000)",
        )
        p.add_argument("--proxy-cid", type=int, default=PARENT_CID, help="vsock CID of the parent (3)")
        p.add_argument("--aws-access-key-id")
        p.add_argument("--aws-secret-access-key")
        p.add_argument("--aws-session-token")
        p.add_argument("--ca-file", help="PEM trust store for the KMS TLS certificate")
        p.add_argument("--endpoint", help="HOST:PORT over TCP instead of vsock (host testing)")
        p.add_argument("--no-tls", action="store_true", help="plain HTTP (host testing)")
        p.add_argument("--attestation-doc", help="attestation document file instead of /dev/nsm")
        p.add_argument("--private-key", help="PEM private key named by --attestation-doc")
        p.add_argument("--no-recipient", action="store_true", help="call without attestation")

    p = sub.add_parser("decrypt", help="Decrypt a ciphertext blob")
    common(p)
    p.add_argument("--ciphertext", required=True, help="base64 CiphertextBlob")
    p.add_argument("--key-id")
    p.add_argument("--encryption-algorithm")
    p.add_argument("--encryption-context", help="JSON object")
    p = sub.add_parser("genkey", help="GenerateDataKey")
    common(p)
    p.add_argument("--key-id", required=True)
    p.add_argument("--key-spec", required=True, choices=["AES-256", "AES-128"])
    p = sub.add_parser("genrandom", help="GenerateRandom")
    common(p)
    p.add_argument("--length", type=int, required=True)
    return parser


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ClientError as err:
        sys.stderr.write(f"kms_client: {err.kind}: {err.message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
