"""What every set-up step shares: the options of the run, progress lines, commands, root.

A step is a function ``step(ctx) -> None`` that logs what it does (``"cached: ..."`` when there is
nothing to do, ``"would ..."`` in a dry run) and raises :class:`StepFailed` with a one-line reason
when it cannot finish. Standard library only: ``scripts/setup.sh`` runs the set-up from a clone
before the package's dependencies are installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: apt waits up to 10 minutes for another apt or dpkg to let go of its lock.
APT_WAIT = ["-o", "DPkg::Lock::Timeout=600"]


class StepFailed(Exception):
    """A step could not finish; the message is the one-line reason shown to the user."""


def _stderr_fd() -> int | None:
    """stderr's file descriptor, for a child's stdout (None when stderr has none: captured)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _stderr(line: str) -> None:
    sys.stderr.write(f"setup: {line}\n")
    sys.stderr.flush()


@dataclass
class Context:
    """The state of one ``nitro-harness setup`` run.

    ``python``: the interpreter that runs nitro-harness commands (doctor, images), which the
    python step may switch to a checkout's ``.venv``; ``cache``: the cache root
    (``$NITRO_HARNESS_CACHE`` or ``~/.cache/nitro-harness``); ``env``: the environment the
    steps read and pass on; ``images``: recipe names the images step builds; ``apt_update``:
    set when a step changed apt's sources, so the packages step refreshes the lists.
    """

    dry_run: bool = False
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    images: list[str] = field(default_factory=lambda: ["hello"])
    log: Callable[[str], None] = _stderr
    apt_update: bool = False

    @property
    def cache(self) -> Path:
        """The cache root every build shares (the same rule as the image cache and the QEMU search)."""
        explicit = self.env.get("NITRO_HARNESS_CACHE")
        return Path(explicit) if explicit else Path.home() / ".cache" / "nitro-harness"

    def flag(self, name: str) -> bool:
        """Whether environment variable ``name`` is set to ``1`` (SKIP_KERNEL, SKIP_IMAGES)."""
        return self.env.get(name, "0") == "1"

    def run(self, argv: Sequence[str], what: str, *, env: dict[str, str] | None = None) -> None:
        """Run ``argv`` with all its output on stderr (stdout stays clean); raise StepFailed
        ``"<what> failed (exit N)"`` when it exits non-zero or cannot start."""
        try:
            proc = subprocess.run(list(argv), env=env or self.env,
                                  stdout=_stderr_fd(), check=False)
        except OSError as e:
            raise StepFailed(f"{what}: cannot run {argv[0]}: {e.strerror or e}") from None
        if proc.returncode != 0:
            raise StepFailed(f"{what} failed (exit {proc.returncode})")

    def output(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
               cwd: str | None = None, stderr: int | None = subprocess.PIPE) -> tuple[int, str]:
        """Run ``argv`` (in ``cwd``; its stderr dropped, or shown with ``stderr=None``); return
        its exit status and stdout (127 and "" when it cannot start)."""
        try:
            proc = subprocess.run(list(argv), env=env or self.env, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, check=False, cwd=cwd)
        except OSError:
            return 127, ""
        return proc.returncode, proc.stdout

    def as_root(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as root: unchanged when already root, else through sudo. Raises StepFailed
        when neither is possible."""
        if os.geteuid() == 0:
            return list(argv)
        if shutil.which("sudo"):
            return ["sudo", *argv]
        raise StepFailed(f"'{shlex.join(argv)}' needs root and sudo is not installed: "
                         "run nitro-harness setup as root")

    def need_apt(self) -> None:
        """Raise StepFailed unless this is a Debian host with apt-get (the set-up supports Debian
        bookworm hosts)."""
        if shutil.which("apt-get", path=self.env.get("PATH")) is None:
            raise StepFailed("apt-get not found: nitro-harness set-up supports Debian (bookworm) hosts")

    def harness_command(self, *args: str) -> list[str]:
        """The nitro-harness command line with the interpreter the python step settled on."""
        return [self.python, "-m", "harness.cli", *args]
