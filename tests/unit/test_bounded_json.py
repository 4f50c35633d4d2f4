"""harness.bounded_json: JSON from outside parsed with a nesting bound, every failure a
ValueError."""

from __future__ import annotations

import json

import pytest

from harness import bounded_json


def test_parses_like_json_loads():
    text = '{"a": [1, 2.5, null, {"b": "\\u00e9"}], "c": true}'
    assert bounded_json.loads(text) == json.loads(text)
    assert bounded_json.loads(text.encode("utf-16")) == json.loads(text)


def test_128_levels_pass_and_129_are_refused():
    assert bounded_json.loads("[" * 128 + "]" * 128) == json.loads("[" * 128 + "]" * 128)
    with pytest.raises(bounded_json.JsonTooDeep, match="^arrays or objects nest deeper than 128 levels$"):
        bounded_json.loads("[" * 129 + "]" * 129)
    with pytest.raises(ValueError, match="deeper than 3 levels"):
        bounded_json.loads('{"a": {"b": {"c": {}}}}', max_depth=3)


def test_past_the_parsers_recursion_is_a_value_error_not_a_recursion_error():
    with pytest.raises(bounded_json.JsonTooDeep):
        bounded_json.loads("[" * 100_000 + "]" * 100_000)
    with pytest.raises(bounded_json.JsonTooDeep):
        bounded_json.loads('{"a":' * 100_000 + "1" + "}" * 100_000)


def test_bad_syntax_and_encoding_stay_what_json_raises():
    with pytest.raises(json.JSONDecodeError):
        bounded_json.loads("[1,")
    with pytest.raises(UnicodeDecodeError):
        bounded_json.loads(b"\xff\xfe\x00")
