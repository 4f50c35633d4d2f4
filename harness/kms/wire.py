"""AWS JSON 1.1 as KMS speaks it: errors, request decoding and response shaping by botocore's model.

Request shapes, lengths, patterns and enums are checked against botocore's own KMS service
model, and responses are shaped by the same model (blobs as padded base64, timestamps as epoch
seconds). Errors are HTTP 400 ``{"__type": name, "message": text}`` (500 for
KMSInternalException, DependencyTimeoutException and KeyUnavailableException); docs/kms.md.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from typing import Any
from collections.abc import Mapping

__all__ = ["KmsError", "Validation", "decode", "encode", "paginate", "service_model"]

_SERVER_ERRORS = {"KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException"}


class KmsError(Exception):
    """An AWS KMS error answered to the client: ``name`` is the ``__type`` (an exception
    name from the KMS model or AWS's common errors), ``message`` the text, ``status`` the
    HTTP status (docs/kms.md: 400, 500 for internal errors)."""

    def __init__(self, name: str, message: str, status: int | None = None):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.status = status if status is not None else (500 if name in _SERVER_ERRORS else 400)


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


class Validation:
    """Collects AWS-style validation errors while a request is decoded."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, value: Any, rule: str, sensitive: bool = False) -> None:
        """Record that the member at ``path`` (model names, dotted) breaks ``rule``; ``value``
        is shown unless None or ``sensitive``."""
        shown = "" if sensitive or value is None else f" '{value}'"
        self.errors.append(f"Value{shown} at '{_wire_name(path)}' failed to satisfy constraint: {rule}")

    def raise_if_any(self) -> None:
        """Raise one ValidationException (KmsError) listing every recorded error, as AWS does."""
        if self.errors:
            count = len(self.errors)
            noun = "error" if count == 1 else "errors"
            raise KmsError(
                "ValidationException",
                f"{count} validation {noun} detected: " + "; ".join(self.errors),
            )


def decode(value: Any, shape, path: str, check: Validation) -> Any:
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
                out[name] = decode(value[name], member, f"{path}.{name}", check)
        for name in shape.required_members:
            if name not in out:
                check.add(f"{path}.{name}", None, "Member must not be null")
        return out
    if kind == "list":
        if not isinstance(value, list):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a JSON array")
        _check_size(len(value), meta, path, None, check, "length")
        return [decode(v, shape.member, f"{path}.member", check) for v in value]
    if kind == "map":
        if not isinstance(value, dict):
            raise KmsError("SerializationException", f"{_wire_name(path)}: expected a JSON object")
        _check_size(len(value), meta, path, None, check, "length")
        return {
            decode(k, shape.key, f"{path}.key", check): decode(v, shape.value, f"{path}.value", check)
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
    n: int, meta: Mapping[str, Any], path: str, shown: Any, check: Validation, what: str
) -> None:
    if "min" in meta and n < meta["min"]:
        check.add(path, shown, f"Member must have {what} greater than or equal to {meta['min']}")
    if "max" in meta and n > meta["max"]:
        check.add(path, shown, f"Member must have {what} less than or equal to {meta['max']}")


def encode(value: Any, shape, path: str) -> Any:
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
            out[name] = encode(item, shape.members[name], f"{path}.{name}")
        return out
    if kind == "list":
        return [encode(v, shape.member, path) for v in value]
    if kind == "map":
        return {k: encode(v, shape.value, path) for k, v in value.items()}
    if kind == "blob":
        return base64.b64encode(value).decode("ascii")
    if kind == "timestamp":
        return round(float(value), 3)
    return value


def paginate(entries: list[Any], p: Mapping[str, Any]) -> tuple[list[Any], str | None]:
    """KMS's ``Limit`` (default 100) / ``Marker`` pagination over ``entries``.

    Returns (this page, the next marker or None on the last page); the marker is the next
    index, opaque to clients. Raises InvalidMarkerException for a marker this KMS did not return.
    """
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
