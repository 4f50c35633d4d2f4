"""The KMS emulator's key store: keys and aliases in memory, optionally persisted to a JSON file.

The file is ``{"version": 1, "keys": {key id: key}, "aliases": {alias name: alias}}``; every
change rewrites it with :func:`harness.atomic_file.write_atomically` (mode 0600: it holds key
material), so a crash leaves either the old or the new state, never a torn file. A key holds
``KeySpec`` and ``KeyUsage`` (absent in files written before asymmetric keys: SYMMETRIC_DEFAULT,
ENCRYPT_DECRYPT) and its secret: ``Material`` (base64; 32 bytes, or an HMAC spec's length) or,
for a key pair, ``PrivateKey`` (base64 PKCS#8 DER; docs/kms.md#key-specs).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError
from harness.kms import asymmetric
from harness.kms.key_specs import ASYMMETRIC_SPECS, HMAC_KEY_BYTES, KEY_USAGES, spec_of, usage_of
from harness.kms.wire import KmsError

__all__ = ["KeyStore", "load_state", "require_usable"]

STATE_VERSION = 1


def _empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "keys": {}, "aliases": {}}


def load_state(path: Path) -> dict[str, Any]:
    """Read a state file written by :meth:`KeyStore.save`; a missing file is an empty store.

    Raises NitroError (FileOperationFailure) naming the file and field when it is unreadable,
    not JSON, of another version, or holds a key whose spec, usage or key material does not
    fit (module docstring); the file is left untouched.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _empty_state()
    except OSError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"KMS state file {path}: cannot read ({err.strerror})"
        ) from None
    try:
        state = json.loads(raw)
    except ValueError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure,
            f"KMS state file {path}: not valid JSON ({err}); the file was left untouched",
        ) from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise NitroError(
            ErrorCode.FileOperationFailure,
            f"KMS state file {path}: field 'version' must be {STATE_VERSION}; the file was left untouched",
        )
    for field_name in ("keys", "aliases"):
        if not isinstance(state.get(field_name), dict):
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"KMS state file {path}: field '{field_name}' must be an object",
            )
    for key_id, key in state["keys"].items():
        problem = _key_problem(key)
        if problem:
            raise NitroError(
                ErrorCode.FileOperationFailure,
                f"KMS state file {path}: keys.{key_id}{problem}; the file was left untouched",
            ) from None
    return state


def _key_problem(key: Any) -> str | None:
    """What is wrong with one stored key record (``".<field> must ..."``), None if nothing."""
    if not isinstance(key, dict):
        return " must be an object"
    spec, usage = spec_of(key), usage_of(key)
    if spec not in KEY_USAGES:
        return f".KeySpec must be one of {', '.join(KEY_USAGES)}, not {spec!r}"
    if usage not in KEY_USAGES[spec]:
        return f".KeyUsage must be one of {', '.join(KEY_USAGES[spec])} for {spec}, not {usage!r}"
    if spec in ASYMMETRIC_SPECS:
        try:
            actual = asymmetric.spec_of_private_key(asymmetric.load_private_key(key["PrivateKey"]))
        except (KeyError, TypeError, ValueError, binascii.Error) as err:
            return f".PrivateKey must be base64 of a PKCS#8 DER private key ({type(err).__name__}: {err})"
        return None if actual == spec else f".PrivateKey must be a {spec} private key, not {actual}"
    want = HMAC_KEY_BYTES.get(spec, 32)
    try:
        size = len(base64.b64decode(key["Material"], validate=True))
    except (KeyError, TypeError, ValueError, binascii.Error) as err:
        return f".Material must be {want} bytes of base64 ({type(err).__name__}: {err})"
    return None if size == want else f".Material must be {want} bytes of base64 (not {size} bytes)"


def require_usable(key: Mapping[str, Any]) -> None:
    """docs/kms.md, KMS key states: cryptographic operations need an Enabled key.

    Raises DisabledException for a Disabled key, KMSInvalidStateException for one pending deletion.
    """
    if key["KeyState"] == "Disabled":
        raise KmsError("DisabledException", f"{key['Arn']} is disabled.")
    if key["KeyState"] != "Enabled":
        raise KmsError("KMSInvalidStateException", f"{key['Arn']} is pending deletion.")


class KeyStore:
    """Keys (``KeyId``, ``Arn``, ``KeyState``, ``Policy``, ``Material`` ...) and aliases of one
    account in one Region.

    ``path``: the JSON state file (None = memory only); loaded here (NitroError if unusable).
    Callers hold :attr:`lock` (re-entrant) around reads and changes, and call :meth:`save`
    after a change.
    """

    def __init__(self, path: Path | None, region: str, account_id: str):
        self.path = path
        self.region = region
        self.account_id = account_id
        self.lock = threading.RLock()
        self.state = load_state(path) if path else _empty_state()

    @property
    def keys(self) -> dict[str, dict[str, Any]]:
        """Key id -> key record."""
        return self.state["keys"]

    @property
    def aliases(self) -> dict[str, dict[str, Any]]:
        """Alias name (``alias/...``) -> ``{"TargetKeyId", "CreationDate", "LastUpdatedDate"}``."""
        return self.state["aliases"]

    def save(self) -> None:
        """Write the whole state to :attr:`path` atomically (OSError propagates)."""
        if self.path is not None:
            data = json.dumps(self.state, indent=1, sort_keys=True).encode()
            write_atomically(self.path, data, 0o600)  # holds key material

    def arn(self, key_id: str) -> str:
        """``arn:aws:kms:<region>:<account>:key/<id>``."""
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, name: str) -> str:
        """``arn:aws:kms:<region>:<account>:alias/<name>``."""
        return f"arn:aws:kms:{self.region}:{self.account_id}:{name}"

    def sweep(self) -> None:
        """Delete keys whose deletion date has passed (as KMS does at the window's end)."""
        now = time.time()
        gone = [
            k
            for k, v in self.keys.items()
            if v["KeyState"] == "PendingDeletion" and v["DeletionDate"] <= now
        ]
        for key_id in gone:
            del self.keys[key_id]
            for alias in [a for a, t in self.aliases.items() if t["TargetKeyId"] == key_id]:
                del self.aliases[alias]
        if gone:
            self.save()

    def resolve(self, key_ref: str, *, allow_alias: bool = True) -> dict[str, Any]:
        """Find a key by id, key ARN, alias name or alias ARN.

        Raises NotFoundException (no such key or alias, or another account's ARN) and
        ValidationException when an alias names the key where ``allow_alias`` is False.
        """
        self.sweep()
        ref = key_ref
        prefix = f"arn:aws:kms:{self.region}:{self.account_id}:"
        if ref.startswith("arn:"):
            if not ref.startswith(prefix):
                raise KmsError(
                    "NotFoundException",
                    f"Invalid arn {key_ref}" if ref.count(":") < 5 else f"Key '{key_ref}' does not exist",
                )
            ref = ref[len(prefix) :]
            if ref.startswith("key/"):
                ref = ref[4:]
        if ref.startswith("alias/"):
            if not allow_alias:
                raise KmsError(
                    "ValidationException", f"{key_ref} is an alias; a key id or key ARN is required here"
                )
            alias = self.aliases.get(ref)
            if alias is None:
                raise KmsError("NotFoundException", f"Alias {self.alias_arn(ref)} is not found.")
            ref = alias["TargetKeyId"]
        key = self.keys.get(ref)
        if key is None:
            raise KmsError("NotFoundException", f"Key '{self.arn(ref)}' does not exist")
        return key
