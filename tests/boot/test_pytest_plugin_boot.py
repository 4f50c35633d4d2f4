"""The pytest plugin with a real boot: a scenario whose guest runs but prints the wrong text
fails with the console excerpt and the boot timeline, and keeps its artifacts, the timeline's
file with its phases in boot order among them. The plugin's behaviour that needs no boot is
tests/unit/test_pytest_plugin.py."""

from __future__ import annotations

import json
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
        "--- boot timeline (*/boot-timeline.json) ---",
        "*host  EIF read, CRC-checked and measured",
        "*guest*] Run /init",
        "*host  heartbeat received",
        f"artifacts: {folder}",
    ])
    logs = list(folder.glob("*/console.log"))
    assert len(logs) == 1
    assert "Hello from the enclave side!" in logs[0].read_text(errors="replace")
    assert (folder / "scenario.yaml").exists()
    timeline = json.loads((logs[0].parent / "boot-timeline.json").read_text())
    assert (timeline["format"], timeline["outcome"], timeline["error"]) == (
        "nitro-harness boot timeline 1", "heartbeat", None)
    assert_boot_order(timeline["phases"])


HOST_ORDER = ["eif_measured", "resources_reserved", "sections_extracted", "kernel_read",
              "preflight_checked", "vsock_started", "nsm_started", "qemu_spawned",
              "console_connected", "qmp_socket", "qmp_ready", "vcpus_pinned", "resumed", "heartbeat"]


def assert_boot_order(phases: list[dict]) -> None:
    """The phases of a hello boot on the Nitro-style kernel, in the order a boot passes them
    (docs/boot.md#boot-timeline)."""
    at = {p["name"]: p["host_s"] for p in phases if p["side"] == "host"}
    assert [p["name"] for p in phases if p["name"] in HOST_ORDER] == HOST_ORDER
    assert [p["host_s"] for p in phases] == sorted(p["host_s"] for p in phases)
    # The guest RAM is filled alongside QEMU's start (docs/boot.md#guest-ram).
    assert at["resources_reserved"] < at["guest_ram_ready"]
    for device in ("vsock", "nsm"):
        assert at["qemu_spawned"] <= at[f"{device}_connected"] <= at[f"{device}_handshake"] <= at["qmp_ready"]
        assert at["resumed"] <= at[f"{device}_driver_ready"] <= at["heartbeat"]
    guest = [p for p in phases if p["side"] == "guest"]
    steps = [p["name"] for p in guest]
    assert steps[:6] == ["console_first_byte", "kernel_started", "console_enabled",
                         "initramfs_unpacking", "initramfs_unpacked", "run_init"]
    assert set(steps[6:-1]) == {"init_step"} and steps[-1] == "init_heartbeat"
    assert "init: loaded /nsm.ko" in [p["label"] for p in guest]
    # Two guest clocks: the kernel's printk stamps and init's own (CLOCK_MONOTONIC, read by init),
    # which may lag the kernel's by tens of ms; each goes forward on its own.
    kernel_clock = [p["guest_s"] for p in guest[1:6]]
    init_clock = [p["guest_s"] for p in guest[6:]]
    assert kernel_clock == sorted(kernel_clock) and kernel_clock[0] == 0.0
    assert init_clock == sorted(init_clock)
    assert at["resumed"] <= guest[0]["host_s"]
