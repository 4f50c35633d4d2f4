"""The pytest plugin with a real boot: a scenario whose guest runs but prints the wrong text
fails with the console excerpt and keeps its artifacts. The plugin's behaviour that needs no
boot is tests/unit/test_pytest_plugin.py."""

from __future__ import annotations

import textwrap

from harness.images import debian

# pytester points HOME at its own folder; the images and the kernel stay in the real cache.
REAL_CACHE = debian.cache_root()

pytest_plugins = ["pytester"]


def test_broken_scenario_boots_and_fails_with_console_excerpt_and_artifacts(pytester, monkeypatch):
    """A real boot of the hello image with a wrong expected text."""
    scenario = pytester.path / "scenarios" / "broken.yaml"
    scenario.parent.mkdir()
    scenario.write_text(textwrap.dedent("""
        name: broken
        image: hello
        timeout: 600
        steps:
          - console: {expect: 'Hello from the enclave side!', within: 120}
          - console: {expect: 'Goodbye from the enclave side!', within: 10}
          - terminate:
        """).lstrip("\n"))
    artifacts = pytester.path / "art"
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(REAL_CACHE))
    result = pytester.runpytest_subprocess("scenarios", f"--artifacts-dir={artifacts}", timeout=900)
    result.assert_outcomes(failed=1)
    folder = artifacts / "scenarios_broken.yaml_broken"
    result.stdout.fnmatch_lines([
        "scenarios/broken.yaml:6: step 2 (console Goodbye from the enclave side!) failed: "
        "'Goodbye from the enclave side!' did not appear within 10 s",
        "--- console (last lines) ---",
        "*Hello from the enclave side!",
        f"artifacts: {folder}",
    ])
    logs = list(folder.glob("*/console.log"))
    assert len(logs) == 1
    assert "Hello from the enclave side!" in logs[0].read_text(errors="replace")
    assert (folder / "scenario.yaml").exists()
