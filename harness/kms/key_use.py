"""Using a key in a cryptographic operation: the checks every such KMS request goes through.

In KMS's order (docs/kms.md#operations): the key is resolved (NotFoundException), its policy
decides with the request's condition keys (AccessDeniedException), it must be Enabled
(DisabledException, KMSInvalidStateException) and of the operation's key usage
(InvalidKeyUsageException); the operation then checks its algorithm and inputs, and ``DryRun``
answers DryRunOperationException once everything passed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from harness.kms.credentials import Caller
from harness.kms.key_specs import check_usage
from harness.kms.store import require_usable
from harness.kms.wire import KmsError, Validation

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["alias_of", "dry_run", "key_for_use", "require_member"]


def alias_of(ref: str | None) -> str | None:
    """``kms:RequestAlias``: the alias the request named the key by, if any."""
    if not ref:
        return None
    if ref.startswith("alias/"):
        return ref
    match = re.match(r"^arn:aws[\w-]*:kms:[^:]*:\d{12}:(alias/.+)$", ref)
    return match.group(1) if match else None


def dry_run(params: Mapping[str, Any]) -> None:
    """DryRunOperationException when the request set ``DryRun`` (called after every check passed)."""
    if params.get("DryRun"):
        raise KmsError(
            "DryRunOperationException", "The request would have succeeded, but the DryRun option is set."
        )


def require_member(params: Mapping[str, Any], name: str) -> None:
    """ValidationException for a member the current model marks optional but KMS still needs."""
    if params.get(name) is None:
        check = Validation()
        check.add(name, None, "Member must not be null")
        check.raise_if_any()


def key_for_use(
    svc: KmsService,
    params: Mapping[str, Any],
    caller: Caller,
    action: str,
    usage: str | None,
    *,
    operation: str | None = None,
    symmetric: bool = False,
    key_field: str = "KeyId",
    context_field: str = "EncryptionContext",
    attestation: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The key ``params[key_field]`` names, resolved, authorized for ``kms:<action>``, Enabled
    and of KeyUsage ``usage`` (any usage when None; SYMMETRIC_DEFAULT with ``symmetric``).

    ``operation``: the name in InvalidKeyUsageException messages (default ``action``);
    ``attestation``: a verified Recipient's condition keys; ``extra``: more condition keys
    (None values dropped). Raises the KmsError of the first check that fails.
    """
    with svc.store.lock:
        key = svc.store.resolve(params[key_field])
        svc.authorize(
            key,
            action,
            caller,
            encryption_context=params.get(context_field),
            attestation=attestation,
            extra={"kms:RequestAlias": alias_of(params.get(key_field)), **(extra or {})},
        )
        require_usable(key)
    if usage is not None:
        check_usage(key, operation or action, usage, symmetric=symmetric)
    return key
