"""Who calls the KMS emulator: the access keys it accepts and the IAM principal each stands for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

from harness.errors import ErrorCode, NitroError

__all__ = ["Caller", "KmsCredential", "normalize_credentials"]


@dataclass(frozen=True)
class KmsCredential:
    """An access key the emulator accepts: ``access_key_id``, ``secret_access_key`` and the
    IAM ``principal_arn`` it stands for (``aws:PrincipalArn`` in policies)."""

    access_key_id: str
    secret_access_key: str
    principal_arn: str


@dataclass(frozen=True)
class Caller:
    """The principal one request runs as: from its SigV4 access key, or the server's default
    principal (``access_key_id`` None) when signatures are not checked."""

    principal_arn: str
    access_key_id: str | None


def normalize_credentials(credentials: Any, default_principal: str) -> dict[str, KmsCredential]:
    """Access key id -> :class:`KmsCredential` from None (no keys), a sequence of
    :class:`KmsCredential`, or a mapping access key -> secret (principal ``default_principal``)
    or access key -> (secret, principal ARN). NitroError (InvalidArgument) for other entries."""
    if credentials is None:
        return {}
    out: dict[str, KmsCredential] = {}
    if isinstance(credentials, Mapping):
        for akid, value in credentials.items():
            if isinstance(value, str):
                out[akid] = KmsCredential(akid, value, default_principal)
            else:
                secret, arn = value
                out[akid] = KmsCredential(akid, secret, arn)
        return out
    for cred in credentials:
        if not isinstance(cred, KmsCredential):
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"credentials: expected KmsCredential entries, got {type(cred).__name__}",
            )
        out[cred.access_key_id] = cred
    return out
