"""The harness as a user's project gets it: the wheel built from this checkout, installed into a
fresh virtualenv in a temporary folder outside the repository, ``nitro-harness setup --only
images`` against the shared cache, then a user-style test file run by that venv's pytest: the
``enclave`` fixture with the default image, and an ``eif=`` marker naming an EIF at the user
project's root. Both must pass.

The venv is created without pip and gets the wheel through this environment's pip
(``pip --python``); its dependencies (cbor2, cryptography, pytest, ...) come from this
environment's site-packages through a ``.pth`` file, so nothing is downloaded. A ``.pth`` line
adds a folder to ``sys.path`` without running that folder's own ``.pth`` files, so the
checkout's editable install stays invisible: the test checks that the harness imported is the
wheel's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from helpers import REPO

USER_TEST = '''
    import sys
    from pathlib import Path

    import harness
    import pytest


    def test_installed_harness_is_used():
        assert Path(harness.__file__).is_relative_to(sys.prefix), harness.__file__


    def test_default_image(enclave):
        enclave.console.expect(r"Hello from the enclave side!", timeout=240)


    @pytest.mark.enclave(eif="hello.eif", memory_mib=512)
    def test_eif_at_the_project_root(enclave, eif):
        assert eif == Path(__file__).resolve().parents[1] / "hello.eif"
        enclave.console.expect(r"Hello from the enclave side!", timeout=240)
'''


def _user_env() -> dict[str, str]:
    """The environment of the user's commands: no checkout on PYTHONPATH, not an xdist worker
    of ours (the inner pytest takes its CIDs as a plain run does), the shared cache."""
    drop = {"PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER",
            "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, cwd=cwd, env=_user_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _build_wheel(tmp: Path) -> Path:
    """The wheel of the checkout as it is (committed or not). pip builds in the source folder,
    so a copy of what the wheel is made of keeps build/ and *.egg-info out of the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "harness", src / "harness",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
          str(tmp / "wheels"), str(src)], cwd=tmp, timeout=300)
    (wheel,) = (tmp / "wheels").glob("nitro_harness-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv in ``tmp/venv`` with the wheel installed; returns its bin folder."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=_user_env()).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_nitro_harness_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)], cwd=tmp, timeout=300)
    return venv / "bin"


@pytest.mark.timeout(900)
def test_wheel_in_a_fresh_venv_runs_a_users_enclave_tests(tmp_path: Path) -> None:
    times: dict[str, float] = {}
    t0 = time.monotonic()
    wheel = _build_wheel(tmp_path)
    times["wheel"] = time.monotonic() - t0

    t0 = time.monotonic()
    bin_dir = _fresh_venv(tmp_path, wheel)
    times["venv"] = time.monotonic() - t0
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    assert not project.is_relative_to(REPO)

    # The recipes ship in the wheel: the shipped ones are listed from the venv's copy.
    listed = json.loads(_run([str(bin_dir / "nitro-harness"), "images", "list"], cwd=project,
                             timeout=120).stdout)
    recipes = {r["Name"]: r["Recipe"] for r in listed["Recipes"]}
    assert {"hello", "python"} <= set(recipes)
    assert Path(recipes["hello"]).is_relative_to(tmp_path / "venv"), recipes["hello"]

    t0 = time.monotonic()
    setup = _run([str(bin_dir / "nitro-harness"), "setup", "--only", "images"], cwd=project,
                 timeout=600)
    times["setup"] = time.monotonic() - t0
    assert "setup: == 1/1 images" in setup.stderr and "setup: done in" in setup.stderr
    assert "setup: image hello: " in setup.stderr and setup.stdout == ""

    # The user's build-enclave writes the EIF at the project's root; the test names it there.
    built = json.loads(_run([str(bin_dir / "nitro-harness"), "images", "build", "hello",
                             "--output-file", str(project / "hello.eif")], cwd=project,
                            timeout=120).stdout)
    assert built["Cached"] is True and (project / "hello.eif").stat().st_size > 1_000_000
    (project / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    (project / "tests" / "test_enclave.py").write_text(textwrap.dedent(USER_TEST).lstrip("\n"))
    t0 = time.monotonic()
    result = _run([str(bin_dir / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-p", "no:xdist", "-rA"], cwd=project, timeout=800)
    times["pytest"] = time.monotonic() - t0
    assert "3 passed" in result.stdout, result.stdout[-3000:]
    print("installed-package timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
