"""The fuzz targets: one module per parser that takes outside input (docs/fuzzing.md#targets).

Each module defines ``NAME``, ``DECLARED`` (the exception types its parser documents for input
it refuses), ``one_input(data: bytes)`` (feed one input to the parser) and ``MAX_LEN`` (the
longest input the fuzzer generates); optionally ``TIME_LIMIT_S``. None of them imports atheris.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Target name -> pure-Python parsing libraries its parser leans on, instrumented for coverage
#: along with the harness (fuzz/worker.py), in the order the table lists the targets.
TARGETS: dict[str, tuple[str, ...]] = {
    "eif": ("cbor2",),
    "cpio": (),
    "docker_archive": ("tarfile", "gzip"),
    "nsm": ("cbor2",),
    "attestation": ("cbor2",),
    "cms": ("asn1crypto",),
    "kms": ("http.server", "http.client", "email", "botocore.auth"),
    "vsock": (),
    "virtqueue": (),
    "scenario": ("yaml", "jsonschema"),
}


def load(name: str) -> ModuleType:
    """The target module called ``name``; KeyError naming the known ones otherwise."""
    if name not in TARGETS:
        raise KeyError(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.targets.{name}")
