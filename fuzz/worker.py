"""Fuzz one target with atheris (libFuzzer) for a number of inputs; ``fuzz/run.py`` starts it.

    python fuzz/worker.py TARGET --crashes DIR --report FILE [-runs=N ...] CORPUS...

The target's harness modules (and the pure-Python parsing libraries :data:`fuzz.targets.TARGETS`
names for it) are imported under atheris's coverage instrumentation. Each input gets the verdict
of :func:`fuzz.verdict.run_one`; a crash does not stop the run: the input is kept in
``--crashes`` (the first three of each kind, named ``<kind>-<sha1>``) and one JSON line
describing it is appended to ``--report``, then fuzzing goes on. libFuzzer's own ``-timeout``
is the backstop for an input stuck outside Python; when it fires the process ends, and
``run.py`` counts it and starts a new worker for the inputs left.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: the repository's harness and fuzz packages

import atheris  # noqa: E402 - after the path is set

from fuzz import verdict  # noqa: E402 - imports nothing of harness (kept uninstrumented)

KEEP_PER_KIND = 3


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--crashes", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--time-limit", type=float, default=None)
    args, libfuzzer_argv = parser.parse_known_args(argv[1:])

    from fuzz import targets

    if args.target not in targets.TARGETS:
        parser.error(f"unknown target {args.target!r} (known: {', '.join(targets.TARGETS)})")
    # Only what is imported inside the block is instrumented: the target imports the harness
    # and the parsing libraries it leans on (nothing imported them before).
    include = ["harness", f"fuzz.targets.{args.target}", *targets.TARGETS[args.target]]
    with atheris.instrument_imports(include=include):
        target = targets.load(args.target)

    kept: collections.Counter[str] = collections.Counter()
    args.crashes.mkdir(parents=True, exist_ok=True)

    def test_one_input(data: bytes) -> None:
        crash = verdict.run_one(target, data, args.time_limit)
        if crash is None:
            return
        name = verdict.input_name(data, crash)
        saved = None
        if kept[crash.signature] < KEEP_PER_KIND:
            kept[crash.signature] += 1
            path = args.crashes / name
            if not path.exists():
                path.write_bytes(data)
            saved = str(path)
        with open(args.report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"target": args.target, "kind": crash.kind, "where": crash.where,
                                "message": crash.message, "input": saved,
                                "traceback": crash.traceback if saved else None}) + "\n")

    atheris.Setup([argv[0], *libfuzzer_argv], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
