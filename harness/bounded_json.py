"""JSON from outside the harness, parsed with a bound on how deep it nests.

``json.loads`` recurses once per nested array or object, so a few KiB of ``[[[[...`` end in a
RecursionError that no caller expects; and a document parsed just under Python's limit fails
later, in whatever walks it. :func:`loads` gives both cases the ValueError callers already handle
for malformed JSON, and refuses documents nested deeper than serde_json's default limit of 128
(what nitro-cli parses EIF metadata with), far beyond any real EIF metadata, image config, KMS
request or key policy.
"""

from __future__ import annotations

import json
from typing import Any

#: Levels of nested arrays and objects accepted (serde_json's default recursion limit).
MAX_DEPTH = 128


class JsonTooDeep(ValueError):
    """JSON nested deeper than the bound (or than Python's parser can recurse)."""


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` as ``json.loads`` does. Raises ValueError: ``json.JSONDecodeError`` for
    bad syntax, ``UnicodeDecodeError`` for bytes that are not UTF-8/16/32, :class:`JsonTooDeep`
    for arrays and objects nested deeper than ``max_depth`` levels."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonTooDeep(f"arrays or objects nest deeper than {max_depth} levels") from None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise JsonTooDeep(f"arrays or objects nest deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict)
                                                          else node))
    return value
