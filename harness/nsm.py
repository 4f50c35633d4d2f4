"""The emulated Nitro Secure Module: PCR bank, request/response CBOR codec, API, fault injection.

docs/nsm.md is the contract. Requests and responses are serde's externally tagged CBOR: unit variants
are a bare text string (``"DescribeNSM"``), struct variants ``{"Name": {fields in declaration
order}}``, errors ``{"Error": "<Name>"}``; absent optionals are CBOR null; integers shortest;
lengths definite. :func:`encode_request` / :func:`encode_response` reproduce the Rust reference
byte for byte (the golden vectors in tests/vectors); the decoders accept what serde would (fields in any
order, missing optionals as null, byte strings also as arrays of integers).

State (docs/pcrs.md#pcr-bank, docs/nsm.md#pcr-bank): 32 PCRs of SHA-384; PCR0/1/2/8 from the EIF, PCR3 from the parent's role
ARN, PCR4 from the parent instance ID, PCRs 0-15 locked at boot, 16-31 zero and user-extendable.
Errors follow QEMU's virtio-nsm where the real device's choice is unknown: request > 0x1000 ->
InputTooLarge; unparsable or unknown -> InvalidOperation; index >= 32 -> InvalidIndex; extend or
lock of a locked PCR -> ReadOnlyIndex; LockPCRs{range > 32} -> InvalidIndex.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import cbor2

from harness.attestation import build_document, tamper_document
from harness.pcr import PCR_SIZE, ZERO_PCR, Measurements, extend, pcr_for_instance_id, pcr_for_role_arn

#: Largest request the device accepts (the Linux driver's limit too).
MAX_REQUEST_SIZE = 0x1000
#: Size of the response buffer the Linux driver offers.
MAX_RESPONSE_SIZE = 0x3000
#: PCRs in the bank.
MAX_PCRS = 32
#: PCRs locked at boot (docs/nsm.md#pcr-bank).
BOOT_LOCKED = range(16)
#: PCRs a document carries (docs/attestation.md#payload: keys 0..15).
DOCUMENT_PCRS = range(16)
#: PCRs zeroed in debug-mode documents (docs/pcrs.md#debug-mode); PCR3 and PCR4 keep their values.
DEBUG_ZEROED = (0, 1, 2, 8)
#: Bytes GetRandom returns (docs/nsm.md#requests).
RANDOM_SIZE = 256
#: Strict-mode size limits (docs/nsm.md#limits: the NSM documentation's, the real NSM enforces none).
STRICT_LIMITS = {"user_data": 512, "nonce": 512, "public_key": 1024}


class NsmErrorCode(enum.Enum):
    """The NSM's ErrorCode names (docs/nsm.md#errors), encoded as ``{"Error": name}``."""

    Success = "Success"
    InvalidArgument = "InvalidArgument"
    InvalidIndex = "InvalidIndex"
    InvalidResponse = "InvalidResponse"
    ReadOnlyIndex = "ReadOnlyIndex"
    InvalidOperation = "InvalidOperation"
    BufferTooSmall = "BufferTooSmall"
    InputTooLarge = "InputTooLarge"
    InternalError = "InternalError"


class NsmRequestError(Exception):
    """A request the NSM answers with ``{"Error": code}``; ``code`` is an :class:`NsmErrorCode`."""

    def __init__(self, code: NsmErrorCode, message: str = ""):
        super().__init__(f"{code.value}: {message}" if message else code.value)
        self.code = code


class NsmCodecError(ValueError):
    """Bytes that are not a valid NSM request or response."""


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCR:
    """Request: the value and lock state of PCR ``index``."""

    index: int


@dataclass(frozen=True)
class ExtendPCR:
    """Request: extend PCR ``index`` with ``data`` (new = SHA384(old || data))."""

    index: int
    data: bytes


@dataclass(frozen=True)
class LockPCR:
    """Request: lock PCR ``index`` against further extends."""

    index: int


@dataclass(frozen=True)
class LockPCRs:
    """Request: lock PCRs [0, range)."""

    range: int


@dataclass(frozen=True)
class DescribeNSM:
    """Request: module version, ID, PCR count and locked PCRs."""


@dataclass(frozen=True)
class Attestation:
    """Request: a signed attestation document carrying the optional fields."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True)
class GetRandom:
    """Request: random bytes."""


Request = Union[DescribePCR, ExtendPCR, LockPCR, LockPCRs, DescribeNSM, Attestation, GetRandom]


@dataclass(frozen=True)
class DescribePCRResponse:
    """Response to DescribePCR: ``lock`` state and 48-byte ``data``."""

    lock: bool
    data: bytes


@dataclass(frozen=True)
class ExtendPCRResponse:
    """Response to ExtendPCR: the new PCR value."""

    data: bytes


@dataclass(frozen=True)
class LockPCRResponse:
    """Response to LockPCR (a unit variant)."""


@dataclass(frozen=True)
class LockPCRsResponse:
    """Response to LockPCRs (a unit variant)."""


@dataclass(frozen=True)
class DescribeNSMResponse:
    """Response to DescribeNSM (field order is the wire order)."""

    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: list[int]
    digest: str = "SHA384"


@dataclass(frozen=True)
class AttestationResponse:
    """Response to Attestation: the COSE_Sign1 document."""

    document: bytes


@dataclass(frozen=True)
class GetRandomResponse:
    """Response to GetRandom."""

    random: bytes


@dataclass(frozen=True)
class ErrorResponse:
    """``{"Error": name}``."""

    error: NsmErrorCode


Response = Union[
    DescribePCRResponse,
    ExtendPCRResponse,
    LockPCRResponse,
    LockPCRsResponse,
    DescribeNSMResponse,
    AttestationResponse,
    GetRandomResponse,
    ErrorResponse,
]

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


# -- state ---------------------------------------------------------------------------------------


class NsmState:
    """The PCR bank and identity of one enclave's NSM.

    ``measurements`` gives PCR0/1/2 (and PCR8 when the EIF is signed), a
    :class:`harness.pcr.Measurements` or a ``{index: bytes}`` dict; ``parent_role_arn`` and
    ``instance_id`` set PCR3 and PCR4 (docs/pcrs.md#parent-pcrs); PCRs 0-15 are locked at boot (docs/nsm.md#pcr-bank).
    ``module_id`` is the enclave ID DescribeNSM and documents report. ``strict`` enforces the
    documented size limits on Attestation fields (user_data/nonce 512, public_key 1024) with
    InvalidArgument; by default, like the real NSM, nothing is enforced. Thread-safe.
    """

    def __init__(
        self,
        measurements: Measurements | dict[int, bytes],
        *,
        module_id: str,
        debug_mode: bool = False,
        parent_role_arn: str | None = None,
        instance_id: str | None = None,
        version: tuple[int, int, int] = (1, 0, 0),
        strict: bool = False,
    ):
        values = measurements.as_dict() if isinstance(measurements, Measurements) else dict(measurements)
        self.pcrs: list[bytes] = [ZERO_PCR] * MAX_PCRS
        for index, value in values.items():
            if not 0 <= index < MAX_PCRS or len(value) != PCR_SIZE:
                raise ValueError(f"measurement PCR{index} must be {PCR_SIZE} bytes at an index below {MAX_PCRS}")
            self.pcrs[index] = bytes(value)
        if parent_role_arn is not None:
            self.pcrs[3] = pcr_for_role_arn(parent_role_arn)
        if instance_id is not None:
            self.pcrs[4] = pcr_for_instance_id(instance_id)
        self.locked: set[int] = set(BOOT_LOCKED)
        self.module_id = module_id
        self.debug_mode = debug_mode
        self.version = tuple(version)
        self.strict = strict
        self._lock = threading.RLock()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < MAX_PCRS:
            raise NsmRequestError(NsmErrorCode.InvalidIndex, f"PCR{index} >= {MAX_PCRS}")

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """Return (locked, value) of PCR ``index``. Raises NsmRequestError(InvalidIndex)."""
        with self._lock:
            self._check_index(index)
            return index in self.locked, self.pcrs[index]

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data`` and return the new value (docs/pcrs.md#extend-rule: SHA384(old ||
        data)). Raises NsmRequestError(InvalidIndex | ReadOnlyIndex)."""
        with self._lock:
            self._check_index(index)
            if index in self.locked:
                raise NsmRequestError(NsmErrorCode.ReadOnlyIndex, f"PCR{index} is locked")
            self.pcrs[index] = extend(self.pcrs[index], data)
            return self.pcrs[index]

    def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index``. Locking a locked PCR fails with ReadOnlyIndex (AWS's self-check
        expects LockPCR on 0-15 to fail); InvalidIndex past the bank."""
        with self._lock:
            self._check_index(index)
            if index in self.locked:
                raise NsmRequestError(NsmErrorCode.ReadOnlyIndex, f"PCR{index} is already locked")
            self.locked.add(index)

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs [0, range_) (docs/nsm.md#pcr-bank); already locked ones are fine. ``range_`` > 32 is
        InvalidIndex (LockPCRs{32} succeeds, {33} fails)."""
        with self._lock:
            if not 0 <= range_ <= MAX_PCRS:
                raise NsmRequestError(NsmErrorCode.InvalidIndex, f"range {range_} > {MAX_PCRS}")
            self.locked.update(range(range_))

    def locked_pcrs(self) -> list[int]:
        """Sorted list of locked PCR indexes."""
        with self._lock:
            return sorted(self.locked)

    def document_pcrs(self) -> dict[int, bytes]:
        """PCRs 0-15 as a document carries them: in debug mode PCR0, 1, 2 and 8 read as zero,
        PCR3 and PCR4 keep their values (docs/pcrs.md#debug-mode)."""
        with self._lock:
            out = {i: self.pcrs[i] for i in DOCUMENT_PCRS}
        if self.debug_mode:
            for i in DEBUG_ZEROED:
                out[i] = ZERO_PCR
        return out

    def check_attestation_fields(self, request: Attestation) -> None:
        """In strict mode, raise InvalidArgument for fields over the documented limits."""
        if not self.strict:
            return
        for name, limit in STRICT_LIMITS.items():
            value = getattr(request, name)
            if value is not None and len(value) > limit:
                raise NsmRequestError(NsmErrorCode.InvalidArgument, f"{name} is {len(value)} bytes > {limit}")


# -- fault injection -----------------------------------------------------------------------------


@dataclass
class _Fault:
    error: NsmErrorCode | None = None
    delay_s: float = 0.0
    tamper: str | None = None  # "payload" | "signature" | "certificate"
    expired: bool = False
    remaining: int | None = None  # None = every request


class NsmFaults:
    """Per-request-type faults the NSM applies before (error, delay) or after (tampered or
    expired document) handling a request. Request types are wire names (``"Attestation"``,
    ``"GetRandom"``, ...) or ``"*"`` for every type. ``count`` limits a fault to the next N
    matching requests. Thread-safe: tests set faults while the device thread serves the guest.

    Example: ``faults.fail("Attestation", NsmErrorCode.InternalError, count=1)``;
    ``faults.delay("GetRandom", 0.5)``; ``faults.tamper("signature")``; ``faults.expire()``.
    """

    def __init__(self) -> None:
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()

    def _add(self, request_type: str, fault: _Fault) -> None:
        if request_type != "*" and request_type not in _REQUEST_TYPES:
            raise ValueError(f"unknown NSM request type {request_type!r}")
        with self._lock:
            self._faults.setdefault(request_type, []).append(fault)

    def fail(self, request_type: str, error: NsmErrorCode | str, *, count: int | None = None) -> None:
        """Answer ``request_type`` with ``{"Error": error}``."""
        self._add(request_type, _Fault(error=NsmErrorCode(error), remaining=count))

    def delay(self, request_type: str, seconds: float, *, count: int | None = None) -> None:
        """Hold the response to ``request_type`` for ``seconds`` (the NSM is synchronous, so the
        guest's ioctl blocks for that long)."""
        self._add(request_type, _Fault(delay_s=float(seconds), remaining=count))

    def tamper(self, part: str = "signature", *, count: int | None = None) -> None:
        """Change one byte of the next Attestation documents' ``part`` (``payload``,
        ``signature`` or ``certificate``; see :func:`harness.attestation.tamper_document`)."""
        if part not in ("payload", "signature", "certificate"):
            raise ValueError(f"unknown document part {part!r}")
        self._add("Attestation", _Fault(tamper=part, remaining=count))

    def expire(self, *, count: int | None = None) -> None:
        """Sign the next Attestation documents with a fresh leaf that expired a minute ago
        (timestamp 3 h 1 min in the past): valid at their own timestamp, ``certificate-expired``
        now, like a stale document replayed."""
        self._add("Attestation", _Fault(expired=True, remaining=count))

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def take(self, request_type: str) -> list[_Fault]:
        """Return the faults that apply to one request of ``request_type`` and use them up."""
        out: list[_Fault] = []
        with self._lock:
            for key in (request_type, "*"):
                kept = []
                for fault in self._faults.get(key, []):
                    out.append(fault)
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    if fault.remaining is None or fault.remaining > 0:
                        kept.append(fault)
                if key in self._faults:
                    self._faults[key] = kept
        return out


# -- the module ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NsmTraceEvent:
    """One handled request: the wire name (``"?"`` when undecodable), decoded request and
    response objects, the error code if any, and the handling time in seconds."""

    request_type: str
    request: Request | None
    response: Response
    error: NsmErrorCode | None
    duration_s: float
    request_size: int
    response_size: int

    def to_json(self) -> dict[str, Any]:
        """The JSON object :func:`trace_writer` writes for this event."""
        return _event_json(self)


def _event_json(event: "NsmTraceEvent") -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": time.time(),
        "request": event.request_type,
        "error": event.error.value if event.error else None,
        "ms": round(event.duration_s * 1000, 3),
        "request_bytes": event.request_size,
        "response_bytes": event.response_size,
    }
    req = event.request
    if isinstance(req, (DescribePCR, ExtendPCR, LockPCR)):
        out["index"] = req.index
    elif isinstance(req, LockPCRs):
        out["range"] = req.range
    elif isinstance(req, Attestation):
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(req, name)
            out[name] = None if value is None else len(value)
    return out


def trace_writer(path: str | os.PathLike[str]) -> Callable[[NsmTraceEvent], None]:
    """Return a ``trace`` callable for :class:`Nsm` that appends one JSON line per request to
    ``path`` (time, request type, error name or null, handling ms, sizes, PCR index or
    Attestation field lengths). Thread-safe; the file is opened per line so it can be read
    while the enclave runs. I/O errors are swallowed (a trace never breaks the device)."""
    import json

    lock = threading.Lock()

    def write(event: NsmTraceEvent) -> None:
        line = json.dumps(_event_json(event), separators=(",", ":")) + "\n"
        with lock:
            try:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(line)
            except OSError:
                pass

    return write


class Nsm:
    """The NSM API: bytes in, bytes out, as the virtio device exchanges them (docs/nsm.md).

    ``state`` is an :class:`NsmState`; ``pki`` a :class:`harness.pki.Pki` that signs
    documents; ``faults`` an optional :class:`NsmFaults`; ``trace`` an optional callable that
    receives an :class:`NsmTraceEvent` per request. ``indefinite`` chooses the document's outer
    map form (docs/attestation.md#map-forms; default indefinite, as AWS since 2025-07).
    """

    def __init__(
        self,
        state: NsmState,
        pki,
        *,
        faults: NsmFaults | None = None,
        trace: Callable[[NsmTraceEvent], None] | None = None,
        indefinite: bool = True,
    ):
        self.state = state
        self.pki = pki
        self.faults = faults if faults is not None else NsmFaults()
        self.trace = trace
        self.indefinite = indefinite

    def handle(self, request_bytes: bytes) -> bytes:
        """Answer one request (CBOR bytes) with response CBOR bytes; never raises for bad input.

        Request > 0x1000 bytes -> InputTooLarge; undecodable or unknown -> InvalidOperation;
        other errors as :class:`NsmState` raises them; faults applied per request type.
        """
        start = time.perf_counter()
        request: Request | None = None
        name = "?"
        if len(request_bytes) > MAX_REQUEST_SIZE:
            response: Response = ErrorResponse(NsmErrorCode.InputTooLarge)
        else:
            try:
                request = decode_request(request_bytes)
                name = request_name(request)
                response = self._dispatch(request)
            except NsmCodecError:
                response = ErrorResponse(NsmErrorCode.InvalidOperation)
            except NsmRequestError as err:
                response = ErrorResponse(err.code)
        encoded = encode_response(response)
        if len(encoded) > MAX_RESPONSE_SIZE:
            # The driver's buffer is 0x3000; a document that large (huge user fields) cannot
            # be delivered.
            response = ErrorResponse(NsmErrorCode.BufferTooSmall)
            encoded = encode_response(response)
        if self.trace is not None:
            self.trace(
                NsmTraceEvent(
                    request_type=name,
                    request=request,
                    response=response,
                    error=response.error if isinstance(response, ErrorResponse) else None,
                    duration_s=time.perf_counter() - start,
                    request_size=len(request_bytes),
                    response_size=len(encoded),
                )
            )
        return encoded

    def _dispatch(self, request: Request) -> Response:
        faults = self.faults.take(request_name(request))
        for fault in faults:
            if fault.delay_s:
                time.sleep(fault.delay_s)
        for fault in faults:
            if fault.error is not None:
                return ErrorResponse(fault.error)
        state = self.state
        if isinstance(request, DescribePCR):
            locked, value = state.describe_pcr(request.index)
            return DescribePCRResponse(lock=locked, data=value)
        if isinstance(request, ExtendPCR):
            return ExtendPCRResponse(data=state.extend_pcr(request.index, request.data))
        if isinstance(request, LockPCR):
            state.lock_pcr(request.index)
            return LockPCRResponse()
        if isinstance(request, LockPCRs):
            state.lock_pcrs(request.range)
            return LockPCRsResponse()
        if isinstance(request, DescribeNSM):
            major, minor, patch = state.version
            return DescribeNSMResponse(
                version_major=major,
                version_minor=minor,
                version_patch=patch,
                module_id=state.module_id,
                max_pcrs=MAX_PCRS,
                locked_pcrs=state.locked_pcrs(),
            )
        if isinstance(request, GetRandom):
            return GetRandomResponse(random=os.urandom(RANDOM_SIZE))
        if isinstance(request, Attestation):
            state.check_attestation_fields(request)
            return AttestationResponse(document=self._document(request, faults))
        raise NsmRequestError(NsmErrorCode.InvalidOperation)  # pragma: no cover - exhaustive

    def _document(self, request: Attestation, faults: list[_Fault]) -> bytes:
        expired = any(f.expired for f in faults)
        timestamp = None
        if expired:
            timestamp = int((time.time() - 3 * 3600 - 60) * 1000)
        try:
            document = build_document(
                self.pki,
                module_id=self.state.module_id,
                pcrs=self.state.document_pcrs(),
                public_key=request.public_key,
                user_data=request.user_data,
                nonce=request.nonce,
                timestamp=timestamp,
                indefinite=self.indefinite,
                fresh_leaf=expired,
            )
        except Exception as err:  # a signing failure must reach the guest as an NSM error
            raise NsmRequestError(NsmErrorCode.InternalError, str(err)) from err
        for fault in faults:
            if fault.tamper:
                document = tamper_document(document, fault.tamper)
        return document
