"""``nitro-harness run PATH...``: run YAML scenarios without writing Python.

Same engine and runner as the pytest plugin (:mod:`harness.scenario`). Every file is validated
before anything boots (a malformed scenario is E03 with file:line). While running, one line per
step is printed (stderr) with its result and elapsed time; at the end a summary table (stdout)
and, for each failed case, the failure report with the console excerpt and artifacts path.
``--junitxml`` writes a JUnit XML report (one testcase per scenario case), ``--json`` the
results as JSON. Exit status: 0 when no case failed (skips allowed), 1 when any failed (as
pytest); usage and schema errors exit with their nitro-cli code (E01/E03).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from harness import scenario as scn
from harness.cli import progress
from harness.enclave_factory import EnclaveFactory
from harness.errors import ErrorCode, NitroError

#: Exit status when at least one scenario case failed (pytest's convention).
EXIT_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` command."""
    parser = subparsers.add_parser(
        "run", help="run YAML scenarios (files or folders of *.yaml)",
        description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="scenario file or folder")
    parser.add_argument("--junitxml", metavar="FILE", help="write a JUnit XML report")
    parser.add_argument("--json", metavar="FILE", dest="json_file", help="write results as JSON")
    parser.add_argument("--qemu", metavar="PATH", help="QEMU binary (default: the doctor's choice)")
    parser.add_argument("--accel", choices=("kvm", "tcg"), help="accelerator (default: the doctor's choice)")
    parser.add_argument("--kernel", action="append", choices=scn.KERNELS, dest="kernels",
                        help="run every case on this kernel (repeatable; default nitro): nitro = the "
                             "harness's Nitro-style kernel, debian = Debian's cloud kernel (recipe <image>-debian)")
    parser.add_argument("--arch", action="append", choices=scn.ARCHES, dest="arches",
                        help="run every case on this architecture (repeatable; default x86_64): "
                             "aarch64 = Graviton, the recipe <image>-arm64 on QEMU's virt machine")
    parser.add_argument("--artifacts-dir", metavar="DIR",
                        help="where per-case artifacts folders go (default: a new temporary folder)")
    parser.add_argument("--keep-artifacts", action="store_true",
                        help="keep artifacts of passing cases too (failed cases always keep theirs)")
    parser.add_argument("-k", dest="select", metavar="TEXT",
                        help="run only cases whose id contains TEXT")
    parser.set_defaults(func=run_command)


def _scenario_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise NitroError(ErrorCode.InvalidArgument, f"{path}: no *.yaml scenario in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise NitroError(ErrorCode.FileOperationFailure, f"{path}: no such scenario file or folder")
    return files


def run_command(args: argparse.Namespace) -> int:
    """Validate every scenario, run each case, report; return 0 or :data:`EXIT_FAILED`."""
    kernels = list(dict.fromkeys(args.kernels or ["nitro"]))
    arches = list(dict.fromkeys(args.arches or ["x86_64"]))
    cases = [case for path in _scenario_files(args.paths)
             for case in scn.load_scenarios(path, kernels=kernels, arches=arches)]
    if args.select:
        cases = [c for c in cases if args.select in c.id]
    if not cases:
        if args.select:
            raise NitroError(ErrorCode.InvalidArgument, f"no scenario case matches -k {args.select!r}")
        raise NitroError(ErrorCode.InvalidArgument,
                         f"no scenario case runs on kernel {', '.join(kernels)} and architecture "
                         f"{', '.join(arches)} (an aarch64 case needs its image's <image>-arm64 "
                         "recipe)")
    root = Path(args.artifacts_dir) if args.artifacts_dir else Path(tempfile.mkdtemp(prefix="nitro-harness-run-"))
    root.mkdir(parents=True, exist_ok=True)
    progress(f"running {len(cases)} scenario case(s); artifacts under {root}")
    results = []
    skip_cache: dict[tuple[str, str], str | None] = {}
    for number, case in enumerate(cases, 1):
        results.append(_run_case(case, number, len(cases), root, args, skip_cache))
    _print_summary(results)
    if args.junitxml:
        write_junit(results, Path(args.junitxml))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    if not args.artifacts_dir and not any(r.artifacts and r.artifacts.exists() for r in results):
        shutil.rmtree(root, ignore_errors=True)
    return EXIT_FAILED if any(r.status == scn.Status.FAILED for r in results) else 0


def _run_case(case: scn.Scenario, number: int, total: int, root: Path, args: argparse.Namespace,
              skip_cache: dict[tuple[str, str], str | None]) -> scn.ScenarioResult:
    where = f"{scn.display_path(case.path)}:{case.line}"
    progress(f"[{number}/{total}] {case.id} ({where})")
    for requirement in case.requires:
        key = (requirement, case.arch)
        if key not in skip_cache:
            skip_cache[key] = scn.requirement_skip_reason(requirement, qemu=args.qemu,
                                                          accel=args.accel, arch=case.arch)
        if skip_cache[key]:
            result = scn.ScenarioResult(case, status=scn.Status.SKIPPED, message=skip_cache[key] or "")
            progress(f"    skipped: {result.message}")
            return result
    folder = root / f"{number:03d}-{case.id.replace('/', '_')}"
    started = time.monotonic()
    steps_total = len(case.steps)

    live = sys.stderr.isatty()

    def on_step(event: str, step: scn.StepResult) -> None:
        elapsed = time.monotonic() - started
        head = f"  [{elapsed:7.1f}s] step {step.number:<4} {step.label:<50.50}"
        if event == "start":
            if live:  # shown while the step runs, completed in place when it ends
                sys.stderr.write(head + " ...")
                sys.stderr.flush()
            return
        mark = {"passed": "ok", "xfailed": "failed as expected"}.get(step.status, step.status)
        if live:
            sys.stderr.write("\r\033[K")
        progress(f"{head} {mark} ({step.elapsed:.1f}s)")

    factory = EnclaveFactory(folder, qemu=args.qemu, accel=args.accel)
    result = scn.ScenarioRunner(case, factory, artifacts_dir=folder, on_step=on_step,
                                eif_dirs=[Path.cwd()]).run()
    progress(f"    {result.status} in {result.elapsed:.1f}s ({steps_total} top-level steps)")
    if result.status == scn.Status.PASSED and not args.keep_artifacts:
        shutil.rmtree(folder, ignore_errors=True)
        result.artifacts = None
    return result


def _print_summary(results: list[scn.ScenarioResult]) -> None:
    width = max([len("SCENARIO")] + [len(r.scenario.id) for r in results])
    out = sys.stdout
    out.write(f"\n{'SCENARIO':<{width}}  {'RESULT':<8}  {'TIME':>8}  {'STEPS':>7}  NOTE\n")
    for r in results:
        passed = sum(1 for s in r.steps if s.status in ("passed", "xfailed"))
        note = str(r.artifacts) if r.status == "failed" and r.artifacts else r.message if r.status == "skipped" else ""
        out.write(f"{r.scenario.id:<{width}}  {r.status:<8}  {r.elapsed:>7.1f}s  "
                  f"{passed:>3}/{len(r.steps):<3}  {note}\n")
    counts = {s: sum(1 for r in results if r.status == s) for s in ("passed", "failed", "skipped")}
    out.write(", ".join(f"{n} {s}" for s, n in counts.items() if n) + "\n")
    for r in results:
        if r.status == "failed":
            out.write(f"\n=== {r.scenario.id} failed ===\n{r.failure_report()}\n")
    out.flush()


def write_junit(results: list[scn.ScenarioResult], path: Path) -> None:
    """Write a JUnit XML report: one ``testcase`` per scenario case, failures with the runner's
    report, skips with their reason, each step and the artifacts folder as properties."""
    suite = ET.Element("testsuite", name="nitro-harness", tests=str(len(results)),
                       failures=str(sum(r.status == "failed" for r in results)),
                       skipped=str(sum(r.status == "skipped" for r in results)), errors="0",
                       time=f"{sum(r.elapsed for r in results):.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=scn.display_path(r.scenario.path),
                             name=r.scenario.id, time=f"{r.elapsed:.3f}",
                             file=scn.display_path(r.scenario.path), line=str(r.scenario.line))
        props = ET.SubElement(case, "properties")
        for s in r.steps:
            ET.SubElement(props, "property", name=f"step {s.number}",
                          value=f"{s.status} {s.elapsed:.1f}s {s.label}")
        if r.artifacts:
            ET.SubElement(props, "property", name="artifacts", value=str(r.artifacts))
        if r.status == "failed":
            failure = ET.SubElement(case, "failure", message=r.message.splitlines()[0] if r.message else "failed")
            failure.text = r.failure_report()
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.message)
    top = ET.Element("testsuites")
    top.append(suite)
    tree = ET.ElementTree(top)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
