"""Fixtures of the boot tests (every test here is marked ``slow`` by tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.qemu_build import expected_build_dir


@pytest.fixture(scope="session")
def built_qemu() -> Path:
    """The patched QEMU that ``nitro-harness setup --only qemu`` builds, found without harness.qemu's search;
    skips (naming the command to run) when that build does not exist yet."""
    binary = expected_build_dir() / "bin" / "qemu-system-x86_64"
    if not (binary.parent.parent / ".complete").is_file():
        pytest.skip(f"patched QEMU not built yet at {binary}: run nitro-harness setup --only qemu")
    return binary
