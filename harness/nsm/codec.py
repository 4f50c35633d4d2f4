"""NSM requests and responses as CBOR, byte-compatible with the Rust nsm-api.

docs/nsm.md#encoding is the contract. Requests and responses are serde's externally tagged CBOR:
unit variants are a bare text string (``"DescribeNSM"``), struct variants ``{"Name": {fields in
declaration order}}``, errors ``{"Error": "<Name>"}``; absent optionals are CBOR null; integers
shortest; lengths definite. :func:`encode_request` / :func:`encode_response` reproduce the Rust
reference byte for byte (the golden vectors in tests/vectors); the decoders accept what serde
would (fields in any order, missing optionals as null, byte strings also as arrays of integers).
"""

from __future__ import annotations

from typing import Any

import cbor2

from harness.nsm.messages import (
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    NsmErrorCode,
    Request,
    Response,
)


class NsmCodecError(ValueError):
    """Bytes that are not a valid NSM request or response."""


# Wire names and field lists (declaration order = wire order).
_REQUEST_TYPES: dict[str, tuple[type, tuple[str, ...]]] = {
    "DescribePCR": (DescribePCR, ("index",)),
    "ExtendPCR": (ExtendPCR, ("index", "data")),
    "LockPCR": (LockPCR, ("index",)),
    "LockPCRs": (LockPCRs, ("range",)),
    "DescribeNSM": (DescribeNSM, ()),
    "Attestation": (Attestation, ("user_data", "nonce", "public_key")),
    "GetRandom": (GetRandom, ()),
}
_RESPONSE_TYPES: dict[str, tuple[type, tuple[str, ...]]] = {
    "DescribePCR": (DescribePCRResponse, ("lock", "data")),
    "ExtendPCR": (ExtendPCRResponse, ("data",)),
    "LockPCR": (LockPCRResponse, ()),
    "LockPCRs": (LockPCRsResponse, ()),
    "DescribeNSM": (
        DescribeNSMResponse,
        ("version_major", "version_minor", "version_patch", "module_id", "max_pcrs", "locked_pcrs", "digest"),
    ),
    "Attestation": (AttestationResponse, ("document",)),
    "GetRandom": (GetRandomResponse, ("random",)),
}
_NAME_OF = {cls: name for table in (_REQUEST_TYPES, _RESPONSE_TYPES) for name, (cls, _) in table.items()}
_BYTES_FIELDS = {"data", "user_data", "nonce", "public_key", "document", "random"}
_OPTIONAL_FIELDS = {"user_data", "nonce", "public_key"}
# serde's u16 for PCR indexes (nsm-api: `index: u16`, `range: u16`).
_U16_FIELDS = {"index", "range"}

#: Wire names of the requests (``"DescribePCR"``, ..., ``"GetRandom"``).
REQUEST_NAMES = frozenset(_REQUEST_TYPES)


def request_name(request: Request | Response) -> str:
    """The wire name of a request or response object (``"DescribePCR"``, ...)."""
    if isinstance(request, ErrorResponse):
        return "Error"
    return _NAME_OF[type(request)]


def _encode(obj: Any, table: dict[str, tuple[type, tuple[str, ...]]]) -> bytes:
    name = _NAME_OF.get(type(obj))
    if name is None or table[name][0] is not type(obj):
        raise TypeError(f"not an NSM message of this direction: {obj!r}")
    fields = table[name][1]
    if not fields:
        return cbor2.dumps(name)  # unit variant: bare text string
    inner: dict[str, Any] = {}
    for f in fields:
        value = getattr(obj, f)
        if f in _BYTES_FIELDS and value is not None:
            value = bytes(value)
        elif f == "locked_pcrs":
            value = sorted(value)
        inner[f] = value
    return cbor2.dumps({name: inner})


def encode_request(obj: Request) -> bytes:
    """Encode a request object as the Rust nsm-api does (docs/nsm.md#encoding). Raises
    TypeError for anything that is not a request."""
    return _encode(obj, _REQUEST_TYPES)


def encode_response(obj: Response) -> bytes:
    """Encode a response object as the Rust nsm-api does (docs/nsm.md#encoding). Raises
    TypeError for anything that is not a response."""
    if isinstance(obj, ErrorResponse):
        return cbor2.dumps({"Error": obj.error.value})
    return _encode(obj, _RESPONSE_TYPES)


def _as_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    # serde_bytes also deserializes a sequence of u8.
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return bytes(value)
    raise NsmCodecError(f"{where} must be a byte string")


def _decode(data: bytes, table: dict[str, tuple[type, tuple[str, ...]]], *, response: bool) -> Any:
    try:
        value = cbor2.loads(bytes(data))
    except Exception as err:
        raise NsmCodecError(f"not CBOR: {err}") from None
    if isinstance(value, str):
        entry = table.get(value)
        if entry is None or entry[1]:
            raise NsmCodecError(f"unknown unit variant {value!r}")
        return entry[0]()
    if not isinstance(value, dict) or len(value) != 1:
        raise NsmCodecError("expected a text string or a single-key map")
    ((name, inner),) = value.items()
    if response and name == "Error":
        try:
            return ErrorResponse(NsmErrorCode(inner))
        except ValueError:
            raise NsmCodecError(f"unknown error code {inner!r}") from None
    entry = table.get(name) if isinstance(name, str) else None
    if entry is None:
        raise NsmCodecError(f"unknown variant {name!r}")
    cls, fields = entry
    if not fields:
        # serde accepts a unit variant written as {"Name": null}.
        if inner is not None:
            raise NsmCodecError(f"{name} takes no fields")
        return cls()
    if not isinstance(inner, dict):
        raise NsmCodecError(f"{name} must carry a map of fields")
    args: dict[str, Any] = {}
    for f in fields:
        if f not in inner or inner[f] is None:
            if f in _OPTIONAL_FIELDS:
                args[f] = None
                continue
            raise NsmCodecError(f"{name}.{f} is missing")
        v = inner[f]
        if f in _BYTES_FIELDS:
            v = _as_bytes(v, f"{name}.{f}")
        elif f in _U16_FIELDS or f in ("version_major", "version_minor", "version_patch", "max_pcrs"):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (f in _U16_FIELDS and v > 0xFFFF):
                raise NsmCodecError(f"{name}.{f} must be an unsigned integer")
        elif f == "lock":
            if not isinstance(v, bool):
                raise NsmCodecError(f"{name}.lock must be a bool")
        elif f in ("module_id", "digest"):
            if not isinstance(v, str):
                raise NsmCodecError(f"{name}.{f} must be text")
        elif f == "locked_pcrs":
            if not isinstance(v, list) or not all(isinstance(i, int) for i in v):
                raise NsmCodecError(f"{name}.locked_pcrs must be an array of integers")
        args[f] = v
    return cls(**args)


def decode_request(data: bytes) -> Request:
    """Decode request bytes into a request object. Raises :class:`NsmCodecError` when the
    bytes are not CBOR or not a known request (the NSM then answers InvalidOperation)."""
    return _decode(data, _REQUEST_TYPES, response=False)


def decode_response(data: bytes) -> Response:
    """Decode response bytes into a response object (or :class:`ErrorResponse`). Raises
    :class:`NsmCodecError` for anything else."""
    return _decode(data, _RESPONSE_TYPES, response=True)
