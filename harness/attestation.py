"""Attestation documents: build them as the NSM signs them, and verify any document (AWS's too).

docs/attestation.md. A document is an untagged COSE_Sign1 ``[protected = bstr(a1 01 38 22)
i.e. {1: -35}, unprotected = {}, payload = bstr(map), signature = bstr(r || s, 96 bytes)]``
signed with ES384 by the leaf certificate in the payload. The payload map has exactly 9 keys in this order:
module_id, digest, timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce. The
outer map is definite (``a9``, AWS until ~2025-04) or indefinite (``bf .. ff``, AWS since
~2025-07); ``pcrs`` and ``cabundle`` are always definite.

Verification runs in a fixed order and reports the first failure as :class:`AttestationError`
with a short check name (see :data:`CHECKS`), so tests and the CLI can tell *why* a document
was rejected.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import cose
from harness.cose import COSE_SIGN1_TAG, sig_structure  # noqa: F401 - part of this module's API

#: The COSE protected header every NSM document carries: {1 (alg): -35 (ES384)}.
PROTECTED_ES384 = cose.protected_header(cose.ES384)
#: Payload keys in the order the NSM writes them.
PAYLOAD_KEYS = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)
#: Upper bound used by the verifier for optional fields (AWS's documented maximum is 1024).
MAX_OPTIONAL_FIELD = 1024
#: The latest timestamp a document may carry (ms): the last millisecond of year 9999, the end
#: of what a datetime (and an X.509 GeneralizedTime) can hold.
MAX_TIMESTAMP_MS = 253402300799999

#: Names of the verification checks, in the order they run.
CHECKS = (
    "structure",  # CBOR / COSE_Sign1 shape
    "algorithm",  # protected header is not {1: -35}
    "fields",  # payload keys, types and sizes
    "certificate",  # certificate / cabundle[i] does not fully decode, or is not P-384 / ecdsa-with-SHA384
    "chain",  # an issuer signature or name link is broken
    "root",  # the chain does not end at a pinned root
    "constraints",  # basicConstraints / pathlen / keyUsage
    "certificate-not-yet-valid",
    "certificate-expired",
    "timestamp",  # document timestamp outside the leaf's validity
    "signature",  # COSE signature does not verify with the leaf key
    "pcr",
    "nonce",
    "user-data",
    "public-key",
    "debug-mode",
)

#: Pass as ``at`` to check certificate validity at the document's own timestamp.
AT_DOCUMENT_TIME: Literal["document"] = "document"


class AttestationError(Exception):
    """A document failed verification. ``check`` is one of :data:`CHECKS`; ``message`` is one
    line saying what was wrong."""

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


def aws_root_g1() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 certificate shipped in ``harness/data``
    (docs/attestation.md: DER SHA-256 641a0321...bb5b)."""
    pem = resources.files("harness").joinpath("data/aws_nitro_root_g1.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem)


# -- building ----------------------------------------------------------------------------------


def _timestamp_ms(timestamp: dt.datetime | int | None) -> int:
    if timestamp is None:
        return int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    if isinstance(timestamp, dt.datetime):
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=dt.timezone.utc)
        return int(timestamp.timestamp() * 1000)
    return int(timestamp)


def encode_payload(
    *,
    module_id: str,
    timestamp_ms: int,
    pcrs: dict[int, bytes],
    certificate: bytes,
    cabundle: list[bytes],
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
    indefinite: bool = True,
    digest: str = "SHA384",
) -> bytes:
    """Encode the 9-key payload map exactly as the NSM does (docs/attestation.md): keys in
    order, ``pcrs`` a definite map with ascending keys, ``cabundle`` a definite array; the outer
    map definite (``a9``) or indefinite (``bf ... ff``)."""
    values: dict[str, Any] = {
        "module_id": module_id,
        "digest": digest,
        "timestamp": timestamp_ms,
        "pcrs": {i: bytes(pcrs[i]) for i in sorted(pcrs)},
        "certificate": bytes(certificate),
        "cabundle": [bytes(c) for c in cabundle],
        "public_key": None if public_key is None else bytes(public_key),
        "user_data": None if user_data is None else bytes(user_data),
        "nonce": None if nonce is None else bytes(nonce),
    }
    # cbor2 writes dicts/lists with definite lengths and shortest heads; only the outer map's
    # head differs between the two forms, so write that one by hand.
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(values[k]) for k in PAYLOAD_KEYS)
    return (b"\xbf" + body + b"\xff") if indefinite else (b"\xa9" + body)


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """Return the untagged COSE_Sign1 document for ``payload`` signed ES384 with ``key``."""
    return cose.sign1(key, payload, cose.ES384)


def build_document(
    pki,
    *,
    module_id: str,
    pcrs: dict[int, bytes],
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    timestamp: dt.datetime | int | None = None,
    indefinite: bool = True,
    fresh_leaf: bool = False,
) -> bytes:
    """Sign an attestation document as the NSM of enclave ``module_id`` would (docs/attestation.md).

    ``pki`` is a :class:`harness.pki.Pki`; ``pcrs`` maps index -> 48-byte value (the NSM passes
    0..15, already zeroed for debug mode); ``timestamp`` is a datetime or Unix milliseconds
    (default now) and the leaf is chosen valid at that time; ``fresh_leaf`` forces a new leaf.
    Returns the document bytes (untagged COSE_Sign1, ES384, raw r||s).
    """
    ms = _timestamp_ms(timestamp)
    at = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    signer = pki.signer_for(module_id, at=at, fresh=fresh_leaf)
    der = serialization.Encoding.DER
    payload = encode_payload(
        module_id=module_id,
        timestamp_ms=ms,
        pcrs=pcrs,
        certificate=signer.certificate.public_bytes(der),
        cabundle=[c.public_bytes(der) for c in signer.cabundle],
        public_key=public_key,
        user_data=user_data,
        nonce=nonce,
        indefinite=indefinite,
    )
    return sign_payload(signer.key, payload)


# -- decoding and verifying ------------------------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    """Policy checked after the cryptographic checks. ``pcrs`` maps index -> expected 48-byte
    value; ``nonce``/``user_data``/``public_key`` must equal the document's when given;
    debug-mode documents (PCR0 all zero, docs/pcrs.md) are rejected unless ``allow_debug``."""

    pcrs: dict[int, bytes] = field(default_factory=dict)
    nonce: bytes | None = None
    user_data: bytes | None = None
    public_key: bytes | None = None
    allow_debug: bool = False


@dataclass(frozen=True)
class AttestationDocument:
    """A decoded (and, when returned by :func:`verify_document`, verified) document.

    ``timestamp`` is a UTC datetime (ms precision); ``pcrs`` maps index -> bytes; ``certificate``
    is the leaf, ``cabundle`` root first as carried; ``root`` is the pinned root the chain ended
    at (None when only decoded); ``verified_at`` the time validity was checked at.
    """

    module_id: str
    digest: str
    timestamp: dt.datetime
    timestamp_ms: int
    pcrs: dict[int, bytes]
    certificate: x509.Certificate
    cabundle: list[x509.Certificate]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    payload: bytes
    signature: bytes
    protected: bytes
    indefinite: bool
    root: x509.Certificate | None = None
    verified_at: dt.datetime | None = None

    @property
    def debug_mode(self) -> bool:
        """True when PCR0 is all zero: how a debug-mode enclave's document looks (docs/pcrs.md)."""
        pcr0 = self.pcrs.get(0)
        return pcr0 is not None and not any(pcr0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: hex for PCRs and byte fields, ISO-8601 UTC times, certificate
        summaries (subject, issuer, serial, validity, SHA-256)."""
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp_ms,
            "timestamp_utc": _iso(self.timestamp),
            "debug_mode": self.debug_mode,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "certificate": _cert_summary(self.certificate),
            "cabundle": [_cert_summary(c) for c in self.cabundle],
            "public_key": None if self.public_key is None else self.public_key.hex(),
            "user_data": None if self.user_data is None else self.user_data.hex(),
            "nonce": None if self.nonce is None else self.nonce.hex(),
            "payload_map": "indefinite" if self.indefinite else "definite",
            "verified": None
            if self.root is None
            else {
                "root_sha256": self.root.fingerprint(hashes.SHA256()).hex(),
                "root_subject": self.root.subject.rfc4514_string(),
                "at": _iso(self.verified_at) if self.verified_at else None,
            },
        }


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cert_summary(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _fail(check: str, message: str) -> AttestationError:
    return AttestationError(check, message)


def decode_document(data: bytes) -> AttestationDocument:
    """Decode and type-check a document without any cryptographic check.

    Accepts the untagged form and tag 18, definite and indefinite payload maps. Raises
    :class:`AttestationError` with check ``structure``, ``algorithm``, ``fields`` or
    ``certificate``. Source: docs/attestation.md.
    """
    try:
        sign1 = cose.decode_sign1(data)
    except cose.CoseError as err:
        raise _fail("structure", str(err)) from None
    protected, payload, signature = sign1.protected, sign1.payload, sign1.signature
    try:
        header = cbor2.loads(protected) if protected else {}
    except Exception:
        raise _fail("structure", "protected header is not CBOR") from None
    if header != {1: -35}:
        raise _fail("algorithm", f"protected header {header!r} is not {{1: -35}} (ES384)")
    if len(signature) != 96:
        raise _fail("structure", f"ES384 signature must be 96 bytes (r||s), got {len(signature)}")
    try:
        body = cbor2.loads(payload)
    except Exception as err:
        raise _fail("structure", f"payload is not CBOR: {err}") from None
    if not isinstance(body, dict):
        raise _fail("fields", "payload is not a map")
    missing = [k for k in PAYLOAD_KEYS if k not in body]
    if missing:
        raise _fail("fields", f"payload lacks {', '.join(missing)}")
    extra = [k for k in body if k not in PAYLOAD_KEYS]
    if extra:
        raise _fail("fields", f"payload has unknown keys {extra!r}")

    module_id, digest, ts = body["module_id"], body["digest"], body["timestamp"]
    if not isinstance(module_id, str) or not module_id:
        raise _fail("fields", "module_id must be a non-empty text string")
    if digest != "SHA384":
        raise _fail("fields", f"digest {digest!r} is not 'SHA384'")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 < ts <= MAX_TIMESTAMP_MS:
        raise _fail("fields", "timestamp must be a positive integer (ms) before year 10000")
    pcrs = body["pcrs"]
    if not isinstance(pcrs, dict) or not 1 <= len(pcrs) <= 32:
        raise _fail("fields", "pcrs must be a map of 1 to 32 entries")
    for index, value in pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 32:
            raise _fail("fields", f"pcrs key {index!r} is not an index 0..31")
        if not isinstance(value, bytes) or len(value) != 48:
            raise _fail("fields", f"pcrs[{index}] must be 48 bytes (SHA384)")
    if not isinstance(body["certificate"], bytes) or not body["certificate"]:
        raise _fail("fields", "certificate must be a non-empty byte string")
    cabundle = body["cabundle"]
    if not isinstance(cabundle, list) or not cabundle or not all(isinstance(c, bytes) and c for c in cabundle):
        raise _fail("fields", "cabundle must be a non-empty array of byte strings")
    for name in ("public_key", "user_data", "nonce"):
        value = body[name]
        if value is not None and not isinstance(value, bytes):
            raise _fail("fields", f"{name} must be a byte string or null")
        if value is not None and len(value) > MAX_OPTIONAL_FIELD:
            raise _fail("fields", f"{name} is {len(value)} bytes, more than {MAX_OPTIONAL_FIELD}")

    leaf = _parse_cert(body["certificate"], "certificate")
    bundle = [_parse_cert(c, f"cabundle[{i}]") for i, c in enumerate(cabundle)]
    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp=dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc),
        timestamp_ms=ts,
        pcrs=dict(pcrs),
        certificate=leaf,
        cabundle=bundle,
        public_key=body["public_key"],
        user_data=body["user_data"],
        nonce=body["nonce"],
        payload=payload,
        signature=signature,
        protected=protected,
        indefinite=payload[:1] == b"\xbf",
    )


def _one_line(err: Exception) -> str:
    """The first line of ``err``'s text (cryptography's parse errors can span lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _parse_cert(der: bytes, where: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        # cryptography decodes names, validity and extensions lazily, on first access: touch
        # each now, so a malformed one fails here as ``certificate`` naming the field and not
        # later, in the chain checks, as a bare ValueError.
        _ = (cert.serial_number, cert.issuer, cert.subject, cert.extensions)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature)
        key = cert.public_key()
        algorithm = cert.signature_hash_algorithm
    except Exception as err:  # malformed DER surfaces as ValueError, DuplicateExtension, ...
        raise _fail("certificate", f"{where} does not parse as X.509 DER: {_one_line(err)}") from None
    if cert.serial_number <= 0:
        # cryptography only warns about this today and will refuse to load it later; decide
        # here so the verdict does not change with its version.
        raise _fail("certificate", f"{where} serial number is not positive (RFC 5280 4.1.2.2)")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise _fail("certificate", f"{where} key is not EC P-384")
    if not isinstance(algorithm, hashes.SHA384) or cert.signature_algorithm_oid.dotted_string != "1.2.840.10045.4.3.3":
        raise _fail("certificate", f"{where} is not signed with ecdsa-with-SHA384")
    return cert


def _label(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _subject_key_id(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def _check_signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` signed ``child`` (names link and the ECDSA signature verifies)."""
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_document(
    data: bytes,
    *,
    roots: list[x509.Certificate] | None = None,
    at: dt.datetime | Literal["document"] | None = None,
    expect: Expectations | None = None,
) -> AttestationDocument:
    """Verify ``data`` and return the decoded document; raise :class:`AttestationError` naming
    the first failed check otherwise.

    Order (docs/attestation.md): decode and type-check (``structure``, ``algorithm``,
    ``fields``, and ``certificate`` for a certificate that does not fully decode, naming it:
    ``certificate`` or ``cabundle[i]``); build the chain ``[leaf, cabundle reversed]`` and
    check each link's signature (``chain``); the top must be signed by one of ``roots`` (default:
    the AWS root G1) and ``cabundle[0]`` must be that root byte for byte (``root``; the
    bundle's own root is never trusted); CA and leaf constraints and key usage
    (``constraints``); every certificate valid at ``at`` (default now; ``"document"`` uses the
    document's timestamp) (``certificate-not-yet-valid`` / ``certificate-expired``); the
    timestamp inside the leaf's validity (``timestamp``); the ES384 signature with the leaf key,
    high-S accepted (``signature``); then ``expect``: PCRs, nonce, user data, public key, and
    debug mode (``pcr``, ``nonce``, ``user-data``, ``public-key``, ``debug-mode``).
    """
    doc = decode_document(data)
    pinned = list(roots) if roots is not None else [aws_root_g1()]
    if not pinned:
        raise _fail("root", "no root certificate to verify against")

    # Chain: leaf <- instance <- zonal <- regional (cabundle reversed, its root left out).
    chain = [doc.certificate] + list(reversed(doc.cabundle[1:]))
    for child, issuer in zip(chain, chain[1:]):
        if not _check_signed_by(child, issuer):
            raise _fail("chain", f"'{_label(child)}' is not signed by '{_label(issuer)}'")
    top = chain[-1]
    root = next((r for r in pinned if _check_signed_by(top, r)), None)
    if root is None:
        claimed = _authority_key_id(top)
        for candidate in pinned:
            if claimed is not None and claimed == _subject_key_id(candidate) and top.issuer == candidate.subject:
                # Issued by a pinned root's key, but the signature no longer verifies: a broken
                # link, not a foreign root.
                raise _fail("chain", f"'{_label(top)}' is not signed by the pinned root '{_label(candidate)}'")
        raise _fail(
            "root",
            f"'{_label(top)}' is not signed by a pinned root "
            f"({', '.join(r.fingerprint(hashes.SHA256()).hex()[:16] for r in pinned)})",
        )
    der = serialization.Encoding.DER
    if doc.cabundle[0].public_bytes(der) != root.public_bytes(der):
        raise _fail("root", "cabundle[0] is not the pinned root certificate")

    full = chain + [root]
    _check_constraints(full)

    if at == AT_DOCUMENT_TIME:
        when = doc.timestamp
    elif at is None:
        when = dt.datetime.now(dt.timezone.utc)
    else:
        when = at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
    for cert in full:
        if when < cert.not_valid_before_utc:
            raise _fail(
                "certificate-not-yet-valid",
                f"'{_label(cert)}' is valid from {_iso(cert.not_valid_before_utc)}, checked at {_iso(when)}",
            )
        if when > cert.not_valid_after_utc:
            raise _fail(
                "certificate-expired",
                f"'{_label(cert)}' expired at {_iso(cert.not_valid_after_utc)}, checked at {_iso(when)}",
            )
    leaf = doc.certificate
    # Certificates have 1 s resolution; the document's timestamp has ms.
    ts_floor = doc.timestamp.replace(microsecond=0)
    if not leaf.not_valid_before_utc <= ts_floor <= leaf.not_valid_after_utc:
        raise _fail("timestamp", f"document timestamp {_iso(doc.timestamp)} is outside its leaf's validity")

    if not cose.signature_valid(leaf.public_key(), doc.protected, doc.payload, doc.signature, cose.ES384):
        raise _fail("signature", "COSE_Sign1 ES384 signature does not verify with the leaf key")

    doc = _with_verification(doc, root, when)
    if expect is not None:
        _check_expectations(doc, expect)
    return doc


def _with_verification(doc: AttestationDocument, root: x509.Certificate, when: dt.datetime) -> AttestationDocument:
    values = {f: getattr(doc, f) for f in doc.__dataclass_fields__}
    values.update(root=root, verified_at=when)
    return AttestationDocument(**values)


def _check_constraints(full: list[x509.Certificate]) -> None:
    """RFC 5280 basics for the chain ``[leaf, ..., root]``: CAs have CA:TRUE, keyCertSign and
    a pathlen admitting the CAs below them; the leaf is not a CA and may sign (digitalSignature)."""
    leaf = full[0]
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise _fail("constraints", f"leaf '{_label(leaf)}' is a CA")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise _fail("constraints", f"leaf '{_label(leaf)}' lacks keyUsage digitalSignature")
    except x509.ExtensionNotFound:
        pass
    for depth, cert in enumerate(full[1:]):
        # depth = number of CA certificates between this one and the leaf.
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise _fail("constraints", f"CA '{_label(cert)}' has no basicConstraints") from None
        if not bc.ca:
            raise _fail("constraints", f"'{_label(cert)}' issues certificates but is not a CA")
        if bc.path_length is not None and depth > bc.path_length:
            raise _fail("constraints", f"CA '{_label(cert)}' pathlen {bc.path_length} < {depth} CAs below it")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise _fail("constraints", f"CA '{_label(cert)}' lacks keyUsage keyCertSign")
        except x509.ExtensionNotFound:
            pass


def _check_expectations(doc: AttestationDocument, expect: Expectations) -> None:
    for index, value in sorted(expect.pcrs.items()):
        got = doc.pcrs.get(index)
        if got is None:
            raise _fail("pcr", f"PCR{index} is not in the document")
        if got != bytes(value):
            raise _fail("pcr", f"PCR{index} is {got.hex()}, expected {bytes(value).hex()}")
    for name, check, wanted in (
        ("nonce", "nonce", expect.nonce),
        ("user_data", "user-data", expect.user_data),
        ("public_key", "public-key", expect.public_key),
    ):
        if wanted is not None and getattr(doc, name) != bytes(wanted):
            got = getattr(doc, name)
            raise _fail(check, f"{name} is {'null' if got is None else got.hex()[:64]}, expected {bytes(wanted).hex()[:64]}")
    if doc.debug_mode and not expect.allow_debug:
        raise _fail("debug-mode", "document comes from a debug-mode enclave (PCR0 is zero)")


def tamper_document(data: bytes, part: str) -> bytes:
    """Return ``data`` with one byte changed in ``part``: ``"payload"`` (last byte of PCR0),
    ``"signature"`` (first byte of r) or ``"certificate"`` (a byte of the leaf's signature).

    The result still decodes; only the named check fails (``signature`` for the first two,
    ``chain`` for the certificate). Used by NSM fault injection and tests.
    """
    protected, unprotected, payload, signature = cbor2.loads(data)
    if part == "signature":
        signature = bytes([signature[0] ^ 0x01]) + signature[1:]
        return cbor2.dumps([protected, unprotected, payload, signature])
    if part not in ("payload", "certificate"):
        raise ValueError(f"unknown part {part!r}: use payload, signature or certificate")
    doc = decode_document(data)
    certificate = doc.certificate.public_bytes(serialization.Encoding.DER)
    pcrs = dict(doc.pcrs)
    if part == "payload":
        pcrs[0] = pcrs[0][:-1] + bytes([pcrs[0][-1] ^ 0x01])
    else:
        # The last byte of the DER is inside the ECDSA signature value: still parses, no
        # longer verifies against the issuer.
        certificate = certificate[:-1] + bytes([certificate[-1] ^ 0x01])
    payload = encode_payload(
        module_id=doc.module_id,
        timestamp_ms=doc.timestamp_ms,
        pcrs=pcrs,
        certificate=certificate,
        cabundle=[c.public_bytes(serialization.Encoding.DER) for c in doc.cabundle],
        public_key=doc.public_key,
        user_data=doc.user_data,
        nonce=doc.nonce,
        indefinite=doc.indefinite,
    )
    return cbor2.dumps([protected, unprotected, payload, signature])


def document_base64(data: bytes) -> str:
    """Standard padded base64 of a document (as KMS and most tools carry it)."""
    return base64.b64encode(data).decode("ascii")
