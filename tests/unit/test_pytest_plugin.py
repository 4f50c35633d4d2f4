"""The pytest plugin, exercised through pytest's own ``pytester``: collection, reports, artifacts,
JUnit, markers, fixtures and pytest-xdist.

Scenarios here fail or pass on conditions the engine checks before QEMU starts (a missing or
corrupt EIF), so they run the real runner and engine on any machine; scenarios that boot live
in scenarios/ and run with ``pytest scenarios/``, and the plugin's report of a booted guest is
tests/boot/test_pytest_plugin_boot.py.
"""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PASSING = """
name: finds-missing-eif
eif: missing.eif
steps:
  - expect_failure: {code: E19}
"""

FAILING = """
name: wrong-code
eif: missing.eif
steps:
  - sleep: 0.01
  - expect_failure: {code: E26}
"""


def scenario_file(pytester: pytest.Pytester, name: str, text: str, folder: str = "scenarios") -> Path:
    path = pytester.path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_collects_one_item_per_scenario_and_matrix_case(pytester):
    scenario_file(pytester, "many.yaml", """
        name: first
        image: hello
        steps: [{sleep: 1}]
        ---
        name: second
        image: hello
        matrix:
          enclave.memory_mib: [256, 512]
        steps: [{sleep: 1}]
        """)
    result = pytester.runpytest("--collect-only", "-q", "scenarios")
    result.stdout.fnmatch_lines([
        "scenarios/many.yaml::first",
        "scenarios/many.yaml::second[memory_mib=256]",
        "scenarios/many.yaml::second[memory_mib=512]",
        "3 tests collected*",
    ])


def test_yaml_outside_scenarios_is_collected_only_when_named(pytester):
    scenario_file(pytester, "other.yaml", PASSING, folder="elsewhere")
    result = pytester.runpytest("--collect-only", "-q", "elsewhere")
    result.stdout.fnmatch_lines(["no tests collected*"])
    result = pytester.runpytest("--collect-only", "-q", "elsewhere/other.yaml")
    result.stdout.fnmatch_lines(["elsewhere/other.yaml::finds-missing-eif", "1 test collected*"])


def test_schema_error_is_a_one_line_collection_error(pytester):
    scenario_file(pytester, "broken.yaml", """
        image: hello
        steps:
          - console: {expect: 'Hello (', count: 3}
        """)
    result = pytester.runpytest("scenarios")
    result.stdout.fnmatch_lines([
        "*ERROR collecting scenarios/broken.yaml*",
        "[[] E03 []] InvalidArgument: scenarios/broken.yaml:3: steps[[]0[]].console.expect: bad regex 'Hello (':*",
    ])
    assert "Traceback" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_failure_report_names_step_and_artifacts_which_are_kept(pytester):
    scenario_file(pytester, "pass.yaml", PASSING)
    scenario_file(pytester, "fail.yaml", FAILING)
    artifacts = pytester.path / "art"
    result = pytester.runpytest("scenarios", f"--artifacts-dir={artifacts}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*scenarios/fail.yaml:5: step 2 (expect_failure E26) failed: expected failure E26, got E19*",
        f"artifacts: {artifacts}/scenarios_fail.yaml_wrong-code",
    ])
    kept = artifacts / "scenarios_fail.yaml_wrong-code"
    assert (kept / "scenario.yaml").read_text().startswith("name: wrong-code")
    # The passing scenario's folder is removed; the failing one's stays.
    assert sorted(p.name for p in artifacts.iterdir()) == ["scenarios_fail.yaml_wrong-code"]


def test_keep_artifacts_keeps_passing_tests_folders(pytester):
    scenario_file(pytester, "pass.yaml", PASSING)
    artifacts = pytester.path / "art"
    result = pytester.runpytest("scenarios", f"--artifacts-dir={artifacts}", "--keep-artifacts")
    result.assert_outcomes(passed=1)
    assert (artifacts / "scenarios_pass.yaml_finds-missing-eif" / "scenario.yaml").exists()


def test_junit_xml_has_cases_failure_text_and_artifacts_property(pytester):
    scenario_file(pytester, "pass.yaml", PASSING)
    scenario_file(pytester, "fail.yaml", FAILING)
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest("scenarios", f"--junitxml={xml}", f"--artifacts-dir={pytester.path / 'a'}")
    result.assert_outcomes(passed=1, failed=1)
    root = ET.parse(xml).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"finds-missing-eif", "wrong-code"}
    failure = cases["wrong-code"].find("failure")
    assert failure is not None
    assert "expected failure E26, got E19" in (failure.text or "") + (failure.get("message") or "")
    props = {p.get("name"): p.get("value") for p in cases["wrong-code"].iter("property")}
    assert props["artifacts"].endswith("scenarios_fail.yaml_wrong-code")
    assert props["step 1"].startswith("passed")
    assert props["step 2"].startswith("failed")


def test_requirement_marker_skips_with_a_reason(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_nsm
        def test_needs_nsm():
            pass
    """)
    result = pytester.runpytest("-rs", "--qemu=/nonexistent/qemu-system-x86_64")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] test_requirement_marker_skips_with_a_reason.py:*: no usable QEMU: "
        "/nonexistent/qemu-system-x86_64: *"])


def test_scenario_requires_becomes_a_marker(pytester):
    scenario_file(pytester, "kvm.yaml", """
        image: hello
        requires: [kvm]
        markers: [slow]
        steps: [{sleep: 1}]
        """)
    pytester.makeini("[pytest]\nmarkers =\n    slow: boots\n")
    result = pytester.runpytest("--collect-only", "-q", "-m", "requires_kvm and slow and scenario", "scenarios")
    result.stdout.fnmatch_lines(["scenarios/kvm.yaml::kvm", "1 test collected*"])


def test_a_scenario_timeout_sets_the_pytest_timeout_a_minute_above_it(pytester):
    scenario_file(pytester, "long.yaml", """
        name: long
        image: hello
        timeout: 1200
        steps: [{sleep: 1}]
        ---
        name: default
        image: hello
        steps: [{sleep: 1}]
        """)
    pytester.makeconftest("""
        def pytest_collection_finish(session):
            for item in session.items:
                marker = item.get_closest_marker("timeout")
                print("TIMEOUT", item.name, marker.args if marker else None)
        """)
    result = pytester.runpytest("--collect-only", "-q", "-s", "scenarios")
    result.stdout.fnmatch_lines(["TIMEOUT long (1260.0,)", "TIMEOUT default None"])


def test_eif_and_enclave_fixtures_follow_the_marker(pytester):
    pytester.path.joinpath("bad.eif").write_bytes(b"garbage" * 100)
    pytester.makepyfile("""
        import pytest
        from pathlib import Path

        @pytest.mark.enclave(eif="bad.eif", memory_mib=512)
        def test_eif(eif):
            assert eif == Path(__file__).parent / "bad.eif"

        @pytest.mark.enclave(eif="bad.eif")
        def test_enclave(enclave):
            pass

        @pytest.mark.parametrize("enclave", [{"eif": "missing.eif"}], indirect=True)
        def test_indirect(enclave):
            pass
    """)
    result = pytester.runpytest("-q", f"--artifacts-dir={pytester.path / 'a'}")
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    assert "[ E35 ]" in text  # the real EIF reader refused the file
    assert "missing.eif: EIF file not found" in text


def test_eif_paths_resolve_from_the_test_file_then_the_rootdir(pytester):
    """A relative eif= is tried next to the test file, then at pytest's rootdir (where a
    user's build-enclave writes it); the error lists both places."""
    pytester.makeini("[pytest]\n")
    pytester.path.joinpath("root.eif").write_bytes(b"root")
    pytester.path.joinpath("both.eif").write_bytes(b"root")
    tests = pytester.mkdir("tests")
    tests.joinpath("both.eif").write_bytes(b"beside the test")
    tests.joinpath("test_user.py").write_text(textwrap.dedent("""
        import pytest
        from pathlib import Path

        @pytest.mark.enclave(eif="root.eif")
        def test_root(eif, request):
            assert eif == request.config.rootpath / "root.eif"

        @pytest.mark.enclave(eif="both.eif")
        def test_beside_wins(eif):
            assert eif == Path(__file__).parent / "both.eif"

        @pytest.mark.enclave(eif="nowhere.eif")
        def test_missing(eif):
            pass
    """))
    result = pytester.runpytest("-q", "tests")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        f"*[[] E19 []] FileOperationFailure: nowhere.eif: EIF file not found (tried "
        f"{tests / 'nowhere.eif'}, {pytester.path / 'nowhere.eif'})*"])


def test_scenario_eif_resolves_from_the_rootdir(pytester):
    pytester.makeini("[pytest]\n")
    pytester.path.joinpath("app.eif").write_bytes(b"garbage" * 100)
    scenario_file(pytester, "app.yaml", """
        name: app
        eif: app.eif
        steps:
          - expect_failure: {code: E35}
        """)
    result = pytester.runpytest("-q", "scenarios", f"--artifacts-dir={pytester.path / 'a'}")
    result.assert_outcomes(passed=1)  # found at the rootdir; the EIF reader refused it (E35)


def test_recipes_option_and_ini_put_user_folders_first(pytester, monkeypatch):
    monkeypatch.setenv("NITRO_HARNESS_RECIPES", "")  # restored after the in-process runs
    for folder in ("cli-recipes", "ini-recipes"):
        pytester.mkdir(folder).joinpath(f"{folder}.yaml").write_text(
            "kernel: {package: linux-image-6.12-cloud-amd64}\n")
    pytester.makeini("[pytest]\nnitro_harness_recipes = ini-recipes\n")
    pytester.makepyfile("""
        from harness.images.recipes import recipe_path
        from harness import assets

        def test_found(request):
            root = request.config.rootpath
            assert assets.recipe_dirs()[:2] == [root / "cli-recipes", root / "ini-recipes"]
            assert recipe_path("cli-recipes") == root / "cli-recipes" / "cli-recipes.yaml"
            assert recipe_path("ini-recipes") == root / "ini-recipes" / "ini-recipes.yaml"
            assert recipe_path("hello") == assets.shipped_recipes_dir() / "hello.yaml"
    """)
    result = pytester.runpytest("-q", "--recipes", "cli-recipes")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest("-q", "--recipes", "absent")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--recipes / nitro_harness_recipes: */absent: recipes folder not found*"])


def test_xdist_workers_get_distinct_runtime_dirs_and_cids(pytester, monkeypatch):
    # Run under xdist itself, this test's own worker has set these variables; the inner session
    # must choose its workers' folders as a fresh one does.
    for name in ("NITRO_HARNESS_RUNTIME_DIR", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                 "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    out = pytester.path / "out"
    out.mkdir()
    pytester.makepyfile(f"""
        import json, os
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_record(n, enclave_factory):
            factory = enclave_factory.factory
            info = {{"worker": os.environ.get("PYTEST_XDIST_WORKER"),
                     "runtime": os.environ.get("NITRO_HARNESS_RUNTIME_DIR"),
                     "cid": next(factory.cids)}}
            (os.path.join({str(out)!r}, f"{{n}}.json"))
            open(os.path.join({str(out)!r}, f"{{n}}.json"), "w").write(json.dumps(info))
    """)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "--dist", "load",
                                           f"--artifacts-dir={pytester.path / 'a'}")
    result.assert_outcomes(passed=4)
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    workers = {i["worker"] for i in infos}
    runtimes = {i["worker"]: i["runtime"] for i in infos}
    assert workers <= {"gw0", "gw1"}
    assert all(rt.endswith(f"pytest-{w}") for w, rt in runtimes.items())
    assert len(set(runtimes.values())) == len(workers)
    cids = [i["cid"] for i in infos]
    assert len(set(cids)) == 4
    for info in infos:
        index = int(info["worker"][2:])
        assert 1000 + index * 1000 <= info["cid"] < 2000 + index * 1000


