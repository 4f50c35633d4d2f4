"""Code shared by the tests in tests/unit and tests/boot (no tests here).

Importable as ``helpers.<module>`` because pyproject.toml's pytest section puts tests/ on the
path (``pythonpath = ["tests"]``). ``REPO`` is the repository root.
"""

from pathlib import Path

#: The repository root (the folder holding harness/, scenarios/, scripts/, tests/).
REPO = Path(__file__).resolve().parents[2]
