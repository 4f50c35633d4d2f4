"""Key policy evaluation (docs/kms.md), case by case."""

from __future__ import annotations

import json

import pytest

from harness.kms.policy import (
    ATTESTATION_OPERATORS,
    PolicyError,
    RequestContext,
    default_key_policy,
    denial_message,
    evaluate,
    parse_policy,
)

ACCOUNT = "111122223333"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PCR0 = "a" * 16 + "0123456789abcdef" * 5  # 96 lower-case hex digits
OTHER_PCR0 = "b" * 96
ROOT_ALLOW = {
    "Sid": "Enable IAM User Permissions",
    "Effect": "Allow",
    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
    "Action": "kms:*",
    "Resource": "*",
}


def policy(*statements) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def request(action="kms:Decrypt", principal=ALICE, **keys) -> RequestContext:
    context = {"aws:PrincipalArn": principal}
    for name, value in keys.items():
        context[name.replace("__", ":")] = value
    return RequestContext(action, principal, KEY, context)


def attested(pcr0=PCR0, **more):
    return request(
        **{"kms__RecipientAttestation__ImageSha384": pcr0, "kms__RecipientAttestation__PCR0": pcr0}, **more
    )


def allow_decrypt_if(operator, key, value):
    return {
        "Sid": "EnclaveOnly",
        "Effect": "Allow",
        "Principal": {"AWS": ALICE},
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {operator: {key: value}},
    }


def test_default_policy_allows_account_callers_everything():
    doc = default_key_policy(ACCOUNT)
    assert evaluate(doc, request()).allowed
    assert evaluate(doc, request("kms:PutKeyPolicy")).allowed
    outsider = request(principal="arn:aws:iam::999999999999:user/mallory")
    decision = evaluate(doc, outsider)
    assert (decision.allowed, decision.explicit_deny, decision.statement) == (False, False, None)


def test_pcr_condition_allows_matching_image_only():
    doc = policy(allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:ImageSha384", PCR0))
    assert evaluate(doc, attested()).allowed
    assert not evaluate(doc, attested(OTHER_PCR0)).allowed
    assert not evaluate(doc, request()).allowed  # no attestation: key absent, condition fails


def test_explicit_deny_beats_allow():
    deny = {
        "Sid": "DenyOtherImages",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0}},
    }
    doc = policy(ROOT_ALLOW, deny)
    wrong = evaluate(doc, attested(OTHER_PCR0))
    assert (wrong.allowed, wrong.explicit_deny, wrong.statement) == (False, True, "DenyOtherImages")
    assert evaluate(doc, attested()).allowed
    # A negated operator holds when the key is absent: the unattested caller is denied too.
    assert evaluate(doc, request()).explicit_deny
    # Other actions are untouched by the Deny.
    assert evaluate(doc, request("kms:Encrypt")).allowed


def test_unconditioned_allow_defeats_a_pcr_condition():
    conditioned = allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:ImageSha384", PCR0)
    # The classic mistake: the default root statement stays in the policy, so the PCR0
    # condition restricts nothing; a host caller without attestation decrypts.
    leaky = evaluate(policy(ROOT_ALLOW, conditioned), request())
    assert leaky.allowed and leaky.statement == "Enable IAM User Permissions"
    assert not evaluate(policy(conditioned), request()).allowed


def test_null_condition_forces_attestation():
    force = {
        "Sid": "RequireAttestation",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {"Null": {"kms:RecipientAttestation:ImageSha384": "true"}},
    }
    doc = policy(ROOT_ALLOW, force)
    host = evaluate(doc, request())
    assert host.explicit_deny and host.statement == "RequireAttestation"
    assert evaluate(doc, attested()).allowed
    assert evaluate(doc, attested(OTHER_PCR0)).allowed  # Null only checks presence
    present = policy(allow_decrypt_if("Null", "kms:RecipientAttestation:PCR0", "false"))
    assert evaluate(present, attested()).allowed and not evaluate(present, request()).allowed


def test_hex_case_ignored_only_by_ignorecase_operators():
    upper = PCR0.upper()
    assert evaluate(
        policy(allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:PCR0", upper)), attested()
    ).allowed
    assert not evaluate(
        policy(allow_decrypt_if("StringEquals", "kms:RecipientAttestation:PCR0", upper)), attested()
    ).allowed
    assert evaluate(
        policy(allow_decrypt_if("StringEquals", "kms:RecipientAttestation:PCR0", PCR0)), attested()
    ).allowed


def test_debug_mode_zero_pcr0_matches_only_96_zeros():
    zeros = "0" * 96
    doc = policy(allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:ImageSha384", PCR0))
    assert not evaluate(doc, attested(zeros)).allowed
    both = policy(
        allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:ImageSha384", [PCR0, zeros])
    )
    assert evaluate(both, attested(zeros)).allowed  # several values under one key are ORed


def test_condition_key_names_are_case_insensitive():
    doc = policy(allow_decrypt_if("StringEquals", "KMS:recipientattestation:imagesha384", PCR0))
    assert evaluate(doc, attested()).allowed


def test_encryption_context_conditions():
    doc = policy(allow_decrypt_if("StringEquals", "kms:EncryptionContext:Department", "IT"))
    assert evaluate(doc, request(**{"kms__EncryptionContext__Department": "IT"})).allowed
    assert not evaluate(doc, request(**{"kms__EncryptionContext__Department": "HR"})).allowed
    assert not evaluate(doc, request()).allowed
    like = policy(allow_decrypt_if("StringLike", "kms:EncryptionContext:Project", "alpha-*"))
    assert evaluate(like, request(**{"kms__EncryptionContext__Project": "alpha-7"})).allowed
    assert not evaluate(like, request(**{"kms__EncryptionContext__Project": "beta-7"})).allowed


def test_for_all_values_and_for_any_value():
    all_doc = policy(
        allow_decrypt_if("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department", "Project"])
    )
    assert evaluate(all_doc, request(**{"kms__EncryptionContextKeys": ["Department"]})).allowed
    assert not evaluate(all_doc, request(**{"kms__EncryptionContextKeys": ["Department", "Owner"]})).allowed
    assert evaluate(all_doc, request()).allowed  # ForAllValues holds on an absent key
    any_doc = policy(allow_decrypt_if("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", ["Project"]))
    assert evaluate(any_doc, request(**{"kms__EncryptionContextKeys": ["Department", "Project"]})).allowed
    assert not evaluate(any_doc, request(**{"kms__EncryptionContextKeys": ["Department"]})).allowed
    assert not evaluate(any_doc, request()).allowed  # ForAnyValue fails on an absent key


def test_if_exists_passes_absent_keys():
    doc = policy(
        allow_decrypt_if("StringEqualsIgnoreCaseIfExists", "kms:RecipientAttestation:ImageSha384", PCR0)
    )
    assert evaluate(doc, request()).allowed
    assert evaluate(doc, attested()).allowed
    assert not evaluate(doc, attested(OTHER_PCR0)).allowed


def test_principal_arn_conditions_and_principals():
    like = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "kms:*",
        "Resource": "*",
        "Condition": {"ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:role/enclave-*"}},
    }
    doc = policy(like)
    assert evaluate(doc, request(principal=f"arn:aws:iam::{ACCOUNT}:role/enclave-parent")).allowed
    assert not evaluate(doc, request()).allowed
    role = policy(
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/Parent"},
            "Action": "kms:Decrypt",
            "Resource": "*",
        }
    )
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/Parent/i-0123456789abcdef0"
    assert evaluate(role, request(principal=session)).allowed  # a session is named by its role
    assert evaluate(policy({**ROOT_ALLOW, "Principal": {"AWS": ACCOUNT}}), request()).allowed


def test_not_action_not_principal_and_resource():
    doc = policy(
        ROOT_ALLOW,
        {"Effect": "Deny", "NotPrincipal": {"AWS": ALICE}, "Action": "kms:Decrypt", "Resource": "*"},
        {"Effect": "Deny", "Principal": "*", "NotAction": ["kms:Decrypt", "kms:Describe*"], "Resource": "*"},
    )
    assert evaluate(doc, request()).allowed
    assert evaluate(doc, request("kms:DescribeKey")).allowed
    assert evaluate(doc, request("kms:Encrypt")).explicit_deny
    bob = f"arn:aws:iam::{ACCOUNT}:user/bob"
    assert evaluate(doc, request(principal=bob)).explicit_deny
    other_key = policy({**ROOT_ALLOW, "Resource": "arn:aws:kms:us-east-1:111122223333:key/other"})
    assert not evaluate(other_key, request()).allowed


def test_action_wildcards_are_case_insensitive():
    doc = policy({**ROOT_ALLOW, "Action": ["KMS:Generate*", "kms:decrypt"]})
    assert evaluate(doc, request("kms:GenerateDataKey")).allowed
    assert evaluate(doc, request("kms:Decrypt")).allowed
    assert not evaluate(doc, request("kms:Encrypt")).allowed


def test_denial_messages_have_aws_shape():
    ctx = request()
    implicit = evaluate(policy({**ROOT_ALLOW, "Principal": {"AWS": "arn:aws:iam::999999999999:root"}}), ctx)
    assert denial_message(ctx, implicit) == (
        f"User: {ALICE} is not authorized to perform: kms:Decrypt on resource: {KEY} "
        "because no resource-based policy allows the kms:Decrypt action"
    )
    explicit = evaluate(policy({**ROOT_ALLOW, "Effect": "Deny"}), ctx)
    assert denial_message(ctx, explicit) == (
        f"User: {ALICE} is not authorized to perform: kms:Decrypt on resource: {KEY} "
        "with an explicit deny in a resource-based policy"
    )


def test_trace_explains_each_statement():
    doc = policy(allow_decrypt_if("StringEqualsIgnoreCase", "kms:RecipientAttestation:ImageSha384", PCR0))
    decision = evaluate(doc, request())
    assert decision.trace == (
        "EnclaveOnly (Allow): condition StringEqualsIgnoreCase "
        "kms:RecipientAttestation:ImageSha384 not met (request: absent)",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (json.dumps({"Statement": []}), "Statement: missing or empty"),
        (
            policy({**ROOT_ALLOW, "Effect": "Maybe"}),
            r"Statement\[0\] \(Sid 'Enable IAM User Permissions'\)\.Effect",
        ),
        (
            policy({k: v for k, v in ROOT_ALLOW.items() if k != "Principal"}),
            "exactly one of Principal or NotPrincipal",
        ),
        (
            policy({**ROOT_ALLOW, "Condition": {"StringSorta": {"k": "v"}}}),
            "unsupported condition operator 'StringSorta'",
        ),
        (policy({**ROOT_ALLOW, "Condition": {"Null": {"k": "maybe"}}}), 'must be "true" or "false"'),
        (policy({**ROOT_ALLOW, "Principal": {"AWS": "alice"}}), "invalid principal"),
    ],
)
def test_malformed_policies_name_the_field(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_attestation_keys_pcr0_to_pcr31_with_string_operators_and_null():
    """docs/kms.md#condition-keys: every PCR an NSM holds is a key; each takes the String
    operators (with set prefixes and IfExists) and Null; anything else is refused when stored."""
    for index in range(32):
        for operator in ATTESTATION_OPERATORS:
            value = "false" if operator == "Null" else PCR0
            parse_policy(policy(allow_decrypt_if(operator, f"kms:RecipientAttestation:PCR{index}", value)))
    for operator in (
        "ForAnyValue:StringEqualsIgnoreCase",
        "StringLikeIfExists",
        "ForAllValues:StringNotEquals",
    ):
        parse_policy(policy(allow_decrypt_if(operator, "kms:RecipientAttestation:ImageSha384", PCR0)))
    doc = policy(allow_decrypt_if("StringEquals", "kms:RecipientAttestation:PCR23", PCR0))
    assert evaluate(doc, request(**{"kms__RecipientAttestation__PCR23": PCR0})).allowed
    assert not evaluate(doc, request(**{"kms__RecipientAttestation__PCR23": OTHER_PCR0})).allowed
    for operator, key in (
        ("StringEquals", "kms:RecipientAttestation:PCR32"),
        ("StringEquals", "kms:RecipientAttestation:Pcr-1"),
        ("StringEquals", "kms:RecipientAttestation:NitroTPMPCR4"),
        ("Bool", "kms:RecipientAttestation:PCR0"),
        ("ArnEquals", "kms:RecipientAttestation:ImageSha384"),
    ):
        with pytest.raises(PolicyError, match=r"Statement\[0\] \(Sid 'EnclaveOnly'\)\.Condition"):
            parse_policy(policy(allow_decrypt_if(operator, key, PCR0)))
