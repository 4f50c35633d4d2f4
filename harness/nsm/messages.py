"""The NSM's wire vocabulary: request and response types, error codes and the buffer limits.

docs/nsm.md#requests, docs/nsm.md#responses and docs/nsm.md#errors: the names and fields are
the Rust nsm-api's (declaration order is the wire order, see :mod:`harness.nsm.codec`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

#: Largest request the device accepts (the Linux driver's limit too).
MAX_REQUEST_SIZE = 0x1000
#: Size of the response buffer the Linux driver offers.
MAX_RESPONSE_SIZE = 0x3000


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


# -- requests ------------------------------------------------------------------------------------


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


# -- responses -----------------------------------------------------------------------------------


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
