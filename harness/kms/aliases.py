"""KMS alias operations: CreateAlias, DeleteAlias, UpdateAlias, ListAliases.

One function per operation, ``(service, decoded params, caller) -> response dict``, registered
by KMS name in :data:`OPERATIONS`. An alias (``alias/<name>``) names one key of the account;
``alias/aws/`` is reserved for AWS managed keys (docs/kms.md).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from harness.kms.credentials import Caller
from harness.kms.store import KeyStore, require_usable
from harness.kms.wire import KmsError, paginate

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]


def _check_alias_name(name: str) -> None:
    if not name.startswith("alias/") or len(name) <= len("alias/"):
        raise KmsError(
            "ValidationException", f"Alias name {name!r} must begin with 'alias/' followed by a name"
        )
    if name.startswith("alias/aws/"):
        raise KmsError("NotFoundException", f"Alias {name} is reserved for AWS managed keys (alias/aws/)")


def _existing_alias(store: KeyStore, name: str) -> dict[str, Any]:
    """The alias ``name``'s record (NotFoundException if there is none); the caller holds the store lock."""
    alias = store.aliases.get(name)
    if alias is None:
        raise KmsError("NotFoundException", f"Alias {store.alias_arn(name)} is not found.")
    return alias


def create_alias(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """CreateAlias: a new alias for a key (AlreadyExistsException if the name is taken)."""
    name = p["AliasName"]
    _check_alias_name(name)
    store = svc.store
    with store.lock:
        key = store.resolve(p["TargetKeyId"], allow_alias=False)
        svc.authorize(key, "CreateAlias", caller)
        if key["KeyState"] == "PendingDeletion":
            require_usable(key)
        if name in store.aliases:
            raise KmsError(
                "AlreadyExistsException", f"An alias with the name {store.alias_arn(name)} already exists"
            )
        now = time.time()
        store.aliases[name] = {"TargetKeyId": key["KeyId"], "CreationDate": now, "LastUpdatedDate": now}
        store.save()
    return {}


def delete_alias(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """DeleteAlias (authorized by the policy of the key it names)."""
    name = p["AliasName"]
    store = svc.store
    with store.lock:
        alias = _existing_alias(store, name)
        svc.authorize(store.resolve(alias["TargetKeyId"]), "DeleteAlias", caller)
        del store.aliases[name]
        store.save()
    return {}


def update_alias(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """UpdateAlias: point an existing alias at another key."""
    name = p["AliasName"]
    store = svc.store
    with store.lock:
        alias = _existing_alias(store, name)
        key = store.resolve(p["TargetKeyId"], allow_alias=False)
        svc.authorize(key, "UpdateAlias", caller)
        alias.update(TargetKeyId=key["KeyId"], LastUpdatedDate=time.time())
        store.save()
    return {}


def list_aliases(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ListAliases: every alias (or those of ``KeyId``), sorted by name, paginated."""
    store = svc.store
    with store.lock:
        store.sweep()
        target = store.resolve(p["KeyId"], allow_alias=False)["KeyId"] if p.get("KeyId") else None
        aliases = sorted(store.aliases.items())
    entries = [
        {
            "AliasName": name,
            "AliasArn": store.alias_arn(name),
            "TargetKeyId": a["TargetKeyId"],
            "CreationDate": a["CreationDate"],
            "LastUpdatedDate": a["LastUpdatedDate"],
        }
        for name, a in aliases
        if target is None or a["TargetKeyId"] == target
    ]
    page, marker = paginate(entries, p)
    return {"Aliases": page, "NextMarker": marker, "Truncated": marker is not None}


OPERATIONS = {
    "CreateAlias": create_alias,
    "DeleteAlias": delete_alias,
    "UpdateAlias": update_alias,
    "ListAliases": list_aliases,
}
