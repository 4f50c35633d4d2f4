"""The emulated Nitro Secure Module (docs/nsm.md).

One idea per module, every public name re-exported here (``from harness.nsm import Nsm``):

- :mod:`harness.nsm.messages`: request/response types, :class:`NsmErrorCode`, buffer limits;
- :mod:`harness.nsm.codec`: their CBOR, byte-compatible with the Rust nsm-api;
- :mod:`harness.nsm.state`: :class:`NsmState`, the PCR bank, locking, debug-mode zeroing;
- :mod:`harness.nsm.faults`: :class:`NsmFaults`, injected errors, delays, bad documents;
- :mod:`harness.nsm.trace`: :class:`NsmTraceEvent` and :func:`trace_writer`;
- :mod:`harness.nsm.api`: :class:`Nsm`, bytes in, bytes out, documents signed;
- :mod:`harness.nsm.device`: the virtio device (ID 33) over vhost-user; not imported here, so
  the API stays free of virtio (``from harness.nsm.device import NsmDevice``).
"""

from harness.nsm.api import RANDOM_SIZE, Nsm
from harness.nsm.codec import (
    NsmCodecError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    request_name,
)
from harness.nsm.faults import NsmFaults
from harness.nsm.messages import (
    MAX_REQUEST_SIZE,
    MAX_RESPONSE_SIZE,
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
    NsmRequestError,
    Request,
    Response,
)
from harness.nsm.state import BOOT_LOCKED, DEBUG_ZEROED, DOCUMENT_PCRS, MAX_PCRS, STRICT_LIMITS, NsmState
from harness.nsm.trace import NsmTraceEvent, trace_writer

__all__ = [
    "BOOT_LOCKED",
    "DEBUG_ZEROED",
    "DOCUMENT_PCRS",
    "MAX_PCRS",
    "MAX_REQUEST_SIZE",
    "MAX_RESPONSE_SIZE",
    "RANDOM_SIZE",
    "STRICT_LIMITS",
    "Attestation",
    "AttestationResponse",
    "DescribeNSM",
    "DescribeNSMResponse",
    "DescribePCR",
    "DescribePCRResponse",
    "ErrorResponse",
    "ExtendPCR",
    "ExtendPCRResponse",
    "GetRandom",
    "GetRandomResponse",
    "LockPCR",
    "LockPCRResponse",
    "LockPCRs",
    "LockPCRsResponse",
    "Nsm",
    "NsmCodecError",
    "NsmErrorCode",
    "NsmFaults",
    "NsmRequestError",
    "NsmState",
    "NsmTraceEvent",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "request_name",
    "trace_writer",
]
