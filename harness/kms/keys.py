"""KMS key management operations: create, describe, list, enable/disable, deletion, key policy,
tags, and GetPublicKey.

One function per operation, ``(service, decoded params, caller) -> response dict``, registered
by KMS name in :data:`OPERATIONS`. Keys are of AWS_KMS origin and single-Region: symmetric
(SYMMETRIC_DEFAULT), HMAC (HMAC_224/256/384/512) or asymmetric (RSA_2048/3072/4096,
ECC_NIST_P256/P384/P521, ECC_SECG_P256K1), each with one key usage its spec allows
(docs/kms.md#key-specs).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator, Mapping

from harness.kms import asymmetric, policy
from harness.kms.credentials import Caller
from harness.kms.key_specs import (
    ASYMMETRIC_SPECS,
    HMAC_KEY_BYTES,
    algorithm_fields,
    check_new_key,
    spec_of,
    usage_of,
)
from harness.kms.key_use import key_for_use
from harness.kms.store import require_usable
from harness.kms.wire import KmsError, Validation, paginate

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS", "check_new_policy", "metadata", "new_key_material"]


def metadata(svc: KmsService, key: Mapping[str, Any]) -> dict[str, Any]:
    """The ``KeyMetadata`` KMS answers for ``key``: its spec, usage and the algorithms they allow
    (DeletionDate only while pending deletion)."""
    meta = {
        "AWSAccountId": svc.account_id,
        "KeyId": key["KeyId"],
        "Arn": key["Arn"],
        "CreationDate": key["CreationDate"],
        "Enabled": key["KeyState"] == "Enabled",
        "Description": key["Description"],
        "KeyUsage": usage_of(key),
        "KeyState": key["KeyState"],
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": spec_of(key),
        "KeySpec": spec_of(key),
        **algorithm_fields(key),
        "MultiRegion": False,
    }
    if key["KeyState"] == "PendingDeletion":
        meta["DeletionDate"] = key["DeletionDate"]
        meta["PendingDeletionWindowInDays"] = key["PendingWindowInDays"]
    return meta


def new_key_material(spec: str) -> dict[str, str]:
    """The key record members holding a new key's secret: ``PrivateKey`` (base64 PKCS#8 DER)
    for a key pair, else ``Material`` (base64 of 32 random bytes, or the HMAC spec's length)."""
    if spec in ASYMMETRIC_SPECS:
        private = asymmetric.generate_private_key(spec)
        return {"PrivateKey": base64.b64encode(asymmetric.private_der(private)).decode()}
    return {"Material": base64.b64encode(os.urandom(HMAC_KEY_BYTES.get(spec, 32))).decode()}


def check_new_policy(text: str, caller: Caller, key_arn: str, bypass: bool) -> None:
    """Parse a key policy (MalformedPolicyDocumentException) and, unless ``bypass``
    (BypassPolicyLockoutSafetyCheck), apply KMS's lockout check: the policy must still let
    ``caller`` call kms:PutKeyPolicy."""
    try:
        doc = policy.parse_policy(text)
    except policy.PolicyError as err:
        raise KmsError("MalformedPolicyDocumentException", str(err)) from None
    if bypass:
        return
    ctx = policy.RequestContext(
        "kms:PutKeyPolicy", caller.principal_arn, key_arn, {"aws:PrincipalArn": caller.principal_arn}
    )
    if not policy.evaluate(doc, ctx).allowed:
        raise KmsError(
            "MalformedPolicyDocumentException",
            "The new key policy will not allow you to update the key policy in the future.",
        )


def create_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """CreateKey: a new Enabled key of ``KeySpec`` (default SYMMETRIC_DEFAULT) and ``KeyUsage``
    (default ENCRYPT_DECRYPT) with fresh key material; the default key policy unless one is given.

    ValidationException for a usage the spec does not allow or both KeySpec and the deprecated
    CustomerMasterKeySpec; UnsupportedOperationException for specs the emulator does not make."""
    if "KeySpec" in p and "CustomerMasterKeySpec" in p:
        raise KmsError(
            "ValidationException",
            "You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
            "CustomerMasterKeySpec parameter is deprecated. Use KeySpec only",
        )
    usage = p.get("KeyUsage", "ENCRYPT_DECRYPT")
    spec = p.get("KeySpec", p.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
    check_new_key(spec, usage)
    if p.get("Origin", "AWS_KMS") != "AWS_KMS" or p.get("CustomKeyStoreId") or p.get("MultiRegion"):
        raise KmsError(
            "UnsupportedOperationException",
            "The KMS emulator supports only AWS_KMS-origin single-Region keys",
        )
    key_id = str(uuid.uuid4())
    arn = svc.store.arn(key_id)
    key_policy = p.get("Policy")
    if key_policy is not None:
        check_new_policy(key_policy, caller, arn, bool(p.get("BypassPolicyLockoutSafetyCheck")))
    else:
        key_policy = policy.default_key_policy(svc.account_id)
    key = {
        "KeyId": key_id,
        "Arn": arn,
        "CreationDate": time.time(),
        "Description": p.get("Description", ""),
        "KeyState": "Enabled",
        "Policy": key_policy,
        "Tags": {t["TagKey"]: t["TagValue"] for t in p.get("Tags", [])},
        "KeySpec": spec,
        "KeyUsage": usage,
        **new_key_material(spec),
    }
    with svc.store.lock:
        svc.store.keys[key_id] = key
        svc.store.save()
    return {"KeyMetadata": metadata(svc, key)}


def describe_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """DescribeKey: the key's metadata (by id, ARN or alias)."""
    with svc.store.lock:
        key = svc.store.resolve(p["KeyId"])
    svc.authorize(key, "DescribeKey", caller)
    return {"KeyMetadata": metadata(svc, key)}


def list_keys(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ListKeys: every key, oldest first, paginated."""
    with svc.store.lock:
        svc.store.sweep()
        keys = sorted(svc.store.keys.values(), key=lambda k: (k["CreationDate"], k["KeyId"]))
    entries = [{"KeyId": k["KeyId"], "KeyArn": k["Arn"]} for k in keys]
    page, marker = paginate(entries, p)
    return {"Keys": page, "NextMarker": marker, "Truncated": marker is not None}


@contextmanager
def _changing_key(
    svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str
) -> Iterator[dict[str, Any]]:
    """The key ``p["KeyId"]`` (no alias) authorized for ``action``, held under the store lock for
    the block to change; the store is saved after the block (not when it raises)."""
    with svc.store.lock:
        key = svc.store.resolve(p["KeyId"], allow_alias=False)
        svc.authorize(key, action, caller)
        yield key
        svc.store.save()


def _key_to_read(svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str) -> dict[str, Any]:
    """The key ``p["KeyId"]`` (no alias), looked up under the store lock, authorized for ``action``."""
    with svc.store.lock:
        key = svc.store.resolve(p["KeyId"], allow_alias=False)
    svc.authorize(key, action, caller)
    return key


def _set_state(svc: KmsService, p: dict[str, Any], caller: Caller, action: str, new_state: str):
    with _changing_key(svc, p, caller, action) as key:
        if key["KeyState"] == "PendingDeletion":
            require_usable(key)
        key["KeyState"] = new_state
    return {}


def enable_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """EnableKey: Disabled -> Enabled (KMSInvalidStateException while pending deletion)."""
    return _set_state(svc, p, caller, "EnableKey", "Enabled")


def disable_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """DisableKey: Enabled -> Disabled (KMSInvalidStateException while pending deletion)."""
    return _set_state(svc, p, caller, "DisableKey", "Disabled")


def schedule_key_deletion(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ScheduleKeyDeletion: PendingDeletion for PendingWindowInDays (7..30, default 30) days."""
    days = p.get("PendingWindowInDays", 30)
    if not 7 <= days <= 30:
        # The model allows 1..365; KMS itself enforces 7..30 for customer keys.
        check = Validation()
        check.add("PendingWindowInDays", days, "Member must have value between 7 and 30")
        check.raise_if_any()
    with _changing_key(svc, p, caller, "ScheduleKeyDeletion") as key:
        if key["KeyState"] == "PendingDeletion":
            raise KmsError("KMSInvalidStateException", f"{key['Arn']} is pending deletion.")
        key.update(
            KeyState="PendingDeletion", DeletionDate=time.time() + days * 86400, PendingWindowInDays=days
        )
    return {
        "KeyId": key["Arn"],
        "DeletionDate": key["DeletionDate"],
        "KeyState": "PendingDeletion",
        "PendingWindowInDays": days,
    }


def cancel_key_deletion(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """CancelKeyDeletion: PendingDeletion -> Disabled, as KMS leaves it."""
    with _changing_key(svc, p, caller, "CancelKeyDeletion") as key:
        if key["KeyState"] != "PendingDeletion":
            raise KmsError("KMSInvalidStateException", f"{key['Arn']} is not pending deletion.")
        # KMS leaves a key whose deletion was cancelled Disabled.
        key["KeyState"] = "Disabled"
        key.pop("DeletionDate", None)
        key.pop("PendingWindowInDays", None)
    return {"KeyId": key["Arn"]}


def _check_policy_name(p: Mapping[str, Any]) -> str:
    name = p.get("PolicyName", "default")
    if name != "default":
        raise KmsError(
            "NotFoundException",
            f"No such policy exists: {name} (a KMS key has one policy, named 'default')",
        )
    return name


def get_key_policy(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GetKeyPolicy: the key's one policy, named ``default``."""
    name = _check_policy_name(p)
    key = _key_to_read(svc, p, caller, "GetKeyPolicy")
    return {"Policy": key["Policy"], "PolicyName": name}


def put_key_policy(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """PutKeyPolicy: replace the policy after the parse and lockout checks (:func:`check_new_policy`)."""
    _check_policy_name(p)
    with _changing_key(svc, p, caller, "PutKeyPolicy") as key:
        check_new_policy(p["Policy"], caller, key["Arn"], bool(p.get("BypassPolicyLockoutSafetyCheck")))
        key["Policy"] = p["Policy"]
    return {}


def list_key_policies(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ListKeyPolicies: always ``["default"]``."""
    _key_to_read(svc, p, caller, "ListKeyPolicies")
    return {"PolicyNames": ["default"], "Truncated": False}


def update_key_description(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """UpdateKeyDescription."""
    with _changing_key(svc, p, caller, "UpdateKeyDescription") as key:
        key["Description"] = p["Description"]
    return {}


def tag_resource(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """TagResource: add or overwrite tags."""
    with _changing_key(svc, p, caller, "TagResource") as key:
        key.setdefault("Tags", {}).update({t["TagKey"]: t["TagValue"] for t in p["Tags"]})
    return {}


def untag_resource(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """UntagResource: remove tags by name (absent names are no error)."""
    with _changing_key(svc, p, caller, "UntagResource") as key:
        for name in p["TagKeys"]:
            key.setdefault("Tags", {}).pop(name, None)
    return {}


def list_resource_tags(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """ListResourceTags: tags sorted by name, paginated."""
    key = _key_to_read(svc, p, caller, "ListResourceTags")
    tags = [{"TagKey": k, "TagValue": v} for k, v in sorted(key.get("Tags", {}).items())]
    page, marker = paginate(tags, p)
    return {"Tags": page, "NextMarker": marker, "Truncated": marker is not None}


def get_public_key(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GetPublicKey: the DER SubjectPublicKeyInfo of an asymmetric key, with its spec, usage and
    algorithms. UnsupportedOperationException for symmetric and HMAC keys."""
    key = key_for_use(svc, p, caller, "GetPublicKey", None)
    if spec_of(key) not in ASYMMETRIC_SPECS:
        raise KmsError(
            "UnsupportedOperationException",
            f"{key['Arn']} is a {spec_of(key)} key; GetPublicKey works on asymmetric keys only.",
        )
    return {
        "KeyId": key["Arn"],
        "PublicKey": asymmetric.public_der(asymmetric.load_private_key(key["PrivateKey"])),
        "CustomerMasterKeySpec": spec_of(key),
        "KeySpec": spec_of(key),
        "KeyUsage": usage_of(key),
        **algorithm_fields(key),
    }


OPERATIONS = {
    "CreateKey": create_key,
    "GetPublicKey": get_public_key,
    "DescribeKey": describe_key,
    "ListKeys": list_keys,
    "EnableKey": enable_key,
    "DisableKey": disable_key,
    "ScheduleKeyDeletion": schedule_key_deletion,
    "CancelKeyDeletion": cancel_key_deletion,
    "GetKeyPolicy": get_key_policy,
    "PutKeyPolicy": put_key_policy,
    "ListKeyPolicies": list_key_policies,
    "UpdateKeyDescription": update_key_description,
    "TagResource": tag_resource,
    "UntagResource": untag_resource,
    "ListResourceTags": list_resource_tags,
}
