"""The harness PKI: a persisted root CA and the AWS-shaped chain that signs attestation documents.

docs/attestation.md#certificate-chain: every certificate is P-384 / ecdsa-with-SHA384. AWS signs
each document with a leaf that chains ``root -> regional CA (pathlen 2, ~20 days) -> zonal CA
(pathlen 1, ~6 days) -> instance CA (pathlen 0, 24 h, keyCertSign only) -> leaf (CA:FALSE critical,
digitalSignature + nonRepudiation, 3 h)``; the leaf serial is ``enclave id (8 bytes) || 4 zero
bytes || unix time (4 bytes)``. Subjects, validity windows, extension sets and their criticality
below copy those of real AWS chains (``tests/vectors/attestation``), so verifiers that look at
names or extensions see what they would see on Nitro.

Only the root is persisted (its key too, mode 0600, written atomically), so CI can pin one root
across runs; the regional, zonal and instance CAs live in memory and are (re)issued on demand so
that they always cover the leaf they sign.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError

#: Environment variable naming the default PKI directory.
PKI_DIR_ENV = "NITRO_HARNESS_PKI_DIR"
#: File names inside a PKI directory.
ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root.key"

#: Validity of each level, as observed on AWS chains (docs/attestation.md#certificate-chain).
ROOT_VALIDITY = dt.timedelta(days=30 * 365 + 7)  # 2019-10-28 .. 2049-10-28
#: A new root starts this long before its creation, so backdated documents (fault injection,
#: ``attest`` at a past time) can still chain to it.
ROOT_BACKDATE = dt.timedelta(days=30)
REGIONAL_VALIDITY = dt.timedelta(days=20, hours=1)
ZONAL_VALIDITY = dt.timedelta(days=5, hours=18)
INSTANCE_VALIDITY = dt.timedelta(hours=24)
LEAF_VALIDITY = dt.timedelta(hours=3)
#: AWS leaves start 3 s before the time written in their serial.
LEAF_BACKDATE = dt.timedelta(seconds=3)
#: A per-enclave leaf is replaced once less than this is left of it, so a document a verifier
#: checks a little later is still inside its leaf's validity.
LEAF_REFRESH_MARGIN = dt.timedelta(minutes=30)

DEFAULT_REGION = "us-east-1"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _as_utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """Build a Name with one attribute per RDN, in the given (DER) order."""
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(o, v)]) for o, v in pairs])


def root_subject() -> x509.Name:
    """Subject of the harness root: the AWS root's name ``CN=aws.nitro-enclaves, OU=AWS, O=Amazon,
    C=US`` (docs/attestation.md#certificate-chain), so name-matching verifiers behave as on AWS;
    trust comes from the key."""
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, "aws.nitro-enclaves"),
    )


def _regional_subject(region: str, tag: str) -> x509.Name:
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, f"{tag}.{region}.aws.nitro-enclaves"),
    )


def _zonal_subject(region: str, tag: str) -> x509.Name:
    # AWS's zonal CA lists its RDNs in this unusual order (CN first, ST abbreviated).
    return _name(
        (NameOID.COMMON_NAME, f"{tag}.zonal.{region}.aws.nitro-enclaves"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.STATE_OR_PROVINCE_NAME, "WA"),
        (NameOID.LOCALITY_NAME, "Seattle"),
    )


def _host_subject(common_name: str) -> x509.Name:
    # Instance CA and leaf share this layout on AWS.
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
        (NameOID.LOCALITY_NAME, "Seattle"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, common_name),
    )


def _ca_key_usage(*, cert_sign_only: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign_only,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=not cert_sign_only,
        encipher_only=False,
        decipher_only=False,
    )


def split_module_id(module_id: str) -> tuple[str, bytes]:
    """Split an enclave ID ``i-<hex>-enc<hex>`` into (instance ID, 8-byte enclave id).

    The enclave part is the hex after ``-enc`` left-padded to 8 bytes (AWS uses 16 hex digits; the
    harness's slot numbers are shorter). IDs of another shape get the instance ID
    ``i-00000000000000000`` unless they contain ``-enc``, and an enclave id derived from
    SHA-256(module_id), so any module_id can still be signed. Source:
    docs/attestation.md#certificate-chain (leaf serial).
    """
    instance, sep, enc = module_id.rpartition("-enc")
    if not sep:
        instance, enc = "i-00000000000000000", ""
    try:
        value = int(enc, 16)
        if not enc or value >= 1 << 64:
            raise ValueError
        enclave = value.to_bytes(8, "big")
    except ValueError:
        enclave = hashlib.sha256(module_id.encode("utf-8")).digest()[:8]
    return instance, enclave


@dataclass(frozen=True)
class Signer:
    """What signs one attestation document: the leaf key and certificate and the CA bundle.

    ``cabundle`` is root first (root, regional, zonal, instance), as documents carry it
    (docs/attestation.md#payload).
    """

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    cabundle: tuple[x509.Certificate, ...]


@dataclass
class _Ca:
    key: ec.EllipticCurvePrivateKey
    subject: x509.Name
    certificate: x509.Certificate | None = None


class Pki:
    """A root CA plus the in-memory intermediate CAs that issue AWS-shaped leaves.

    ``Pki(root_key, root_certificate, region=...)`` wraps an existing root;
    :meth:`load_or_create` persists one. ``leaf_per_document=True`` issues a fresh leaf for every
    document (AWS reuses one per enclave for up to 3 h; both verify the same way). Thread-safe:
    the NSM device thread and test code may sign at the same time.
    """

    def __init__(
        self,
        root_key: ec.EllipticCurvePrivateKey,
        root_certificate: x509.Certificate,
        *,
        region: str = DEFAULT_REGION,
        leaf_per_document: bool = False,
        directory: Path | None = None,
    ):
        self.root_key = root_key
        self.root_certificate = root_certificate
        self.region = region
        self.leaf_per_document = leaf_per_document
        self.directory = directory
        self._lock = threading.RLock()
        self._regional = _Ca(_new_key(), _regional_subject(region, secrets.token_hex(8)))
        self._zonal = _Ca(_new_key(), _zonal_subject(region, secrets.token_hex(8)))
        self._instances: dict[str, _Ca] = {}
        self._leaves: dict[str, Signer] = {}

    # -- creation and persistence ------------------------------------------------------------

    @classmethod
    def create(cls, *, now: dt.datetime | None = None, **kwargs) -> Pki:
        """Return a new in-memory PKI with a fresh P-384 root (30 years, like AWS's root G1)."""
        now = _as_utc(now or _utcnow())
        key = _new_key()
        subject = root_subject()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
            .not_valid_before(now - ROOT_BACKDATE)
            .not_valid_after(now - ROOT_BACKDATE + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert, **kwargs)

    @staticmethod
    def default_directory() -> Path:
        """``$NITRO_HARNESS_PKI_DIR`` if set, else ``~/.cache/nitro-harness/pki``."""
        env = os.environ.get(PKI_DIR_ENV)
        if env:
            return Path(env)
        return Path.home() / ".cache" / "nitro-harness" / "pki"

    @classmethod
    def load(cls, directory: str | os.PathLike[str], **kwargs) -> Pki:
        """Load the root from ``directory`` (``root.pem`` + ``root.key``).

        Raises NitroError E19 when a file is missing or unreadable, E03 when the key does not
        match the certificate or is not P-384.
        """
        path = Path(directory)
        cert_path, key_path = path / ROOT_CERT_FILE, path / ROOT_KEY_FILE
        try:
            cert_pem = cert_path.read_bytes()
            key_pem = key_path.read_bytes()
        except OSError as err:
            raise NitroError(
                ErrorCode.FileOperationFailure, f"{err.filename}: cannot read PKI root: {err.strerror}"
            ) from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as err:
            raise NitroError(ErrorCode.InvalidArgument, f"{cert_path}: not a PEM certificate ({err})") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as err:
            raise NitroError(ErrorCode.InvalidArgument, f"{key_path}: not an unencrypted PEM private key ({err})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise NitroError(ErrorCode.InvalidArgument, f"{key_path}: root key must be EC P-384 "
                             "(docs/attestation.md#certificate-chain)")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ):
            raise NitroError(ErrorCode.InvalidArgument, f"{key_path}: key does not match {cert_path}")
        return cls(key, cert, directory=path, **kwargs)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str] | None = None, **kwargs) -> Pki:
        """Load the root persisted in ``directory``, creating and saving one if there is none.

        ``directory`` defaults to :meth:`default_directory`. Keyword arguments go to the
        constructor (``region``, ``leaf_per_document``). Errors as :meth:`load` and :meth:`save`.
        """
        path = Path(directory) if directory is not None else cls.default_directory()
        if (path / ROOT_CERT_FILE).exists() or (path / ROOT_KEY_FILE).exists():
            return cls.load(path, **kwargs)
        pki = cls.create(**kwargs)
        pki.save(path)
        return pki

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``root.pem`` (0644) and ``root.key`` (0600, PKCS#8) into ``directory``.

        Each file is written to a temporary name and renamed, so a crash leaves either the old
        file or the new one. Raises NitroError E19 on an I/O failure.
        """
        path = Path(directory)
        key_pem = self.root_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path / ROOT_KEY_FILE, key_pem, 0o600)
            write_atomically(path / ROOT_CERT_FILE, self.root_pem().encode("ascii"), 0o644)
        except OSError as err:
            raise NitroError(
                ErrorCode.FileOperationFailure, f"{err.filename or path}: cannot write PKI root: {err.strerror}"
            ) from None
        self.directory = path

    # -- accessors -----------------------------------------------------------------------------

    def root_pem(self) -> str:
        """The root certificate as PEM text."""
        return self.root_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def root_fingerprint(self) -> str:
        """SHA-256 of the root's DER, lower-case hex (how AWS publishes its root's identity)."""
        return self.root_certificate.fingerprint(hashes.SHA256()).hex()

    # -- issuing -------------------------------------------------------------------------------

    def signer_for(
        self, module_id: str, *, at: dt.datetime | None = None, fresh: bool = False
    ) -> Signer:
        """Return the leaf key, certificate and CA bundle that sign a document of ``module_id``
        at time ``at`` (default now).

        The per-enclave leaf is reused while ``at`` lies in its validity with at least
        ``LEAF_REFRESH_MARGIN`` left, else (or when ``fresh`` or ``leaf_per_document``) a new
        3-hour leaf is issued with serial ``enclave id || 0000 || unix(at)`` and CN
        ``<module_id>.<region>.aws`` (docs/attestation.md#certificate-chain). Every CA is
        (re)issued as needed so that the whole chain is valid over the leaf's validity. Raises
        ValueError when the leaf's validity would fall outside the root's.
        """
        at = _as_utc(at or _utcnow()).replace(microsecond=0)
        with self._lock:
            cached = self._leaves.get(module_id)
            if (
                cached is not None
                and not fresh
                and not self.leaf_per_document
                and cached.certificate.not_valid_before_utc <= at
                and at + LEAF_REFRESH_MARGIN <= cached.certificate.not_valid_after_utc
            ):
                return cached
            signer = self._issue_leaf(module_id, at)
            if not self.leaf_per_document and not fresh:
                self._leaves[module_id] = signer
            return signer

    def _issue_leaf(self, module_id: str, at: dt.datetime) -> Signer:
        instance_id, enclave = split_module_id(module_id)
        not_before, not_after = at - LEAF_BACKDATE, at + LEAF_VALIDITY
        root = self.root_certificate
        if not (root.not_valid_before_utc <= not_before and not_after <= root.not_valid_after_utc):
            raise ValueError(
                f"cannot sign at {at.isoformat()}: the root is valid only from "
                f"{root.not_valid_before_utc.isoformat()} to {root.not_valid_after_utc.isoformat()}"
            )
        regional = self._ensure_ca(
            self._regional, self._root_issuer(), 2, REGIONAL_VALIDITY, dt.timedelta(days=4), not_before, not_after
        )
        zonal = self._ensure_ca(
            self._zonal, regional, 1, ZONAL_VALIDITY, dt.timedelta(hours=16), not_before, not_after
        )
        inst = self._instances.get(instance_id)
        if inst is None:
            inst = _Ca(_new_key(), _host_subject(f"{instance_id}.{self.region}.aws.nitro-enclaves"))
            self._instances[instance_id] = inst
        instance = self._ensure_ca(inst, zonal, 0, INSTANCE_VALIDITY, dt.timedelta(minutes=30), not_before, not_after)

        key = _new_key()
        unix = int(at.timestamp()) & 0xFFFFFFFF
        serial = int.from_bytes(enclave + bytes(4) + unix.to_bytes(4, "big"), "big") or 1
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_host_subject(f"{module_id}.{self.region}.aws"))
            .issuer_name(inst.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=False,  # as on AWS leaves
            )
            .sign(inst.key, hashes.SHA384())
        )
        cabundle = (self.root_certificate, regional.certificate, zonal.certificate, instance.certificate)
        return Signer(key, leaf, cabundle)  # type: ignore[arg-type]

    def _root_issuer(self) -> _Ca:
        return _Ca(self.root_key, self.root_certificate.subject, self.root_certificate)

    def _ensure_ca(
        self,
        ca: _Ca,
        issuer: _Ca,
        pathlen: int,
        validity: dt.timedelta,
        lead: dt.timedelta,
        start: dt.datetime,
        end: dt.datetime,
    ) -> _Ca:
        """(Re)issue ``ca``'s certificate unless it already covers [start, end]."""
        cert = ca.certificate
        if cert is not None and cert.not_valid_before_utc <= start and end <= cert.not_valid_after_utc:
            return ca
        not_before = start - lead
        not_after = max(not_before + validity, end)
        assert issuer.certificate is not None
        # A CA can never outlive its issuer on AWS; clamp to the issuer (the root in practice).
        not_after = min(not_after, issuer.certificate.not_valid_after_utc)
        not_before = max(not_before, issuer.certificate.not_valid_before_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca.subject)
            .issuer_name(issuer.subject)
            .public_key(ca.key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(20 if pathlen == 0 else 16), "big") >> 1 or 1)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        )
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        ski = x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
        if pathlen == 0:
            builder = builder.add_extension(_ca_key_usage(cert_sign_only=True), critical=True)
            builder = builder.add_extension(ski, critical=False).add_extension(aki, critical=False)
        else:
            builder = builder.add_extension(aki, critical=False).add_extension(ski, critical=False)
            builder = builder.add_extension(_ca_key_usage(), critical=True)
        ca.certificate = builder.sign(issuer.key, hashes.SHA384())
        return ca
