"""Declarative YAML scenarios: schema validation with file:line errors, matrix expansion, step runners.

A scenario file holds one or more YAML documents (``---``), each a scenario: the image it boots
(``image:`` recipe or ``eif:`` path), the enclave settings, an optional ``matrix:`` that expands it
into several cases, timeouts, and ordered ``steps``. Every document is validated against
``harness/data/scenario_schema.yaml`` (JSON Schema, checked by ``jsonschema``) before anything
boots; an error names the file, the line and the offending key. docs/scenarios.md is the user's
guide. The design follows labgrid's YAML environments, QEMU functional tests' success/failure
console patterns and LAVA's scenario/step timeouts (see STYLE.md).

The runner (:class:`ScenarioRunner`) drives ``harness.enclave`` and is shared by the pytest plugin
and ``nitro-harness run``; neither front imports the other.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from harness.errors import ErrorCode, NitroError

#: The schema every scenario document is checked against (shipped as package data).
SCHEMA_PATH = Path(__file__).parent / "data" / "scenario_schema.yaml"

#: Console text that fails a waiting step at once (QEMU functional tests' failure pattern).
#: Kept equal to harness.console.DEFAULT_FAIL_PATTERN; restated so loading never needs the engine.
DEFAULT_FAIL_PATTERN = r"Kernel panic|nitro-init: fatal"

#: Default limits in seconds: one step, and a whole scenario (boot included).
DEFAULT_STEP_TIMEOUT = 120.0
DEFAULT_SCENARIO_TIMEOUT = 900.0

#: Default enclave settings of a scenario (issue 4: the hello scenario's shape).
DEFAULT_ENCLAVE: dict[str, Any] = {"cpu_count": 2, "memory_mib": 512, "debug_mode": True}

#: Kernels a scenario can be run on (issue 8): ``nitro``, the harness's Nitro-style kernel (the
#: recipes as named: ACPI off, devices on the command line, SPEC 5), and ``debian``, Debian's
#: cloud kernel (the recipe ``<image>-debian``: the same root filesystem, ACPI discovery, vsock
#: as modules loaded by init).
KERNELS = ("nitro", "debian")

#: Every step kind, in the order docs/scenarios.md documents them.
STEP_KINDS = (
    "boot",
    "console",
    "exec",
    "vsock",
    "attest",
    "isolation",
    "kms",
    "describe",
    "cli",
    "wait_exit",
    "terminate",
    "expect_failure",
    "sleep",
)

#: Steps that do not need a running enclave (all others boot it first when it is not running).
_NO_ENCLAVE_STEPS = {"sleep", "expect_failure", "cli", "terminate", "wait_exit", "boot", "kms"}

#: ``${name}`` placeholders usable in step strings; matrix keys (last dotted segment) add to these.
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
    "qemu_pid",
)
_PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: The in-guest NSM helper the python image ships (issue 3), driven over the console shell.
GUEST_NSM_TOOL = "python3 /opt/nitro-harness/nsm_tool.py"


# --------------------------------------------------------------------------------------------
# Errors


class ScenarioError(NitroError):
    """A malformed scenario: ``path:line: key: rule`` (E03 InvalidArgument, exit status 3).

    ``path`` and ``line`` (1-based, or None when unknown) locate the offending key; raised by
    :func:`load_scenarios` before anything boots.
    """

    def __init__(self, path: Path | str, line: int | None, message: str):
        where = f"{display_path(path)}:{line}" if line else f"{display_path(path)}"
        super().__init__(ErrorCode.InvalidArgument, f"{where}: {message}")
        self.path = Path(path)
        self.line = line


def display_path(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


class StepFailed(AssertionError):
    """A step's expectation did not hold: ``message`` says what, ``excerpt`` the console's tail.

    An ``AssertionError`` so pytest reports it as a test failure, not an error in the harness.
    """

    def __init__(self, message: str, excerpt: str = "", error: BaseException | None = None):
        super().__init__(message)
        self.message = message
        self.excerpt = excerpt
        self.error = error


class StepSkipped(Exception):
    """A step cannot run on this host or yet (for example ``attest`` without the harness NSM)."""


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


def _line_of(doc: Any, path: list[Any], *, key: Any = None) -> int | None:
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
    path = list(error.absolute_path)
    node_schema = error.schema if isinstance(error.schema, dict) else {}
    custom = node_schema.get(f"x-error-{error.validator}")
    if custom is None and error.validator in ("anyOf", "oneOf", "not", "pattern"):
        custom = node_schema.get("x-error")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(node_schema.get("properties", {}))
        extras = [k for k in error.instance if k not in known]
        key = extras[0] if extras else None
        if known and set(known) == set(STEP_KINDS):
            return path, key, f"unknown step kind {key!r} (known: {', '.join(STEP_KINDS)})"
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
        got = "" if isinstance(error.instance, dict) else f" (got {_short(error.instance)})"
        return path, None, f"{custom}{got}"
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        hint = " (indent its keys under it)" if error.instance is None else ""
        return path, None, f"must be of type {wanted}, not {_yaml_type(error.instance)}{hint}"
    return path, None, error.message


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        line = _line_of(doc, err_path, key=key)
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
    allowed = set(PLACEHOLDERS) | {k.split(".")[-1] for k in _matrix_keys(doc.get("matrix"))}
    allowed |= set(_saved_names(doc.get("steps")))

    def walk(node: Any, at: list[Any]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, at + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, at + [i])
        elif isinstance(node, str):
            for name in _PLACEHOLDER_RE.findall(node):
                if name not in allowed:
                    raise ScenarioError(
                        path, _line_of(doc, at), f"{_dotted(at)}: unknown placeholder "
                        f"${{{name}}} (known: {', '.join(sorted(allowed))})")

    walk(doc.get("steps"), ["steps"])


# --------------------------------------------------------------------------------------------
# Model and matrix expansion


@dataclass
class Scenario:
    """One runnable case: a scenario document after matrix expansion.

    ``name`` is the document's name, ``case`` the matrix id (``""`` without a matrix, else like
    ``cpu_count=1,memory_mib=256``), ``data`` the expanded document (``matrix`` removed), ``path``
    and ``line`` where it was written, ``matrix_values`` the case's matrix values by dotted key,
    ``kernel`` the kernel it runs on (one of :data:`KERNELS`; ``kernel=debian`` ends the case id).
    """

    name: str
    case: str
    data: dict
    path: Path
    line: int
    matrix_values: dict[str, Any] = field(default_factory=dict)
    kernel: str = "nitro"

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
        return _line_of(self.data, ["steps", index])

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


def image_for_kernel(image: str, kernel: str) -> str:
    """Recipe name of ``image`` built for ``kernel`` (one of :data:`KERNELS`).

    ``nitro`` keeps the name (the shipped recipes use the Nitro-style kernel); ``debian`` names
    the recipe's Debian-kernel twin ``<image>-debian`` (kept as is when ``image`` already ends
    so). Raises NitroError E03 for an unknown kernel.
    """
    if kernel == "nitro" or (kernel == "debian" and image.endswith("-debian")):
        return image
    if kernel == "debian":
        return f"{image}-debian"
    raise NitroError(ErrorCode.InvalidArgument,
                     f"kernel: unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")


def kernel_of_image(image: str) -> str:
    """The kernel a recipe name implies: ``debian`` for ``<image>-debian``, else ``nitro``."""
    return "debian" if image.endswith("-debian") else "nitro"


def for_kernel(case: Scenario, kernel: str) -> Scenario | None:
    """``case`` run on ``kernel``, or None when it does not run there.

    A case whose image names its kernel (``hello-debian``) runs only on that kernel, as it is.
    A case of a Nitro-kernel image runs as it is on ``nitro`` and, on ``debian``, boots
    :func:`image_for_kernel`'s twin (and every image its steps build is swapped the same way)
    with ``kernel=debian`` added to its id. ``eif:`` cases are left to :func:`load_scenarios`.
    """
    image = case.data["image"]
    if kernel_of_image(image) != "nitro":
        return replace(case, kernel=kernel) if kernel == kernel_of_image(image) else None
    if kernel == "nitro":
        return case
    data = copy.deepcopy(case.data)
    data["image"] = image_for_kernel(image, kernel)
    suffix = f"kernel={kernel}"
    return Scenario(name=case.name, case=f"{case.case},{suffix}" if case.case else suffix,
                    data=data, path=case.path, line=case.line,
                    matrix_values=dict(case.matrix_values), kernel=kernel)


def load_scenarios(path: Path | str, kernels: tuple[str, ...] | list[str] = ("nitro",)) -> list[Scenario]:
    """Load, validate and expand every scenario document of a YAML file.

    Returns the cases in file order, each case once per kernel of ``kernels`` where it runs
    (:func:`for_kernel`); an ``eif:`` case boots its own file whatever the kernel, so it runs
    once, on the first kernel; a case that another kernel's expansion already produced (same
    name and document) is not repeated. Raises :class:`ScenarioError` (E03) for YAML syntax
    errors, schema violations (with file, line and key), unknown placeholders and duplicate
    names, and NitroError E19 when the file cannot be read, E03 for an unknown kernel or none.
    Nothing is booted.
    """
    kernels = list(dict.fromkeys(kernels))
    if not kernels:
        raise NitroError(ErrorCode.InvalidArgument, f"kernel: no kernel chosen (known: {', '.join(KERNELS)})")
    for kernel in kernels:
        image_for_kernel("hello", kernel)  # E03 before any work for an unknown kernel
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NitroError(ErrorCode.FileOperationFailure, f"{path}: cannot read scenario: {exc.strerror}")
    try:
        docs = [d for d in yaml.load_all(text, Loader=_LineLoader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ScenarioError(path, line, f"YAML: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        raise ScenarioError(path, None, f"YAML: {exc}")
    if not docs:
        raise ScenarioError(path, None, "no scenario in the file")
    scenarios: list[Scenario] = []
    seen: dict[str, int] = {}
    for doc in docs:
        validate_document(doc, path)
        name = doc.get("name") or path.stem
        if name in seen:
            raise ScenarioError(path, doc.key_lines.get("name", doc.line),
                                f"name: {name!r} is already used at line {seen[name]}"
                                + ("" if "name" in doc else " (give each document a 'name')"))
        seen[name] = doc.line
        for case in expand(doc, path):
            if "image" not in case.data:
                scenarios.append(replace(case, kernel=kernels[0]))
                continue
            scenarios.extend(c for c in (for_kernel(case, k) for k in kernels) if c is not None)
    unique: dict[tuple[str, str], Scenario] = {}
    for case in scenarios:  # matrix {image: [hello, hello-debian]} on both kernels: one each
        unique.setdefault((case.name, case.to_yaml()), case)
    return list(unique.values())


def step_kind(step: dict) -> tuple[str, dict]:
    """Split a validated step ``{kind: body}`` into ``(kind, body as a dict)``."""
    (kind, body), = step.items()
    if kind == "sleep" and not isinstance(body, dict):
        body = {"seconds": body}
    return kind, dict(body or {})


def step_label(step: dict) -> str:
    """Short human label of a step: its ``name`` or kind plus its main argument."""
    kind, body = step_kind(step)
    if body.get("name"):
        return str(body["name"])
    main = {
        "console": body.get("expect") or (f"not {body.get('expect_not')}" if body.get("expect_not") else None),
        "exec": body.get("command"),
        "vsock": (f"connect {body['connect']}" if "connect" in body else f"accept {body.get('accept')}"),
        "cli": " ".join(str(a) for a in body.get("args", [])),
        "sleep": f"{body.get('seconds')} s",
        "expect_failure": body.get("code") or body.get("message"),
    }.get(kind)
    if main is None:
        return kind
    main = str(main)
    return f"{kind} {main if len(main) <= 50 else main[:47] + '...'}"


# --------------------------------------------------------------------------------------------
# Host requirements (skip reasons)


def requirement_skip_reason(requirement: str, *, qemu: Path | str | None = None,
                            accel: str | None = None) -> str | None:
    """Why this host cannot run a scenario that ``requires: [requirement]``, or None if it can.

    ``kvm``: the accelerator the engine would choose (``accel`` or NITRO_HARNESS_ACCEL, else the
    doctor's probe) must be KVM. ``nsm``: the QEMU must accept ``vhost-user-device`` (the
    harness NSM, issue 5). Reasons come from ``harness.doctor`` and name the fix.
    """
    from harness import doctor, host, qemu as qemu_mod

    try:
        path = Path(qemu) if qemu else qemu_mod.find_qemu()
        info = qemu_mod.probe_qemu(path)
    except NitroError as err:
        return f"no usable QEMU: {err.message}"
    if requirement == "kvm":
        chosen = accel or os.environ.get("NITRO_HARNESS_ACCEL")
        reason = "chosen by --accel/NITRO_HARNESS_ACCEL"
        if not chosen:
            chosen, reason = doctor.choose_accelerator(info, host.kvm_status())
        return None if chosen == "kvm" else f"needs KVM; this host uses {chosen}: {reason}"
    if requirement == "nsm":
        if getattr(info, "vhost_user_device", False):
            return None
        return (f"needs the harness NSM: {path} refuses vhost-user-device "
                "(run scripts/setup.sh to build the patched QEMU, or set NITRO_HARNESS_QEMU)")
    return f"unknown requirement {requirement!r}"


# --------------------------------------------------------------------------------------------
# Enclaves of one test


def resolve_eif(image: str | None = None, eif: str | Path | None = None,
                base: Path | None = None) -> Path:
    """EIF path for a scenario's ``image`` (recipe, built and cached) or ``eif`` (relative to ``base``).

    Raises NitroError E19 when an ``eif`` path does not exist; recipe build errors propagate
    from ``harness.images.recipes.build_image`` (E48).
    """
    if eif is not None:
        path = Path(eif)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.exists():
            raise NitroError(ErrorCode.FileOperationFailure, f"{path}: EIF file not found")
        return path
    if not image:
        raise NitroError(ErrorCode.MissingArgument, "no image or eif given")
    from harness.images.recipes import build_image

    return Path(build_image(image))


class EnclaveFactory:
    """Starts enclaves for one test or scenario and terminates every one of them at :meth:`close`.

    Each enclave gets an artifacts sub-folder (``<artifacts_dir>/<n>-<name>/``: console.log,
    qemu.cmdline, qemu.stderr and traces, kept by the engine; describe.json added here).
    ``cids`` yields CIDs for enclaves that do not ask for one (distinct ranges keep parallel
    pytest-xdist workers apart); ``qemu``/``accel`` are passed to ``Enclave.start``.
    Used by the pytest plugin's ``enclave_factory`` fixture and by :class:`ScenarioRunner`.
    """

    def __init__(self, artifacts_dir: Path, *, qemu: Path | str | None = None,
                 accel: str | None = None, cids: Iterator[int] | None = None):
        self.artifacts_dir = Path(artifacts_dir)
        self.qemu = Path(qemu) if qemu else None
        self.accel = accel
        self.cids = cids
        self.enclaves: list[Any] = []
        self._count = 0

    def config(self, *, image: str | None = None, eif: str | Path | None = None,
               base: Path | None = None, **settings: Any) -> Any:
        """Build an ``EnclaveConfig`` from scenario-style settings (snake_case keys)."""
        from harness.enclave import EnclaveConfig

        if settings.get("cid") is None and self.cids is not None:
            settings["cid"] = next(self.cids)
        if "cpu_ids" in settings:
            settings.pop("cpu_count", None)
        settings.setdefault("memory_mib", DEFAULT_ENCLAVE["memory_mib"])
        if "cpu_ids" not in settings:
            settings.setdefault("cpu_count", DEFAULT_ENCLAVE["cpu_count"])
        return EnclaveConfig(eif_path=resolve_eif(image, eif, base), **settings)

    def start(self, config: Any = None, **settings: Any) -> Any:
        """Start an enclave (from an ``EnclaveConfig`` or from ``image=``/``eif=`` and settings).

        Returns the running ``harness.enclave.Enclave`` after its heartbeat; raises the
        engine's NitroError (having cleaned up) when it cannot start.
        """
        from harness.enclave import Enclave

        if config is None:
            config = self.config(**settings)
        self._count += 1
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", config.name or Path(config.eif_path).stem)
        folder = self.artifacts_dir / f"{self._count}-{label}"
        enclave = Enclave.start(config, artifacts_dir=folder, accel=self.accel, qemu=self.qemu)
        self.enclaves.append(enclave)
        with contextlib.suppress(Exception):
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / "describe.json").write_text(json.dumps(enclave.describe(), indent=2) + "\n")
        return enclave

    def close(self) -> list[str]:
        """Terminate every enclave started here (idempotent); return problems found, if any.

        Afterwards checks, as Firecracker's kill() does, that no QEMU process of ours survives.
        """
        problems = []
        for enclave in reversed(self.enclaves):
            try:
                enclave.terminate()
            except Exception as exc:  # keep terminating the others
                problems.append(f"terminate {getattr(enclave, 'enclave_id', '?')}: {exc}")
            pid = getattr(enclave, "qemu_pid", None)
            if pid and _process_alive(pid):
                problems.append(f"QEMU process {pid} of {enclave.enclave_id} survived terminate")
        return problems


def _wait_dead(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to end; True if it is still alive afterwards."""
    end = time.monotonic() + timeout
    while _process_alive(pid):
        if time.monotonic() >= end:
            return True
        time.sleep(0.1)
    return False


def _process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return not (state and state.group(1) in ("Z", "X"))


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class StepResult:
    """Outcome of one step: ``status`` is passed/failed/skipped, or xfailed for a step nested in
    ``expect_failure`` that failed as expected; ``elapsed`` in seconds."""

    index: int
    kind: str
    label: str
    line: int | None
    number: str = ""  # "2" for the second step, "2.1" for the first step nested in it
    status: str = "running"
    elapsed: float = 0.0
    message: str = ""


@dataclass
class ScenarioResult:
    """Outcome of one scenario case: ``status`` passed/failed/skipped, ``elapsed`` seconds,
    per-step results, the failure ``message`` and console ``excerpt``, the ``artifacts`` folder."""

    scenario: Scenario
    status: str = "running"
    elapsed: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    message: str = ""
    excerpt: str = ""
    artifacts: Path | None = None

    def failure_report(self) -> str:
        """Multi-line report of a failed case: where, why, console excerpt, artifacts path."""
        lines = [self.message]
        if self.excerpt:
            lines += ["--- console (last lines) ---", self.excerpt.rstrip("\n"), "---"]
        if self.artifacts:
            lines.append(f"artifacts: {self.artifacts}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-ready summary (for ``nitro-harness run --json``)."""
        return {
            "scenario": self.scenario.id,
            "file": str(self.scenario.path),
            "line": self.scenario.line,
            "status": self.status,
            "elapsed_s": round(self.elapsed, 3),
            "message": self.message,
            "artifacts": str(self.artifacts) if self.artifacts else None,
            "steps": [
                {"step": s.number, "kind": s.kind, "label": s.label, "line": s.line,
                 "status": s.status, "elapsed_s": round(s.elapsed, 3), "message": s.message}
                for s in self.steps
            ],
        }


# --------------------------------------------------------------------------------------------
# Runner


class ScenarioRunner:
    """Runs one :class:`Scenario` case against the engine and returns a :class:`ScenarioResult`.

    ``factory`` starts and finally terminates the enclaves; ``artifacts_dir`` receives the
    expanded scenario, attestation documents and the enclaves' files; ``on_step(event, result)``
    is called with ``"start"`` and ``"end"`` for each step (the CLI's live lines). The enclave
    boots before the first step that needs one. Step and scenario timeouts (LAVA-style) cap every
    wait; a failure stops the scenario (later steps are not run).
    """

    def __init__(self, scenario: Scenario, factory: EnclaveFactory, *, artifacts_dir: Path,
                 on_step: Callable[[str, StepResult], None] | None = None):
        self.scenario = scenario
        self.factory = factory
        self.artifacts_dir = Path(artifacts_dir)
        self.on_step = on_step or (lambda event, result: None)
        self.enclave: Any = None
        self.booted = False
        self.eif_path: Path | None = None
        self.cursor = 0  # console position after the last matched expectation
        self.deadline = 0.0
        self.saved: dict[str, Any] = {}  # ${name} values stored by cli steps' save:
        self._expecting = 0  # depth of expect_failure steps being run
        self._current_number = ""
        self.cli_runtime: Path | None = None  # private runtime directory of cli steps
        self._documents = 0

    # -- public

    def run(self) -> ScenarioResult:
        """Run every step; never raises for a step failure (see the result), always cleans up."""
        result = ScenarioResult(self.scenario, artifacts=self.artifacts_dir)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        (self.artifacts_dir / "scenario.yaml").write_text(self.scenario.to_yaml())
        started = time.monotonic()
        self.deadline = started + self.scenario.timeout
        try:
            self._run_steps(self.scenario.steps, result, ["steps"])
            result.status = "passed"
        except StepSkipped as skip:
            result.status, result.message = "skipped", str(skip)
        except StepFailed as failure:
            result.status = "failed"
            result.message = failure.message
            result.excerpt = failure.excerpt or self._console_tail()
        except NitroError as err:  # the engine refused or failed outside an expectation
            result.status = "failed"
            result.message = str(err)
            result.excerpt = err.details or self._console_tail()
        except Exception as exc:  # a bug (ours or the engine's): report it, keep the traceback
            import traceback

            (self.artifacts_dir / "traceback.txt").write_text(traceback.format_exc())
            result.status = "failed"
            result.message = (f"internal error: {type(exc).__name__}: {exc} "
                              f"(traceback in {self.artifacts_dir / 'traceback.txt'})")
            result.excerpt = self._console_tail()
        finally:
            problems = self.factory.close() + self._close_cli_runtime()
            result.elapsed = time.monotonic() - started
            if problems and result.status != "failed":
                result.status, result.message = "failed", "; ".join(problems)
        if result.status == "failed":
            result.excerpt = _clean_excerpt(result.excerpt) or self._kept_console_tail()
        return result

    def _kept_console_tail(self, lines: int = 25) -> str:
        # A boot that failed leaves no Enclave object; its console log is in the artifacts.
        logs = sorted(self.artifacts_dir.glob("*/console.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return ""
        text = logs[-1].read_text(encoding="utf-8", errors="replace").replace("\r", "")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    # -- step loop

    def _run_steps(self, steps: list[dict], result: ScenarioResult, at: list[Any], prefix: str = "") -> None:
        for index, step in enumerate(steps):
            kind, body = step_kind(step)
            line = _line_of(self.scenario.data, at + [index])
            record = StepResult(index=len(result.steps), kind=kind, label=step_label(step), line=line,
                                number=f"{prefix}{index + 1}")
            self._current_number = record.number
            result.steps.append(record)
            self.on_step("start", record)
            t0 = time.monotonic()
            try:
                self._run_step(kind, body, result, at + [index, kind])
                record.status = "passed"
            except StepSkipped as skip:
                record.status, record.message = "skipped", str(skip)
                raise
            except StepFailed as failure:
                record.status, record.message = self._failed_status(), failure.message
                failure.message = (f"{display_path(self.scenario.path)}:{line}: step {record.number} "
                                   f"({record.label}) failed: {failure.message}")
                raise
            except NitroError as err:
                record.status, record.message = self._failed_status(), str(err)
                raise StepFailed(
                    f"{display_path(self.scenario.path)}:{line}: step {record.number} ({record.label}) "
                    f"failed: {err}", err.details or self._console_tail(), err) from None
            except Exception as exc:  # a bug (ours or the engine's): keep the traceback as an artifact
                import traceback

                trace = self.artifacts_dir / "traceback.txt"
                trace.write_text(traceback.format_exc())
                record.status = "failed"
                record.message = f"internal error: {type(exc).__name__}: {exc}"
                raise StepFailed(
                    f"{display_path(self.scenario.path)}:{line}: step {record.number} ({record.label}) failed: "
                    f"internal error: {type(exc).__name__}: {exc} (traceback in {trace})",
                    self._console_tail(), exc) from None
            finally:
                record.elapsed = time.monotonic() - t0
                self.on_step("end", record)

    def _failed_status(self) -> str:
        # Inside expect_failure a failure is what the step is for; the outer step turns it back
        # into "failed" if it was the wrong failure.
        return "xfailed" if self._expecting else "failed"

    def _run_step(self, kind: str, body: dict, result: ScenarioResult, at: list[Any]) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StepFailed(f"scenario timeout of {self.scenario.timeout:g} s reached")
        limit = min(float(body.get("timeout", self.scenario.step_timeout)), remaining)
        body = self._substitute(body)
        if kind not in _NO_ENCLAVE_STEPS:
            self._ensure_enclave()
        handler = getattr(self, f"_step_{kind}")
        if kind == "expect_failure":
            handler(body, limit, result, at, self._current_number)
        else:
            handler(body, limit)

    # -- enclave

    def _settings(self) -> dict[str, Any]:
        settings = dict(self.scenario.enclave)
        return settings

    def _boot(self, limit: float) -> None:
        if self.enclave is not None and self.enclave.running:
            raise StepFailed("boot: the scenario's enclave is already running")
        if self.eif_path is None:
            data = self.scenario.data
            self.eif_path = resolve_eif(data.get("image"), data.get("eif"), self.scenario.path.parent)
        settings = self._settings()
        # The boot is part of the step that needs it: the heartbeat wait (nitro-cli's formula
        # unless the scenario sets one) is cut to what is left of the scenario.
        from harness.enclave import heartbeat_timeout

        wait = settings.get("heartbeat_timeout") or heartbeat_timeout(
            self.eif_path.stat().st_size, int(settings.get("memory_mib", DEFAULT_ENCLAVE["memory_mib"])))
        settings["heartbeat_timeout"] = max(1.0, min(float(wait), limit))
        self.booted = True
        self.cursor = 0
        self.enclave = None
        self.enclave = self.factory.start(self.factory.config(eif=self.eif_path, **settings))

    def _ensure_enclave(self) -> Any:
        if self.enclave is None:
            if self.booted:
                raise StepFailed("the enclave is not running (it failed to boot or was terminated; "
                                 "use a 'boot' step to start it again)")
            self._boot(self.deadline - time.monotonic())
        return self.enclave

    def _console_tail(self, lines: int = 25) -> str:
        if self.enclave is None or getattr(self.enclave, "machine", True) is None:
            return ""
        with contextlib.suppress(Exception):
            text = self.enclave.console.text()
            return "\n".join(text.rstrip("\n").splitlines()[-lines:])
        return ""

    def _vars(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "artifacts": str(self.artifacts_dir),
            "scenario": self.scenario.name,
            "image": self.scenario.data.get("image", ""),
        }
        values.update({k: v for k, v in self.scenario.enclave.items() if k in ("cpu_count", "memory_mib")})
        if self.eif_path is not None:
            values["eif"] = str(self.eif_path)
        if self.enclave is not None:
            values.update(enclave_id=self.enclave.enclave_id, enclave_name=self.enclave.name,
                          cid=self.enclave.cid, qemu_pid=self.enclave.qemu_pid)
        values.update({k.split(".")[-1]: v for k, v in self.scenario.matrix_values.items()})
        values.update(self.saved)
        return values

    def _substitute(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (v if k == "steps" else self._substitute(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._substitute(v) for v in node]
        if isinstance(node, str) and "${" in node:
            values = self._vars()

            def repl(match: re.Match) -> str:
                name = match.group(1)
                if name not in values:
                    if name in ("eif",) and self.eif_path is None:
                        self.eif_path = resolve_eif(self.scenario.data.get("image"),
                                                    self.scenario.data.get("eif"),
                                                    self.scenario.path.parent)
                        return str(self.eif_path)
                    raise StepFailed(f"${{{name}}} has no value yet (the enclave has not booted)")
                return str(values[name])

            return _PLACEHOLDER_RE.sub(repl, node)
        return node

    # -- steps

    def _step_boot(self, body: dict, limit: float) -> None:
        self._boot(limit)

    def _step_sleep(self, body: dict, limit: float) -> None:
        seconds = float(body["seconds"])
        if seconds > limit:
            time.sleep(limit)
            raise StepFailed(f"sleep of {seconds:g} s exceeds the time left ({limit:.1f} s)")
        time.sleep(seconds)

    def _step_console(self, body: dict, limit: float) -> None:
        from harness.enclave import ConsoleError

        enclave = self.enclave
        within = min(float(body.get("within", limit)), limit)
        fail_pattern = body.get("fail_pattern", self.scenario.fail_pattern)
        if "send" in body:
            if not enclave.debug_mode:
                raise StepFailed("console send needs a debug-mode enclave (no console otherwise)")
            self.cursor = max(self.cursor, len(enclave.console.text()))
            enclave.console.write(body["send"].encode())
        if "expect" in body:
            try:
                match = enclave.console.expect(body["expect"], timeout=within, fail_pattern=fail_pattern,
                                               count=int(body.get("count", 1)), start=self.cursor)
            except ConsoleError as exc:
                # The whole console's tail, not only what followed the cursor: the lines before
                # the expectation started are often what explains it.
                raise StepFailed(str(exc), self._console_tail() or exc.excerpt, exc) from None
            self.cursor += match.end()
        if "expect_not" in body:
            regex = re.compile(body["expect_not"], re.MULTILINE)
            end = time.monotonic() + (float(body["within"]) if "within" in body and "expect" not in body else 0)
            while True:
                text = enclave.console.text()
                found = regex.search(text)
                if found:
                    raise StepFailed(f"console printed {found.group(0)!r}, which must not appear",
                                     _tail_around(text, found.start()))
                if time.monotonic() >= end:
                    break
                time.sleep(min(0.25, max(0.0, end - time.monotonic())))

    def _exec(self, command: str, timeout: float, enclave: Any = None) -> Any:
        from harness.enclave import ConsoleError

        try:
            return (enclave or self.enclave).exec(command, timeout=timeout)
        except ConsoleError as exc:
            raise StepFailed(f"exec {command!r}: {exc}", exc.excerpt, exc) from None

    def _step_exec(self, body: dict, limit: float) -> None:
        within = min(float(body.get("within", limit)), limit)
        command = body["command"].rstrip()
        if command.endswith("&") and not command.endswith("&&"):
            # A background job: the console shell appends "; <status marker>", and "&;" is a
            # syntax error, so group it ("{ cmd & }" is valid sh).
            command = "{ " + command + " }"
        result = self._exec(command, within)
        expected = body.get("status", 0)
        shown = _indent(result.output)
        if expected is not None and result.status != expected:
            raise StepFailed(f"exit status {result.status}, expected {expected}; output:\n{shown}")
        if "output" in body and not re.search(body["output"], result.output, re.MULTILINE):
            raise StepFailed(f"output does not match {body['output']!r}; output:\n{shown}")
        if "output_not" in body and (bad := re.search(body["output_not"], result.output, re.MULTILINE)):
            raise StepFailed(f"output contains {bad.group(0)!r} (output_not {body['output_not']!r}); "
                             f"output:\n{shown}")

    def _payload(self, body: dict) -> bytes | None:
        if "send" in body:
            return body["send"].encode()
        if "send_hex" in body:
            return bytes.fromhex(body["send_hex"])
        if "send_file" in body:
            path = Path(body["send_file"])
            if not path.is_absolute():
                path = self.scenario.path.parent / path
            try:
                return path.read_bytes()
            except OSError as exc:
                raise StepFailed(f"send_file {path}: {exc.strerror}") from None
        if "send_random" in body:
            return secrets.token_bytes(int(body["send_random"]))
        return None

    def _step_vsock(self, body: dict, limit: float) -> None:
        deadline = time.monotonic() + min(float(body.get("within", limit)), limit)
        count = int(body.get("connections", 1))
        if "connect" in body:
            port = int(body["connect"])
            for n in range(count):
                sock = self._vsock_connect(port, deadline, refused_ok=bool(body.get("expect_refused")))
                if sock is None:
                    continue
                with contextlib.closing(sock):
                    self._exchange(sock, body, deadline, f"connection {n + 1}/{count} to port {port}")
            return
        self._vsock_accept(body, deadline, count)

    def _vsock_connect(self, port: int, deadline: float, *, refused_ok: bool) -> socket.socket | None:
        # The guest's server may still be starting: a refused connection (RST) is retried until
        # the deadline, unless the step expects the refusal.
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = self.enclave.vsock_connect(port, timeout=max(0.5, min(10.0, remaining)))
            except (OSError, NitroError) as exc:
                last = exc
                if refused_ok:
                    return None
                if remaining <= 0.5:
                    raise StepFailed(f"vsock connect to the enclave's port {port} failed: {exc}") from None
                time.sleep(0.5)
                continue
            if refused_ok:
                sock.close()
                raise StepFailed(f"vsock connect to port {port} succeeded; expected it to be refused")
            return sock
        raise StepFailed(f"vsock connect to port {port}: {last}")  # pragma: no cover

    def _vsock_accept(self, body: dict, deadline: float, count: int) -> None:
        port = int(body["accept"])
        listener = self.enclave.vsock_listen(port)
        trigger: dict[str, Any] = {}
        thread = None
        try:
            if body.get("trigger"):
                def run_trigger() -> None:
                    try:
                        trigger["result"] = self.enclave.exec(
                            body["trigger"], timeout=max(1.0, deadline - time.monotonic()))
                    except Exception as exc:  # reported after the exchange
                        trigger["error"] = exc

                thread = threading.Thread(target=run_trigger, name="scenario-trigger", daemon=True)
                thread.start()
            for n in range(count):
                remaining = deadline - time.monotonic()
                try:
                    conn = listener.accept(timeout=max(0.1, remaining))
                except (OSError, NitroError, TimeoutError) as exc:
                    raise StepFailed(f"no guest connection {n + 1}/{count} on parent port {port} "
                                     f"within the step's time: {exc}") from None
                if isinstance(conn, tuple):
                    conn = conn[0]
                with contextlib.closing(conn):
                    self._exchange(conn, body, deadline, f"guest connection {n + 1}/{count} on port {port}")
        finally:
            if thread is not None:
                thread.join(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(Exception):
                listener.close()
        if thread is not None:
            if "error" in trigger:
                raise StepFailed(f"trigger {body['trigger']!r}: {trigger['error']}")
            res = trigger.get("result")
            if res is None:
                raise StepFailed(f"trigger {body['trigger']!r} did not finish in time")
            if res.status != 0:
                raise StepFailed(f"trigger {body['trigger']!r} exited {res.status}:\n{_indent(res.output)}")

    def _exchange(self, sock: socket.socket, body: dict, deadline: float, what: str) -> None:
        payload = self._payload(body)
        sender = None
        send_error: list[BaseException] = []
        if payload is not None:
            def send() -> None:
                try:
                    sock.sendall(payload)
                    if body.get("half_close", True):
                        sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    send_error.append(exc)

            # Sending from a thread while reading here: an echo peer would otherwise fill
            # both directions' credit and deadlock on large payloads.
            sender = threading.Thread(target=send, name="scenario-vsock-send", daemon=True)
            sender.start()
        expect_re = re.compile(body["expect"].encode(), re.MULTILINE) if "expect" in body else None
        want: int | None = None
        if "expect_hex" in body:
            want = len(bytes.fromhex(body["expect_hex"]))
        elif "expect_bytes" in body:
            want = int(body["expect_bytes"])
        elif body.get("expect_echo"):
            want = len(payload or b"")
        digest_reply = bool(body.get("reply_digest"))
        digest_expect = bool(body.get("expect_digest"))
        # reply_digest reads to EOF before answering; expect_digest reads the one-line answer.
        reading = expect_re is not None or want is not None or digest_reply or digest_expect
        received = bytearray()
        while reading:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepFailed(f"{what}: timed out after receiving {len(received)} bytes"
                                 + _received_excerpt(received))
            sock.settimeout(min(remaining, 1.0))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise StepFailed(f"{what}: receive failed after {len(received)} bytes: {exc}") from None
            if not chunk:
                break
            received += chunk
            if digest_expect and b"\n" in received:
                break
            if expect_re is not None and expect_re.search(received):
                break
            if want is not None and expect_re is None and len(received) >= want:
                break
        if sender is not None:
            sender.join(max(0.1, deadline - time.monotonic()))
            if sender.is_alive():
                raise StepFailed(f"{what}: sending {len(payload or b'')} bytes did not finish in time")
            if send_error:
                raise StepFailed(f"{what}: send failed: {send_error[0]}")
        if digest_reply:
            try:
                sock.sendall(f"{len(received)} {hashlib.sha256(received).hexdigest()}\n".encode())
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise StepFailed(f"{what}: sending the digest failed: {exc}") from None
        if digest_expect:
            sent = payload or b""
            want_line = f"{len(sent)} {hashlib.sha256(sent).hexdigest()}"
            got_line = bytes(received).decode("utf-8", "replace").strip()
            if got_line != want_line:
                raise StepFailed(f"{what}: the peer's digest {got_line!r} differs from what was sent "
                                 f"{want_line!r}")
        if expect_re is not None and not expect_re.search(received):
            raise StepFailed(f"{what}: reply does not match {body['expect']!r}" + _received_excerpt(received))
        if "expect_hex" in body and bytes(received[:want]) != bytes.fromhex(body["expect_hex"]):
            raise StepFailed(f"{what}: expected {body['expect_hex']}, got {bytes(received[:want + 16]).hex()}")
        if "expect_bytes" in body and len(received) < want:
            raise StepFailed(f"{what}: got {len(received)} bytes, expected {want}")
        if body.get("expect_echo"):
            sent = payload or b""
            if bytes(received) != sent:
                raise StepFailed(
                    f"{what}: echo differs: sent {len(sent)} bytes sha256 {hashlib.sha256(sent).hexdigest()[:16]}, "
                    f"got {len(received)} bytes sha256 {hashlib.sha256(received).hexdigest()[:16]}")

    def _step_describe(self, body: dict, limit: float) -> None:
        actual = self.enclave.describe()
        (self.artifacts_dir / "describe.json").write_text(json.dumps(actual, indent=2) + "\n")
        expected = body.get("expect") or {}
        mismatch = _subset_mismatch(expected, actual, "describe")
        if mismatch:
            raise StepFailed(f"{mismatch}; describe-enclaves entry: {json.dumps(actual)}")
        if self.enclave.measurements is not None and "Measurements" in actual:
            want = self.enclave.measurements.to_json()
            if actual["Measurements"] != want:
                raise StepFailed(f"describe Measurements {actual['Measurements']} differ from the EIF's {want}")

    def _cli_env(self) -> dict[str, str]:
        # cli steps get a runtime directory of their own: they see the enclaves they start, and
        # `terminate-enclave --all` never reaches enclaves of other tests or users. A short path
        # under /tmp keeps the Unix sockets inside it below the 108-byte limit.
        if self.cli_runtime is None:
            import tempfile

            self.cli_runtime = Path(tempfile.mkdtemp(prefix="nh-rt-"))
        return dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(self.cli_runtime))

    def _close_cli_runtime(self) -> list[str]:
        """Terminate what cli steps left running, check their processes ended, remove the folder."""
        if self.cli_runtime is None:
            return []
        problems = []
        from harness.registry import Registry

        records = Registry(self.cli_runtime).records()
        if records:
            proc = subprocess.run([sys.executable, "-m", "harness.cli", "terminate-enclave", "--all"],
                                  capture_output=True, text=True, env=self._cli_env(), timeout=120)
            if proc.returncode != 0:
                problems.append(f"terminate-enclave --all after the scenario exited {proc.returncode}: "
                                f"{proc.stderr.strip()}")
        for record in records:
            for pid in (record.pid, record.qemu_pid):
                if pid and _wait_dead(pid, 30):
                    problems.append(f"process {pid} of enclave {record.enclave_id} survived")
        import shutil

        shutil.rmtree(self.cli_runtime, ignore_errors=True)
        self.cli_runtime = None
        return problems

    def _step_cli(self, body: dict, limit: float) -> None:
        argv = [sys.executable, "-m", "harness.cli", *[str(a) for a in body["args"]]]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit,
                                  stdin=subprocess.DEVNULL, env=self._cli_env())
        except subprocess.TimeoutExpired as exc:
            raise StepFailed(f"`nitro-harness {' '.join(argv[3:])}` did not finish within {limit:g} s; "
                             f"stderr: {exc.stderr!r}") from None
        self._save_cli(argv, proc)
        shown = f"\nstdout:\n{_indent(proc.stdout)}\nstderr:\n{_indent(proc.stderr)}"
        expected = body.get("status", 0)
        if proc.returncode != expected:
            raise StepFailed(f"`nitro-harness {' '.join(argv[3:])}` exited {proc.returncode}, "
                             f"expected {expected}{shown}")
        if "stdout" in body and not re.search(body["stdout"], proc.stdout, re.MULTILINE):
            raise StepFailed(f"stdout does not match {body['stdout']!r}{shown}")
        if "stdout_not" in body and (bad := re.search(body["stdout_not"], proc.stdout, re.MULTILINE)):
            raise StepFailed(f"stdout contains {bad.group(0)!r} (stdout_not){shown}")
        if "stderr" in body and not re.search(body["stderr"], proc.stderr, re.MULTILINE):
            raise StepFailed(f"stderr does not match {body['stderr']!r}{shown}")
        if "json" in body or "save" in body:
            try:
                actual = json.loads(proc.stdout)
            except ValueError as exc:
                raise StepFailed(f"stdout is not JSON ({exc}){shown}") from None
            mismatch = _subset_mismatch(body.get("json", {}), actual, "stdout")
            if mismatch:
                raise StepFailed(f"{mismatch}{shown}")
            for name, key in (body.get("save") or {}).items():
                if not isinstance(actual, dict) or key not in actual:
                    raise StepFailed(f"save.{name}: the JSON output has no key {key!r}{shown}")
                self.saved[name] = actual[key]

    def _save_cli(self, argv: list[str], proc: subprocess.CompletedProcess) -> None:
        with open(self.artifacts_dir / "cli.log", "a", encoding="utf-8") as log:
            log.write(f"$ nitro-harness {shlex.join(argv[3:])}\n[exit {proc.returncode}]\n"
                      f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}\n")

    def _step_wait_exit(self, body: dict, limit: float) -> None:
        if self.enclave is None:
            raise StepFailed("no enclave to wait for")
        within = min(float(body.get("within", limit)), limit)
        if not self.enclave.wait(within):
            raise StepFailed(f"the enclave was still running after {within:g} s")

    def _step_terminate(self, body: dict, limit: float) -> None:
        if self.enclave is None:
            raise StepFailed("no enclave to terminate")
        enclave, pid = self.enclave, self.enclave.qemu_pid
        enclave.terminate()
        if pid and _process_alive(pid):
            raise StepFailed(f"QEMU process {pid} still runs after terminate")
        if enclave.state != "EMPTY":
            raise StepFailed(f"state is {enclave.state} after terminate, expected EMPTY")
        state_dir = getattr(enclave, "state_dir", None)
        if state_dir is not None and Path(state_dir).exists():
            raise StepFailed(f"the enclave's state folder {state_dir} survived terminate")
        self.enclave = None

    def _step_kms(self, body: dict, limit: float) -> None:
        """Decrypt through the KMS emulator with a key whose policy names a PCR0 (issue 7).

        Starts, for this step only, a KMS emulator over TLS (certificate for
        ``kms.<region>.amazonaws.com`` from a CA kept in ``<artifacts>/kms-tls``) that checks
        SigV4 and verifies attestation documents against the enclave NSM's PKI root, and a
        vsock-proxy on the parent's vsock port 8000 forwarding to it. Creates a key whose
        policy allows ``kms:Decrypt`` only with ``kms:RecipientAttestation:ImageSha384`` equal
        to ``pcr0``, encrypts a known plaintext and decrypts it ``from: enclave`` (the guest's
        kms_client over the console: TLS through the proxy, Recipient from /dev/nsm, CMS) or
        ``from: host`` (boto3 without attestation). ``expect: allowed`` needs the plaintext
        back, ``denied`` an AccessDeniedException. Everything started is stopped at the end.
        """
        from harness.kms import KmsCredential, KmsServer, ensure_tls_identity

        region = body.get("region", "us-east-1")
        origin = body.get("from", "enclave")
        expect = body["expect"]
        plaintext = str(body.get("plaintext", "nitro-harness kms step secret")).encode()
        within = min(float(body.get("within", limit)), limit)
        production = None
        if origin == "production":
            production = self._kms_production_enclave(within)
            enclave = production
        else:
            enclave = self._ensure_enclave() if origin == "enclave" else self.enclave
        try:
            self._kms_run(body, origin, expect, plaintext, within, region, enclave, production)
        finally:
            if production is not None:
                production.terminate()

    def _kms_run(self, body: dict, origin: str, expect: str, plaintext: bytes, within: float,
                 region: str, enclave: Any, production: Any) -> None:
        from harness.kms import KmsCredential, KmsServer, ensure_tls_identity

        if origin != "host" and enclave.nsm is None:
            raise StepSkipped(f"kms from the enclave needs the NSM: "
                              f"{getattr(enclave, 'nsm_status', 'no NSM device')}")
        spec = str(body.get("pcr0", "eif"))
        if spec == "eif" and production is not None:
            pcr0 = production.measurements.as_dict()[0].hex()
        else:
            pcr0 = self._kms_pcr0(spec)
        folder = self.artifacts_dir / "kms"
        folder.mkdir(parents=True, exist_ok=True)
        identity = ensure_tls_identity(self.artifacts_dir / "kms-tls", region=region)
        credential = KmsCredential(
            "AKIA" + secrets.token_hex(8).upper(), secrets.token_hex(20),
            "arn:aws:iam::111122223333:role/nitro-harness-parent")
        server = KmsServer(tls=identity, attestation_roots=[self._kms_root(enclave)],
                           credentials=[credential], region=region)
        proxy = None
        with contextlib.ExitStack() as cleanup:
            server.start()
            cleanup.callback(server.stop)
            if origin != "host":
                from harness.proxy import VsockProxy

                proxy = VsockProxy.on_vsock(enclave.vsock, 8000, "127.0.0.1", server.port,
                                            allowlist=[{"address": "127.0.0.1", "port": server.port}])
                proxy.start()
                cleanup.callback(proxy.stop)
            client = self._kms_boto3(server, identity, credential, region)
            policy = _kms_policy(credential.principal_arn, pcr0)
            key_id = client.create_key(Description=f"scenario {self.scenario.id} kms step",
                                       Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
            blob = client.encrypt(KeyId=key_id, Plaintext=plaintext)["CiphertextBlob"]
            record = {"from": origin, "expect": expect, "policy_image_sha384": pcr0, "key_id": key_id,
                      "policy": policy, "plaintext_b64": base64.b64encode(plaintext).decode()}
            if origin == "host":
                outcome, detail = self._kms_host_decrypt(client, blob)
            else:
                outcome, detail = self._kms_guest_decrypt(identity, credential, region, key_id, blob,
                                                          plaintext, within, production)
            record.update(outcome=outcome, detail=detail)
            with open(folder / "kms-steps.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
        if outcome != expect:
            raise StepFailed(f"Decrypt from the {origin} with a policy requiring ImageSha384 "
                             f"{pcr0[:16]}...: {outcome}, expected {expect}:\n{_indent(detail)}")

    def _kms_pcr0(self, spec: str) -> str:
        """The policy's ImageSha384 value (lower-case hex) for a step's ``pcr0``."""
        from harness.eif import measure_eif

        if spec == "zero":
            return "0" * 96
        if re.fullmatch(r"[0-9a-fA-F]{96}", spec):
            return spec.lower()
        if spec == "eif":
            if self.enclave is not None and self.enclave.measurements is not None:
                return self.enclave.measurements.as_dict()[0].hex()
            if self.eif_path is None:
                self.eif_path = resolve_eif(self.scenario.data.get("image"), self.scenario.data.get("eif"),
                                            self.scenario.path.parent)
            return measure_eif(self.eif_path).as_dict()[0].hex()
        if spec.startswith("image:"):
            image = image_for_kernel(spec[len("image:"):], self.scenario.kernel)
            return measure_eif(resolve_eif(image)).as_dict()[0].hex()
        if spec.startswith("eif:"):
            return measure_eif(resolve_eif(eif=spec[len("eif:"):], base=self.scenario.path.parent)
                               ).as_dict()[0].hex()
        raise StepFailed(f"pcr0: {spec!r} is not eif, zero, image:<recipe>, eif:<path> or 96 hex digits")

    def _kms_root(self, enclave: Any) -> Any:
        pki = getattr(getattr(enclave, "nsm", None), "pki", None)
        if pki is None:
            from harness.pki import Pki

            pki = Pki.load_or_create(getattr(getattr(enclave, "config", None), "pki_dir", None))
        return pki.root_certificate

    @staticmethod
    def _kms_boto3(server: Any, identity: Any, credential: Any, region: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "kms", endpoint_url=f"https://localhost:{server.port}", region_name=region,
            verify=str(identity.ca_certificate), aws_access_key_id=credential.access_key_id,
            aws_secret_access_key=credential.secret_access_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=30))

    @staticmethod
    def _kms_host_decrypt(client: Any, blob: bytes) -> tuple[str, str]:
        from botocore.exceptions import ClientError

        try:
            answer = client.decrypt(CiphertextBlob=blob)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            text = f"{error.get('Code')}: {error.get('Message')}"
            return ("denied" if error.get("Code") == "AccessDeniedException" else "error"), text
        return "allowed", f"Plaintext of {len(answer.get('Plaintext', b''))} bytes from key {answer.get('KeyId')}"

    def _kms_production_enclave(self, within: float) -> Any:
        """Boot a production-mode (not debug) enclave of the python image whose application is
        :data:`_KMS_RUNNER`: it runs the kms_client for the parent over vsock (no console)."""
        app = f"python3 -c \"exec(bytes.fromhex('{_KMS_RUNNER.encode().hex()}').decode())\"; sleep 3600"
        from harness.images.recipes import build_image

        image = image_for_kernel("python", self.scenario.kernel)
        eif = Path(build_image(image, cmd=["/bin/sh", "-c", app]))
        settings = {k: v for k, v in self._settings().items() if k not in ("cid", "name", "cpu_ids")}
        settings["debug_mode"] = False
        settings.setdefault("heartbeat_timeout", max(1.0, within))
        return self.factory.start(self.factory.config(eif=eif, **settings))

    def _kms_production_exec(self, enclave: Any, ca: bytes, argv: list[str], deadline: float) -> Any:
        """Run ``argv`` in the production enclave's runner: returns ExecResult-like (status, output)."""
        from harness.console import ExecResult

        listener = enclave.vsock_listen(KMS_RUNNER_PORT)
        try:
            conn = listener.accept(timeout=max(1.0, deadline - time.monotonic()))
            if isinstance(conn, tuple):
                conn = conn[0]
            with contextlib.closing(conn):
                conn.sendall(json.dumps({"ca": ca.decode(), "argv": argv}).encode())
                conn.shutdown(socket.SHUT_WR)
                data = b""
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                while chunk := conn.recv(65536):
                    data += chunk
        except (OSError, NitroError, TimeoutError) as exc:
            raise StepFailed(f"the production enclave's kms runner (vsock port {KMS_RUNNER_PORT}): {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                listener.close()
        try:
            reply = json.loads(data.decode())
        except ValueError:
            raise StepFailed(f"the kms runner's reply is not JSON: {data[:300]!r}") from None
        return ExecResult(status=int(reply["status"]), output=reply["output"])

    def _kms_guest_decrypt(self, identity: Any, credential: Any, region: str, key_id: str, blob: bytes,
                           plaintext: bytes, within: float, production: Any = None) -> tuple[str, str]:
        deadline = time.monotonic() + within
        if production is not None:
            argv = ["python3", "/opt/nitro-harness/kms_client.py", "decrypt", "--region", region,
                    "--ca-file", "/tmp/nitro-harness-kms-ca.pem", "--aws-access-key-id",
                    credential.access_key_id, "--aws-secret-access-key", credential.secret_access_key,
                    "--key-id", key_id, "--ciphertext", base64.b64encode(blob).decode()]
            res = self._kms_production_exec(production, identity.ca_certificate.read_bytes(), argv, deadline)
            return _kms_outcome(res, plaintext)
        ca_b64 = base64.b64encode(identity.ca_certificate.read_bytes()).decode()
        ca_path = "/tmp/nitro-harness-kms-ca.pem"
        # The guest shell's line editor takes about 1 KiB a line: send the CA in pieces.
        for n in range(0, len(ca_b64), 512):
            redirect = ">" if n == 0 else ">>"
            res = self._exec(f"printf %s {ca_b64[n:n + 512]} {redirect} {ca_path}.b64",
                             max(1.0, deadline - time.monotonic()))
            if res.status != 0:
                raise StepFailed(f"writing the KMS CA into the guest failed (status {res.status}):\n"
                                 f"{_indent(res.output)}")
        res = self._exec(f"base64 -d {ca_path}.b64 > {ca_path} && grep -c CERTIFICATE {ca_path}",
                         max(1.0, deadline - time.monotonic()))
        if res.status != 0:
            raise StepFailed(f"writing the KMS CA into the guest failed (status {res.status}):\n"
                             f"{_indent(res.output)}")
        command = shlex.join([
            "python3", "/opt/nitro-harness/kms_client.py", "decrypt", "--region", region,
            "--ca-file", ca_path, "--aws-access-key-id", credential.access_key_id,
            "--aws-secret-access-key", credential.secret_access_key,
            "--key-id", key_id, "--ciphertext", base64.b64encode(blob).decode()]) + " 2>&1"
        res = self._exec(command, max(1.0, deadline - time.monotonic()))
        return _kms_outcome(res, plaintext)

    def _step_expect_failure(self, body: dict, limit: float, result: ScenarioResult, at: list[Any],
                             number: str) -> None:
        steps = body.get("steps") or [{"boot": None}]
        want_code = body.get("code")
        want_message = body.get("message")
        saved_deadline = self.deadline
        self.deadline = min(self.deadline, time.monotonic() + limit)
        self._expecting += 1
        try:
            self._run_steps(steps, result, at + ["steps"] if body.get("steps") else at + ["__boot__"],
                            prefix=f"{number}.")
        except StepFailed as failure:
            self._expecting -= 1
            nested = next((r for r in reversed(result.steps) if r.status == "xfailed"), None)
            error = failure.error
            code = error.code.tag if isinstance(error, NitroError) else None
            text = f"{failure.message}\n{failure.excerpt}"
            if want_code and code != want_code:
                if nested is not None:
                    nested.status = "failed"
                got = f"{code} ({error})" if code else f"a failure without an error code: {failure.message}"
                raise StepFailed(f"expected failure {want_code}, got {got}", failure.excerpt) from None
            if want_message and not re.search(want_message, text, re.MULTILINE):
                if nested is not None:
                    nested.status = "failed"
                raise StepFailed(f"failure message does not match {want_message!r}: {failure.message}",
                                 failure.excerpt) from None
            (self.artifacts_dir / "expected-failure.txt").write_text(text)
            return
        except BaseException:
            self._expecting -= 1
            raise
        finally:
            self.deadline = saved_deadline
        self._expecting -= 1
        raise StepFailed(f"expected a failure ({want_code or want_message}) but the steps succeeded")

    # attest and isolation follow

    def _step_attest(self, body: dict, limit: float) -> None:
        from harness import attestation

        enclave = self.enclave
        if enclave.nsm is None:
            raise StepSkipped(f"attest needs the NSM: {getattr(enclave, 'nsm_status', 'no NSM device')}")
        within = min(float(body.get("within", limit)), limit)
        command = body.get("command") or _guest_attest_command(body)
        res = self._exec(command, within)
        if res.status != 0:
            raise StepFailed(f"guest attestation command {command!r} exited {res.status}:\n{_indent(res.output)}")
        document = _document_from_output(res.output)
        if document is None:
            raise StepFailed(f"no attestation document in the output of {command!r}:\n{_indent(res.output)}")
        self._documents += 1
        (self.artifacts_dir / f"attestation-{self._documents}.cbor").write_bytes(document)
        if body.get("tamper"):
            document = attestation.tamper_document(document, body["tamper"])
            (self.artifacts_dir / f"attestation-{self._documents}-tampered.cbor").write_bytes(document)
        expect = self._attest_expectations(body)
        try:
            doc = attestation.verify_document(document, roots=[self._attest_root(body)], expect=expect)
        except attestation.AttestationError as exc:
            if "expect_verify_error" in body and re.search(body["expect_verify_error"], str(exc)):
                return
            raise StepFailed(f"attestation document failed verification: {exc}") from None
        if "expect_verify_error" in body:
            raise StepFailed(f"the document verified, expected a failure matching {body['expect_verify_error']!r}")
        (self.artifacts_dir / f"attestation-{self._documents}.json").write_text(
            json.dumps(doc.to_json(), indent=2, default=str) + "\n")
        if doc.module_id != enclave.enclave_id:
            raise StepFailed(f"module_id {doc.module_id!r} is not the enclave ID {enclave.enclave_id!r}")

    def _attest_root(self, body: dict) -> Any:
        from cryptography import x509

        if body.get("root"):
            path = Path(body["root"])
            if not path.is_absolute():
                path = self.scenario.path.parent / path
            try:
                return x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise StepFailed(f"attest root {path}: {exc}") from None
        pki = getattr(self.enclave.nsm, "pki", None)
        if pki is None:
            from harness.pki import Pki

            pki = Pki.load_or_create(getattr(self.enclave.config, "pki_dir", None))
        return pki.root_certificate

    def _attest_expectations(self, body: dict) -> Any:
        from harness import attestation
        from harness.pcr import ZERO_PCR, pcr_for_instance_id, pcr_for_role_arn

        enclave = self.enclave
        measured = enclave.measurements.as_dict()
        debug = bool(body.get("debug_zeros", enclave.debug_mode))
        pcrs: dict[int, bytes] = {}
        if debug:
            # SPEC 2: debug-mode documents carry PCR0-2 (and PCR8) as zeros, PCR3/4 unchanged.
            pcrs.update({i: ZERO_PCR for i in measured})
        role = getattr(enclave.config, "parent_role_arn", None)
        if role:
            pcrs[3] = pcr_for_role_arn(role)
        pcrs[4] = pcr_for_instance_id(enclave.instance_id)
        for index, value in (body.get("pcrs") or {}).items():
            index = int(index)
            if value == "eif":
                if index not in measured:
                    raise StepFailed(f"pcrs.{index}: the EIF has no PCR{index} measurement")
                pcrs[index] = measured[index]
            elif value == "zero":
                pcrs[index] = ZERO_PCR
            else:
                pcrs[index] = bytes.fromhex(value)
        nonce = body.get("verify_nonce", body.get("nonce"))
        return attestation.Expectations(
            pcrs=pcrs,
            nonce=bytes.fromhex(nonce) if nonce is not None else None,
            user_data=bytes.fromhex(body["user_data"]) if "user_data" in body else None,
            public_key=bytes.fromhex(body["public_key"]) if "public_key" in body else None,
            allow_debug=debug,
        )

    def _step_isolation(self, body: dict, limit: float) -> None:
        deadline = time.monotonic() + limit
        checks = body.get("checks") or [c for c in ISOLATION_CHECKS if c != "peer_unreachable"]
        tolerance = float(body.get("memory_tolerance", 0.2))
        report: dict[str, str] = {}
        failures = []
        for check in checks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append(f"{check}: no time left")
                break
            try:
                report[check] = getattr(self, f"_iso_{check}")(remaining, tolerance)
            except StepFailed as exc:
                report[check] = f"FAILED: {exc.message}"
                failures.append(f"{check}: {exc.message}")
        (self.artifacts_dir / "isolation.json").write_text(json.dumps(report, indent=2) + "\n")
        if failures:
            raise StepFailed("isolation checks failed:\n  " + "\n  ".join(failures))

    # Isolation checks (issue 6 item 2): each returns what it saw, or raises StepFailed.

    def _guest_value(self, key: str, expression: str, limit: float) -> str:
        """Value of a shell ``expression`` in the guest, framed by <KEY>...</KEY>.

        The frame is assembled by the shell from a variable, so a console that echoes the typed
        command line (a tty in echo mode) never shows it: only the real output matches.
        """
        res = self._exec(f'__k={key}; echo "<$__k>$({expression})</$__k>"', limit)
        found = re.search(rf"<{key}>(.*?)</{key}>", res.output, re.DOTALL)
        if found is None:
            raise StepFailed(f"guest command for {key} ({expression!r}) printed no value "
                             f"(status {res.status}):\n{_indent(res.output)}")
        return found.group(1)

    def _iso_guest_network(self, limit: float, tolerance: float) -> str:
        names = self._guest_value("NET", "ls /sys/class/net", limit).split()
        if names != ["lo"]:
            raise StepFailed(f"guest network interfaces {names}; only 'lo' may exist")
        return "only lo"

    def _iso_guest_block_devices(self, limit: float, tolerance: float) -> str:
        names = self._guest_value("BLK", "ls /sys/block", limit).split()
        # Loop, RAM and zram devices are the guest kernel's own memory, not host-provided disks.
        disks = [n for n in names if not re.fullmatch(r"(loop|ram|zram)\d+", n)]
        if disks:
            raise StepFailed(f"guest block devices {disks}; none may exist")
        return f"no disks ({len(names)} loop/ram devices)"

    def _iso_guest_cpus(self, limit: float, tolerance: float) -> str:
        seen = self._guest_value("CPUS", "grep -c ^processor /proc/cpuinfo", limit).strip()
        want = len(self.enclave.cpu_ids)
        if seen != str(want):
            raise StepFailed(f"guest sees {seen!r} CPUs, configured {want}")
        return f"{want} CPUs"

    def _iso_guest_memory(self, limit: float, tolerance: float) -> str:
        value = self._guest_value("MEM", "grep MemTotal /proc/meminfo", limit)
        found = re.search(r"MemTotal:\s+(\d+) kB", value)
        if not found:
            raise StepFailed(f"cannot read MemTotal: {value!r}")
        total_mib = int(found.group(1)) / 1024
        want = self.enclave.memory_mib
        if not (want * (1 - tolerance) <= total_mib <= want):
            raise StepFailed(f"guest MemTotal {total_mib:.1f} MiB is not within "
                             f"[{want * (1 - tolerance):.0f}, {want}] MiB of the configured {want} MiB")
        return f"MemTotal {total_mib:.1f} MiB of {want} MiB"

    def _guest_connect_results(self, targets: list[tuple[int, int]], limit: float,
                               enclave: Any = None) -> dict[int, str]:
        # One python3 run in the guest tries each (cid, port) and prints "cid:ok" or "cid:errno".
        script = (
            "import socket\n"
            f"for cid, port in {targets!r}:\n"
            "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
            "    s.settimeout(15)\n"
            "    try:\n"
            "        s.connect((cid, port)); r = 'ok'\n"
            "    except OSError as e:\n"
            "        r = 'errno%s' % e.errno\n"
            "    s.close()\n"
            "    print('vsock-result %d:%s' % (cid, r))\n"
        )
        encoded = base64.b64encode(script.encode()).decode()
        res = self._exec(f"python3 -c 'import base64;exec(base64.b64decode(\"{encoded}\"))'", limit, enclave)
        results = dict(re.findall(r"vsock-result (\d+):(\S+)", res.output))
        if res.status != 0 or len(results) != len(targets):
            raise StepFailed(f"guest vsock probe (needs python3 in the image) exited {res.status}:\n"
                             f"{_indent(res.output)}")
        return {int(k): v for k, v in results.items()}

    def _iso_guest_vsock_cids(self, limit: float, tolerance: float) -> str:
        port = 47000 + secrets.randbelow(1000)
        listener = self.enclave.vsock_listen(port)
        try:
            others = [2, 1, self.enclave.cid + 1000]
            results = self._guest_connect_results([(c, port) for c in others] + [(3, port)], limit)
        finally:
            with contextlib.suppress(Exception):
                listener.close()
        if results.get(3) != "ok":
            raise StepFailed(f"the guest could not reach the parent (CID 3) port {port}: {results[3]}")
        reached = [c for c in others if results.get(c) == "ok"]
        if reached:
            raise StepFailed(f"the guest reached CID(s) {reached}; only CID 3 may be reachable")
        return "only CID 3 reachable: " + ", ".join(f"{c}->{r}" for c, r in sorted(results.items()))

    def _iso_host_cmdline(self, limit: float, tolerance: float) -> str:
        argv = self.enclave.qemu_cmdline
        if not argv:
            raise StepFailed("the QEMU command line is not known")
        (self.artifacts_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        bad = []
        for i, arg in enumerate(argv):
            if arg in ("-netdev", "-net", "-drive", "-blockdev", "-hda", "-hdb", "-cdrom", "-sd",
                       "-mtdblock", "-pflash", "-usb"):
                bad.append(arg)
            elif arg == "-nic" and (i + 1 >= len(argv) or argv[i + 1] != "none"):
                bad.append(arg)
            elif re.search(r"virtio-net|virtio-blk|virtio-scsi|e1000|rtl8139|vhost-net|nvme|"
                           r"usb-storage|scsi-hd|ide-hd|ide-cd", arg):
                bad.append(arg)
        if "-nodefaults" not in argv:
            bad.append("(missing -nodefaults: QEMU would add default devices)")
        if bad:
            raise StepFailed(f"QEMU command line has network/disk devices: {bad}")
        return "no network or disk device, -nodefaults"

    def _iso_host_vcpu_affinity(self, limit: float, tolerance: float) -> str:
        enclave = self.enclave
        pid = enclave.qemu_pid
        cpus = set(enclave.cpu_ids)
        vcpus = list(enclave.vcpu_thread_ids)
        if len(vcpus) != len(enclave.cpu_ids):
            raise StepFailed(f"{len(vcpus)} vCPU threads known, {len(enclave.cpu_ids)} configured")
        problems, seen = [], {}
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError as exc:
            raise StepFailed(f"cannot list QEMU {pid}'s threads: {exc.strerror}") from None
        for tid in tids:
            try:
                affinity = os.sched_getaffinity(tid)
            except OSError:
                continue  # the thread ended meanwhile
            seen[tid] = sorted(affinity)
            if tid in vcpus and not affinity <= cpus:
                problems.append(f"vCPU thread {tid} may run on {sorted(affinity)}, not only {sorted(cpus)}")
            if tid not in vcpus and affinity & cpus:
                problems.append(f"QEMU thread {tid} ({_thread_name(pid, tid)}) may run on enclave "
                                f"CPUs {sorted(affinity & cpus)}")
        missing = [t for t in vcpus if t not in tids]
        if missing:
            problems.append(f"vCPU threads {missing} are not threads of QEMU {pid}")
        # The harness's own per-enclave threads (device back ends, console reader) must stay off too.
        own = [getattr(b, "native_id", None) for b in getattr(enclave, "_backends", [])]
        with contextlib.suppress(Exception):
            own.append(enclave.console.native_id)
        for tid in filter(None, own):
            with contextlib.suppress(OSError):
                affinity = os.sched_getaffinity(tid)
                if affinity & cpus:
                    problems.append(f"harness thread {tid} ({_thread_name(os.getpid(), tid)}) may run "
                                    f"on enclave CPUs {sorted(affinity & cpus)}")
        (self.artifacts_dir / "affinity.json").write_text(json.dumps(
            {"enclave_cpus": sorted(cpus), "vcpu_threads": vcpus, "qemu_threads": seen}, indent=2) + "\n")
        if problems:
            raise StepFailed("; ".join(problems))
        others = len(set(seen) - set(vcpus))
        return f"vCPU threads {sorted(set(vcpus))} on {sorted(cpus)}; {others} other QEMU threads off them"

    def _iso_host_memory(self, limit: float, tolerance: float) -> str:
        enclave = self.enclave
        argv = " ".join(enclave.qemu_cmdline)
        if "prealloc=on" not in argv:
            raise StepFailed("guest memory is not preallocated (no prealloc=on on the memory backend)")
        try:
            status = Path(f"/proc/{enclave.qemu_pid}/status").read_text()
        except OSError as exc:
            raise StepFailed(f"cannot read QEMU's status: {exc.strerror}") from None
        fields = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", status, re.MULTILINE)}
        resident_mib = (fields.get("RssShmem", 0) + fields.get("HugetlbPages", 0)) / 1024
        want = enclave.memory_mib
        if resident_mib < want * 0.95:
            raise StepFailed(f"only {resident_mib:.0f} MiB of the {want} MiB guest memory is resident")
        seen = f"{resident_mib:.0f} MiB resident (prealloc)"
        if "mem-lock=on" in argv:
            locked_mib = fields.get("VmLck", 0) / 1024
            if locked_mib < want * 0.95:
                raise StepFailed(f"mem-lock=on but only {locked_mib:.0f} MiB locked of {want} MiB")
            seen += f", {locked_mib:.0f} MiB locked"
        return seen

    def _iso_peer_unreachable(self, limit: float, tolerance: float) -> str:
        # A second enclave from the same EIF; each tries to reach the other's CID, which the
        # vsock device must refuse (RST) whatever the port: only CID 3 is routed (SPEC 3).
        peer = self.factory.start(self.factory.config(eif=self.eif_path, **{
            k: v for k, v in self._settings().items() if k not in ("cid", "name", "cpu_ids")}))
        try:
            port = 5005
            mine = self._guest_connect_results([(peer.cid, port)], limit)
            theirs = self._guest_connect_results([(self.enclave.cid, port)], limit, peer)
        finally:
            peer.terminate()
        if mine.get(peer.cid) == "ok" or theirs.get(self.enclave.cid) == "ok":
            raise StepFailed(f"enclaves reached each other: {mine} / {theirs}")
        return f"CID {self.enclave.cid} -> {peer.cid}: {mine[peer.cid]}; back: {theirs[self.enclave.cid]}"


#: Isolation checks in the order they run; ``peer_unreachable`` (boots a second enclave) only on request.
ISOLATION_CHECKS = (
    "guest_network",
    "guest_block_devices",
    "guest_cpus",
    "guest_memory",
    "guest_vsock_cids",
    "host_cmdline",
    "host_vcpu_affinity",
    "host_memory",
    "peer_unreachable",
)


# --------------------------------------------------------------------------------------------
# Helpers


def _guest_attest_command(body: dict) -> str:
    parts = [GUEST_NSM_TOOL, "attest"]
    for key, flag in (("nonce", "--nonce"), ("user_data", "--user-data"), ("public_key", "--public-key")):
        if key in body:
            parts += [flag, body[key]]
    return " ".join(parts)


def _document_from_output(output: str) -> bytes | None:
    """The attestation document in a guest helper's output: JSON ``{"document": b64}``, or the
    longest base64 / hex token (COSE_Sign1 starts with 0x84 or tag 18 0xd2)."""
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError, TypeError):
                value = json.loads(line).get("document")
                if value:
                    return base64.b64decode(value)
    best = None
    for token in re.findall(r"[A-Za-z0-9+/=]{64,}", output):
        for decode in (bytes.fromhex, base64.b64decode):
            with contextlib.suppress(ValueError):
                data = decode(token)
                if data[:1] in (b"\x84", b"\xd2") and (best is None or len(data) > len(best)):
                    best = data
    return best


def _kms_outcome(res: Any, plaintext: bytes) -> tuple[str, str]:
    """allowed / denied / error from the guest kms_client's status and output."""
    found = re.search(r"^PLAINTEXT: (\S+)", res.output, re.MULTILINE)
    if res.status == 0 and found:
        try:
            got = base64.b64decode(found.group(1), validate=True)
        except ValueError:
            return "error", f"PLAINTEXT is not base64:\n{res.output}"
        if got != plaintext:
            return "error", f"PLAINTEXT decodes to {got!r}, not the encrypted {plaintext!r}"
        return "allowed", res.output
    if res.status != 0 and re.search(r"^kms_client: AccessDeniedException: ", res.output, re.MULTILINE):
        return "denied", res.output
    return "error", f"kms_client exited {res.status}:\n{res.output}"


#: vsock port the production-mode kms runner connects to on the parent (CID 3).
KMS_RUNNER_PORT = 7200

#: Application of the production-mode enclave of ``kms`` steps with ``from: production``: it
#: connects to the parent's vsock port, reads {"ca": PEM, "argv": [...]} until EOF, writes the CA
#: to /tmp/nitro-harness-kms-ca.pem, runs argv and answers {"status": n, "output": text}.
_KMS_RUNNER = (
    "import json, socket, subprocess, time\n"
    "while True:\n"
    "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
    "    try:\n"
    f"        s.connect((3, {KMS_RUNNER_PORT}))\n"
    "    except OSError:\n"
    "        s.close(); time.sleep(0.2); continue\n"
    "    data = b''\n"
    "    while True:\n"
    "        chunk = s.recv(65536)\n"
    "        if not chunk: break\n"
    "        data += chunk\n"
    "    job = json.loads(data)\n"
    "    open('/tmp/nitro-harness-kms-ca.pem', 'w').write(job['ca'])\n"
    "    p = subprocess.run(job['argv'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
    "    s.sendall(json.dumps({'status': p.returncode, 'output': p.stdout.decode('utf-8', 'replace')}).encode())\n"
    "    s.close()\n"
)


def _kms_policy(principal: str, pcr0: str) -> dict:
    """Key policy of a kms step: ``principal`` administers the key and may use it, except that
    ``kms:Decrypt`` needs ``kms:RecipientAttestation:ImageSha384`` equal to ``pcr0``."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ParentAdministers", "Effect": "Allow", "Principal": {"AWS": principal},
             "NotAction": "kms:Decrypt", "Resource": "*"},
            {"Sid": "DecryptOnlyFromTheImage", "Effect": "Allow", "Principal": {"AWS": principal},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0}}},
        ],
    }


def _clean_excerpt(text: str) -> str:
    """Drop the engine's "last console lines:" heading (the report has its own) and blank ends."""
    lines = text.strip("\n").splitlines()
    if lines and lines[0].strip().rstrip(":") == "last console lines":
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def _indent(text: str, limit: int = 40) -> str:
    lines = text.rstrip("\n").splitlines()
    if len(lines) > limit:
        lines = [f"... ({len(lines) - limit} lines before)"] + lines[-limit:]
    return "\n".join("    " + line for line in lines) if lines else "    <no output>"


def _tail_around(text: str, position: int, lines: int = 25) -> str:
    head = text[:position].splitlines()[-lines:]
    rest = text[position:].splitlines()[:3]
    return "\n".join(head[:-1] + rest) if head else "\n".join(rest)


def _received_excerpt(data: bytes | bytearray) -> str:
    if not data:
        return " (nothing received)"
    shown = bytes(data[-200:]).decode("utf-8", "replace")
    return f"; last bytes received: {shown!r}"


def _subset_mismatch(expected: Any, actual: Any, where: str) -> str | None:
    """Why ``actual`` does not contain ``expected`` (None if it does).

    Mappings: every expected key present and matching; lists: every expected item matches some
    actual item; a string expectation also matches a number equal to it (placeholders give strings).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected a mapping, got {_short(actual)}"
        for key, value in expected.items():
            if key not in actual:
                return f"{where}.{key}: missing (have {', '.join(map(str, actual))})"
            if (why := _subset_mismatch(value, actual[key], f"{where}.{key}")) is not None:
                return why
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{where}: expected a list, got {_short(actual)}"
        for n, item in enumerate(expected):
            if all(_subset_mismatch(item, have, where) is not None for have in actual):
                return f"{where}[{n}]: no item matches {_short(item)}"
        return None
    if isinstance(expected, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return None if expected == str(actual) else f"{where}: {actual!r} != {expected!r}"
    return None if expected == actual else f"{where}: {_short(actual)} != {_short(expected)}"
