"""The KMS emulator's TLS identity: what an enclave's ``kms.<region>.amazonaws.com`` connection verifies.

A CA (install it in the enclave image's trust store) and a server certificate for the KMS
endpoint name, kept in one folder and renewed before they expire (docs/kms.md).
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError

__all__ = ["TlsIdentity", "ensure_tls_identity", "ssl_context"]


@dataclass(frozen=True)
class TlsIdentity:
    """Files of the emulator's TLS identity: ``ca_certificate`` (PEM; install it in the enclave
    image's trust store), ``certificate`` (PEM server certificate) and ``private_key`` (PEM,
    mode 0600). ``names``: the DNS names the certificate covers."""

    ca_certificate: Path
    certificate: Path
    private_key: Path
    names: tuple[str, ...]


def ensure_tls_identity(
    directory: str | os.PathLike,
    *,
    region: str = "us-east-1",
    extra_names: Sequence[str] = (),
    min_remaining: _dt.timedelta = _dt.timedelta(days=1),
) -> TlsIdentity:
    """Return (creating or renewing as needed) a CA and a server certificate for
    ``kms.<region>.amazonaws.com``, ``localhost`` and ``127.0.0.1`` plus ``extra_names``.

    docs/kms.md: enclave clients speak TLS to ``kms.<region>.amazonaws.com`` through the proxy and
    check the name, so the emulator needs a certificate for it from a CA the image trusts.
    Files in ``directory``: ``kms-ca.pem``, ``kms-ca.key``, ``kms-cert.pem``, ``kms-key.pem``.
    Existing files are reused while the certificate covers the names and stays valid for
    ``min_remaining``; the CA is kept across renewals so images built earlier still trust it.
    Each file is written atomically. Raises NitroError E19 when the directory is unusable.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(directory)
    names = tuple(dict.fromkeys([f"kms.{region}.amazonaws.com", "localhost", *extra_names]))
    ca_path, ca_key_path = folder / "kms-ca.pem", folder / "kms-ca.key"
    cert_path, key_path = folder / "kms-cert.pem", folder / "kms-key.pem"
    now = _dt.datetime.now(_dt.timezone.utc)
    identity = TlsIdentity(ca_path, cert_path, key_path, names)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8

    try:
        folder.mkdir(parents=True, exist_ok=True)
        ca = ca_key = None
        if ca_path.exists() and ca_key_path.exists():
            ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if ca.not_valid_after_utc < now + min_remaining:
                ca = ca_key = None
        if cert_path.exists() and key_path.exists() and ca is not None:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = set(san.get_values_for_type(x509.DNSName))
            if (
                set(names) <= covered
                and cert.issuer == ca.subject
                and cert.not_valid_after_utc >= now + min_remaining
            ):
                return identity
        if ca is None:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitro-harness"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "nitro-harness KMS emulator CA"),
                ]
            )
            ca = (
                x509.CertificateBuilder()
                .subject_name(ca_name)
                .issuer_name(ca_name)
                .public_key(ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(hours=1))
                .not_valid_after(now + _dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            write_atomically(
                ca_key_path, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600
            )
            write_atomically(ca_path, ca.public_bytes(pem))
        key = ec.generate_private_key(ec.SECP256R1())
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + _dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_atomically(key_path, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
        write_atomically(cert_path, cert.public_bytes(pem))
    except OSError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"KMS TLS identity in {folder}: {err.strerror or err}"
        ) from None
    except (ValueError, TypeError, x509.ExtensionNotFound) as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"KMS TLS identity in {folder}: unusable existing file ({err})"
        ) from None
    return identity


def ssl_context(tls: Any) -> ssl.SSLContext | None:
    """The server-side TLS context for ``tls``: None (plain HTTP, returns None), an
    ``ssl.SSLContext`` (used as is), a :class:`TlsIdentity`, or (cert PEM path, key PEM path).

    TLS 1.2 at least. Raises NitroError: InvalidArgument for another shape, FileOperationFailure
    when the certificate or key cannot be loaded.
    """
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    if isinstance(tls, TlsIdentity):
        tls = (tls.certificate, tls.private_key)
    try:
        certfile, keyfile = tls
    except (TypeError, ValueError):
        raise NitroError(
            ErrorCode.InvalidArgument, "tls: expected an ssl.SSLContext or (cert_path, key_path)"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        raise NitroError(
            ErrorCode.FileOperationFailure,
            f"TLS certificate {certfile} / key {keyfile}: cannot load ({err})",
        ) from None
    return context
