"""Fuzz target: the KMS emulator's request handler, HTTP request line, headers and body.

One input is the bytes a client writes on one connection: one or more HTTP/1.1 requests. They
go through the server's own handler class (:mod:`harness.kms.server`: request line and headers,
Content-Length, X-Amz-Target, SigV4 when the request carries an Authorization header) into
:class:`harness.kms.service.KmsService` (JSON decoding by botocore's KMS model, every operation,
key policies, Recipient attestation documents), over a key store reset to a fixed set of keys
(``fuzz/keys/kms_state.json``: one of each key kind, an alias) before each input; docs/kms.md.

The handler answers every failure as a KMS error and raises nothing; an exception it did not
expect becomes a 500 KMSInternalException after being logged. That log record is the crash:
its exception is raised again here, so the verdict names it. Nothing is declared.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

from harness.attestation import AT_DOCUMENT_TIME, aws_root_g1
from harness.kms.credentials import KmsCredential
from harness.kms.server import _Handler
from harness.kms.service import KmsService
from harness.kms.sigv4 import SigV4Verifier

NAME = "kms"
DECLARED: tuple[type[BaseException], ...] = ()
#: Requests with a Recipient attestation document are about 7 KiB.
MAX_LEN = 12288

STATE_PATH = Path(__file__).resolve().parents[1] / "keys" / "kms_state.json"
#: The signing credential of the generated seeds (fuzzing only).
ACCESS_KEY, SECRET_KEY = "AKIAFUZZFUZZFUZZFUZZ", "fuzz/secret/key/only/for/signing/seeds"
PRINCIPAL = "arn:aws:iam::111122223333:role/fuzz"
#: Seeds are signed at a fixed time; the skew allowed covers every date the fuzzer keeps.
MAX_SKEW_S = 100 * 365 * 86400.0


class _Connection:
    """The socket a handler is constructed with: reads come from the input, writes collected."""

    def __init__(self, data: bytes):
        self.data = data
        self.sent = bytearray()

    def makefile(self, mode: str, buffering: int = -1):
        return io.BytesIO(self.data) if "r" in mode else _Sink(self.sent)

    def settimeout(self, timeout) -> None:
        pass

    def sendall(self, data) -> None:
        self.sent += data


class _Sink(io.RawIOBase):
    def __init__(self, out: bytearray):
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.out += b
        return len(b)


class _Internal(logging.Handler):
    """Keeps the exception of each record logged at ERROR (the handler's catch-all)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@functools.cache
def _setup() -> tuple[SimpleNamespace, SimpleNamespace, dict, _Internal]:
    service = KmsService(None, attestation_roots=[aws_root_g1()], attestation_at=AT_DOCUMENT_TIME)
    creds = {ACCESS_KEY: KmsCredential(ACCESS_KEY, SECRET_KEY, PRINCIPAL)}
    common = dict(service=service, default_principal=PRINCIPAL, on_request=None)
    open_server = SimpleNamespace(sigv4=None, **common)
    signed_server = SimpleNamespace(sigv4=SigV4Verifier(creds, service.region, MAX_SKEW_S),
                                    **common)
    internal = _Internal()
    log = logging.getLogger("harness.kms")
    log.addHandler(internal)
    log.propagate = False  # the records are the findings, not noise on stderr
    return open_server, signed_server, json.loads(STATE_PATH.read_text()), internal


def one_input(data: bytes) -> None:
    """Serve ``data`` as one client connection's bytes."""
    open_server, signed_server, template, internal = _setup()
    server = signed_server if b"authorization:" in data.lower() else open_server
    server.service.store.state = copy.deepcopy(template)
    internal.errors.clear()
    _Handler(_Connection(data), ("127.0.0.1", 40000), server)
    if internal.errors:
        raise internal.errors[0]
