"""The KMS emulator's HTTP(S) server: ``POST /`` with ``X-Amz-Target: TrentService.<Operation>``.

boto3 (and any SigV4 client) talks to :class:`KmsServer` unchanged. Keep-alive HTTP/1.1, one
thread per connection (TLS handshakes included), every failure answered as a KMS error: a bug
in the emulator is KMS's 500 KMSInternalException, never a dead socket (docs/kms.md).
"""

from __future__ import annotations

import datetime as _dt
import http.server
import json
import logging
import os
import socketserver
import ssl
import threading
import uuid
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from harness.errors import ErrorCode, NitroError
from harness.kms.credentials import Caller, normalize_credentials
from harness.kms.service import KmsService
from harness.kms.sigv4 import SigV4Verifier
from harness.kms.tls import ssl_context
from harness.kms.wire import KmsError

__all__ = ["KmsServer"]

log = logging.getLogger("harness.kms")

_TARGET_PREFIX = "TrentService."
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
        if self.request_version == "HTTP/0.9":
            # A bare "GET /" line: HTTP/0.9 has no status line or headers, only the body.
            self.wfile.write(body)
            return
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

    def _content_length(self) -> int:
        """The request's Content-Length: digits only, at most 2 MiB (RFC 9110 8.6). Otherwise
        SerializationException, and the connection closes (the body's end is unknown)."""
        text = self.headers.get("Content-Length")
        if text is None:
            self.close_connection = True
            raise KmsError("SerializationException", "Content-Length is required")
        text = text.strip()
        if not text.isascii() or not text.isdigit():
            self.close_connection = True
            raise KmsError("SerializationException",
                           f"Content-Length {text[:40]!r} is not a number")
        length = int(text)
        if length > _MAX_BODY:
            self.close_connection = True
            raise KmsError(
                "SerializationException", f"request body of {length} bytes exceeds {_MAX_BODY}"
            )
        return length

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.headers.get("Content-Length") is not None:
            try:
                self.rfile.read(self._content_length())
            except KmsError:
                pass  # the connection closes after the answer: its body need not be read
        self._fail(
            KmsError("UnknownOperationException", "KMS accepts only POST / with X-Amz-Target"),
            str(uuid.uuid4()),
        )

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        request_id = str(uuid.uuid4())
        server: _HttpServer = self.server  # type: ignore[assignment]
        record: dict[str, Any] = {"request_id": request_id, "operation": None, "caller": None}
        try:
            body = self.rfile.read(self._content_length())
            target = self.headers.get("X-Amz-Target", "")
            if not target.startswith(_TARGET_PREFIX):
                raise KmsError(
                    "UnknownOperationException", f"X-Amz-Target {target!r} is not TrentService.<Operation>"
                )
            record["operation"] = target[len(_TARGET_PREFIX) :][:64]
            if server.sigv4 is not None:
                cred = server.sigv4.verify("POST", self.path, self.headers, body)
                caller = Caller(cred.principal_arn, cred.access_key_id)
            else:
                caller = Caller(server.default_principal, None)
            record["caller"] = caller.principal_arn
            result = server.service.handle(target[len(_TARGET_PREFIX) :], body, caller)
            self._reply(200, result, request_id)
            record["status"] = 200
        except KmsError as err:
            self._fail(err, request_id)
            record.update(status=err.status, error=err.name, message=err.message)
        except ValueError as err:
            self._fail(KmsError("SerializationException", str(err)), request_id)
            record.update(status=400, error="SerializationException", message=str(err))
        except Exception as err:  # noqa: BLE001 - any bug becomes KMS's 500, never a dead socket
            log.exception("KMS emulator internal error")
            internal = KmsError(
                "KMSInternalException", f"internal error in the KMS emulator: {type(err).__name__}: {err}"
            )
            self._fail(internal, request_id)
            record.update(status=internal.status, error=internal.name, message=internal.message)
        if server.on_request is not None:
            server.on_request(record)


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(
        self,
        address,
        service: KmsService,
        sigv4: SigV4Verifier | None,
        default_principal: str,
        ssl_context: ssl.SSLContext | None,
        on_request: Callable[[dict[str, Any]], None] | None = None,
    ):
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.service = service
        self.sigv4 = sigv4
        self.default_principal = default_principal
        self.ssl_context = ssl_context
        self.on_request = on_request
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


class KmsServer:
    """The KMS emulator as a threaded HTTP(S) server (docs/kms.md).

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
    ``on_request``: called after each answered ``POST`` with ``{request_id, operation, caller,
    status}`` plus ``error`` and ``message`` when it failed (a request log; it must not raise).

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
        on_request: Callable[[dict[str, Any]], None] | None = None,
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
        creds = normalize_credentials(credentials, self.default_principal)
        self._sigv4 = SigV4Verifier(creds, region) if credentials is not None else None
        self._ssl = ssl_context(tls)
        self._address = (host, port)
        self._on_request = on_request
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._serving_ended = threading.Event()

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
                self._address, self.service, self._sigv4, self.default_principal, self._ssl,
                self._on_request,
            )
        except OSError as err:
            raise NitroError(
                ErrorCode.SocketError,
                f"KMS emulator: cannot listen on {self._address[0]}:{self._address[1]} ({err.strerror})",
            ) from None
        self._serving_ended = threading.Event()
        server = self._server

        def serve() -> None:
            try:
                server.serve_forever(poll_interval=0.2)
            finally:
                self._serving_ended.set()

        self._thread = threading.Thread(target=serve, name="kms-emulator", daemon=True)
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
            # An Event, not Thread.join(timeout): Python 3.11's join, interrupted by Ctrl-C, can
            # release the serving thread's state lock and mark it stopped while it still runs.
            while self._thread is not None and self._thread.is_alive():
                self._serving_ended.wait(1.0)
        finally:
            self.stop()

    def __enter__(self) -> KmsServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
