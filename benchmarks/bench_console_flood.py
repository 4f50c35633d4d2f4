#!/usr/bin/env python3
"""Console flood benchmark: a guest printing without end must not grow the supervising process
or slow the CLI (docs/boot.md#console).

Boots ``benchmarks/recipes/console-flood.yaml`` (or ``--eif``) with the CLI's ``run-enclave
--debug-mode``; its application prints text lines and raw random bytes on the serial console as
fast as the serial port takes them. For ``--seconds`` (default 300), every ``--interval``
seconds (default 5), it samples the supervising process's RSS (``/proc/<pid>/status``) and CPU
time, the console log's size, and times one ``nitro-harness describe-enclaves`` (a new process,
as a user's script would run it, which must list the enclave as RUNNING). Then it times
``terminate-enclave``.

Output: a progress line per sample on stderr; at the end a table on stdout: RSS at the start
(after run-enclave returned), at the end and at most, its growth, the console bytes logged and
their rate, the supervisor's CPU share, describe-enclaves median and max, terminate-enclave's
time, and the verdicts the harness holds itself to: RSS growth under 5 MB (10^6 bytes) and every
describe-enclaves under 1 s. Exit status 0 when both hold, 1 when one does not, 2 when the
enclave could not be started or a describe-enclaves failed, 130 when interrupted. The enclave is
terminated on every path.

Usage::

    python benchmarks/bench_console_flood.py [--seconds 300] [--interval 5] [--eif PATH]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().parent / "recipes" / "console-flood.yaml"
RSS_GROWTH_LIMIT = 5_000_000  # bytes
DESCRIBE_LIMIT_S = 1.0


@dataclass
class Sample:
    at_s: float  # seconds since run-enclave returned
    rss: int  # supervisor RSS, bytes
    cpu_s: float  # supervisor user + system CPU seconds
    log_bytes: int  # console log size
    describe_s: float  # wall time of one describe-enclaves


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``nitro-harness ARGS`` from this checkout, as a new process."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--interval", type=float, default=5)
    parser.add_argument("--eif", type=Path, help="default: the console-flood recipe, built now")
    parser.add_argument("--memory", default="512")
    parser.add_argument("--json", type=Path, help="also write the samples and summary here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from harness.images.recipes import build_image
    from harness.registry import Registry

    eif = args.eif or build_image(RECIPE)
    name = f"console-flood-{os.getpid()}"
    run = cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", args.memory,
              "--debug-mode", "--enclave-name", name, timeout=600)
    if run.returncode != 0:
        print(f"run-enclave failed ({run.returncode}): {run.stderr.strip()}", file=sys.stderr)
        return 2
    enclave_id = json.loads(run.stdout)["EnclaveID"]
    status = 0
    samples: list[Sample] = []
    terminate_s = None
    try:
        record = Registry().find(enclave_id=enclave_id)
        pid, log = record.pid, Path(record.state_dir) / "console.log"
        started = time.monotonic()
        while True:
            now = time.monotonic()
            described = cli("describe-enclaves")
            describe_s = time.monotonic() - now
            mine = [e for e in json.loads(described.stdout or "[]") if e["EnclaveID"] == enclave_id] \
                if described.returncode == 0 else []
            if not mine or mine[0]["State"] != "RUNNING":
                print(f"describe-enclaves did not list the enclave as RUNNING: {described.stderr.strip()}",
                      file=sys.stderr)
                status = 2
                break
            sample = Sample(now - started, rss_bytes(pid), cpu_seconds(pid), log.stat().st_size, describe_s)
            samples.append(sample)
            print(f"{sample.at_s:6.0f} s  RSS {mb(sample.rss)}  console {mb(sample.log_bytes)}  "
                  f"describe-enclaves {describe_s:.3f} s", file=sys.stderr)
            if now - started >= args.seconds:
                break
            time.sleep(max(0.0, args.interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        status = 130
    finally:
        now = time.monotonic()
        done = cli("terminate-enclave", "--enclave-id", enclave_id)
        terminate_s = time.monotonic() - now
        if done.returncode != 0:
            print(f"terminate-enclave failed: {done.stderr.strip()}", file=sys.stderr)
            status = status or 2
    if len(samples) < 2:
        return status or 2
    first, last = samples[0], samples[-1]
    took = last.at_s - first.at_s
    describes = [s.describe_s for s in samples]
    growth = last.rss - first.rss
    summary = {
        "seconds": round(took, 1),
        "samples": len(samples),
        "rss_start": first.rss, "rss_end": last.rss, "rss_max": max(s.rss for s in samples),
        "rss_growth": growth,
        "console_bytes": last.log_bytes,
        "console_bytes_per_s": round((last.log_bytes - first.log_bytes) / took) if took else 0,
        "supervisor_cpu_share": round((last.cpu_s - first.cpu_s) / took, 3) if took else 0,
        "describe_median_s": round(statistics.median(describes), 3),
        "describe_max_s": round(max(describes), 3),
        "terminate_s": round(terminate_s, 2) if terminate_s is not None else None,
        "rss_growth_ok": growth < RSS_GROWTH_LIMIT,
        "describe_ok": max(describes) < DESCRIBE_LIMIT_S,
    }
    rows = [
        ("flood time (samples)", f"{took:.0f} s ({len(samples)})"),
        ("console bytes logged (rate)",
         f"{mb(last.log_bytes)} ({summary['console_bytes_per_s'] / 1e3:.0f} kB/s)"),
        ("supervisor RSS start / end / max",
         f"{mb(first.rss)} / {mb(last.rss)} / {mb(summary['rss_max'])}"),
        ("supervisor RSS growth (limit 5 MB)",
         f"{growth / 1e6:+.2f} MB: {'ok' if summary['rss_growth_ok'] else 'OVER'}"),
        ("supervisor CPU (share of one core)", f"{summary['supervisor_cpu_share'] * 100:.0f} %"),
        ("describe-enclaves median / max (limit 1 s)",
         f"{summary['describe_median_s']:.3f} s / {summary['describe_max_s']:.3f} s: "
         f"{'ok' if summary['describe_ok'] else 'OVER'}"),
        ("terminate-enclave", f"{terminate_s:.2f} s"),
    ]
    print("| measure | value |\n|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]},
                                        indent=2) + "\n")
    if status:
        return status
    return 0 if summary["rss_growth_ok"] and summary["describe_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
