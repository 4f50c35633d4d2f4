"""Attestation commands: ``attest``, ``verify-attestation`` and ``pki init|show|export-root``.

Exit statuses (docs/nitro-cli.md numbering): a document that fails verification exits with
E59 (EIFSignatureCheckerError, nitro-cli's code for "a signature or certificate did not check
out"), and the message starts with the name of the failed check (``certificate-expired: ...``,
``certificate: cabundle[1] does not parse ...``, ``signature: ...``, see
:data:`harness.attestation.CHECKS`); unreadable files E19 (FileOperationFailure); malformed
option values E03 (InvalidArgument), among them a nonce, user data or public key longer than a
document may carry.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

from cryptography import x509

from harness.cli import print_json, progress
from harness.errors import ErrorCode, NitroError


def register(subparsers) -> None:
    """Add ``attest``, ``verify-attestation`` and ``pki``."""
    a = subparsers.add_parser(
        "attest",
        help="sign the attestation document an enclave of this EIF would get, without booting",
    )
    a.add_argument("--eif-path", required=True, type=Path)
    a.add_argument("--debug-mode", action="store_true", help="PCR0/1/2/8 read as zero (docs/pcrs.md)")
    a.add_argument("--parent-role", metavar="ARN", help="IAM role ARN of the parent (PCR3)")
    a.add_argument("--instance-id", metavar="ID", help="parent instance ID (PCR4 and the enclave ID)")
    a.add_argument("--enclave-id", metavar="ID", help="module_id (default <instance-id>-enc<16 hex>)")
    a.add_argument("--nonce", metavar="HEX")
    a.add_argument("--user-data", metavar="HEX")
    a.add_argument("--public-key", type=Path, metavar="FILE", help="bytes placed in public_key as is")
    a.add_argument("--pki-dir", type=Path, help="PKI directory (default $NITRO_HARNESS_PKI_DIR or "
                   "~/.cache/nitro-harness/pki; created if missing)")
    a.add_argument("--region", default="us-east-1", help="region in the chain's names")
    a.add_argument("--timestamp", metavar="TIME", help="sign as of TIME (ISO 8601 or Unix seconds)")
    a.add_argument("--definite", action="store_true",
                   help="definite-length payload map (AWS before 2025-04) instead of indefinite")
    a.add_argument("--output", required=True, type=Path)
    a.set_defaults(func=attest)

    v = subparsers.add_parser("verify-attestation", help="verify an attestation document and print it as JSON")
    v.add_argument("file", type=Path, metavar="FILE", help="raw COSE_Sign1 bytes (or base64 of them)")
    v.add_argument("--root", type=Path, action="append", metavar="PEM",
                   help="pinned root certificate(s) (default: AWS Nitro Enclaves Root G1)")
    v.add_argument("--at", metavar="TIME",
                   help="check validity at TIME: ISO 8601, Unix seconds, 'now' (default) or "
                        "'document' (the document's own timestamp)")
    v.add_argument("--expect-pcr", action="append", default=[], metavar="N=HEX")
    v.add_argument("--nonce", metavar="HEX")
    v.add_argument("--user-data", metavar="HEX")
    v.add_argument("--public-key", type=Path, metavar="FILE")
    v.add_argument("--allow-debug", action="store_true", help="accept debug-mode documents")
    v.set_defaults(func=verify_attestation)

    p = subparsers.add_parser("pki", help="the harness PKI that signs attestation documents")
    psub = p.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)
    for name, helptext, func in (
        ("init", "create the root CA (or keep the existing one)", pki_init),
        ("show", "print the root's identity as JSON", pki_show),
        ("export-root", "write the root certificate as PEM", pki_export_root),
    ):
        sp = psub.add_parser(name, help=helptext)
        sp.add_argument("--pki-dir", type=Path, help="default $NITRO_HARNESS_PKI_DIR or ~/.cache/nitro-harness/pki")
        sp.set_defaults(func=func)
        if name == "init":
            sp.add_argument("--force", action="store_true", help="replace an existing root")
        if name == "export-root":
            sp.add_argument("--output", type=Path, help="file to write (default: stdout)")


# -- parsing helpers -----------------------------------------------------------------------------


def _hex(value: str | None, option: str) -> bytes | None:
    if value is None:
        return None
    text = value[2:] if value.lower().startswith("0x") else value
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise NitroError(ErrorCode.InvalidArgument, f"{option} {value!r}: not hexadecimal") from None


def _field(value: bytes | None, option: str, field: str) -> bytes | None:
    """Check ``value`` for the document's ``field`` (nonce, user_data or public_key), given as
    ``option``, against the size a document may carry.

    docs/attestation.md: each of these fields is at most
    :data:`harness.attestation.MAX_OPTIONAL_FIELD` (1024) bytes, and every verifier (this
    harness's, the KMS emulator's) rejects a longer one. The real NSM signs longer ones (its
    documentation says 512 for nonce and user data, see :data:`harness.nsm.STRICT_LIMITS`), so
    the limit is checked here, before signing or verifying, as E03 naming the option.
    """
    from harness.attestation import MAX_OPTIONAL_FIELD

    if value is not None and len(value) > MAX_OPTIONAL_FIELD:
        raise NitroError(
            ErrorCode.InvalidArgument,
            f"{option}: {len(value)} bytes, more than the {MAX_OPTIONAL_FIELD} bytes an "
            f"attestation document's {field} may carry",
        )
    return value


def _time(value: str, option: str) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    except (OverflowError, OSError):
        raise NitroError(ErrorCode.InvalidArgument, f"{option} {value!r}: out of range") from None
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise NitroError(
            ErrorCode.InvalidArgument, f"{option} {value!r}: expected ISO 8601 (2026-01-03T20:41:07Z) or Unix seconds"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise NitroError(ErrorCode.FileOperationFailure, f"{path}: cannot read {what}: {err.strerror}") from None


def _load_root(path: Path) -> x509.Certificate:
    data = _read(path, "root certificate")
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise NitroError(ErrorCode.InvalidArgument, f"{path}: not a PEM or DER certificate ({err})") from None


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise NitroError(ErrorCode.FileOperationFailure, f"{path}: cannot write: {err.strerror}") from None


def _document_bytes(path: Path) -> bytes:
    """Raw CBOR, or base64 of it (what KMS requests and many tools carry)."""
    import base64
    import binascii

    data = _read(path, "attestation document")
    stripped = data.strip()
    if stripped[:1] not in (b"\x84", b"\xd2") and stripped:
        try:
            return base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            pass
    return data


# -- commands ------------------------------------------------------------------------------------


def attest(args) -> int:
    """``attest``: measure the EIF, build the NSM state an enclave of it would have, sign a
    document with the harness PKI and write it (atomically) to ``--output``. Prints a summary."""
    import secrets

    from harness.attestation import build_document, decode_document
    from harness.eif import measure_eif
    from harness.nsm import NsmState
    from harness.pki import Pki

    nonce = _field(_hex(args.nonce, "--nonce"), "--nonce", "nonce")
    user_data = _field(_hex(args.user_data, "--user-data"), "--user-data", "user_data")
    public_key = None
    if args.public_key:
        public_key = _field(_read(args.public_key, "public key"), f"--public-key {args.public_key}", "public_key")
    timestamp = _time(args.timestamp, "--timestamp") if args.timestamp else None
    measurements = measure_eif(args.eif_path)
    if args.instance_id is not None:
        instance_id = args.instance_id
    else:
        from harness.enclave import default_instance_id

        instance_id = default_instance_id()
    module_id = args.enclave_id or f"{instance_id}-enc{secrets.randbits(64):016x}"
    state = NsmState(
        measurements,
        module_id=module_id,
        debug_mode=args.debug_mode,
        parent_role_arn=args.parent_role,
        instance_id=instance_id,
    )
    pki = Pki.load_or_create(args.pki_dir, region=args.region)
    try:
        document = build_document(
            pki,
            module_id=module_id,
            pcrs=state.document_pcrs(),
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
            timestamp=timestamp,
            indefinite=not args.definite,
        )
    except ValueError as err:
        raise NitroError(ErrorCode.InvalidArgument, f"--timestamp: {err}") from None
    _write_atomic(args.output, document)
    progress(f"wrote {len(document)} bytes to {args.output}")
    doc = decode_document(document)
    print_json(
        {
            "Output": str(args.output),
            "ModuleId": module_id,
            "Timestamp": doc.timestamp_ms,
            "DebugMode": args.debug_mode,
            "Measurements": measurements.to_json(),
            "PCR3": doc.pcrs[3].hex(),
            "PCR4": doc.pcrs[4].hex(),
            "Root": {"Path": str(pki.directory) if pki.directory else None, "SHA256": pki.root_fingerprint()},
        }
    )
    return 0


def verify_attestation(args) -> int:
    """``verify-attestation``: verify FILE against the pinned root(s) and print the document
    as JSON; a failure is one line ``E59 ... <check>: <reason>``."""
    from harness.attestation import AT_DOCUMENT_TIME, AttestationError, Expectations, aws_root_g1, verify_document

    roots = [_load_root(p) for p in args.root] if args.root else [aws_root_g1()]
    at: dt.datetime | str | None
    if args.at is None or args.at == "now":
        at = None
    elif args.at == "document":
        at = AT_DOCUMENT_TIME
    else:
        at = _time(args.at, "--at")
    pcrs: dict[int, bytes] = {}
    for item in args.expect_pcr:
        index, sep, value = item.partition("=")
        if not sep or not index.strip().isdigit() or not 0 <= int(index) < 32:
            raise NitroError(ErrorCode.InvalidArgument, f"--expect-pcr {item!r}: expected N=HEX with N in 0..31")
        digest = _hex(value.strip(), f"--expect-pcr {index}")
        assert digest is not None
        if len(digest) != 48:
            raise NitroError(ErrorCode.InvalidArgument, f"--expect-pcr {item[:20]}...: a PCR is 48 bytes (96 hex digits)")
        pcrs[int(index)] = digest
    expect = Expectations(
        pcrs=pcrs,
        nonce=_field(_hex(args.nonce, "--nonce"), "--nonce", "nonce"),
        user_data=_field(_hex(args.user_data, "--user-data"), "--user-data", "user_data"),
        public_key=_field(_read(args.public_key, "public key"), f"--public-key {args.public_key}", "public_key")
        if args.public_key
        else None,
        allow_debug=args.allow_debug,
    )
    data = _document_bytes(args.file)
    try:
        doc = verify_document(data, roots=roots, at=at, expect=expect)  # type: ignore[arg-type]
    except AttestationError as err:
        raise NitroError(ErrorCode.EIFSignatureCheckerError, f"{args.file}: {err.check}: {err.message}") from None
    print_json(doc.to_json())
    return 0


def _pki_dir(args) -> Path:
    from harness.pki import Pki

    return args.pki_dir if args.pki_dir is not None else Pki.default_directory()


def _root_json(pki, created: bool | None = None) -> dict:
    cert = pki.root_certificate
    out = {
        "Directory": str(pki.directory) if pki.directory else None,
        "Subject": cert.subject.rfc4514_string(),
        "SHA256": pki.root_fingerprint(),
        "NotBefore": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "NotAfter": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "KeyAlgorithm": "EC P-384",
    }
    if created is not None:
        out["Created"] = created
    return out


def pki_init(args) -> int:
    """``pki init``: create the root in the PKI directory unless one exists (``--force``
    replaces it). Prints the root's identity."""
    from harness.pki import ROOT_CERT_FILE, Pki

    directory = _pki_dir(args)
    exists = (directory / ROOT_CERT_FILE).exists()
    if exists and not args.force:
        pki = Pki.load(directory)
        progress(f"keeping the existing root in {directory} (--force replaces it)")
    else:
        pki = Pki.create()
        pki.save(directory)
        progress(f"created a new root in {directory}")
    print_json(_root_json(pki, created=not exists or args.force))
    return 0


def pki_show(args) -> int:
    """``pki show``: print the root's directory, subject, SHA-256 and validity. E19 when no
    root exists there yet."""
    from harness.pki import Pki

    print_json(_root_json(Pki.load(_pki_dir(args))))
    return 0


def pki_export_root(args) -> int:
    """``pki export-root``: write the root certificate PEM to ``--output`` (or stdout), for
    verifiers that pin a root (``openssl verify -CAfile``, KMS emulators, SDKs)."""
    from harness.pki import Pki

    pki = Pki.load(_pki_dir(args))
    pem = pki.root_pem()
    if args.output is None:
        import sys

        sys.stdout.write(pem)
    else:
        _write_atomic(args.output, pem.encode("ascii"))
        progress(f"wrote the root certificate to {args.output}")
    return 0
