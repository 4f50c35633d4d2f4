"""IAM-style key policy evaluation for the KMS emulator.

docs/kms.md and AWS's IAM policy evaluation logic, restricted to what a KMS key policy decides:

* A statement applies when its ``Principal``/``NotPrincipal``, ``Action``/``NotAction``,
  ``Resource``/``NotResource`` and every ``Condition`` match the request.
* An applicable ``Deny`` always wins (explicit deny); otherwise an applicable ``Allow`` is
  needed; otherwise the request is implicitly denied.
* Condition keys are case-insensitive; values are compared by the operator:
  ``StringEquals``, ``StringNotEquals``, ``StringEqualsIgnoreCase``,
  ``StringNotEqualsIgnoreCase``, ``StringLike``, ``StringNotLike``, ``ArnEquals``,
  ``ArnNotEquals``, ``ArnLike``, ``ArnNotLike``, ``Bool``, ``Null``, each with an optional
  ``ForAnyValue:``/``ForAllValues:`` prefix and ``IfExists`` suffix. Several values under one
  key are ORed, several keys and operators are ANDed.
* A key absent from the request fails positive operators, satisfies negated ones
  (``...Not...``), satisfies ``ForAllValues:`` and fails ``ForAnyValue:``; ``IfExists`` makes
  an absent key pass. ``Null: {"k": "true"}`` holds when ``k`` is absent.

The request's keys are built by the caller (:mod:`harness.kms.service`): ``aws:PrincipalArn``,
``kms:EncryptionContext:<key>``, ``kms:RecipientAttestation:ImageSha384`` and
``kms:RecipientAttestation:PCR<n>`` (lower-case hex, only from a verified attestation document).
A policy naming another ``kms:RecipientAttestation:*`` key (PCR32, a typo) or comparing one with
an operator other than the String operators and ``Null`` is refused when stored, so that it
cannot silently never match (docs/kms.md#condition-keys).

Emulation choice (documented, no IAM exists here): a principal naming an account
(``"111122223333"`` or ``arn:aws:iam::111122223333:root``) matches every caller of that account,
as it does on AWS when the account's IAM policies allow the call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from harness import bounded_json

__all__ = [
    "PolicyError",
    "RequestContext",
    "Decision",
    "parse_policy",
    "evaluate",
    "denial_message",
    "default_key_policy",
    "ATTESTATION_OPERATORS",
]

_SET_PREFIXES = ("foranyvalue:", "forallvalues:")
_STRING_OPERATORS = {
    "stringequals": ("equals", False, False),
    "stringnotequals": ("equals", False, True),
    "stringequalsignorecase": ("equals", True, False),
    "stringnotequalsignorecase": ("equals", True, True),
    "stringlike": ("like", False, False),
    "stringnotlike": ("like", False, True),
    "arnequals": ("equals", False, False),
    "arnnotequals": ("equals", False, True),
    "arnlike": ("like", False, False),
    "arnnotlike": ("like", False, True),
    "bool": ("equals", True, False),
}
#: ``kms:RecipientAttestation:ImageSha384`` and ``PCR0`` to ``PCR31`` (every PCR an NSM holds).
_ATTESTATION_KEY_RE = re.compile(r"^kms:recipientattestation:(imagesha384|pcr([0-9]|[12][0-9]|3[01]))$")
#: The operators an attestation key takes (each with ForAnyValue:/ForAllValues: and IfExists but Null).
ATTESTATION_OPERATORS = (
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "Null",
)
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_ROOT_RE = re.compile(r"^arn:aws[\w-]*:iam::(\d{12}):root$")
_ASSUMED_ROLE_RE = re.compile(r"^arn:(aws[\w-]*):sts::(\d{12}):assumed-role/([^/]+)/[^/]+$")


class PolicyError(ValueError):
    """A key policy that is not valid JSON or breaks the policy grammar.

    The KMS emulator answers it as ``MalformedPolicyDocumentException``; the message names
    the statement and field at fault.
    """


@dataclass(frozen=True)
class RequestContext:
    """What a policy is evaluated against.

    ``action``: ``"kms:<Operation>"``; ``principal_arn``: the caller's ARN; ``resource_arn``:
    the key ARN; ``keys``: condition keys to values (str, or a list for multivalued keys such
    as ``kms:EncryptionContextKeys``); key names are matched case-insensitively.
    """

    action: str
    principal_arn: str
    resource_arn: str
    keys: Mapping[str, str | Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`evaluate`.

    ``allowed``: the request may proceed; ``explicit_deny``: a Deny statement applied;
    ``statement``: the Sid (or ``"#<index>"``) of the deciding statement, None for an implicit
    deny; ``trace``: one line per statement saying why it did or did not apply (for logs).
    """

    allowed: bool
    explicit_deny: bool
    statement: str | None
    trace: tuple[str, ...] = ()


def default_key_policy(account_id: str) -> str:
    """The key policy KMS gives a key created without one: the account root may do ``kms:*``.

    ``account_id``: 12 digits. Returns the policy as JSON text (Source: AWS KMS "Default key
    policy", statement "Enable IAM User Permissions").
    """
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


def _as_list(value: Any, where: str) -> list[str]:
    """A policy element that may be a string or a list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise PolicyError(f"{where}: must be a string or a non-empty list of strings")


def _condition_values(value: Any, where: str) -> list[str]:
    """Condition values: strings, numbers and booleans are compared as their text (IAM)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise PolicyError(f"{where}: condition values must be strings, numbers or booleans")
    if not out:
        raise PolicyError(f"{where}: empty list of condition values")
    return out


def _split_operator(name: str, where: str) -> tuple[str, str, bool]:
    """``ForAnyValue:StringLikeIfExists`` -> (``"foranyvalue"``, ``"stringlike"``, True)."""
    lowered = name.lower()
    prefix = ""
    for candidate in _SET_PREFIXES:
        if lowered.startswith(candidate):
            prefix, lowered = candidate[:-1], lowered[len(candidate) :]
            break
    if_exists = lowered.endswith("ifexists") and lowered != "null"
    if if_exists:
        lowered = lowered[: -len("ifexists")]
    if lowered not in _STRING_OPERATORS and lowered != "null":
        raise PolicyError(f"{where}: unsupported condition operator {name!r}")
    if lowered == "null" and if_exists:
        raise PolicyError(f"{where}: Null cannot take IfExists")
    return prefix, lowered, if_exists


def _check_attestation_key(operator: str, key: str, where: str) -> None:
    """PolicyError for an unknown ``kms:RecipientAttestation:*`` key or an operator that cannot
    compare a hex digest (module docstring)."""
    lowered = key.lower()
    if not lowered.startswith("kms:recipientattestation:"):
        return
    if not _ATTESTATION_KEY_RE.match(lowered):
        raise PolicyError(
            f"{where}: unknown condition key {key!r}; the attestation keys are "
            "kms:RecipientAttestation:ImageSha384 and kms:RecipientAttestation:PCR0 to PCR31"
        )
    base = _split_operator(operator, where)[1]
    if base not in {name.lower() for name in ATTESTATION_OPERATORS}:
        raise PolicyError(
            f"{where}: operator {operator!r} cannot compare {key} (hex text); "
            f"use one of {', '.join(ATTESTATION_OPERATORS)}"
        )


def _check_principal(value: Any, where: str) -> None:
    if value == "*":
        return
    if not isinstance(value, dict) or not value:
        raise PolicyError(f'{where}: must be "*" or an object such as {{"AWS": ...}}')
    for kind, ids in value.items():
        if kind not in ("AWS", "Service", "Federated", "CanonicalUser"):
            raise PolicyError(f"{where}: unknown principal type {kind!r}")
        for ident in _as_list(ids, f"{where}.{kind}"):
            if kind == "AWS" and not (ident == "*" or _ACCOUNT_RE.match(ident) or ident.startswith("arn:")):
                raise PolicyError(
                    f'{where}.AWS: {ident!r} is not an ARN, a 12-digit account id or "*" (invalid principal)'
                )


def parse_policy(text: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and check a key policy; return it as a dict with ``Statement`` always a list.

    Checks the grammar KMS enforces before storing a policy: JSON object, ``Statement``
    present, each statement with ``Effect`` Allow/Deny, exactly one of Principal/NotPrincipal,
    Action/NotAction and Resource/NotResource, and known condition operators.
    Raises :class:`PolicyError` naming the statement and field.
    """
    if isinstance(text, Mapping):
        doc: Any = dict(text)
    else:
        try:
            doc = bounded_json.loads(text)
        except ValueError as err:  # syntax, encoding, or nesting too deep
            raise PolicyError(f"policy: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise PolicyError("policy: must be a JSON object")
    statements = doc.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise PolicyError("policy.Statement: missing or empty")
    for index, st in enumerate(statements):
        where = f"Statement[{index}]" + (
            f" (Sid {st.get('Sid')!r})" if isinstance(st, dict) and "Sid" in st else ""
        )
        if not isinstance(st, dict):
            raise PolicyError(f"{where}: must be an object")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise PolicyError(f'{where}.Effect: must be "Allow" or "Deny"')
        for a, b in (("Principal", "NotPrincipal"), ("Action", "NotAction"), ("Resource", "NotResource")):
            if (a in st) == (b in st):
                raise PolicyError(f"{where}: needs exactly one of {a} or {b}")
        for name in ("Principal", "NotPrincipal"):
            if name in st:
                _check_principal(st[name], f"{where}.{name}")
        for name in ("Action", "NotAction", "Resource", "NotResource"):
            if name in st:
                _as_list(st[name], f"{where}.{name}")
        cond = st.get("Condition", {})
        if not isinstance(cond, dict):
            raise PolicyError(f"{where}.Condition: must be an object")
        for op, block in cond.items():
            _split_operator(op, f"{where}.Condition")
            if not isinstance(block, dict) or not block:
                raise PolicyError(f"{where}.Condition.{op}: must map condition keys to values")
            for key, values in block.items():
                _condition_values(values, f"{where}.Condition.{op}.{key}")
                _check_attestation_key(op, key, f"{where}.Condition.{op}")
                if op.lower() == "null":
                    for v in _condition_values(values, f"{where}.Condition.Null.{key}"):
                        if v.lower() not in ("true", "false"):
                            raise PolicyError(f'{where}.Condition.Null.{key}: must be "true" or "false"')
    doc["Statement"] = statements
    return doc


@lru_cache(maxsize=4096)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """IAM wildcard pattern: ``*`` any run of characters, ``?`` one character."""
    parts = []
    for ch in pattern:
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("^" + "".join(parts) + "$", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _principal_matches(spec: Any, principal_arn: str) -> bool:
    """Does a Principal element name the caller? (see the module docstring for accounts)."""
    if spec == "*":
        return True
    ids = spec.get("AWS")
    if ids is None:
        return False  # Service/Federated principals are never an IAM caller here
    caller_account = principal_arn.split(":")[4] if principal_arn.count(":") >= 5 else ""
    role_arn = None
    assumed = _ASSUMED_ROLE_RE.match(principal_arn)
    if assumed:  # an assumed-role session is named by its role's ARN in policies
        role_arn = f"arn:{assumed.group(1)}:iam::{assumed.group(2)}:role/{assumed.group(3)}"
    for ident in _as_list(ids, "Principal.AWS"):
        if ident == "*" or ident == principal_arn or ident == role_arn:
            return True
        if _ACCOUNT_RE.match(ident) and ident == caller_account:
            return True
        root = _ROOT_RE.match(ident)
        if root and root.group(1) == caller_account:
            return True
    return False


def _any_wildcard(patterns: Iterable[str], value: str, ignore_case: bool) -> bool:
    return any(_wildcard(p, ignore_case).match(value) for p in patterns)


def _value_matches(kind: str, ignore_case: bool, policy_values: list[str], value: str) -> bool:
    """Does one request value match any of the policy's values (before negation)?"""
    if kind == "like":
        return _any_wildcard(policy_values, value, False)
    if ignore_case:
        folded = value.casefold()
        return any(v.casefold() == folded for v in policy_values)
    return value in policy_values


def _condition_holds(
    operator: str, key: str, policy_values: list[str], keys: Mapping[str, list[str]]
) -> bool:
    """Evaluate one (operator, key, values) triple against the request (module docstring)."""
    prefix, base, if_exists = _split_operator(operator, "Condition")
    present = keys.get(key.lower())
    if base == "null":
        want_absent = any(v.lower() == "true" for v in policy_values)
        return (present is None or present == []) == want_absent
    kind, ignore_case, negated = _STRING_OPERATORS[base]
    if not present:
        if if_exists:
            return True
        if prefix == "forallvalues":
            return True
        if prefix == "foranyvalue":
            return False
        return negated
    matches = [_value_matches(kind, ignore_case, policy_values, v) for v in present]
    if prefix == "forallvalues":
        return all((not m) if negated else m for m in matches)
    if prefix == "foranyvalue":
        return any((not m) if negated else m for m in matches)
    # Single-valued operator; for a multivalued key, positive = any match, negated = none.
    return (not any(matches)) if negated else any(matches)


def _statement_applies(
    st: Mapping[str, Any], ctx: RequestContext, keys: Mapping[str, list[str]]
) -> tuple[bool, str]:
    """(applies, why-not) for one statement."""
    if "Principal" in st and not _principal_matches(st["Principal"], ctx.principal_arn):
        return False, "principal does not match"
    if "NotPrincipal" in st and _principal_matches(st["NotPrincipal"], ctx.principal_arn):
        return False, "principal excluded by NotPrincipal"
    if "Action" in st and not _any_wildcard(_as_list(st["Action"], "Action"), ctx.action, True):
        return False, "action does not match"
    if "NotAction" in st and _any_wildcard(_as_list(st["NotAction"], "NotAction"), ctx.action, True):
        return False, "action excluded by NotAction"
    if "Resource" in st and not _any_wildcard(_as_list(st["Resource"], "Resource"), ctx.resource_arn, False):
        return False, "resource does not match"
    if "NotResource" in st and _any_wildcard(
        _as_list(st["NotResource"], "NotResource"), ctx.resource_arn, False
    ):
        return False, "resource excluded by NotResource"
    for operator, block in st.get("Condition", {}).items():
        for key, values in block.items():
            if not _condition_holds(operator, key, _condition_values(values, key), keys):
                shown = keys.get(key.lower())
                return False, f"condition {operator} {key} not met (request: {shown if shown else 'absent'})"
    return True, "applies"


def evaluate(policy: str | Mapping[str, Any], ctx: RequestContext) -> Decision:
    """Decide a request against a key policy: explicit Deny wins, else an Allow is needed.

    ``policy``: JSON text or a dict from :func:`parse_policy`; ``ctx``: the request.
    Returns a :class:`Decision`. Raises :class:`PolicyError` if the policy is malformed.
    Source: docs/kms.md ("explicit Deny beats Allow") and AWS IAM's evaluation logic.
    """
    doc = parse_policy(policy) if not isinstance(policy, Mapping) else policy
    keys: dict[str, list[str]] = {}
    for name, value in ctx.keys.items():
        keys[name.lower()] = [value] if isinstance(value, str) else list(value)
    allow: str | None = None
    trace = []
    for index, st in enumerate(doc["Statement"]):
        label = str(st.get("Sid") or f"#{index}")
        applies, why = _statement_applies(st, ctx, keys)
        trace.append(f"{label} ({st['Effect']}): {why}")
        if not applies:
            continue
        if st["Effect"] == "Deny":
            return Decision(False, True, label, tuple(trace))
        if allow is None:
            allow = label
    if allow is not None:
        return Decision(True, False, allow, tuple(trace))
    return Decision(False, False, None, tuple(trace))


def denial_message(ctx: RequestContext, decision: Decision) -> str:
    """AWS's AccessDeniedException text: who, which action, which resource, and why.

    Explicit: ``User: <arn> is not authorized to perform: kms:Decrypt on resource: <key arn>
    with an explicit deny in a resource-based policy``; implicit: ``... because no
    resource-based policy allows the kms:Decrypt action`` (AWS's wording since 2021).
    """
    head = (
        f"User: {ctx.principal_arn} is not authorized to perform: {ctx.action} "
        f"on resource: {ctx.resource_arn}"
    )
    if decision.explicit_deny:
        return f"{head} with an explicit deny in a resource-based policy"
    return f"{head} because no resource-based policy allows the {ctx.action} action"
