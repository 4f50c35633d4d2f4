"""Signing an EIF, re-signing it, and checking its signature (docs/eif-format.md).

The signature section holds the signing certificate and a COSE_Sign1 (harness.cose) over the
canonical PCR0 payload ``{"register_index": 0, "register_value": [48 byte values]}``, signed
with an EC P-256/384/521 key; PCR8 is the hash of that certificate (docs/pcrs.md).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from harness import cose
from harness.eif.format import (
    SectionType, decode_signature_section, encode_signature_section, fail,
)
from harness.eif.measurement import measure_eif
from harness.eif.reader import read_eif
from harness.eif.sources import FileRange
from harness.eif.writer import output_file, write_sections
from harness.errors import ErrorCode, NitroError
from harness.pcr import Measurements


def pcr0_payload(pcr0: bytes) -> bytes:
    """Canonical signed payload: CBOR {"register_index": 0, "register_value": [48 uints]}."""
    return cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})


@dataclass(frozen=True)
class Signer:
    """A signing identity: certificate PEM bytes and private key PEM bytes (EC P-256/384/521)."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, cert_path: Path | str, key_path: Path | str) -> "Signer":
        """Load both PEM files; raises ``NitroError(E60)`` naming a missing/unreadable file."""
        out = []
        for p in (cert_path, key_path):
            try:
                out.append(Path(p).read_bytes())
            except OSError as e:
                raise NitroError(ErrorCode.EIFSigningError,
                                 f"{p}: open: {e.strerror or e}") from None
        return cls(out[0], out[1])

    def _load(self, where: str = "signing key"):
        """Return ``(private key, certificate)`` after checking they can sign an EIF: an EC key
        on P-256/384/521 and a certificate for that key. Raises ``NitroError(E60)``
        "<where>: private key|signing certificate: <rule>"."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: cannot load PEM ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: {type(key).__name__.lstrip('_')} is not an "
                             "EC key; only EC P-256, P-384 and P-521 keys can sign an EIF")
        if key.curve.name not in cose.ALGORITHMS:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: private key: curve {key.curve.name} is not P-256, P-384 "
                             "or P-521")
        try:
            cert = x509.load_pem_x509_certificates(self.cert_pem)[0]
        except ValueError as e:
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: signing certificate: not a PEM certificate ({e})") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise NitroError(ErrorCode.EIFSigningError,
                             f"{where}: signing certificate: does not match the private key")
        return key, cert

    def sign_pcr0(self, pcr0: bytes, where: str = "signing key") -> bytes:
        """Return the signature section bytes for ``pcr0`` (docs/eif-format.md structure).

        COSE_Sign1 untagged: [bstr({1: alg}), {}, bstr(payload), r||s]; the section is a CBOR
        array of one map whose values are arrays of byte values. Raises ``NitroError(E60)``.
        """
        key, _cert = self._load(where)
        cose_sign1 = cose.sign1(key, pcr0_payload(pcr0), cose.ALGORITHMS[key.curve.name])
        return encode_signature_section(self.cert_pem, cose_sign1)


@dataclass(frozen=True)
class SignatureCheck:
    """Result of checking an EIF signature: ``ok``, a one-line ``reason``, and the certificate."""

    ok: bool
    reason: str
    certificate: Any = None  # cryptography.x509.Certificate


def verify_eif_signature(path: Path | str, cert_pem: bytes | None = None, *,
                         at: _dt.datetime | None = None,
                         measurements: Measurements | None = None) -> SignatureCheck:
    """Check an EIF's signature (docs/eif-format.md); never raises for a bad signature,
    reports it.

    Checks: the section decodes; the certificate (from the EIF, or ``cert_pem`` to pin a
    given one, which must then equal the embedded one) is valid at ``at`` (default now);
    its key is EC P-256/384/521 and matches the COSE algorithm; the COSE_Sign1 has protected
    header exactly {1: alg}, empty unprotected header, a valid ECDSA signature over the
    Sig_structure; the payload is byte-equal to the canonical {"register_index": 0,
    "register_value": PCR0} of the image as measured. ``measurements`` avoids re-measuring.
    Raises ``NitroError(E35)`` only when the file is not a valid EIF, E59 when unsigned.
    """
    from cryptography import x509

    path = Path(path)
    if measurements is None:
        measurements = measure_eif(path)
    eif = read_eif(path, check_crc=False)
    if eif.signature_raw is None:
        raise NitroError(ErrorCode.EIFSignatureCheckerError, f"{path}: signature: EIF is not signed")
    emb_pem, cose_raw = decode_signature_section(path, eif.signature_raw)
    try:
        cert = x509.load_pem_x509_certificates(emb_pem)[0]
    except ValueError as e:
        return SignatureCheck(False, f"embedded certificate does not parse ({e})")
    if cert_pem is not None:
        try:
            pinned = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError as e:
            return SignatureCheck(False, f"given certificate does not parse ({e})", cert)
        if pinned != cert:
            return SignatureCheck(False, "embedded certificate differs from the given one", cert)
    failure = _certificate_problem(cert, at)
    if failure is None:
        failure = _cose_problem(cert, cose_raw, measurements.pcr0)
    if failure is not None:
        return SignatureCheck(False, failure, cert)
    return SignatureCheck(True, "signature valid over PCR0", cert)


def _certificate_problem(cert: Any, at: _dt.datetime | None) -> str | None:
    """Why ``cert`` cannot have signed at ``at`` (default now; naive means UTC), else None."""
    now = at or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.timezone.utc)
    try:
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception as e:  # noqa: BLE001 - lazily decoded fields raise assorted errors
        return f"certificate validity does not decode ({e})"
    if not nb <= now <= na:
        return (f"certificate not valid at {now.isoformat()} "
                f"(valid {nb.isoformat()} to {na.isoformat()})")
    return None


def _cose_problem(cert: Any, cose_raw: bytes, pcr0: bytes) -> str | None:
    """Why the COSE_Sign1 ``cose_raw`` is not ``cert``'s signature over the canonical payload
    of ``pcr0``, else None."""
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        pub = cert.public_key()
    except Exception as e:  # noqa: BLE001 - cryptography parses the key lazily
        return f"certificate public key does not parse ({e})"
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in cose.ALGORITHMS:
        return "certificate key is not EC P-256/P-384/P-521"
    algorithm = cose.ALGORITHMS[pub.curve.name]
    try:
        doc = cose.decode_sign1(cose_raw)
    except cose.CoseError as e:
        return f"COSE_Sign1 does not decode ({e})"
    if doc.protected != cose.protected_header(algorithm):
        return (f"protected header {doc.protected.hex()} is not {{1: {algorithm.alg}}} "
                f"for {pub.curve.name}")
    if doc.unprotected != {}:
        return "unprotected header is not empty"
    if len(doc.signature) != 2 * algorithm.size:
        return f"signature is {len(doc.signature)} bytes, expected {2 * algorithm.size}"
    if not cose.signature_valid(pub, doc.protected, doc.payload, doc.signature, algorithm):
        return "ECDSA signature does not verify"
    if doc.payload != pcr0_payload(pcr0):
        return "signed payload is not the canonical encoding of this image's PCR0"
    return None


def sign_eif(in_path: Path | str, out_path: Path | str, cert_pem: bytes | Path | str,
             key_pem: bytes | Path | str) -> Measurements:
    """(Re-)sign an EIF: copy every section except an old signature, append a new one
    (docs/eif-format.md).

    ``cert_pem``/``key_pem`` are PEM bytes or paths to PEM files. Sections keep their table
    order and are packed without gaps; the header is rewritten with the new table and CRC.
    ``in_path`` may equal ``out_path`` (the result replaces it atomically,
    harness.atomic_file). Returns the measurements including PCR8. Raises
    ``NitroError(E35)`` for an invalid or corrupt input EIF, ``NitroError(E60)`` for a bad
    key or certificate (RSA key, unknown curve, mismatch).
    """
    in_path, out_path = Path(in_path), Path(out_path)

    def load(v: bytes | Path | str) -> bytes:
        if isinstance(v, bytes):
            return v
        try:
            return Path(v).read_bytes()
        except OSError as e:
            raise NitroError(ErrorCode.EIFSigningError, f"{v}: open: {e.strerror or e}") from None

    signer = Signer(load(cert_pem), load(key_pem))
    signer._load(str(key_pem) if not isinstance(key_pem, bytes) else "signing key")
    eif = read_eif(in_path, check_crc=True)
    if eif.crc_ok is False:
        raise fail(in_path, "crc32", f"stored 0x{eif.header.crc32:08x} != computed "
                                     f"0x{eif.crc_computed:08x}; refusing to sign a corrupt EIF")
    keep = [s for s in eif.sections if s.type != SectionType.SIGNATURE]
    with open(in_path, "rb") as src, output_file(out_path, ErrorCode.EIFSigningError) as out:
        items = [(s.type, FileRange(src, s.data_offset, s.size)) for s in keep]
        m, _ = write_sections(out, out_path, items, ErrorCode.EIFSigningError, signer=signer,
                              base=eif.header)
    return m
