"""The NSM API: request bytes in, response bytes out, as the virtio device exchanges them.

docs/nsm.md is the contract. Errors follow QEMU's virtio-nsm where the real device's choice is
unknown (docs/nsm.md#errors): request > 0x1000 -> InputTooLarge; unparsable or unknown ->
InvalidOperation; PCR errors as :class:`harness.nsm.state.NsmState` raises them; a signing failure
-> InternalError; a response over the driver's 0x3000-byte buffer -> BufferTooSmall.
Attestation documents are signed by :func:`harness.attestation.build_document`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from harness.attestation import build_document, tamper_document
from harness.nsm.codec import NsmCodecError, decode_request, encode_response, request_name
from harness.nsm.faults import Fault, NsmFaults
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
from harness.nsm.state import MAX_PCRS, NsmState
from harness.nsm.trace import NsmTraceEvent

#: Bytes GetRandom returns (docs/nsm.md#requests).
RANDOM_SIZE = 256


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
        return self._finish(name, request, response, start, len(request_bytes))

    def input_too_large(self, request_size: int) -> bytes:
        """The answer to a request of ``request_size`` bytes (> 0x1000) whose bytes were never
        copied: InputTooLarge (docs/nsm.md#errors), traced like :meth:`handle` would."""
        return self._finish("?", None, ErrorResponse(NsmErrorCode.InputTooLarge),
                            time.perf_counter(), request_size)

    def _finish(self, name: str, request: Request | None, response: Response, start: float,
                request_size: int) -> bytes:
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
                    request_size=request_size,
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

    def _document(self, request: Attestation, faults: list[Fault]) -> bytes:
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
