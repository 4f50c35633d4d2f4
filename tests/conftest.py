"""The test suite's two halves (see CONTRIBUTING.md):

- tests/unit: no QEMU process, no image or kernel build, no network; about a minute.
- tests/boot: tests that start QEMU or need the built images, kernel or QEMU binary; minutes.

Every test under tests/boot/ is marked ``slow`` here, as every YAML scenario is by the plugin,
so ``pytest -m "not slow"`` runs exactly tests/unit. Code shared by tests is in tests/helpers/
(``helpers.*``, on the path through pyproject's pytest ``pythonpath``); fixtures of the boot
tests are in tests/boot/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BOOT = Path(__file__).parent / "boot"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/boot/ ``slow``."""
    for item in items:
        if item.path.is_relative_to(BOOT):
            item.add_marker(pytest.mark.slow)
