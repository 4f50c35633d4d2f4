"""The KMS emulator of a scenario's ``services: kms:`` block, and of ``kms`` steps.

:class:`KmsEmulator` is :class:`harness.kms.KmsServer` the way an enclave meets KMS
(docs/scenarios.md#services, docs/kms.md): TLS with a certificate for
``kms.<region>.amazonaws.com`` from a CA kept in a folder (an image that trusts that CA keeps
trusting it while the folder is kept), SigV4 with one access key, attestation documents
verified against the harness PKI root the enclaves' NSM signs with, and the declared keys:
alias, key spec, key usage and key policy. Every request is logged, one JSON object a line,
to ``kms.log``; the keys as created (IDs, ARNs, policies) to ``kms-keys.json``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from harness.kms import KmsCredential, KmsServer, TlsIdentity

#: Account and parent role of the emulator's caller unless the block names others.
DEFAULT_ACCOUNT = "111122223333"
DEFAULT_ROLE = "role/nitro-harness-parent"


class KmsServiceError(Exception):
    """A declared key or setting the emulator refused: ``at`` (path below ``services.kms``) and
    a one-line ``message``."""

    def __init__(self, at: list[Any], message: str):
        super().__init__(message)
        self.at = at
        self.message = message


class KmsEmulator:
    """A KMS emulator for a scenario case or a step.

    ``spec`` is the ``services.kms`` mapping (docs/scenarios.md#services): ``region``,
    ``account_id``, ``credentials`` (``access_key_id``, ``secret_access_key``,
    ``principal_arn``; a fresh random key otherwise), ``keys`` (declared keys, created by
    :meth:`create_declared_keys`). ``folder`` receives ``kms.log`` and ``kms-keys.json``;
    ``tls_dir`` the TLS identity (default ``folder/kms-tls``); ``attestation_roots`` the
    certificates Recipient documents must chain to (default: the harness PKI root).
    :meth:`start` / :meth:`stop`; placeholders in :meth:`placeholders`.
    """

    def __init__(self, spec: Mapping[str, Any], folder: Path, *, tls_dir: Path | None = None,
                 attestation_roots: Sequence[Any] | None = None):
        self.spec = dict(spec)
        self.folder = Path(folder)
        self.tls_dir = Path(tls_dir) if tls_dir is not None else self.folder / "kms-tls"
        self.region = str(self.spec.get("region", "us-east-1"))
        self.account_id = str(self.spec.get("account_id", DEFAULT_ACCOUNT))
        self.attestation_roots = attestation_roots
        self.server: KmsServer | None = None
        self.identity: TlsIdentity | None = None
        self.credential = _credential(self.spec.get("credentials") or {}, self.account_id)
        self.keys: dict[str, dict[str, str]] = {}  # alias name (without alias/) -> key_id, arn
        self.keys_created = False
        self._log_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> KmsEmulator:
        """Make (or reuse) the TLS identity and serve on 127.0.0.1 (an ephemeral port).

        Raises NitroError when the TLS folder is unusable or the port cannot be bound.
        """
        from harness.kms import KmsServer, ensure_tls_identity

        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = ensure_tls_identity(self.tls_dir, region=self.region)
        roots = self.attestation_roots
        if roots is None:
            from harness.pki import Pki

            roots = [Pki.load_or_create().root_certificate]
        self.server = KmsServer(tls=self.identity, attestation_roots=roots,
                                credentials=[self.credential], region=self.region,
                                account_id=self.account_id, on_request=self._log_request)
        self.server.start()
        self._log({"event": "started", "endpoint": self.endpoint, "region": self.region,
                   "ca_file": str(self.identity.ca_certificate)})
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            self._log({"event": "stopped"})

    # -- what steps and proxies need

    @property
    def port(self) -> int:
        """The emulator's TCP port on 127.0.0.1 (after :meth:`start`)."""
        assert self.server is not None, "KmsEmulator.start() first"
        return self.server.port

    @property
    def endpoint(self) -> str:
        """``https://localhost:<port>``: boto3's ``endpoint_url`` on the parent (the
        certificate names localhost)."""
        return f"https://localhost:{self.port}"

    def placeholders(self) -> dict[str, str]:
        """The ``kms.*`` placeholder values (docs/scenarios.md#placeholders), keys included
        once created."""
        assert self.identity is not None, "KmsEmulator.start() first"
        values = {
            "kms.endpoint": self.endpoint, "kms.ca_file": str(self.identity.ca_certificate),
            "kms.host": "127.0.0.1", "kms.port": str(self.port), "kms.region": self.region,
            "kms.account_id": self.account_id,
            "kms.access_key_id": self.credential.access_key_id,
            "kms.secret_access_key": self.credential.secret_access_key,
            "kms.principal_arn": self.credential.principal_arn,
        }
        for name, key in self.keys.items():
            values[f"kms.keys.{name}.key_id"] = key["key_id"]
            values[f"kms.keys.{name}.arn"] = key["arn"]
        return values

    def boto3_client(self) -> Any:
        """A boto3 KMS client for the parent: the emulator's endpoint, CA and access key."""
        import boto3
        from botocore.config import Config

        assert self.identity is not None, "KmsEmulator.start() first"
        return boto3.client(
            "kms", endpoint_url=self.endpoint, region_name=self.region,
            verify=str(self.identity.ca_certificate),
            aws_access_key_id=self.credential.access_key_id,
            aws_secret_access_key=self.credential.secret_access_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=30))

    # -- keys

    def create_key(self, *, policy: str | None = None, key_spec: str = "SYMMETRIC_DEFAULT",
                   key_usage: str | None = None, description: str = "",
                   alias: str | None = None, bypass_lockout_check: bool = False) -> dict[str, str]:
        """Create a key as the emulator's caller: CreateKey (default policy), CreateAlias when
        ``alias`` is given, then PutKeyPolicy with ``policy`` (JSON text) when given, so that
        a policy granting the caller nothing more than its conditions still gets its alias.

        Returns ``{"key_id", "arn"}``. Raises :class:`KmsServiceError` (``at`` naming the
        field) with the emulator's error, e.g. MalformedPolicyDocumentException.
        """
        params: dict[str, Any] = {"KeySpec": key_spec, "Description": description}
        if key_usage:
            params["KeyUsage"] = key_usage
        meta = self._call("CreateKey", params, ["key_spec"])["KeyMetadata"]
        key = {"key_id": meta["KeyId"], "arn": meta["Arn"]}
        if alias:
            self._call("CreateAlias", {"AliasName": alias, "TargetKeyId": key["key_id"]}, ["alias"])
        if policy is not None:
            self._call("PutKeyPolicy", {"KeyId": key["key_id"], "PolicyName": "default",
                                        "Policy": policy,
                                        "BypassPolicyLockoutSafetyCheck": bypass_lockout_check},
                       ["policy"])
        return key

    def create_declared_keys(self, resolve: Callable[[Any, list[Any]], Any]) -> None:
        """Create every key of ``spec["keys"]`` once (later calls do nothing).

        ``resolve(node, at)`` substitutes placeholders in a key's fields (``at`` its path below
        ``services.kms``). A policy is a mapping (sent as JSON) or JSON text. Raises
        :class:`KmsServiceError` naming the key and field.
        """
        if self.keys_created:
            return
        self.keys_created = True
        created = []
        for index, declared in enumerate(self.spec.get("keys") or []):
            at = ["keys", index]
            body = resolve(declared, at)
            policy = body.get("policy")
            if isinstance(policy, str):
                try:
                    json.loads(policy)
                except ValueError as err:
                    raise KmsServiceError(at + ["policy"], f"not valid JSON: {err}") from None
            elif policy is not None:
                policy = json.dumps(policy)
            alias = str(body["alias"])
            try:
                key = self.create_key(
                    policy=policy, key_spec=str(body.get("key_spec", "SYMMETRIC_DEFAULT")),
                    key_usage=body.get("key_usage"), description=str(body.get("description", "")),
                    alias=alias, bypass_lockout_check=bool(body.get("bypass_policy_lockout_safety_check")))
            except KmsServiceError as err:
                raise KmsServiceError(at + err.at, err.message) from None
            self.keys[alias.removeprefix("alias/")] = key
            created.append({"alias": alias, **key, "key_spec": body.get("key_spec", "SYMMETRIC_DEFAULT"),
                            "policy": json.loads(policy) if policy else None})
        (self.folder / "kms-keys.json").write_text(json.dumps(created, indent=2) + "\n")

    def _call(self, operation: str, params: dict[str, Any], at: list[Any]) -> dict[str, Any]:
        from harness.kms import KmsError
        from harness.kms.credentials import Caller

        assert self.server is not None, "KmsEmulator.start() first"
        caller = Caller(self.credential.principal_arn, self.credential.access_key_id)
        try:
            answer = self.server.service.handle(operation, json.dumps(params).encode(), caller)
        except KmsError as err:
            self._log({"operation": operation, "caller": caller.principal_arn, "error": err.name,
                       "message": err.message, "by": "services"})
            raise KmsServiceError(at, f"{operation}: {err.name}: {err.message}") from None
        self._log({"operation": operation, "caller": caller.principal_arn, "status": 200,
                   "by": "services"})
        return answer

    # -- the request log

    def _log_request(self, record: dict[str, Any]) -> None:
        self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}, default=str)
        with self._log_lock, open(self.folder / "kms.log", "a", encoding="utf-8") as out:
            out.write(line + "\n")


def _credential(given: Mapping[str, Any], account_id: str) -> KmsCredential:
    """The one access key the emulator accepts: the block's ``credentials`` or a fresh one."""
    from harness.kms import KmsCredential

    return KmsCredential(
        str(given.get("access_key_id") or "AKIA" + secrets.token_hex(8).upper()),
        str(given.get("secret_access_key") or secrets.token_hex(20)),
        str(given.get("principal_arn") or f"arn:aws:iam::{account_id}:{DEFAULT_ROLE}"))


__all__ = ["DEFAULT_ACCOUNT", "KmsEmulator", "KmsServiceError"]
