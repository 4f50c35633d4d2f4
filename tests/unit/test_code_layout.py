"""The layout rules of CONTRIBUTING.md hold for the whole package: no module over 600 lines, no
class over 300 lines, and no reference to documents outside the repository (every reference
points at docs/)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
OUTSIDE_REFERENCE = re.compile(r"SPEC [0-9]|DESIG[N]|STYLE\.md|issue [0-9]")


def _package_modules() -> list[Path]:
    return sorted((ROOT / "harness").rglob("*.py"))


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _package_modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_class_over_300_lines():
    long = {}
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
                 and ".venv" not in p.parts]
    else:
        files = [ROOT / name for name in tracked.stdout.splitlines()]
    hits = []
    for path in files:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert hits == []
