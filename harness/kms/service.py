"""The KMS service: one request decoded by the model, dispatched to its operation, answered.

Independent of HTTP (:mod:`harness.kms.server` carries it). The operations live in
:mod:`harness.kms.keys`, :mod:`harness.kms.aliases`, :mod:`harness.kms.crypto`,
:mod:`harness.kms.data_key_pairs`, :mod:`harness.kms.signing`, :mod:`harness.kms.mac` and
:mod:`harness.kms.key_agreement`, one function each, registered here by their KMS names; they
reach the key store, the key-policy check and the Recipient verifier through the
:class:`KmsService` they are given.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from harness import bounded_json
from harness.errors import ErrorCode, NitroError
from harness.kms import aliases, crypto, data_key_pairs, key_agreement, keys, mac, policy, signing
from harness.kms.credentials import Caller
from harness.kms.key_specs import spec_of, usage_of
from harness.kms.recipient import RecipientVerifier
from harness.kms.store import KeyStore
from harness.kms.wire import KmsError, Validation, decode, encode, service_model

__all__ = ["KmsService", "OPERATIONS"]

log = logging.getLogger("harness.kms")

#: KMS operation name -> implementation ``(service, decoded params, caller) -> response dict``.
OPERATIONS: dict[str, Callable[[KmsService, dict[str, Any], Caller], dict[str, Any]]] = {
    **keys.OPERATIONS,
    **aliases.OPERATIONS,
    **crypto.OPERATIONS,
    **data_key_pairs.OPERATIONS,
    **signing.OPERATIONS,
    **mac.OPERATIONS,
    **key_agreement.OPERATIONS,
}


def _account_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[4] if len(parts) > 5 else ""


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
    (docs/kms.md: AWS's choice is undocumented). Thread-safe.
    Raises NitroError for unusable arguments (InvalidArgument) or state file (FileOperationFailure).
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
                f"(docs/kms.md), got {bad_attestation_exception!r}",
            )
        if not re.fullmatch(r"\d{12}", account_id):
            raise NitroError(ErrorCode.InvalidArgument, f"account_id: must be 12 digits, got {account_id!r}")
        self.region = region
        self.account_id = account_id
        self.state_path = Path(state_path) if state_path is not None else None
        self.store = KeyStore(self.state_path, region, account_id)
        self.recipients = RecipientVerifier(attestation_roots, attestation_at, bad_attestation_exception)
        self._policy_cache: dict[str, dict[str, Any]] = {}
        self.model = service_model()

    def handle(self, operation: str, body: bytes, caller: Caller) -> dict[str, Any]:
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
            raw = bounded_json.loads(body or b"{}")
        except ValueError:  # syntax, encoding, or nesting too deep
            raise KmsError("SerializationException", "request body is not valid JSON") from None
        check = Validation()
        params = decode(raw, op_model.input_shape, "", check) if op_model.input_shape else {}
        check.raise_if_any()
        impl = OPERATIONS.get(operation)
        if impl is None:
            raise KmsError(
                "UnsupportedOperationException",
                f"The KMS emulator does not implement {operation}",
            )
        result = impl(self, params, caller)
        if op_model.output_shape is None:
            return {}
        return encode(result, op_model.output_shape, operation)

    def _policy(self, key: Mapping[str, Any]) -> dict[str, Any]:
        text = key["Policy"]
        doc = self._policy_cache.get(text)
        if doc is None:
            doc = policy.parse_policy(text)
            if len(self._policy_cache) > 256:
                self._policy_cache.clear()
            self._policy_cache[text] = doc
        return doc

    def authorize(
        self,
        key: Mapping[str, Any],
        action: str,
        caller: Caller,
        *,
        encryption_context: Mapping[str, str] | None = None,
        attestation: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Evaluate ``key``'s policy for ``kms:<action>`` by ``caller``; AccessDeniedException if denied.

        The request's condition keys: ``aws:PrincipalArn``, ``aws:PrincipalAccount``,
        ``kms:CallerAccount``, the key's ``kms:KeySpec``, ``kms:KeyUsage`` and ``kms:KeyOrigin``,
        ``kms:EncryptionContext:<name>`` and ``kms:EncryptionContextKeys`` from
        ``encryption_context``, the Recipient's ``attestation`` keys, and ``extra`` (None values
        dropped). Rule: docs/kms.md#condition-keys, explicit Deny beats Allow.
        """
        condition_keys: dict[str, Any] = {
            "aws:PrincipalArn": caller.principal_arn,
            "aws:PrincipalAccount": _account_of(caller.principal_arn),
            "kms:CallerAccount": _account_of(caller.principal_arn),
            "kms:KeySpec": spec_of(key),
            "kms:KeyUsage": usage_of(key),
            "kms:KeyOrigin": "AWS_KMS",
        }
        if encryption_context:
            for name, value in encryption_context.items():
                condition_keys[f"kms:EncryptionContext:{name}"] = value
            condition_keys["kms:EncryptionContextKeys"] = list(encryption_context)
        if attestation:
            condition_keys.update(attestation)
        if extra:
            condition_keys.update({k: v for k, v in extra.items() if v is not None})
        ctx = policy.RequestContext(f"kms:{action}", caller.principal_arn, key["Arn"], condition_keys)
        decision = policy.evaluate(self._policy(key), ctx)
        if not decision.allowed:
            log.info(
                "denied %s for %s on %s: %s",
                ctx.action,
                caller.principal_arn,
                key["Arn"],
                "; ".join(decision.trace),
            )
            raise KmsError("AccessDeniedException", policy.denial_message(ctx, decision))
