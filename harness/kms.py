"""KMS emulator: AWS JSON 1.1 over HTTP(S), key policies, attestation, CiphertextForRecipient.

SPEC 8 is the contract. boto3 (and any SigV4 client) talks to :class:`KmsServer` unchanged:
``POST /`` with ``X-Amz-Target: TrentService.<Operation>``. Request shapes, lengths, patterns
and enums are checked against botocore's own KMS service model, and responses are shaped by
the same model (blobs as padded base64, timestamps as epoch seconds). Errors are HTTP 400
``{"__type": name, "message": text}`` (500 for KMSInternalException,
DependencyTimeoutException and KeyUnavailableException).

``Recipient`` (Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom) carries an
attestation document; it is verified with ``harness.attestation.verify_document`` against the
configured roots (the harness PKI's root by default), its PCRs become the
``kms:RecipientAttestation:*`` condition keys, and the secret is returned only as
``CiphertextForRecipient`` (``harness.cms``), encrypted to the document's RSA public key.

Symmetric ciphertext blobs are the emulator's own opaque format (SPEC 8): ``b"NHK" 0x01`` ||
key id (36 ASCII bytes) || 12-byte IV || AES-256-GCM ciphertext and tag, with the encryption
context (canonical JSON) as additional authenticated data.

State (keys, aliases, policies) can be persisted to a JSON file; every change is written to a
temporary file in the same folder, fsynced and renamed over the old one, so a crash leaves
either the old or the new state, never a torn file.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime as _dt
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import socketserver
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness import cms, kms_policy
from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError

__all__ = [
    "KmsError",
    "KmsCredential",
    "KmsServer",
    "KmsService",
    "TlsIdentity",
    "ensure_tls_identity",
    "service_model",
]

log = logging.getLogger("harness.kms")

_TARGET_PREFIX = "TrentService."
_SERVER_ERRORS = {"KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException"}
_BLOB_MAGIC = b"NHK\x01"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]{64})\s*$"
)
_STATE_VERSION = 1


class KmsError(Exception):
    """An AWS KMS error answered to the client: ``name`` is the ``__type`` (an exception
    name from the KMS model or AWS's common errors), ``message`` the text, ``status`` the
    HTTP status (SPEC 8: 400, 500 for internal errors)."""

    def __init__(self, name: str, message: str, status: int | None = None):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.status = status if status is not None else (500 if name in _SERVER_ERRORS else 400)


@dataclass(frozen=True)
class KmsCredential:
    """An access key the emulator accepts: ``access_key_id``, ``secret_access_key`` and the
    IAM ``principal_arn`` it stands for (``aws:PrincipalArn`` in policies)."""

    access_key_id: str
    secret_access_key: str
    principal_arn: str


# --------------------------------------------------------------------------------------------
# botocore model: request validation and response shaping
# --------------------------------------------------------------------------------------------

_MODEL = None
_MODEL_LOCK = threading.Lock()


def service_model():
    """botocore's KMS ``ServiceModel`` (loaded once; about 0.1 s)."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            import botocore.session

            _MODEL = botocore.session.get_session().get_service_model("kms")
        return _MODEL


def _wire_name(path: str) -> str:
    """AWS validation messages name members in lowerCamelCase dotted paths."""
    return ".".join(part[:1].lower() + part[1:] for part in path.split(".") if part)


_PATTERNS: dict[str, re.Pattern[str] | None] = {}


def _pattern(text: str) -> re.Pattern[str] | None:
    """Compile a model pattern once; patterns Python's ``re`` cannot read are skipped."""
    if text not in _PATTERNS:
        try:
            _PATTERNS[text] = re.compile(text)
        except re.error:
            _PATTERNS[text] = None
    return _PATTERNS[text]


class _Validation:
    """Collects AWS-style validation errors while a request is decoded."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, value: Any, rule: str, sensitive: bool = False) -> None:
        shown = "" if sensitive or value is None else f" '{value}'"
        self.errors.append(f"Value{shown} at '{_wire_name(path)}' failed to satisfy constraint: {rule}")

    def raise_if_any(self) -> None:
        if self.errors:
            count = len(self.errors)
            noun = "error" if count == 1 else "errors"
            raise KmsError(
                "ValidationException",
                f"{count} validation {noun} detected: " + "; ".join(self.errors),
            )


def _decode(value: Any, shape, path: str, check: _Validation) -> Any:
    """Decode one JSON value by its botocore shape, recording constraint violations.

    Type mismatches are SerializationException (the request cannot be read at all);
    length, range, pattern and enum violations are ValidationException (collected).
    """
    meta = shape.metadata
    kind = shape.type_name
    sensitive = bool(meta.get("sensitive"))
    if kind == "structure":
        if not isinstance(value, dict):
            raise KmsError(
                "SerializationException", f"{_wire_name(path) or 'request'}: expected a JSON object"
            )
        out = {}
        for name, member in shape.members.items():
            if name in value and value[name] is not None:
                out[name] = _decode(value[name], member, f"{path}.{name}", check)
        for name in shape.required_members:
            if name not in out:
                check.add(f"{path}.{name}", None, "Member must not be null")
        return out
    if kind == "list":
        if not isinstance(value, list):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a JSON array")
        _check_size(len(value), meta, path, None, check, "length")
        return [_decode(v, shape.member, f"{path}.member", check) for v in value]
    if kind == "map":
        if not isinstance(value, dict):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a JSON object")
        _check_size(len(value), meta, path, None, check, "length")
        return {
            _decode(k, shape.key, f"{path}.key", check): _decode(v, shape.value, f"{path}.value", check)
            for k, v in value.items()
        }
    if kind == "string":
        if not isinstance(value, str):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a string")
        _check_size(len(value), meta, path, None if sensitive else value, check, "length")
        if shape.enum and value not in shape.enum:
            check.add(path, value, "Member must satisfy enum value set: [" + ", ".join(shape.enum) + "]")
        pattern = meta.get("pattern")
        if pattern and value and (compiled := _pattern(pattern)) and not compiled.fullmatch(value):
            check.add(
                path,
                None if sensitive else value,
                f"Member must satisfy regular expression pattern: {pattern}",
            )
        return value
    if kind == "blob":
        if not isinstance(value, str):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise KmsError("SerializationException", f"{_wire_name(path)}: not valid base64") from None
        _check_size(len(raw), meta, path, None, check, "length")
        return raw
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected an integer")
        _check_size(value, meta, path, value, check, "value")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected true or false")
        return value
    if kind == "timestamp":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected epoch seconds")
        return float(value)
    return value


def _check_size(
    n: int, meta: Mapping[str, Any], path: str, shown: Any, check: _Validation, what: str
) -> None:
    if "min" in meta and n < meta["min"]:
        check.add(path, shown, f"Member must have {what} greater than or equal to {meta['min']}")
    if "max" in meta and n > meta["max"]:
        check.add(path, shown, f"Member must have {what} less than or equal to {meta['max']}")


def _encode(value: Any, shape, path: str) -> Any:
    """Encode a Python value for the wire by its botocore output shape.

    Members the shape does not declare are a bug in the emulator (KMSInternalException).
    """
    kind = shape.type_name
    if kind == "structure":
        out = {}
        for name, item in value.items():
            if item is None:
                continue
            if name not in shape.members:
                raise KmsError("KMSInternalException", f"emulator bug: {path}.{name} is not in the KMS model")
            out[name] = _encode(item, shape.members[name], f"{path}.{name}")
        return out
    if kind == "list":
        return [_encode(v, shape.member, path) for v in value]
    if kind == "map":
        return {k: _encode(v, shape.value, path) for k, v in value.items()}
    if kind == "blob":
        return base64.b64encode(value).decode("ascii")
    if kind == "timestamp":
        return round(float(value), 3)
    return value


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    """Read a state file written by :func:`harness.atomic_file.write_atomically`; NitroError if it is unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"version": _STATE_VERSION, "keys": {}, "aliases": {}}
    except OSError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"KMS state file {path}: cannot read ({err.strerror})"
        ) from None
    try:
        state = json.loads(raw)
    except ValueError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure,
            f"KMS state file {path}: not valid JSON ({err}); the file was left untouched",
        ) from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise NitroError(
            ErrorCode.FileOperationFailure,
            f"KMS state file {path}: field 'version' must be {_STATE_VERSION}; the file was left untouched",
        )
    for field_name in ("keys", "aliases"):
        if not isinstance(state.get(field_name), dict):
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"KMS state file {path}: field '{field_name}' must be an object",
            )
    for key_id, key in state["keys"].items():
        try:
            if len(base64.b64decode(key["Material"], validate=True)) != 32:
                raise ValueError("not 32 bytes")
        except (KeyError, TypeError, ValueError, binascii.Error) as err:
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"KMS state file {path}: keys.{key_id}.Material must be 32 bytes of base64 ({err})",
            ) from None
    return state


# --------------------------------------------------------------------------------------------
# The service: operations on state, independent of HTTP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Caller:
    principal_arn: str
    access_key_id: str | None


def _encryption_context_aad(context: Mapping[str, str] | None) -> bytes:
    """Canonical bytes of an encryption context (order-independent, as KMS treats it)."""
    return json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":")).encode()


def _load_roots(roots: Iterable[Any]) -> list[Any]:
    """Turn PEM/DER bytes, paths or certificate objects into ``x509.Certificate`` objects."""
    from cryptography import x509

    out = []
    for item in roots:
        if isinstance(item, x509.Certificate):
            out.append(item)
            continue
        data = item
        if isinstance(item, (str, os.PathLike)):
            try:
                data = Path(item).read_bytes()
            except OSError as err:
                raise NitroError(
                    ErrorCode.FileOperationFailure, f"attestation root {item}: cannot read ({err.strerror})"
                ) from None
        try:
            if b"-----BEGIN" in data:
                out.extend(x509.load_pem_x509_certificates(data))
            else:
                out.append(x509.load_der_x509_certificate(data))
        except ValueError as err:
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"attestation root {item!r:.60}: not a PEM or DER certificate ({err})",
            ) from None
    return out


class KmsService:
    """The KMS operations over an in-memory (optionally persisted) key store.

    ``state_path``: JSON file to load from and save to (None = memory only).
    ``region`` / ``account_id``: used in ARNs (``arn:aws:kms:<region>:<account>:key/<id>``).
    ``attestation_roots``: certificates (objects, PEM/DER bytes or paths) a Recipient's
    attestation document must chain to; None = the harness PKI's root
    (``harness.pki``), resolved on first use. ``attestation_at``: verification time (None =
    now; a datetime, or ``"document"`` for each document's own timestamp, to accept stored
    documents such as real AWS vectors).
    ``bad_attestation_exception``: ``"ValidationException"`` or ``"AccessDeniedException"``
    (SPEC 8: AWS's choice is undocumented). Thread-safe.
    """

    def __init__(
        self,
        state_path: str | os.PathLike | None = None,
        *,
        region: str = "us-east-1",
        account_id: str = "111122223333",
        attestation_roots: Sequence[Any] | None = None,
        attestation_at: _dt.datetime | str | None = None,
        bad_attestation_exception: str = "ValidationException",
    ):
        if bad_attestation_exception not in ("ValidationException", "AccessDeniedException"):
            raise NitroError(
                ErrorCode.InvalidArgument,
                "bad_attestation_exception: must be ValidationException or AccessDeniedException "
                f"(SPEC 8), got {bad_attestation_exception!r}",
            )
        if not re.fullmatch(r"\d{12}", account_id):
            raise NitroError(ErrorCode.InvalidArgument, f"account_id: must be 12 digits, got {account_id!r}")
        self.region = region
        self.account_id = account_id
        self.state_path = Path(state_path) if state_path is not None else None
        self._lock = threading.RLock()
        self._state = (
            _load_state(self.state_path)
            if self.state_path
            else {"version": _STATE_VERSION, "keys": {}, "aliases": {}}
        )
        self._roots = _load_roots(attestation_roots) if attestation_roots is not None else None
        self._attestation_at = attestation_at
        self._bad_attestation = bad_attestation_exception
        self._policy_cache: dict[str, dict[str, Any]] = {}
        self.model = service_model()
        self._operations: dict[str, Callable[[dict[str, Any], _Caller], dict[str, Any]]] = {
            "CreateKey": self._create_key,
            "DescribeKey": self._describe_key,
            "ListKeys": self._list_keys,
            "CreateAlias": self._create_alias,
            "DeleteAlias": self._delete_alias,
            "UpdateAlias": self._update_alias,
            "ListAliases": self._list_aliases,
            "EnableKey": self._enable_key,
            "DisableKey": self._disable_key,
            "ScheduleKeyDeletion": self._schedule_key_deletion,
            "CancelKeyDeletion": self._cancel_key_deletion,
            "GetKeyPolicy": self._get_key_policy,
            "PutKeyPolicy": self._put_key_policy,
            "ListKeyPolicies": self._list_key_policies,
            "UpdateKeyDescription": self._update_key_description,
            "TagResource": self._tag_resource,
            "UntagResource": self._untag_resource,
            "ListResourceTags": self._list_resource_tags,
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "ReEncrypt": self._re_encrypt,
            "GenerateDataKey": self._generate_data_key,
            "GenerateDataKeyWithoutPlaintext": self._generate_data_key_without_plaintext,
            "GenerateDataKeyPair": self._generate_data_key_pair,
            "GenerateDataKeyPairWithoutPlaintext": self._generate_data_key_pair_without_plaintext,
            "GenerateRandom": self._generate_random,
        }

    # ---- entry point ----------------------------------------------------------------------

    def handle(self, operation: str, body: bytes, caller: _Caller) -> dict[str, Any]:
        """Run one operation: decode ``body`` (JSON) by the model, execute, shape the output.

        Returns the response as a JSON-ready dict. Raises :class:`KmsError`.
        """
        try:
            op_model = self.model.operation_model(operation)
        except Exception:  # botocore raises OperationNotFoundError
            raise KmsError(
                "UnknownOperationException", f"Unknown operation TrentService.{operation}"
            ) from None
        try:
            raw = json.loads(body or b"{}")
        except ValueError:
            raise KmsError("SerializationException", "request body is not valid JSON") from None
        check = _Validation()
        params = _decode(raw, op_model.input_shape, "", check) if op_model.input_shape else {}
        check.raise_if_any()
        impl = self._operations.get(operation)
        if impl is None:
            raise KmsError(
                "UnsupportedOperationException",
                f"The KMS emulator does not implement {operation}",
            )
        result = impl(params, caller)
        if op_model.output_shape is None:
            return {}
        return _encode(result, op_model.output_shape, operation)

    # ---- helpers --------------------------------------------------------------------------

    def _save(self) -> None:
        if self.state_path is not None:
            data = json.dumps(self._state, indent=1, sort_keys=True).encode()
            write_atomically(self.state_path, data, 0o600)  # holds key material

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def _alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{name}"

    def _sweep(self) -> None:
        """Delete keys whose deletion date has passed (as KMS does at the window's end)."""
        now = time.time()
        gone = [
            k
            for k, v in self._state["keys"].items()
            if v["KeyState"] == "PendingDeletion" and v["DeletionDate"] <= now
        ]
        for key_id in gone:
            del self._state["keys"][key_id]
            for alias in [a for a, t in self._state["aliases"].items() if t["TargetKeyId"] == key_id]:
                del self._state["aliases"][alias]
        if gone:
            self._save()

    def _resolve(self, key_ref: str, *, allow_alias: bool = True) -> dict[str, Any]:
        """Find a key by id, key ARN, alias name or alias ARN (NotFoundException)."""
        self._sweep()
        ref = key_ref
        prefix = f"arn:aws:kms:{self.region}:{self.account_id}:"
        if ref.startswith("arn:"):
            if not ref.startswith(prefix):
                raise KmsError(
                    "NotFoundException",
                    f"Invalid arn {key_ref}" if ref.count(":") < 5 else f"Key '{key_ref}' does not exist",
                )
            ref = ref[len(prefix) :]
            if ref.startswith("key/"):
                ref = ref[4:]
        if ref.startswith("alias/"):
            if not allow_alias:
                raise KmsError(
                    "ValidationException", f"{key_ref} is an alias; a key id or key ARN is required here"
                )
            alias = self._state["aliases"].get(ref)
            if alias is None:
                raise KmsError("NotFoundException", f"Alias {self._alias_arn(ref)} is not found.")
            ref = alias["TargetKeyId"]
        key = self._state["keys"].get(ref)
        if key is None:
            raise KmsError("NotFoundException", f"Key '{self._arn(ref)}' does not exist")
        return key

    def _metadata(self, key: Mapping[str, Any]) -> dict[str, Any]:
        meta = {
            "AWSAccountId": self.account_id,
            "KeyId": key["KeyId"],
            "Arn": key["Arn"],
            "CreationDate": key["CreationDate"],
            "Enabled": key["KeyState"] == "Enabled",
            "Description": key["Description"],
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": key["KeyState"],
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }
        if key["KeyState"] == "PendingDeletion":
            meta["DeletionDate"] = key["DeletionDate"]
            meta["PendingDeletionWindowInDays"] = key["PendingWindowInDays"]
        return meta

    def _policy(self, key: Mapping[str, Any]) -> dict[str, Any]:
        text = key["Policy"]
        doc = self._policy_cache.get(text)
        if doc is None:
            doc = kms_policy.parse_policy(text)
            if len(self._policy_cache) > 256:
                self._policy_cache.clear()
            self._policy_cache[text] = doc
        return doc

    def _authorize(
        self,
        key: Mapping[str, Any],
        action: str,
        caller: _Caller,
        *,
        encryption_context: Mapping[str, str] | None = None,
        attestation: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Evaluate the key policy for ``kms:<action>``; AccessDeniedException if denied."""
        keys: dict[str, Any] = {
            "aws:PrincipalArn": caller.principal_arn,
            "aws:PrincipalAccount": _account_of(caller.principal_arn),
            "kms:CallerAccount": _account_of(caller.principal_arn),
        }
        if encryption_context:
            for name, value in encryption_context.items():
                keys[f"kms:EncryptionContext:{name}"] = value
            keys["kms:EncryptionContextKeys"] = list(encryption_context)
        if attestation:
            keys.update(attestation)
        if extra:
            keys.update({k: v for k, v in extra.items() if v is not None})
        ctx = kms_policy.RequestContext(f"kms:{action}", caller.principal_arn, key["Arn"], keys)
        decision = kms_policy.evaluate(self._policy(key), ctx)
        if not decision.allowed:
            log.info(
                "denied %s for %s on %s: %s",
                ctx.action,
                caller.principal_arn,
                key["Arn"],
                "; ".join(decision.trace),
            )
            raise KmsError("AccessDeniedException", kms_policy.denial_message(ctx, decision))

    @staticmethod
    def _require_usable(key: Mapping[str, Any]) -> None:
        """SPEC 8 / KMS key states: cryptographic operations need an Enabled key."""
        if key["KeyState"] == "Disabled":
            raise KmsError("DisabledException", f"{key['Arn']} is disabled.")
        if key["KeyState"] != "Enabled":
            raise KmsError("KMSInvalidStateException", f"{key['Arn']} is pending deletion.")

    def _attest(self, recipient: Mapping[str, Any] | None) -> tuple[bytes | None, dict[str, str]]:
        """Verify a Recipient's attestation document.

        Returns (recipient SPKI DER, condition keys ``kms:RecipientAttestation:*``), or
        (None, {}) without a Recipient. A bad document raises the configured exception.
        """
        if not recipient:
            return None, {}
        document = recipient.get("AttestationDocument")
        if not document:
            raise KmsError(
                "ValidationException", "Recipient.AttestationDocument is required when Recipient is given"
            )
        from harness import attestation  # the NSM area's verifier; imported on first use

        roots = self._roots
        if roots is None:
            roots = self._roots = _default_roots()
        try:
            doc = attestation.verify_document(document, roots=roots, at=self._attestation_at)
        except attestation.AttestationError as err:
            raise KmsError(
                self._bad_attestation,
                f"The attestation document is not valid: {err}",
            ) from None
        public_key = doc.public_key
        if not public_key:
            raise KmsError(
                "ValidationException",
                "The attestation document has no public_key to encrypt the CiphertextForRecipient to",
            )
        try:
            key = serialization.load_der_public_key(public_key)
        except ValueError:
            raise KmsError(
                "ValidationException",
                "The attestation document's public_key is not a DER SubjectPublicKeyInfo",
            ) from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise KmsError(
                "ValidationException",
                "The attestation document's public_key must be an RSA key of at least 2048 bits (RSAES_OAEP_SHA_256)",
            )
        keys = {f"kms:RecipientAttestation:PCR{index}": value.hex() for index, value in doc.pcrs.items()}
        if 0 in doc.pcrs:
            keys["kms:RecipientAttestation:ImageSha384"] = doc.pcrs[0].hex()
        return public_key, keys

    def _seal(self, key: Mapping[str, Any], plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        material = base64.b64decode(key["Material"])
        iv = os.urandom(12)
        key_id = key["KeyId"].encode()
        sealed = AESGCM(material).encrypt(iv, plaintext, key_id + _encryption_context_aad(context))
        return _BLOB_MAGIC + key_id + iv + sealed

    def _blob_key_id(self, blob: bytes) -> str:
        if len(blob) < 4 + 36 + 12 + 16 or blob[:4] != _BLOB_MAGIC:
            raise KmsError(
                "InvalidCiphertextException", "The ciphertext is not a ciphertext blob of this KMS"
            )
        key_id = blob[4:40].decode("ascii", "replace")
        if not _KEY_ID_RE.match(key_id):
            raise KmsError(
                "InvalidCiphertextException", "The ciphertext is not a ciphertext blob of this KMS"
            )
        return key_id

    def _unseal(self, key: Mapping[str, Any], blob: bytes, context: Mapping[str, str] | None) -> bytes:
        material = base64.b64decode(key["Material"])
        try:
            return AESGCM(material).decrypt(
                blob[40:52], blob[52:], key["KeyId"].encode() + _encryption_context_aad(context)
            )
        except Exception:  # cryptography raises InvalidTag
            raise KmsError(
                "InvalidCiphertextException",
                "The ciphertext or its encryption context does not match (authentication failed)",
            ) from None

    @staticmethod
    def _check_algorithm(params: Mapping[str, Any], name: str = "EncryptionAlgorithm") -> None:
        algorithm = params.get(name)
        if algorithm not in (None, "SYMMETRIC_DEFAULT"):
            raise KmsError(
                "InvalidKeyUsageException", f"{name} {algorithm} is not valid for a SYMMETRIC_DEFAULT key"
            )

    @staticmethod
    def _dry_run(params: Mapping[str, Any]) -> None:
        if params.get("DryRun"):
            raise KmsError(
                "DryRunOperationException", "The request would have succeeded, but the DryRun option is set."
            )

    def _key_for_secret_op(
        self,
        params: Mapping[str, Any],
        caller: _Caller,
        action: str,
        *,
        attestation: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        key = self._resolve(params["KeyId"])
        self._authorize(
            key,
            action,
            caller,
            encryption_context=params.get("EncryptionContext"),
            attestation=attestation,
            extra={"kms:RequestAlias": _alias_of(params.get("KeyId")), **(extra or {})},
        )
        self._require_usable(key)
        self._dry_run(params)
        return key

    # ---- key management -------------------------------------------------------------------

    def _check_new_policy(self, text: str, caller: _Caller, key_arn: str, bypass: bool) -> None:
        """Parse a policy (MalformedPolicyDocumentException) and apply KMS's lockout check."""
        try:
            doc = kms_policy.parse_policy(text)
        except kms_policy.PolicyError as err:
            raise KmsError("MalformedPolicyDocumentException", str(err)) from None
        if bypass:
            return
        ctx = kms_policy.RequestContext(
            "kms:PutKeyPolicy",
            caller.principal_arn,
            key_arn,
            {
                "aws:PrincipalArn": caller.principal_arn,
            },
        )
        if not kms_policy.evaluate(doc, ctx).allowed:
            raise KmsError(
                "MalformedPolicyDocumentException",
                "The new key policy will not allow you to update the key policy in the future.",
            )

    def _create_key(self, p: dict[str, Any], caller: _Caller) -> dict[str, Any]:
        usage = p.get("KeyUsage", "ENCRYPT_DECRYPT")
        spec = p.get("KeySpec", p.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
        if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
            raise KmsError(
                "UnsupportedOperationException",
                f"The KMS emulator supports only SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys, not {spec}/{usage}",
            )
        if p.get("Origin", "AWS_KMS") != "AWS_KMS" or p.get("CustomKeyStoreId") or p.get("MultiRegion"):
            raise KmsError(
                "UnsupportedOperationException",
                "The KMS emulator supports only AWS_KMS-origin single-Region keys",
            )
        key_id = str(uuid.uuid4())
        arn = self._arn(key_id)
        policy = p.get("Policy")
        if policy is not None:
            self._check_new_policy(policy, caller, arn, bool(p.get("BypassPolicyLockoutSafetyCheck")))
        else:
            policy = kms_policy.default_key_policy(self.account_id)
        key = {
            "KeyId": key_id,
            "Arn": arn,
            "CreationDate": time.time(),
            "Description": p.get("Description", ""),
            "KeyState": "Enabled",
            "Policy": policy,
            "Tags": {t["TagKey"]: t["TagValue"] for t in p.get("Tags", [])},
            "Material": base64.b64encode(os.urandom(32)).decode(),
        }
        with self._lock:
            self._state["keys"][key_id] = key
            self._save()
        return {"KeyMetadata": self._metadata(key)}

    def _describe_key(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"])
        self._authorize(key, "DescribeKey", caller)
        return {"KeyMetadata": self._metadata(key)}

    def _list_keys(self, p, caller):
        with self._lock:
            self._sweep()
            keys = sorted(self._state["keys"].values(), key=lambda k: (k["CreationDate"], k["KeyId"]))
        entries = [{"KeyId": k["KeyId"], "KeyArn": k["Arn"]} for k in keys]
        page, marker = _paginate(entries, p)
        return {"Keys": page, "NextMarker": marker, "Truncated": marker is not None}

    def _check_alias_name(self, name: str) -> None:
        if not name.startswith("alias/") or len(name) <= len("alias/"):
            raise KmsError(
                "ValidationException", f"Alias name {name!r} must begin with 'alias/' followed by a name"
            )
        if name.startswith("alias/aws/"):
            raise KmsError("NotFoundException", f"Alias {name} is reserved for AWS managed keys (alias/aws/)")

    def _create_alias(self, p, caller):
        name = p["AliasName"]
        self._check_alias_name(name)
        with self._lock:
            key = self._resolve(p["TargetKeyId"], allow_alias=False)
            self._authorize(key, "CreateAlias", caller)
            if key["KeyState"] == "PendingDeletion":
                self._require_usable(key)
            if name in self._state["aliases"]:
                raise KmsError(
                    "AlreadyExistsException", f"An alias with the name {self._alias_arn(name)} already exists"
                )
            now = time.time()
            self._state["aliases"][name] = {
                "TargetKeyId": key["KeyId"],
                "CreationDate": now,
                "LastUpdatedDate": now,
            }
            self._save()
        return {}

    def _delete_alias(self, p, caller):
        name = p["AliasName"]
        with self._lock:
            alias = self._state["aliases"].get(name)
            if alias is None:
                raise KmsError("NotFoundException", f"Alias {self._alias_arn(name)} is not found.")
            self._authorize(self._resolve(alias["TargetKeyId"]), "DeleteAlias", caller)
            del self._state["aliases"][name]
            self._save()
        return {}

    def _update_alias(self, p, caller):
        name = p["AliasName"]
        with self._lock:
            alias = self._state["aliases"].get(name)
            if alias is None:
                raise KmsError("NotFoundException", f"Alias {self._alias_arn(name)} is not found.")
            key = self._resolve(p["TargetKeyId"], allow_alias=False)
            self._authorize(key, "UpdateAlias", caller)
            alias.update(TargetKeyId=key["KeyId"], LastUpdatedDate=time.time())
            self._save()
        return {}

    def _list_aliases(self, p, caller):
        with self._lock:
            self._sweep()
            target = self._resolve(p["KeyId"], allow_alias=False)["KeyId"] if p.get("KeyId") else None
            aliases = sorted(self._state["aliases"].items())
        entries = [
            {
                "AliasName": name,
                "AliasArn": self._alias_arn(name),
                "TargetKeyId": a["TargetKeyId"],
                "CreationDate": a["CreationDate"],
                "LastUpdatedDate": a["LastUpdatedDate"],
            }
            for name, a in aliases
            if target is None or a["TargetKeyId"] == target
        ]
        page, marker = _paginate(entries, p)
        return {"Aliases": page, "NextMarker": marker, "Truncated": marker is not None}

    def _set_state(self, p, caller, action: str, new_state: str):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, action, caller)
            if key["KeyState"] == "PendingDeletion":
                self._require_usable(key)
            key["KeyState"] = new_state
            self._save()
        return {}

    def _enable_key(self, p, caller):
        return self._set_state(p, caller, "EnableKey", "Enabled")

    def _disable_key(self, p, caller):
        return self._set_state(p, caller, "DisableKey", "Disabled")

    def _schedule_key_deletion(self, p, caller):
        days = p.get("PendingWindowInDays", 30)
        if not 7 <= days <= 30:
            # The model allows 1..365; KMS itself enforces 7..30 for customer keys.
            check = _Validation()
            check.add("PendingWindowInDays", days, "Member must have value between 7 and 30")
            check.raise_if_any()
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "ScheduleKeyDeletion", caller)
            if key["KeyState"] == "PendingDeletion":
                raise KmsError("KMSInvalidStateException", f"{key['Arn']} is pending deletion.")
            key.update(
                KeyState="PendingDeletion", DeletionDate=time.time() + days * 86400, PendingWindowInDays=days
            )
            self._save()
        return {
            "KeyId": key["Arn"],
            "DeletionDate": key["DeletionDate"],
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": days,
        }

    def _cancel_key_deletion(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "CancelKeyDeletion", caller)
            if key["KeyState"] != "PendingDeletion":
                raise KmsError("KMSInvalidStateException", f"{key['Arn']} is not pending deletion.")
            # KMS leaves a key whose deletion was cancelled Disabled.
            key["KeyState"] = "Disabled"
            key.pop("DeletionDate", None)
            key.pop("PendingWindowInDays", None)
            self._save()
        return {"KeyId": key["Arn"]}

    @staticmethod
    def _check_policy_name(p) -> str:
        name = p.get("PolicyName", "default")
        if name != "default":
            raise KmsError(
                "NotFoundException",
                f"No such policy exists: {name} (a KMS key has one policy, named 'default')",
            )
        return name

    def _get_key_policy(self, p, caller):
        name = self._check_policy_name(p)
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
        self._authorize(key, "GetKeyPolicy", caller)
        return {"Policy": key["Policy"], "PolicyName": name}

    def _put_key_policy(self, p, caller):
        self._check_policy_name(p)
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "PutKeyPolicy", caller)
            self._check_new_policy(
                p["Policy"], caller, key["Arn"], bool(p.get("BypassPolicyLockoutSafetyCheck"))
            )
            key["Policy"] = p["Policy"]
            self._save()
        return {}

    def _list_key_policies(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
        self._authorize(key, "ListKeyPolicies", caller)
        return {"PolicyNames": ["default"], "Truncated": False}

    def _update_key_description(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "UpdateKeyDescription", caller)
            key["Description"] = p["Description"]
            self._save()
        return {}

    def _tag_resource(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "TagResource", caller)
            key.setdefault("Tags", {}).update({t["TagKey"]: t["TagValue"] for t in p["Tags"]})
            self._save()
        return {}

    def _untag_resource(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
            self._authorize(key, "UntagResource", caller)
            for name in p["TagKeys"]:
                key.setdefault("Tags", {}).pop(name, None)
            self._save()
        return {}

    def _list_resource_tags(self, p, caller):
        with self._lock:
            key = self._resolve(p["KeyId"], allow_alias=False)
        self._authorize(key, "ListResourceTags", caller)
        tags = [{"TagKey": k, "TagValue": v} for k, v in sorted(key.get("Tags", {}).items())]
        page, marker = _paginate(tags, p)
        return {"Tags": page, "NextMarker": marker, "Truncated": marker is not None}

    # ---- cryptographic operations ---------------------------------------------------------

    def _encrypt(self, p, caller):
        self._check_algorithm(p)
        with self._lock:
            key = self._key_for_secret_op(
                p,
                caller,
                "Encrypt",
                extra={"kms:EncryptionAlgorithm": p.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")},
            )
        return {
            "CiphertextBlob": self._seal(key, p["Plaintext"], p.get("EncryptionContext")),
            "KeyId": key["Arn"],
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def _open_blob(
        self,
        p,
        caller,
        action: str,
        *,
        blob_field="CiphertextBlob",
        key_field="KeyId",
        context_field="EncryptionContext",
        attestation=None,
    ):
        """Resolve, authorize and decrypt a ciphertext blob (Decrypt, ReEncrypt's source)."""
        if blob_field not in p:
            # Optional in the current model (DryRun-era change); KMS still needs it here.
            check = _Validation()
            check.add(blob_field, None, "Member must not be null")
            check.raise_if_any()
        blob = p[blob_field]
        with self._lock:
            blob_key_id = self._blob_key_id(blob)
            if p.get(key_field):
                key = self._resolve(p[key_field])
                if key["KeyId"] != blob_key_id:
                    raise KmsError(
                        "IncorrectKeyException",
                        "The key ID in the request does not identify a KMS key that can perform this operation.",
                    )
            else:
                key = self._state["keys"].get(blob_key_id)
                if key is None:
                    raise KmsError(
                        "InvalidCiphertextException", "The ciphertext refers to a KMS key that does not exist"
                    )
            context = p.get(context_field)
            self._authorize(
                key,
                action,
                caller,
                encryption_context=context,
                attestation=attestation,
                extra={
                    "kms:RequestAlias": _alias_of(p.get(key_field)),
                    "kms:EncryptionAlgorithm": p.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT"),
                },
            )
            self._require_usable(key)
        return key, self._unseal(key, blob, context)

    def _decrypt(self, p, caller):
        self._check_algorithm(p)
        spki, attestation = self._attest(p.get("Recipient"))
        key, plaintext = self._open_blob(p, caller, "Decrypt", attestation=attestation)
        self._dry_run(p)
        out: dict[str, Any] = {"KeyId": key["Arn"], "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        if spki is not None:
            out["CiphertextForRecipient"] = cms.build_ciphertext_for_recipient(plaintext, spki)
        else:
            out["Plaintext"] = plaintext
        return out

    def _re_encrypt(self, p, caller):
        self._check_algorithm(p, "SourceEncryptionAlgorithm")
        self._check_algorithm(p, "DestinationEncryptionAlgorithm")
        source, plaintext = self._open_blob(
            p, caller, "ReEncryptFrom", key_field="SourceKeyId", context_field="SourceEncryptionContext"
        )
        with self._lock:
            destination = self._resolve(p["DestinationKeyId"])
            self._authorize(
                destination, "ReEncryptTo", caller, encryption_context=p.get("DestinationEncryptionContext")
            )
            self._require_usable(destination)
        self._dry_run(p)
        return {
            "CiphertextBlob": self._seal(destination, plaintext, p.get("DestinationEncryptionContext")),
            "SourceKeyId": source["Arn"],
            "KeyId": destination["Arn"],
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    @staticmethod
    def _data_key_length(p) -> int:
        """SPEC 8: exactly one of KeySpec (AES_128 -> 16, AES_256 -> 32) or NumberOfBytes."""
        spec, count = p.get("KeySpec"), p.get("NumberOfBytes")
        if (spec is None) == (count is None):
            raise KmsError("ValidationException", "Please specify either number of bytes or key spec.")
        return count if count is not None else {"AES_128": 16, "AES_256": 32}[spec]

    def _generate_data_key(self, p, caller):
        length = self._data_key_length(p)
        spki, attestation = self._attest(p.get("Recipient"))
        with self._lock:
            key = self._key_for_secret_op(p, caller, "GenerateDataKey", attestation=attestation)
        plaintext = os.urandom(length)
        out: dict[str, Any] = {
            "CiphertextBlob": self._seal(key, plaintext, p.get("EncryptionContext")),
            "KeyId": key["Arn"],
        }
        if spki is not None:
            out["CiphertextForRecipient"] = cms.build_ciphertext_for_recipient(plaintext, spki)
        else:
            out["Plaintext"] = plaintext
        return out

    def _generate_data_key_without_plaintext(self, p, caller):
        length = self._data_key_length(p)
        with self._lock:
            key = self._key_for_secret_op(p, caller, "GenerateDataKeyWithoutPlaintext")
        return {
            "CiphertextBlob": self._seal(key, os.urandom(length), p.get("EncryptionContext")),
            "KeyId": key["Arn"],
        }

    def _key_pair(self, p, caller, action: str, attestation=None):
        spec = p["KeyPairSpec"]
        with self._lock:
            key = self._key_for_secret_op(
                p, caller, action, attestation=attestation, extra={"kms:DataKeyPairSpec": spec}
            )
        private = _generate_private_key(spec)
        private_der = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out = {
            "PrivateKeyCiphertextBlob": self._seal(key, private_der, p.get("EncryptionContext")),
            "PublicKey": public_der,
            "KeyId": key["Arn"],
            "KeyPairSpec": spec,
        }
        return out, private_der

    def _generate_data_key_pair(self, p, caller):
        spki, attestation = self._attest(p.get("Recipient"))
        out, private_der = self._key_pair(p, caller, "GenerateDataKeyPair", attestation)
        if spki is not None:
            out["CiphertextForRecipient"] = cms.build_ciphertext_for_recipient(private_der, spki)
        else:
            out["PrivateKeyPlaintext"] = private_der
        return out

    def _generate_data_key_pair_without_plaintext(self, p, caller):
        out, _ = self._key_pair(p, caller, "GenerateDataKeyPairWithoutPlaintext")
        return out

    def _generate_random(self, p, caller):
        if p.get("CustomKeyStoreId"):
            raise KmsError("CustomKeyStoreNotFoundException", "The KMS emulator has no custom key stores")
        count = p.get("NumberOfBytes")
        if count is None:
            check = _Validation()
            check.add("NumberOfBytes", None, "Member must not be null")
            check.raise_if_any()
        # GenerateRandom is not a key operation: IAM alone authorizes it, no key policy applies.
        spki, _ = self._attest(p.get("Recipient"))
        data = os.urandom(count)
        if spki is not None:
            return {"CiphertextForRecipient": cms.build_ciphertext_for_recipient(data, spki)}
        return {"Plaintext": data}


def _account_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[4] if len(parts) > 5 else ""


def _alias_of(ref: str | None) -> str | None:
    """``kms:RequestAlias``: the alias the request named the key by, if any."""
    if not ref:
        return None
    if ref.startswith("alias/"):
        return ref
    match = re.match(r"^arn:aws[\w-]*:kms:[^:]*:\d{12}:(alias/.+)$", ref)
    return match.group(1) if match else None


def _paginate(entries: list[Any], p: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    """Limit (default 100) / Marker pagination; the marker is the next index, opaque."""
    limit = p.get("Limit", 100)
    start = 0
    if p.get("Marker"):
        try:
            start = int(base64.urlsafe_b64decode(p["Marker"].encode()).decode())
        except (ValueError, binascii.Error):
            raise KmsError("InvalidMarkerException", "The marker is not one this KMS returned") from None
    page = entries[start : start + limit]
    more = start + limit < len(entries)
    marker = base64.urlsafe_b64encode(str(start + limit).encode()).decode() if more else None
    return page, marker


def _generate_private_key(spec: str):
    """A fresh private key for GenerateDataKeyPair's KeyPairSpec."""
    if spec.startswith("RSA_"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(spec[4:]))
    curves = {
        "ECC_NIST_P256": ec.SECP256R1,
        "ECC_NIST_P384": ec.SECP384R1,
        "ECC_NIST_P521": ec.SECP521R1,
        "ECC_SECG_P256K1": ec.SECP256K1,
    }
    if spec in curves:
        return ec.generate_private_key(curves[spec]())
    if spec == "ECC_NIST_EDWARDS25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PrivateKey.generate()
    raise KmsError(
        "UnsupportedOperationException", f"KeyPairSpec {spec} is not supported by the KMS emulator"
    )


def _default_roots() -> list[Any]:
    """The harness PKI's root, the default trust anchor for Recipient documents (SPEC 7)."""
    from harness import pki

    return [pki.Pki.load_or_create().root_certificate]


# --------------------------------------------------------------------------------------------
# TLS identity: what an enclave's kms.<region>.amazonaws.com connection verifies
# --------------------------------------------------------------------------------------------


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

    SPEC 8: enclave clients speak TLS to ``kms.<region>.amazonaws.com`` through the proxy and
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


# --------------------------------------------------------------------------------------------
# SigV4 verification (botocore's signer computes the expected signature)
# --------------------------------------------------------------------------------------------


def _normalize_credentials(credentials: Any, default_principal: str) -> dict[str, KmsCredential]:
    """Accept a sequence of :class:`KmsCredential`, or a mapping access key -> secret or
    access key -> (secret, principal ARN)."""
    if credentials is None:
        return {}
    out: dict[str, KmsCredential] = {}
    if isinstance(credentials, Mapping):
        for akid, value in credentials.items():
            if isinstance(value, str):
                out[akid] = KmsCredential(akid, value, default_principal)
            else:
                secret, arn = value
                out[akid] = KmsCredential(akid, secret, arn)
        return out
    for cred in credentials:
        if not isinstance(cred, KmsCredential):
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"credentials: expected KmsCredential entries, got {type(cred).__name__}",
            )
        out[cred.access_key_id] = cred
    return out


class _ListedHeadersSigV4(SigV4Auth):
    """botocore's SigV4 signer over exactly the headers the client listed in SignedHeaders
    (botocore would choose its own set, dropping e.g. User-Agent)."""

    def __init__(self, credentials: Credentials, service: str, region: str, listed: Mapping[str, str]):
        super().__init__(credentials, service, region)
        self._listed = listed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        mapped = HTTPHeaders()
        for name, value in self._listed.items():
            mapped[name] = value
        return mapped


class _SigV4:
    """Checks AWS Signature Version 4 on KMS requests against configured credentials."""

    def __init__(self, credentials: Mapping[str, KmsCredential], region: str, max_skew_s: float = 300.0):
        self.credentials = credentials
        self.region = region
        self.max_skew_s = max_skew_s

    def verify(self, method: str, path: str, headers, body: bytes) -> KmsCredential:
        """Return the credential that signed the request; raise KmsError otherwise.

        Errors follow AWS: MissingAuthenticationTokenException, UnrecognizedClientException
        (unknown access key), InvalidSignatureException (scope, time, signature),
        IncompleteSignatureException (malformed header).
        """

        auth = headers.get("Authorization")
        if not auth:
            raise KmsError("MissingAuthenticationTokenException", "Missing Authentication Token")
        match = _AUTH_RE.match(auth.strip())
        if not match:
            raise KmsError(
                "IncompleteSignatureException",
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
                "for AWS4-HMAC-SHA256",
            )
        scope = match.group("cred").split("/")
        if len(scope) != 5:
            raise KmsError(
                "IncompleteSignatureException",
                f"Credential {match.group('cred')!r} is not <key>/<date>/<region>/<service>/aws4_request",
            )
        akid, day, region, service, terminator = scope
        cred = self.credentials.get(akid)
        if cred is None:
            raise KmsError(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        if service != "kms" or terminator != "aws4_request":
            raise KmsError(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: 'kms'. (got {service!r})",
            )
        if region != self.region:
            raise KmsError(
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region, not '{region}'. (this KMS serves {self.region})",
            )
        amz_date = headers.get("X-Amz-Date")
        if not amz_date:
            raise KmsError("IncompleteSignatureException", "X-Amz-Date header is required for SigV4")
        try:
            signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            raise KmsError(
                "IncompleteSignatureException", f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ"
            ) from None
        if day != amz_date[:8]:
            raise KmsError(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{day}' != '{amz_date[:8]}'",
            )
        now = time.time()
        if abs(now - signed_at) > self.max_skew_s:
            raise KmsError(
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than "
                f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now - self.max_skew_s))} "
                f"({time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))} - 5 min.)"
                if signed_at < now
                else f"Signature not yet current: {amz_date} is still later than "
                f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now + self.max_skew_s))}",
            )
        signed_names = match.group("signed").split(";")
        if "host" not in signed_names:
            raise KmsError("InvalidSignatureException", "'Host' must be a signed header")
        content_sha = headers.get("X-Amz-Content-SHA256")
        if (
            content_sha
            and content_sha != "UNSIGNED-PAYLOAD"
            and content_sha != hashlib.sha256(body).hexdigest()
        ):
            raise KmsError(
                "InvalidSignatureException",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )

        signed_headers = {name: ",".join(headers.get_all(name) or [""]) for name in signed_names}

        request = AWSRequest(
            method=method, url=f"http://{signed_headers['host']}{path}", data=body, headers=signed_headers
        )
        request.context["timestamp"] = amz_date
        verifier = _ListedHeadersSigV4(
            Credentials(cred.access_key_id, cred.secret_access_key), "kms", region, signed_headers
        )
        canonical = verifier.canonical_request(request)
        expected = verifier.signature(verifier.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, match.group("sig")):
            raise KmsError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method. Consult the service "
                "documentation for details.",
            )
        return cred


# --------------------------------------------------------------------------------------------
# HTTP(S) server
# --------------------------------------------------------------------------------------------

_MAX_BODY = 2 * 1024 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 and the guest client reuse connections
    server_version = "nitro-harness-kms"
    sys_version = ""
    timeout = 60

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the harness logs via logging
        log.debug("%s " + fmt, self.client_address[0], *args)

    def _reply(self, status: int, payload: Mapping[str, Any], request_id: str) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", request_id)
        if "__type" in payload:
            self.send_header("x-amzn-ErrorType", str(payload["__type"]))
        # Head and body in one write: two small segments would meet the peer's delayed ACK
        # (Nagle), costing ~40 ms per keep-alive request.
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def _fail(self, err: KmsError, request_id: str) -> None:
        self._reply(err.status, {"__type": err.name, "message": err.message}, request_id)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, _MAX_BODY))
        self._fail(
            KmsError("UnknownOperationException", "KMS accepts only POST / with X-Amz-Target"),
            str(uuid.uuid4()),
        )

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        request_id = str(uuid.uuid4())
        server: _HttpServer = self.server  # type: ignore[assignment]
        try:
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                self.close_connection = True
                raise KmsError("SerializationException", "Content-Length is required")
            length = int(length_text)
            if length < 0 or length > _MAX_BODY:
                self.close_connection = True
                raise KmsError(
                    "SerializationException", f"request body of {length} bytes exceeds {_MAX_BODY}"
                )
            body = self.rfile.read(length)
            target = self.headers.get("X-Amz-Target", "")
            if not target.startswith(_TARGET_PREFIX):
                raise KmsError(
                    "UnknownOperationException", f"X-Amz-Target {target!r} is not TrentService.<Operation>"
                )
            if server.sigv4 is not None:
                cred = server.sigv4.verify("POST", self.path, self.headers, body)
                caller = _Caller(cred.principal_arn, cred.access_key_id)
            else:
                caller = _Caller(server.default_principal, None)
            result = server.service.handle(target[len(_TARGET_PREFIX) :], body, caller)
            self._reply(200, result, request_id)
        except KmsError as err:
            self._fail(err, request_id)
        except ValueError as err:
            self._fail(KmsError("SerializationException", str(err)), request_id)
        except Exception as err:  # noqa: BLE001 - any bug becomes KMS's 500, never a dead socket
            log.exception("KMS emulator internal error")
            self._fail(
                KmsError(
                    "KMSInternalException", f"internal error in the KMS emulator: {type(err).__name__}: {err}"
                ),
                request_id,
            )


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(
        self,
        address,
        service: KmsService,
        sigv4: _SigV4 | None,
        default_principal: str,
        ssl_context: ssl.SSLContext | None,
    ):
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.service = service
        self.sigv4 = sigv4
        self.default_principal = default_principal
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address) -> None:
        # TLS handshake in the connection's own thread, so a slow client never blocks accept().
        if self.ssl_context is None:
            self.RequestHandlerClass(request, client_address, self)
            return
        request.settimeout(_Handler.timeout)
        try:
            wrapped = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.debug("TLS handshake with %s failed: %s", client_address, err)
            return
        try:
            self.RequestHandlerClass(wrapped, client_address, self)
        finally:
            try:
                wrapped.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def _ssl_context(tls: Any) -> ssl.SSLContext | None:
    """``tls``: None, an ``ssl.SSLContext``, a :class:`TlsIdentity`, or (cert path, key path)."""
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


class KmsServer:
    """The KMS emulator as a threaded HTTP(S) server (SPEC 8).

    ``state_path``: JSON state file (None = keys live only as long as the server).
    ``host``/``port``: listening address (port 0 = ephemeral; see :attr:`endpoint_url`).
    ``tls``: None (HTTP), an ``ssl.SSLContext``, a :class:`TlsIdentity` (see
    :func:`ensure_tls_identity`), or (cert PEM path, key PEM path).
    ``attestation_roots``: trust anchors for Recipient documents (None = harness PKI root).
    ``attestation_at``: verification time for documents (None = now).
    ``bad_attestation_exception``: ``"ValidationException"`` or ``"AccessDeniedException"``.
    ``credentials``: None (no SigV4 check; every caller is ``default_principal``), or
    :class:`KmsCredential` entries / a mapping access key -> secret or (secret, principal ARN);
    then every request must carry a valid SigV4 signature, and its access key names the caller.
    ``region``/``account_id``: used in key ARNs and the SigV4 scope check.
    ``default_principal``: caller ARN for unsigned requests (default
    ``arn:aws:iam::<account>:user/harness``).

    Use as a context manager or call :meth:`start` / :meth:`stop`. Raises :class:`NitroError`
    for unusable arguments (bad state file, TLS files, address in use).
    """

    def __init__(
        self,
        state_path: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: Any = None,
        attestation_roots: Sequence[Any] | None = None,
        attestation_at: _dt.datetime | None = None,
        bad_attestation_exception: str = "ValidationException",
        credentials: Any = None,
        region: str = "us-east-1",
        account_id: str = "111122223333",
        default_principal: str | None = None,
    ):
        self.service = KmsService(
            state_path,
            region=region,
            account_id=account_id,
            attestation_roots=attestation_roots,
            attestation_at=attestation_at,
            bad_attestation_exception=bad_attestation_exception,
        )
        self.default_principal = default_principal or f"arn:aws:iam::{account_id}:user/harness"
        creds = _normalize_credentials(credentials, self.default_principal)
        self._sigv4 = _SigV4(creds, region) if credentials is not None else None
        self._ssl = _ssl_context(tls)
        self._address = (host, port)
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def region(self) -> str:
        """The Region in key ARNs and SigV4 scopes."""
        return self.service.region

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None:
            raise NitroError(ErrorCode.InvalidArgument, "KmsServer.port: the server is not started")
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        """``http(s)://host:port`` for boto3's ``endpoint_url`` (after :meth:`start`)."""
        host = self._address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    def start(self) -> KmsServer:
        """Bind and serve in a daemon thread. Returns self. NitroError if the bind fails."""
        if self._server is not None:
            return self
        try:
            self._server = _HttpServer(
                self._address, self.service, self._sigv4, self.default_principal, self._ssl
            )
        except OSError as err:
            raise NitroError(
                ErrorCode.SocketError,
                f"KMS emulator: cannot listen on {self._address[0]}:{self._address[1]} ({err.strerror})",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="kms-emulator", daemon=True
        )
        self._thread.start()
        log.info("KMS emulator listening on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent. State is already on disk."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def serve_forever(self) -> None:
        """Start and block until interrupted (used by ``nitro-harness kms serve``)."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=1.0)
        finally:
            self.stop()

    def __enter__(self) -> KmsServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
