"""What goes wrong in a scenario: a malformed file, a failed step, a step this host cannot run."""

from __future__ import annotations

import contextlib
from pathlib import Path

from harness.errors import ErrorCode, NitroError


def display_path(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


class ScenarioError(NitroError):
    """A malformed scenario: ``path:line: key: rule`` (E03 InvalidArgument, exit status 3).

    ``path`` and ``line`` (1-based, or None when unknown) locate the offending key; raised by
    :func:`harness.scenario.load_scenarios` before anything boots.
    """

    def __init__(self, path: Path | str, line: int | None, message: str):
        where = f"{display_path(path)}:{line}" if line else f"{display_path(path)}"
        super().__init__(ErrorCode.InvalidArgument, f"{where}: {message}")
        self.path = Path(path)
        self.line = line


class StepFailed(AssertionError):
    """A step's expectation did not hold: ``message`` says what, ``excerpt`` the console's tail.

    An ``AssertionError`` so pytest reports it as a test failure, not an error in the harness.
    ``error`` is the engine's exception behind it, if any (``expect_failure`` reads its code).
    """

    def __init__(self, message: str, excerpt: str = "", error: BaseException | None = None):
        super().__init__(message)
        self.message = message
        self.excerpt = excerpt
        self.error = error


class StepSkipped(Exception):
    """A step cannot run on this host or yet (for example ``attest`` without the harness NSM)."""
