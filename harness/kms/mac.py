"""KMS HMACs: GenerateMac and VerifyMac with GENERATE_VERIFY_MAC keys (RFC 2104).

HMAC_224/256/384/512 keys hold 28/32/48/64 random bytes and take only their own MAC algorithm
(HMAC_SHA_224 ... HMAC_SHA_512; another one is InvalidKeyUsageException). The message is MACed
as given, digest or not. A MAC that does not match is KMSInvalidMacException, never
``MacValid: false`` (docs/kms.md#hmac).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from harness.kms.credentials import Caller
from harness.kms.key_specs import check_algorithm
from harness.kms.key_use import dry_run, key_for_use
from harness.kms.wire import KmsError

if TYPE_CHECKING:
    from harness.kms.service import KmsService

__all__ = ["OPERATIONS"]

_DIGESTS = {
    "HMAC_SHA_224": hashlib.sha224,
    "HMAC_SHA_256": hashlib.sha256,
    "HMAC_SHA_384": hashlib.sha384,
    "HMAC_SHA_512": hashlib.sha512,
}


def _mac(svc: KmsService, p: Mapping[str, Any], caller: Caller, action: str) -> tuple[dict[str, Any], bytes]:
    """(key, HMAC of ``Message``) after every check of GenerateMac and VerifyMac."""
    algorithm = p["MacAlgorithm"]
    key = key_for_use(svc, p, caller, action, "GENERATE_VERIFY_MAC", extra={"kms:MacAlgorithm": algorithm})
    check_algorithm(key, algorithm)
    return key, hmac.new(base64.b64decode(key["Material"]), p["Message"], _DIGESTS[algorithm]).digest()


def generate_mac(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """GenerateMac: the HMAC of ``Message`` under the key."""
    key, mac = _mac(svc, p, caller, "GenerateMac")
    dry_run(p)
    return {"Mac": mac, "MacAlgorithm": p["MacAlgorithm"], "KeyId": key["Arn"]}


def verify_mac(svc: KmsService, p: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """VerifyMac: ``MacValid: true``, or KMSInvalidMacException (compared in constant time)."""
    key, mac = _mac(svc, p, caller, "VerifyMac")
    if not hmac.compare_digest(mac, p["Mac"]):
        raise KmsError(
            "KMSInvalidMacException",
            f"The MAC does not match {p['MacAlgorithm']} of the message under {key['Arn']}",
        )
    dry_run(p)
    return {"KeyId": key["Arn"], "MacValid": True, "MacAlgorithm": p["MacAlgorithm"]}


OPERATIONS = {"GenerateMac": generate_mac, "VerifyMac": verify_mac}
