"""Fuzz every target (or the named ones) for N inputs each and print the table.

    python fuzz/run.py [--runs N] [--json FILE] [--seed S] [TARGET ...]

For each target a worker (``fuzz/worker.py``, atheris) runs N inputs starting from the seeds in
``fuzz/seeds/<target>/`` (new corpus entries go to a temporary folder, removed afterwards);
crashing inputs are kept in ``fuzz/crashes/<target>/``. A worker that libFuzzer ends (an input
stuck past the wall-clock backstop, memory past the limit, a fatal signal) counts as one crash
and a new worker runs the inputs left. The table (target, inputs, crashes, crash kinds, wall
time, inputs per second) is printed when all targets are done, each target's line as it
finishes; ``--json`` writes the same rows (and every crash: kind, where, message, input file)
after each target. Exits 1 if any target crashed, 2 on a usage error. docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.targets import TARGETS  # noqa: E402 - after the path is set

FUZZ = ROOT / "fuzz"
#: libFuzzer's wall-clock limit for one input: the backstop behind the verdict's CPU-time limit.
BACKSTOP_S = 60
#: Memory one worker may use (MiB): Python, atheris and the harness take about 150.
RSS_LIMIT_MB = 3072
#: Workers started for one target before giving up on it (each crash of the process ends one).
MAX_WORKERS = 20

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)


def _max_len(name: str) -> int:
    from fuzz.targets import load

    return load(name).MAX_LEN


def run_target(name: str, runs: int, *, seed: int | None, time_limit: float | None,
               log_dir: Path) -> dict:
    """Fuzz target ``name`` for ``runs`` inputs; returns its row of the table."""
    seeds = FUZZ / "seeds" / name
    crashes = FUZZ / "crashes" / name
    report = log_dir / f"{name}.crashes.jsonl"
    report.unlink(missing_ok=True)
    log = log_dir / f"{name}.log"
    start = time.monotonic()
    done = 0
    process_crashes: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=f"nitro-fuzz-{name}-") as corpus:
        for attempt in range(MAX_WORKERS):
            left = runs - done
            if left <= 0:
                break
            crashes.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(FUZZ / "worker.py"), name, "--crashes", str(crashes),
                   "--report", str(report), f"-runs={left}", f"-max_len={_max_len(name)}",
                   f"-timeout={BACKSTOP_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
                   f"-artifact_prefix={crashes}/", "-print_final_stats=0"]
            if time_limit:
                cmd.append(f"--time-limit={time_limit}")
            if seed is not None:
                cmd.append(f"-seed={seed + attempt}")
            cmd += [corpus, str(seeds)]
            with open(log, "a", encoding="utf-8") as out:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            text = log.read_text(encoding="utf-8", errors="replace").rsplit("$ ", 1)[-1]
            finished = _DONE.search(text)
            ran = int(finished.group(1)) if finished else max(
                (int(n) for n in _PROGRESS.findall(text)), default=0)
            done += ran
            if proc.returncode == 0 and finished:
                break
            # libFuzzer ended the worker: that input is a crash (its artifact is in crashes/).
            tail = [line for line in text.splitlines() if "==" in line or "ERROR" in line
                    or "ALARM" in line or "Test unit written" in line]
            process_crashes.append({"target": name, "kind": f"worker-exit-{proc.returncode}",
                                    "where": "libFuzzer", "message": " | ".join(tail[-3:])[:300],
                                    "input": None})
            done += 1
    if crashes.is_dir() and not any(crashes.iterdir()):
        crashes.rmdir()  # nothing kept: no empty folder left in the checkout
    found = [json.loads(line) for line in report.read_text().splitlines()] \
        if report.exists() else []
    found += process_crashes
    kinds = sorted({f"{c['kind']} at {c['where']}" for c in found})
    wall = time.monotonic() - start
    return {"target": name, "inputs": done, "crashes": len(found), "kinds": kinds,
            "wall_s": round(wall, 1), "inputs_per_s": round(done / wall) if wall else 0,
            "found": found}


def table(rows: list[dict]) -> str:
    """The table as text: one line per target and a total line."""
    head = f"{'target':<16} {'inputs':>10} {'crashes':>8} {'kinds':>6} {'wall s':>9} {'inputs/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['target']:<16} {r['inputs']:>10,} {r['crashes']:>8} {len(r['kinds']):>6} "
                     f"{r['wall_s']:>9.1f} {r['inputs_per_s']:>9,}")
    total_wall = sum(r["wall_s"] for r in rows)
    lines.append(f"{'total':<16} {sum(r['inputs'] for r in rows):>10,} "
                 f"{sum(r['crashes'] for r in rows):>8} {sum(len(r['kinds']) for r in rows):>6} "
                 f"{total_wall:>9.1f}")
    for r in rows:
        for kind in r["kinds"]:
            lines.append(f"  {r['target']}: {kind}")
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"targets to run (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--runs", type=int, default=10000, help="inputs per target (default 10000)")
    parser.add_argument("--json", type=Path, help="also write the rows and crashes as JSON here")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--time-limit", type=float,
                        help="CPU seconds per input before it counts as a hang (default: the "
                             "target's, else 10)")
    parser.add_argument("--logs", type=Path, help="keep the workers' logs here (default: a "
                        "temporary folder, removed)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        import atheris  # noqa: F401
    except ImportError:
        parser.error("atheris is not installed: pip install -e '.[fuzz]'")
    names = args.targets or list(TARGETS)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="nitro-fuzz-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "commit": _commit(), "runs": args.runs, "cpus": os.cpu_count()}
    rows: list[dict] = []
    try:
        for name in names:
            row = run_target(name, args.runs, seed=args.seed, time_limit=args.time_limit,
                             log_dir=log_dir)
            rows.append(row)
            print(f"{name}: {row['inputs']:,} inputs, {row['crashes']} crashes, "
                  f"{row['wall_s']:.1f} s", flush=True)
            if args.json:
                args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    finally:
        if args.logs is None:
            shutil.rmtree(log_dir, ignore_errors=True)
    print()
    print(table(rows))
    return 1 if any(r["crashes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
