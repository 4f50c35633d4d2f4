"""Fuzz target: the scenario loader, on any YAML file a user points the runner at.

One input is one scenario file. :func:`harness.scenario.load_scenarios` reads it (YAML with
line numbers, every document checked against the schema, placeholders, matrix expansion,
kernel and architecture twins for both kernels and both architectures (a twin's recipe
looked up by name), every case rendered as YAML to drop duplicates);
docs/scenarios.md. Nothing boots. Declared errors: ``NitroError``
(``ScenarioError``, E03, naming file, line and key; E19 for an unreadable file).
"""

from __future__ import annotations

from harness.errors import NitroError
from harness.scenario import load_scenarios

from fuzz.scratch import MemFile

NAME = "scenario"
DECLARED = (NitroError,)
#: The shipped scenarios are 0.8-4 KiB.
MAX_LEN = 8192

_FILE = MemFile("fuzz-scenario.yaml")


def one_input(data: bytes) -> None:
    """Load ``data`` as a scenario file on both kernels and both architectures."""
    load_scenarios(_FILE.holding(data), kernels=("nitro", "debian"), arches=("x86_64", "aarch64"))
