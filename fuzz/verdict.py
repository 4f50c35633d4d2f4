"""The verdict on one fuzz input: pass, or a crash (an undeclared exception, or a hang).

docs/fuzzing.md#what-counts-as-a-crash: a target's ``one_input(data)`` feeds ``data`` to one
parser; the exceptions its module documents (the target's ``DECLARED``) are that parser saying
no, and pass. Anything else that escapes is a crash, and so is an input that runs longer than
the per-input time limit (a hang). Needs no atheris: the unit tests replay seeds and crash
reproducers through :func:`run_one`.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: CPU seconds one input may use before it counts as a hang. The slowest inputs (a KMS
#: CreateKey of an RSA-4096 key, an attestation chain check) take well under a second.
DEFAULT_TIME_LIMIT_S = 10.0

FUZZ_DIR = Path(__file__).resolve().parent


class Hang(BaseException):
    """Raised in the main thread when an input runs past its time limit. A BaseException, so
    a parser's ``except Exception`` cannot swallow it."""


@dataclass(frozen=True)
class Crash:
    """One crashing input: ``kind`` (the exception's type name, or ``hang``), ``where`` (the
    innermost frame in the harness, ``file:line``), a one-line ``message`` and the
    ``traceback`` text."""

    kind: str
    where: str
    message: str
    traceback: str

    @property
    def signature(self) -> str:
        """What makes two crashes the same bug: the exception type and where it came from."""
        return f"{self.kind} at {self.where}"


def _innermost_harness_frame(tb) -> str:
    where = "?"
    for frame in traceback.extract_tb(tb):
        if frame.filename == __file__:
            continue  # the time limit's own handler
        if "/harness/" in frame.filename or "/fuzz/" in frame.filename:
            parts = Path(frame.filename).parts
            anchor = max(i for i, p in enumerate(parts) if p in ("harness", "fuzz"))
            where = f"{'/'.join(parts[anchor:])}:{frame.lineno}"
    return where


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`Hang` in the main thread once the process has used ``seconds`` of CPU
    time inside the block (ITIMER_PROF, SIGPROF). CPU time, so a loaded machine does not turn
    slow inputs into hangs, and SIGPROF, so libFuzzer's and pytest-timeout's wall-clock alarms
    (SIGALRM) stay theirs: they catch what waits without spinning. No limit when ``seconds``
    is None or off the main thread."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"input used more than {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def run_one(target: ModuleType, data: bytes, time_limit_s: float | None = None) -> Crash | None:
    """Run ``target.one_input(data)``; None when it returned or raised one of
    ``target.DECLARED``, else the :class:`Crash`. ``time_limit_s`` defaults to the target's
    ``TIME_LIMIT_S`` or :data:`DEFAULT_TIME_LIMIT_S`. KeyboardInterrupt propagates."""
    limit = time_limit_s or getattr(target, "TIME_LIMIT_S", DEFAULT_TIME_LIMIT_S)
    try:
        with time_limit(limit):
            target.one_input(data)
    except target.DECLARED:
        return None
    except Hang as err:
        return Crash("hang", _innermost_harness_frame(err.__traceback__), str(err),
                     "".join(traceback.format_exception(err)))
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - every undeclared exception is the finding
        text = str(err).strip().splitlines()
        return Crash(type(err).__name__, _innermost_harness_frame(err.__traceback__),
                     text[0][:200] if text else "", "".join(traceback.format_exception(err)))
    return None


def input_name(data: bytes, crash: Crash) -> str:
    """The file name a reproducer is kept under: ``<kind>-<sha1 of the input, 16 hex>``."""
    return f"{crash.kind.lower()}-{hashlib.sha1(data).hexdigest()[:16]}"
