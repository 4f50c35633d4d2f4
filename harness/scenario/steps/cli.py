"""``cli``: run ``nitro-harness ARGS...`` as a subprocess; check its exit status, output and JSON.

cli steps get a runtime directory of their own (``NITRO_HARNESS_RUNTIME_DIR``): they see the
enclaves they start, ``terminate-enclave --all`` never reaches enclaves of other tests or
users, and whatever they leave running is terminated when the case ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.enclave_factory import wait_dead
from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register
from harness.scenario.steps.report import indent, subset_mismatch

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


class CliRuntime:
    """The private runtime directory of one case's cli steps, created on first use."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def env(self) -> dict[str, str]:
        """The environment of a cli step: this process's, with the private runtime directory."""
        # A short path under /tmp keeps the Unix sockets inside it below the 108-byte limit.
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="nh-rt-"))
        return dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(self.folder))

    def close(self) -> list[str]:
        """Terminate what cli steps left running, check their processes ended, remove the folder.

        Returns the problems found (a failed ``terminate-enclave --all``, surviving processes).
        """
        if self.folder is None:
            return []
        problems = []
        from harness.registry import Registry

        records = Registry(self.folder).records()
        if records:
            proc = subprocess.run([sys.executable, "-m", "harness.cli", "terminate-enclave", "--all"],
                                  capture_output=True, text=True, env=self.env(), timeout=120)
            if proc.returncode != 0:
                problems.append(f"terminate-enclave --all after the scenario exited {proc.returncode}: "
                                f"{proc.stderr.strip()}")
        for record in records:
            for pid in (record.pid, record.qemu_pid):
                if pid and wait_dead(pid, 30):
                    problems.append(f"process {pid} of enclave {record.enclave_id} survived")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None
        return problems


def _runtime(runner: ScenarioRunner) -> CliRuntime:
    def make() -> CliRuntime:
        runtime = CliRuntime()
        runner.on_close(runtime.close)
        return runtime

    return runner.state("cli", make)


def label(body: dict[str, Any]) -> str:
    """The arguments, space-separated."""
    return " ".join(str(a) for a in body.get("args", []))


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Run ``nitro-harness`` with ``args`` within the step's limit (logged to ``cli.log``).

    StepFailed when it does not finish, its status is not ``status`` (default 0), ``stdout`` /
    ``stdout_not`` / ``stderr`` regexes fail, or its JSON stdout does not contain ``json``;
    ``save: {name: key}`` keeps fields of that JSON as ``${name}`` placeholders.
    """
    body, limit = call.body, call.limit
    argv = [sys.executable, "-m", "harness.cli", *[str(a) for a in body["args"]]]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit,
                              stdin=subprocess.DEVNULL, env=_runtime(runner).env())
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"`nitro-harness {' '.join(argv[3:])}` did not finish within {limit:g} s; "
                         f"stderr: {exc.stderr!r}") from None
    with open(runner.artifacts_dir / "cli.log", "a", encoding="utf-8") as log:
        log.write(f"$ nitro-harness {shlex.join(argv[3:])}\n[exit {proc.returncode}]\n"
                  f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}\n")
    shown = f"\nstdout:\n{indent(proc.stdout)}\nstderr:\n{indent(proc.stderr)}"
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
        mismatch = subset_mismatch(body.get("json", {}), actual, "stdout")
        if mismatch:
            raise StepFailed(f"{mismatch}{shown}")
        for name, key in (body.get("save") or {}).items():
            if not isinstance(actual, dict) or key not in actual:
                raise StepFailed(f"save.{name}: the JSON output has no key {key!r}{shown}")
            runner.saved[name] = actual[key]


STEP = register("cli", needs_enclave=False, label=label, run=run)
