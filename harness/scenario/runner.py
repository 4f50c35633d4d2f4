"""Running one scenario case: deadlines, placeholders, booting on demand, the step loop.

:class:`ScenarioRunner` drives ``harness.enclave`` through an :class:`EnclaveFactory` and is
shared by the pytest plugin and ``nitro-harness run``; neither front imports the other. What
each step kind does lives in :mod:`harness.scenario.steps` (one module per kind, found through
its registry). Timeouts follow LAVA's scenario/step levels: every wait is cut to what is left of
the scenario.
"""

from __future__ import annotations

import contextlib
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from harness.console import ExecResult
from harness.enclave_factory import DEFAULT_ENCLAVE, EnclaveFactory, RunningEnclave, resolve_eif
from harness.errors import NitroError
from harness.scenario.errors import StepFailed, StepSkipped, display_path
from harness.scenario.loader import PLACEHOLDER_RE, Scenario, line_of
from harness.scenario.results import ScenarioResult, Status, StepResult
from harness.scenario.steps import registry
from harness.scenario.steps.registry import StepCall, step_kind, step_label

T = TypeVar("T")

#: ``close()`` callbacks steps register (:meth:`ScenarioRunner.on_close`): each returns problems.
Cleanup = Callable[[], list[str]]


class ScenarioRunner:
    """Runs one :class:`Scenario` case against the engine and returns a :class:`ScenarioResult`.

    ``factory`` starts and finally terminates the enclaves; ``artifacts_dir`` receives the
    expanded scenario, attestation documents and the enclaves' files; ``on_step(event, result)``
    is called with ``"start"`` and ``"end"`` for each step (the CLI's live lines); ``eif_dirs``
    are folders a relative ``eif:`` path is tried against after the scenario file's own (pytest's
    rootdir, or the current folder for ``nitro-harness run``). The enclave
    boots before the first step that needs one. Step and scenario timeouts (LAVA-style) cap every
    wait; a failure stops the scenario (later steps are not run).

    What step modules use: ``enclave`` (None until booted, again after ``terminate``),
    ``cursor`` (absolute console position after the last matched expectation), ``deadline``
    (``time.monotonic()`` value the scenario must end by), ``saved`` (``${name}`` values of cli
    steps' ``save:``), ``services`` (the case's :class:`~harness.scenario.services.ScenarioServices`,
    started before the first step, or None), ``expecting`` (depth of ``expect_failure`` steps
    being run), and the methods below.
    """

    def __init__(self, scenario: Scenario, factory: EnclaveFactory, *, artifacts_dir: Path,
                 on_step: Callable[[str, StepResult], None] | None = None,
                 eif_dirs: Sequence[Path] = ()):
        self.scenario = scenario
        self.eif_dirs = [Path(d) for d in eif_dirs]
        self.factory = factory
        self.artifacts_dir = Path(artifacts_dir)
        self.on_step = on_step or (lambda event, result: None)
        self.enclave: RunningEnclave | None = None
        self.booted = False
        self.eif_path: Path | None = None
        self.cursor = 0
        self.deadline = 0.0
        self.saved: dict[str, Any] = {}
        self.services: Any = None  # harness.scenario.services.ScenarioServices with a services: block
        self.expecting = 0
        self._cleanups: list[Cleanup] = []
        self._state: dict[str, Any] = {}
        self._counters: dict[str, int] = {}

    # -- public

    def run(self) -> ScenarioResult:
        """Run every step; never raises for a step failure (see the result), always cleans up."""
        result = ScenarioResult(self.scenario, artifacts=self.artifacts_dir)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        (self.artifacts_dir / "scenario.yaml").write_text(self.scenario.to_yaml())
        started = time.monotonic()
        self.deadline = started + self.scenario.timeout
        try:
            from harness.scenario.services import start_services

            self.services = start_services(self)
            self.run_steps(self.scenario.steps, result, ["steps"])
            result.status = Status.PASSED
        except StepSkipped as skip:
            result.status, result.message = Status.SKIPPED, str(skip)
        except StepFailed as failure:
            result.status = Status.FAILED
            result.message = failure.message
            result.excerpt = failure.excerpt or self.console_tail()
        except NitroError as err:  # the engine refused or failed outside an expectation
            result.status = Status.FAILED
            result.message = str(err)
            result.excerpt = err.details or self.console_tail()
        except Exception as exc:  # a bug (ours or the engine's): report it, keep the traceback
            trace = self._keep_traceback()
            result.status = Status.FAILED
            result.message = f"internal error: {type(exc).__name__}: {exc} (traceback in {trace})"
            result.excerpt = self.console_tail()
        finally:
            problems = self.factory.close()
            for cleanup in self._cleanups:
                problems += cleanup()
            result.elapsed = time.monotonic() - started
            if problems and result.status != Status.FAILED:
                result.status, result.message = Status.FAILED, "; ".join(problems)
        if result.status == Status.FAILED:
            result.timeline = kept_timeline(self.artifacts_dir)
            excerpt = result.excerpt
            if result.timeline:  # the report shows the whole timeline: drop a boot error's tail of it
                excerpt = excerpt.split("\nboot timeline, last phases", 1)[0]
            result.excerpt = _clean_excerpt(excerpt) or kept_console_tail(self.artifacts_dir)
        return result

    # -- the step loop

    def run_steps(self, steps: list[dict], result: ScenarioResult, at: list[Any], prefix: str = "") -> None:
        """Run ``steps`` in order, recording each in ``result`` (numbers ``prefix`` + 1, 2, ...).

        ``at`` is their path in the scenario document (for lines). Raises StepFailed, with the
        step's file, line, number and label, on the first failure; StepSkipped as it comes.
        """
        for index, step in enumerate(steps):
            kind, body = step_kind(step)
            line = line_of(self.scenario.data, at + [index])
            record = StepResult(index=len(result.steps), kind=kind, label=step_label(step), line=line,
                                number=f"{prefix}{index + 1}")
            result.steps.append(record)
            self.on_step("start", record)
            where = f"{display_path(self.scenario.path)}:{line}: step {record.number} ({record.label})"
            t0 = time.monotonic()
            try:
                self._run_step(kind, body, StepCall(body, 0.0, at + [index, kind], record.number, result))
                record.status = Status.PASSED
            except StepSkipped as skip:
                record.status, record.message = Status.SKIPPED, str(skip)
                raise
            except StepFailed as failure:
                record.status, record.message = self._failed_status(), failure.message
                failure.message = f"{where} failed: {failure.message}"
                raise
            except NitroError as err:
                record.status, record.message = self._failed_status(), str(err)
                raise StepFailed(f"{where} failed: {err}", err.details or self.console_tail(), err) from None
            except Exception as exc:  # a bug (ours or the engine's): keep the traceback as an artifact
                trace = self._keep_traceback()
                record.status = Status.FAILED
                record.message = f"internal error: {type(exc).__name__}: {exc}"
                raise StepFailed(f"{where} failed: internal error: {type(exc).__name__}: {exc} "
                                 f"(traceback in {trace})", self.console_tail(), exc) from None
            finally:
                record.elapsed = time.monotonic() - t0
                self.on_step("end", record)

    def _failed_status(self) -> Status:
        # Inside expect_failure a failure is what the step is for; the outer step turns it back
        # into "failed" if it was the wrong failure.
        return Status.XFAILED if self.expecting else Status.FAILED

    def _run_step(self, kind: str, body: dict, call: StepCall) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StepFailed(f"scenario timeout of {self.scenario.timeout:g} s reached")
        call.limit = min(float(body.get("timeout", self.scenario.step_timeout)), remaining)
        call.body = self._substitute(body)
        step = registry.get(kind)
        if step.needs_enclave:
            self.ensure_enclave()
        step.run(self, call)

    def _keep_traceback(self) -> Path:
        trace = self.artifacts_dir / "traceback.txt"
        trace.write_text(traceback.format_exc())
        return trace

    # -- the enclave

    def settings(self) -> dict[str, Any]:
        """The scenario's enclave settings (defaults filled in), a copy."""
        return dict(self.scenario.enclave)

    def eif_bases(self) -> list[Path]:
        """Folders a relative ``eif:`` path is tried against, in order: the scenario file's,
        then ``eif_dirs``."""
        return [self.scenario.path.parent, *self.eif_dirs]

    def scenario_eif(self) -> Path:
        """The EIF of the scenario's ``image`` (built on first use) or ``eif``; kept once known."""
        if self.eif_path is None:
            data = self.scenario.data
            eif = self._substitute(data["eif"]) if data.get("eif") else None  # ${artifacts}/app.eif
            self.eif_path = resolve_eif(data.get("image"), eif, self.eif_bases())
        return self.eif_path

    def boot(self, limit: float, eif: Path | None = None, debug_mode: bool | None = None) -> RunningEnclave:
        """Start the scenario's enclave (of ``eif`` and ``debug_mode`` when given, for this boot
        only); its heartbeat wait is cut to ``limit`` seconds.

        Raises StepFailed when it already runs, the engine's NitroError when it cannot start.
        """
        if self.enclave is not None and self.enclave.running:
            raise StepFailed("boot: the scenario's enclave is already running")
        eif = eif or self.scenario_eif()
        settings = self.settings() | ({} if debug_mode is None else {"debug_mode": debug_mode})
        # The boot is part of the step that needs it: the heartbeat wait (nitro-cli's formula
        # unless the scenario sets one) is cut to what is left of the scenario.
        from harness.enclave import heartbeat_timeout

        wait = settings.get("heartbeat_timeout") or heartbeat_timeout(
            eif.stat().st_size, int(settings.get("memory_mib", DEFAULT_ENCLAVE["memory_mib"])))
        # Never cut below a second (no boot fits in less), unless the scenario asks for less.
        settings["heartbeat_timeout"] = max(min(1.0, float(wait)), min(float(wait), limit))
        self.booted = True
        self.cursor = 0
        self.enclave = None
        self.enclave = self.factory.start(self.factory.config(eif=eif, **settings))
        return self.enclave

    def ensure_enclave(self) -> RunningEnclave:
        """The running enclave, booted now (with what is left of the scenario) if not yet.

        Raises StepFailed when it booted before and is gone (failed or terminated).
        """
        if self.enclave is None:
            if self.booted:
                raise StepFailed("the enclave is not running (it failed to boot or was terminated; "
                                 "use a 'boot' step to start it again)")
            return self.boot(self.deadline - time.monotonic())
        return self.enclave

    def exec(self, command: str, timeout: float, enclave: RunningEnclave | None = None) -> ExecResult:
        """Run ``command`` in ``enclave`` (default: the scenario's) over its console shell.

        A console failure or timeout becomes StepFailed with the console excerpt.
        """
        from harness.console import ConsoleError

        try:
            return (enclave or self.ensure_enclave()).exec(command, timeout=timeout)
        except ConsoleError as exc:
            raise StepFailed(f"exec {command!r}: {exc}", exc.excerpt, exc) from None

    def console_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the running enclave's console ("" without one)."""
        if self.enclave is None or getattr(self.enclave, "machine", True) is None:
            return ""
        with contextlib.suppress(Exception):
            text = self.enclave.console.text()
            return "\n".join(text.rstrip("\n").splitlines()[-lines:])
        return ""

    # -- what steps keep between them

    def on_close(self, cleanup: Cleanup) -> None:
        """Call ``cleanup`` when the case ends (after its enclaves are terminated); the
        problems it returns fail a case that otherwise passed."""
        self._cleanups.append(cleanup)

    def state(self, key: str, make: Callable[[], T]) -> T:
        """A step kind's own object for this case: ``make()`` on first use, the same later."""
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    def next_number(self, key: str) -> int:
        """1, 2, 3, ... per ``key`` over the case (numbering of artifact files)."""
        self._counters[key] = self._counters.get(key, 0) + 1
        return self._counters[key]

    # -- placeholders

    def _vars(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "artifacts": str(self.artifacts_dir),
            "scenario": self.scenario.name,
            "scenario_dir": str(self.scenario.path.parent.resolve()),
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
        """``node`` with ``${name}`` replaced (nested ``steps`` are left for their own turn).

        ``${eif}`` builds or finds the EIF when nothing booted yet; any other name without a
        value yet (``${cid}`` before the boot) is StepFailed.
        """
        if isinstance(node, dict):
            return {k: (v if k == "steps" else self._substitute(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._substitute(v) for v in node]
        if isinstance(node, str) and "${" in node:
            values = self._vars()

            def repl(match: re.Match) -> str:
                name = match.group(1)
                if "." in name:  # ${eif.pcr0}, ${kms.endpoint}: services/placeholders.py
                    from harness.scenario.services.placeholders import dotted_value

                    return dotted_value(self, name)
                if name not in values:
                    if name == "eif" and self.eif_path is None:
                        return str(self.scenario_eif())
                    raise StepFailed(f"${{{name}}} has no value yet (the enclave has not booted)")
                return str(values[name])

            return PLACEHOLDER_RE.sub(repl, node)
        return node


def _clean_excerpt(text: str) -> str:
    """Drop the engine's "last console lines:" heading (the report has its own) and blank ends."""
    lines = text.strip("\n").splitlines()
    if lines and lines[0].strip().rstrip(":") == "last console lines":
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def kept_console_tail(artifacts_dir: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of the newest console log kept in ``artifacts_dir`` ("" without
    one): a boot that failed leaves no Enclave object, only its artifacts."""
    logs = sorted(artifacts_dir.glob("*/console.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    text = logs[-1].read_text(encoding="utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def kept_timeline(artifacts_dir: Path) -> list[str]:
    """The newest boot-timeline.json kept in ``artifacts_dir`` (docs/boot.md#boot-timeline): its
    path, then one line per phase; [] without one (or when it cannot be read)."""
    from harness.boot_timeline import FILE_NAME, format_phases, load_phases

    kept = sorted(artifacts_dir.glob(f"*/{FILE_NAME}"), key=lambda p: p.stat().st_mtime)
    try:
        return [str(kept[-1]), *format_phases(load_phases(kept[-1]))] if kept else []
    except (OSError, ValueError):
        return []
