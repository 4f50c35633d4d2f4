"""Loading scenario files: YAML with line numbers, schema validation, matrix cases, and each
case's kernel and architecture twins (:mod:`harness.scenario.twins`).

A scenario file holds one or more YAML documents (``---``), each a scenario. Every document is
validated against ``harness/data/scenario_schema.yaml`` (JSON Schema draft 2020-12, checked by
``jsonschema``) before anything boots; an error names the file, the line and the offending key
(docs/scenarios.md). A ``matrix:`` expands a document into cases, and every case runs once per
chosen kernel (``nitro``, or ``debian`` through the recipe's ``<image>-debian`` twin) and
architecture (``x86_64``, or ``aarch64`` through the recipe's ``<image>-arm64`` twin).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from harness.console import DEFAULT_FAIL_PATTERN
from harness.enclave_factory import DEFAULT_ENCLAVE
from harness.errors import ErrorCode, NitroError
from harness.scenario.errors import ScenarioError
from harness.scenario.twins import (ARCHES, KERNELS, for_arch, for_kernel, image_for_arch,
                                    image_for_kernel, recipe_exists)

#: The schema every scenario document is checked against (shipped as package data).
SCHEMA_PATH = Path(__file__).parent.parent / "data" / "scenario_schema.yaml"

#: Default limits in seconds: one step, and a whole scenario (boot included).
DEFAULT_STEP_TIMEOUT = 120.0
DEFAULT_SCENARIO_TIMEOUT = 900.0

#: Cases one document's ``matrix`` may expand to (docs/scenarios.md#matrix).
MAX_MATRIX_CASES = 256
#: Values one document may hold with its YAML aliases expanded, and how deep its mappings and
#: lists may nest (docs/scenarios.md#top-level-keys): far beyond any real scenario (the shipped
#: documents hold at most 137 values, 8 levels deep).
MAX_DOCUMENT_VALUES = 100_000
MAX_DOCUMENT_DEPTH = 64


#: ``${name}`` placeholders usable in step strings; matrix keys (last dotted segment) add to these,
#: and so do the dotted names of :mod:`harness.scenario.services.placeholders` (``${eif.pcr0}``,
#: ``${kms.endpoint}``, ...).
PLACEHOLDERS = (
    "enclave_id",
    "enclave_name",
    "cid",
    "eif",
    "image",
    "cpu_count",
    "memory_mib",
    "artifacts",
    "scenario",
    "scenario_dir",
    "qemu_pid",
)
PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_/-]+)*)\}")
#: Placeholders a top-level ``eif:`` path may use (an EIF a step builds into the artifacts).
EIF_PATH_PLACEHOLDERS = ("artifacts", "scenario", "scenario_dir")


# --------------------------------------------------------------------------------------------
# YAML with line numbers


class _Node:
    """Mixin giving a loaded mapping/sequence its own line and its children's lines (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]
    value_lines: dict[Any, int]


class LineDict(dict, _Node):
    """A YAML mapping that remembers the line of itself (``line``), of each key and each value."""


class LineList(list, _Node):
    """A YAML sequence that remembers its own line and each item's line (``value_lines[i]``)."""


class _LineLoader(yaml.SafeLoader):
    """PyYAML's safe loader recording marks: mappings and sequences become LineDict/LineList."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:  # type: ignore[override]
        self.flatten_mapping(node)
        result = LineDict()
        result.line = node.start_mark.line + 1
        result.key_lines, result.value_lines = {}, {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                )
            if key in result:
                # YAML forbids duplicate keys; PyYAML silently keeps the last one.
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = key_node.start_mark.line + 1
            result.value_lines[key] = value_node.start_mark.line + 1
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LineList:  # type: ignore[override]
        result = LineList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.value_lines = {i: child.start_mark.line + 1 for i, child in enumerate(node.value)}
        return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


def line_of(doc: Any, path: list[Any], *, key: Any = None) -> int | None:
    """Line of the node at ``path`` in ``doc`` (or of ``key`` inside it), nearest known ancestor."""
    node, line = doc, getattr(doc, "line", None)
    for part in path:
        if isinstance(node, _Node) and part in getattr(node, "value_lines", {}):
            # Prefer the key's line for mappings: that is where a reader looks.
            line = node.key_lines.get(part, node.value_lines[part])
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return line
        if isinstance(node, _Node) and node.line and not isinstance(node, LineDict):
            line = line or node.line
    if key is not None and isinstance(node, _Node) and key in node.key_lines:
        return node.key_lines[key]
    return line


def _dotted(path: list[Any]) -> str:
    """``['steps', 2, 'console', 'count']`` -> ``steps[2].console.count`` (empty -> ``<top>``)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top>"


def short(value: Any) -> str:
    """``value`` as JSON (a string as its repr), cut to 60 characters for messages."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_extent(doc: Any, path: Path | str) -> None:
    """ScenarioError when ``doc``, with YAML aliases expanded, holds more than
    :data:`MAX_DOCUMENT_VALUES` values or nests deeper than :data:`MAX_DOCUMENT_DEPTH`.

    An alias repeats what its anchor names, so a few lines can stand for billions of values
    that validation and placeholder checks would walk one by one; the walk here stops at the
    bound (docs/scenarios.md#top-level-keys)."""
    count = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_DOCUMENT_VALUES:
            raise ScenarioError(path, getattr(doc, "line", None),
                                f"the document expands to more than {MAX_DOCUMENT_VALUES} values "
                                "(YAML aliases repeat what their anchor names)")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) \
            else ()
        if children and depth >= MAX_DOCUMENT_DEPTH:
            raise ScenarioError(path, getattr(node, "line", None),
                                f"collections nest deeper than {MAX_DOCUMENT_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


# --------------------------------------------------------------------------------------------
# Schema


@functools.cache
def schema() -> dict:
    """Return the scenario JSON Schema (draft 2020-12) loaded from :data:`SCHEMA_PATH`."""
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema())
    return jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _message(error: jsonschema.ValidationError) -> tuple[list[Any], Any, str]:
    """Turn a jsonschema error into (path, offending key or None, one-line rule)."""
    from harness.scenario.steps.registry import step_kinds

    path = list(error.absolute_path)
    node_schema = error.schema if isinstance(error.schema, dict) else {}
    custom = node_schema.get(f"x-error-{error.validator}")
    if custom is None and error.validator in ("anyOf", "oneOf", "not", "pattern"):
        custom = node_schema.get("x-error")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(node_schema.get("properties", {}))
        extras = [k for k in error.instance if k not in known]
        key = extras[0] if extras else None
        if known and set(known) == set(step_kinds()):
            return path, key, f"unknown step kind {key!r} (known: {', '.join(step_kinds())})"
        return path, key, f"unknown key {key!r} (allowed: {', '.join(known)})"
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return path, None, f"missing required key {missing[0]!r}"
    if error.validator == "format" and error.validator_value == "regex":
        try:
            re.compile(error.instance)
        except re.error as exc:
            return path, None, f"bad regex {error.instance!r}: {exc}"
    if custom:
        got = "" if isinstance(error.instance, dict) else f" (got {short(error.instance)})"
        return path, None, f"{custom}{got}"
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        hint = " (indent its keys under it)" if error.instance is None else ""
        return path, None, f"must be of type {wanted}, not {_yaml_type(error.instance)}{hint}"
    return path, None, error.message


def _yaml_type(value: Any) -> str:
    return {
        dict: "mapping", LineDict: "mapping", list: "list", LineList: "list", str: "string",
        bool: "boolean", int: "integer", float: "number", type(None): "null",
    }.get(type(value), type(value).__name__)


def validate_document(doc: Any, path: Path | str) -> None:
    """Check one scenario document against the schema; raise :class:`ScenarioError` on the first error.

    ``doc`` is what :class:`_LineLoader` produced (line numbers come from it); errors are
    ordered by line so the first problem in the file is the one reported. Also checks what a
    schema cannot say: ``${...}`` placeholders must be known names.
    """
    if not isinstance(doc, dict):
        raise ScenarioError(path, getattr(doc, "line", None) or 1,
                            f"a scenario is a mapping, not {_yaml_type(doc)}")
    errors = []
    for error in _validator().iter_errors(doc):
        err_path, key, text = _message(error)
        line = line_of(doc, err_path, key=key)
        where = _dotted(err_path + ([key] if key is not None else []))
        errors.append((line or 0, len(err_path), where, text))
    if errors:
        # Earliest line first; at equal lines the deepest (most specific) error.
        line, _, where, text = sorted(errors, key=lambda e: (e[0], -e[1]))[0]
        raise ScenarioError(path, line or None, f"{where}: {text}")
    _check_placeholders(doc, path)


def _saved_names(steps: Any) -> Iterator[str]:
    """Names ``cli`` steps' ``save:`` define (placeholders for later steps), nested ones too."""
    for step in steps if isinstance(steps, list) else []:
        for kind, body in (step.items() if isinstance(step, dict) else []):
            if isinstance(body, dict):
                if kind == "cli" and isinstance(body.get("save"), dict):
                    yield from body["save"]
                yield from _saved_names(body.get("steps"))


def _check_placeholders(doc: dict, path: Path | str) -> None:
    from harness.scenario.services.placeholders import service_names, step_names

    allowed = set(PLACEHOLDERS) | {k.split(".")[-1] for k in _matrix_keys(doc.get("matrix"))}
    allowed |= set(_saved_names(doc.get("steps"))) | step_names(doc)

    def walk(node: Any, at: list[Any], names: set[str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, at + [k], names)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, at + [i], names)
        elif isinstance(node, str):
            for name in PLACEHOLDER_RE.findall(node):
                if name not in names:
                    raise ScenarioError(
                        path, line_of(doc, at), f"{_dotted(at)}: unknown placeholder "
                        f"${{{name}}} (known: {', '.join(sorted(names))})")

    walk(doc.get("steps"), ["steps"], allowed)
    walk(doc.get("services"), ["services"], service_names(doc))
    walk(doc.get("eif"), ["eif"], set(EIF_PATH_PLACEHOLDERS))


# --------------------------------------------------------------------------------------------
# Model and matrix expansion


@dataclass
class Scenario:
    """One runnable case: a scenario document after matrix expansion.

    ``name`` is the document's name, ``case`` the matrix id (``""`` without a matrix, else like
    ``cpu_count=1,memory_mib=256``), ``data`` the expanded document (``matrix`` removed), ``path``
    and ``line`` where it was written, ``matrix_values`` the case's matrix values by dotted key,
    ``kernel`` the kernel it runs on (one of :data:`KERNELS`; ``kernel=debian`` ends the case id),
    ``arch`` the architecture (one of :data:`ARCHES`; ``arch=aarch64`` ends the case id).
    """

    name: str
    case: str
    data: dict
    path: Path
    line: int
    matrix_values: dict[str, Any] = field(default_factory=dict)
    kernel: str = "nitro"
    arch: str = "x86_64"

    @property
    def id(self) -> str:
        """``name`` or ``name[case]``: the test id pytest and ``nitro-harness run`` show."""
        return f"{self.name}[{self.case}]" if self.case else self.name

    @property
    def steps(self) -> list[dict]:
        """The ordered steps, each a one-key mapping ``{kind: body}``."""
        return self.data["steps"]

    @property
    def enclave(self) -> dict[str, Any]:
        """Enclave settings with the defaults of :data:`DEFAULT_ENCLAVE` filled in."""
        settings = dict(self.data.get("enclave") or {})
        if "cpu_ids" in settings:
            return {k: v for k, v in DEFAULT_ENCLAVE.items() if k != "cpu_count"} | settings
        return DEFAULT_ENCLAVE | settings

    @property
    def requires(self) -> list[str]:
        """Host features needed (``kvm``, ``nsm``)."""
        return list(self.data.get("requires") or [])

    @property
    def timeout(self) -> float:
        """Whole-scenario limit in seconds."""
        return float(self.data.get("timeout", DEFAULT_SCENARIO_TIMEOUT))

    @property
    def step_timeout(self) -> float:
        """Default per-step limit in seconds."""
        return float(self.data.get("step_timeout", DEFAULT_STEP_TIMEOUT))

    @property
    def fail_pattern(self) -> str | None:
        """Console failure pattern (None disables it)."""
        return self.data.get("fail_pattern", DEFAULT_FAIL_PATTERN)

    def step_line(self, index: int) -> int | None:
        """Line of step ``index`` (0-based) in :attr:`path`."""
        return line_of(self.data, ["steps", index])

    def to_yaml(self) -> str:
        """The expanded scenario as plain YAML (kept in the artifacts folder)."""
        return yaml.safe_dump(_plain(self.data), sort_keys=False)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _matrix_keys(matrix: Any) -> list[str]:
    if isinstance(matrix, dict):
        return list(matrix)
    if isinstance(matrix, list):
        return list(dict.fromkeys(k for case in matrix if isinstance(case, dict) for k in case))
    return []


def _matrix_size(matrix: Any) -> int:
    """How many cases ``matrix`` expands to (a mapping multiplies its lists' lengths)."""
    if not matrix:
        return 1
    if isinstance(matrix, dict):
        return math.prod(len(v) for v in matrix.values())
    return len(matrix)


def _matrix_cases(matrix: Any) -> list[tuple[dict[str, Any], dict[str, int]]]:
    """Cases as (values by dotted key, line of each value)."""
    if not matrix:
        return [({}, {})]
    if isinstance(matrix, dict):
        keys = list(matrix)
        lists = [matrix[k] for k in keys]
        cases = []
        for combo in itertools.product(*(range(len(v)) for v in lists)):
            values = {k: lists[n][i] for n, (k, i) in enumerate(zip(keys, combo))}
            lines = {k: getattr(lists[n], "value_lines", {}).get(i, matrix.key_lines.get(k, 0))
                     for n, (k, i) in enumerate(zip(keys, combo))}
            cases.append((values, lines))
        return cases
    return [(dict(case), dict(getattr(case, "value_lines", {}))) for case in matrix]


def _case_id(values: dict[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
        parts.append(f"{key.split('.')[-1]}={text}")
    return ",".join(parts)


def _apply(doc: LineDict, dotted: str, value: Any, line: int) -> None:
    """Set ``doc[a][b]... = value`` for ``dotted`` ``a.b...``, recording ``line`` for errors."""
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = LineDict()
            child.line, child.key_lines, child.value_lines = line, {}, {}
            node[part] = child
            node.key_lines[part] = node.value_lines[part] = line
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    if isinstance(node, _Node):
        node.key_lines[parts[-1]] = node.value_lines[parts[-1]] = line


def expand(doc: LineDict, path: Path) -> list[Scenario]:
    """Expand one validated document into its cases (one without ``matrix``).

    Each case is validated again after substitution, so a matrix value of the wrong type is
    reported at the matrix value's line. Raises :class:`ScenarioError`.
    """
    name = doc.get("name") or path.stem
    size = _matrix_size(doc.get("matrix"))
    if size > MAX_MATRIX_CASES:
        # Each case boots an enclave; a few aliased lists would otherwise multiply into
        # millions of cases before anything runs.
        raise ScenarioError(path, doc.key_lines.get("matrix"),
                            f"matrix: {size} cases, more than the {MAX_MATRIX_CASES} one "
                            "document may expand to")
    cases = []
    for values, lines in _matrix_cases(doc.get("matrix")):
        data = copy.deepcopy(doc)
        data.pop("matrix", None)
        for key, value in values.items():
            if key == "matrix" or key.startswith("matrix."):
                raise ScenarioError(path, lines.get(key), f"matrix.{key}: a matrix cannot set itself")
            _apply(data, key, value, lines.get(key, doc.line))
        try:
            validate_document(data, path)
        except ScenarioError as err:
            raise ScenarioError(path, err.line, err.message.split(": ", 1)[-1]
                                + f" (in matrix case {_case_id(values)})") from None
        cases.append(Scenario(name=name, case=_case_id(values), data=data, path=path,
                              line=doc.line, matrix_values=values))
    ids = [c.case for c in cases]
    if len(set(ids)) != len(ids):
        raise ScenarioError(path, doc.key_lines.get("matrix"), "matrix: two cases have the same values")
    return cases


# --------------------------------------------------------------------------------------------
# Files


def load_scenarios(path: Path | str, kernels: tuple[str, ...] | list[str] = ("nitro",),
                   arches: tuple[str, ...] | list[str] = ("x86_64",)) -> list[Scenario]:
    """Load, validate and expand every scenario document of a YAML file.

    Returns the cases in file order, each case once per kernel of ``kernels`` and architecture
    of ``arches`` where it runs (:func:`for_kernel`, :func:`for_arch`); an ``eif:`` case boots
    its own file whatever the kernel, so it runs once, on the first kernel and architecture; a
    case that another expansion already produced (same name and document) is not repeated. Raises :class:`ScenarioError` (E03) for a file that is
    not UTF-8, YAML syntax errors, schema violations (with file, line and key), unknown placeholders and duplicate
    names, and NitroError E19 when the file cannot be read, E03 for an unknown kernel or
    architecture, or none. Nothing is booted.
    """
    kernels = list(dict.fromkeys(kernels))
    arches = list(dict.fromkeys(arches))
    if not kernels:
        raise NitroError(ErrorCode.InvalidArgument, f"kernel: no kernel chosen (known: {', '.join(KERNELS)})")
    if not arches:
        raise NitroError(ErrorCode.InvalidArgument,
                         f"arch: no architecture chosen (known: {', '.join(ARCHES)})")
    for kernel in kernels:
        image_for_kernel("hello", kernel)  # E03 before any work for an unknown kernel
    for arch in arches:
        image_for_arch("hello", arch)
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NitroError(ErrorCode.FileOperationFailure, f"{path}: cannot read scenario: {exc.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, raw.count(b"\n", 0, exc.start) + 1,
                            f"not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_LineLoader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ScenarioError(path, line, f"YAML: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        raise ScenarioError(path, None, f"YAML: {exc}")
    except RecursionError:
        raise ScenarioError(path, None, "YAML: collections nest too deeply") from None
    if not docs:
        raise ScenarioError(path, None, "no scenario in the file")
    scenarios: list[Scenario] = []
    seen: dict[str, int] = {}
    for doc in docs:
        _check_extent(doc, path)
        validate_document(doc, path)
        name = doc.get("name") or path.stem
        if name in seen:
            raise ScenarioError(path, doc.key_lines.get("name", doc.line),
                                f"name: {name!r} is already used at line {seen[name]}"
                                + ("" if "name" in doc else " (give each document a 'name')"))
        seen[name] = doc.line
        for case in expand(doc, path):
            if "image" not in case.data:
                scenarios.append(replace(case, kernel=kernels[0], arch=arches[0]))
                continue
            for arch in arches:
                for kernel_case in (for_kernel(case, k) for k in kernels):
                    if kernel_case is not None:
                        arch_case = for_arch(kernel_case, arch, recipe_exists)
                        if arch_case is not None:
                            scenarios.append(arch_case)
    unique: dict[tuple[str, str], Scenario] = {}
    for case in scenarios:  # matrix {image: [hello, hello-debian]} on both kernels: one each
        unique.setdefault((case.name, case.to_yaml()), case)
    return list(unique.values())
