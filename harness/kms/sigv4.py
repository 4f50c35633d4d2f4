"""AWS Signature Version 4 on KMS requests, checked against the emulator's credentials.

botocore's own signer computes the expected signature over the headers the client listed, so
what boto3 (or the guest's kms_client) signs verifies byte for byte. Errors are AWS's:
MissingAuthenticationTokenException, IncompleteSignatureException, UnrecognizedClientException,
InvalidSignatureException.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from harness.kms.credentials import KmsCredential
from harness.kms.wire import KmsError

__all__ = ["SigV4Verifier"]

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]{64})\s*$"
)


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


class SigV4Verifier:
    """Checks AWS Signature Version 4 on KMS requests against configured credentials.

    ``credentials``: access key id -> :class:`KmsCredential`; ``region``: the only Region a
    signature may be scoped to; ``max_skew_s``: seconds X-Amz-Date may differ from now (AWS: 300).
    """

    def __init__(self, credentials: Mapping[str, KmsCredential], region: str, max_skew_s: float = 300.0):
        self.credentials = credentials
        self.region = region
        self.max_skew_s = max_skew_s

    def verify(self, method: str, path: str, headers, body: bytes) -> KmsCredential:
        """Return the credential that signed the request; raise KmsError otherwise.

        ``headers``: the request's headers (``get`` and ``get_all``, as ``http.server`` gives
        them); ``body``: the raw request body, hashed for X-Amz-Content-SHA256.

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
