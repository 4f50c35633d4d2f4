"""``nitro-harness setup`` (harness/setup/) and its clone wrapper scripts/setup.sh, without
installing or building anything: the sources step against a fake /etc/apt, dry runs, cached
QEMU builds, the python step of an installed package, step selection, and the doctor's fix
commands. The real set-up runs in .ci/run (and tests/boot/test_installed_package.py runs its
images step from an installed wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import assets, doctor
from harness.setup import Context, StepFailed, parse_only, run_setup
from harness.setup.apt import backports_types, os_codename
from harness.setup.python_env import step_python
from helpers import REPO
from helpers.qemu_build import expected_build_dir, fake_build

SETUP = REPO / "scripts" / "setup.sh"


def setup_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", "setup", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_steps_in_order_and_only_picks_some() -> None:
    assert parse_only(None) == ["sources", "packages", "qemu", "python", "kernel", "doctor", "images"]
    # --only keeps the run's order whatever the order given, and may be repeated.
    assert parse_only(["images,qemu", "sources"]) == ["sources", "qemu", "images"]
    with pytest.raises(StepFailed, match="unknown step 'bogus'"):
        parse_only(["qemu,bogus"])


def test_dry_run_changes_nothing_and_times_every_step(tmp_path: Path) -> None:
    apt = apt_tree(tmp_path, {})
    (tmp_path / "os-release").write_text("ID=debian\nVERSION_CODENAME=bookworm\n")
    out = setup_cli("--dry-run", env={
        "NITRO_HARNESS_CACHE": str(tmp_path / "cache"), "NITRO_HARNESS_APT_ETC": str(apt),
        "NITRO_HARNESS_OS_RELEASE": str(tmp_path / "os-release"), "NITRO_HARNESS_QEMU": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    heads = [ln for ln in lines if ln.startswith("setup: == ")]
    assert heads == [f"setup: == {n}/7 {s} (dry run)" for n, s in enumerate(
        ["sources", "packages", "qemu", "python", "kernel", "doctor", "images"], 1)]
    assert len([ln for ln in lines if ln.startswith("setup: -- ") and ln.endswith(" s")]) == 7
    assert lines[-1].startswith("setup: done in ") and "images " in lines[-1]
    assert "setup: would add bookworm-backports (deb deb-src)" in out.stderr
    assert f"setup: would build QEMU into {tmp_path / 'cache' / expected_build_dir().name}" in out.stderr
    assert "setup: would run nitro-harness images build hello" in out.stderr
    assert list((apt / "sources.list.d").iterdir()) == [] and not (tmp_path / "cache").exists()


def test_qemu_step_reuses_a_complete_build_and_checks_the_override(tmp_path: Path) -> None:
    binary = fake_build(tmp_path, expected_build_dir().name, 1_000_000)
    out = setup_cli("--only", "qemu", env={"NITRO_HARNESS_CACHE": str(tmp_path), "NITRO_HARNESS_QEMU": ""})
    assert out.returncode == 0, out.stderr
    assert f"setup: cached: {binary}" in out.stderr
    out = setup_cli("--only", "qemu", env={"NITRO_HARNESS_QEMU": str(tmp_path / "nope")})
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f'setup: FAILED at step "qemu": NITRO_HARNESS_QEMU={tmp_path / "nope"} is not an executable file')


def test_a_build_without_the_aarch64_binary_is_built_again(tmp_path: Path) -> None:
    fake_build(tmp_path, expected_build_dir().name, 1_000_000, binaries=("qemu-system-x86_64",))
    out = setup_cli("--only", "qemu", "--dry-run",
                    env={"NITRO_HARNESS_CACHE": str(tmp_path), "NITRO_HARNESS_QEMU": ""})
    assert out.returncode == 0, out.stderr
    assert "would build QEMU into" in out.stderr and "cached" not in out.stderr


def test_python_step_of_an_installed_package_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(assets, "source_checkout", lambda: None)
    step_python(Context(log=lines.append, python="/nonexistent/python"))
    assert len(lines) == 1 and "installed as a package" in lines[0]
    assert str(assets.data_dir().parent) in lines[0]


def test_run_reports_the_failed_step(tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = Context(log=lines.append, env={**os.environ, "NITRO_HARNESS_QEMU": str(tmp_path)})
    assert run_setup(ctx, ["qemu"]) == 1
    assert lines[-1] == f'FAILED at step "qemu": NITRO_HARNESS_QEMU={tmp_path} is not an executable file'


def test_setup_needs_only_the_standard_library() -> None:
    """scripts/setup.sh runs the set-up before the dependencies are installed."""
    code = ("import sys; import harness.cli, harness.cli.setup_commands, harness.setup, "
            "harness.images.apt_state, harness.arch; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'yaml', 'cbor2', "
            "'cryptography', 'jsonschema', 'asn1crypto', 'pytest', 'qemu', 'botocore'}); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_os_codename_and_backports_forms(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text('ID=debian\nVERSION_CODENAME="bookworm"\n')
    assert os_codename(tmp_path / "os-release") == "bookworm"
    assert os_codename(tmp_path / "missing") == ""
    apt = apt_tree(tmp_path, {
        "sources.list.d/a.list": "deb-src http://deb.debian.org/debian bookworm-backports main\n",
        "sources.list.d/b.sources": "Types: deb\nSuites: bookworm bookworm-backports\n"})
    assert backports_types(apt) == (True, True)


# --- the doctor names the set-up step that fixes a missing piece -----------------------------

def test_doctor_names_setup_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path / "empty"))
    checks = {c.name: c for c in doctor._setup_checks() + [doctor._kernel_check()]}
    assert (checks["hello image"].status, checks["hello image"].fix) == (
        "warn", "nitro-harness setup --only images")
    assert checks["nitro kernel"].fix == "nitro-harness setup --only kernel"
    assert checks["packages"].status in ("ok", "warn", "info")
    if checks["packages"].status == "warn":
        assert checks["packages"].fix == "nitro-harness setup --only packages"
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "images" / "hello-0123456789abcdef.eif").write_bytes(b"x")
    assert {c.name: c for c in doctor._setup_checks()}["hello image"].status == "ok"


# --- the sources step, against a fake /etc/apt, through scripts/setup.sh -----------------------

MAIN_SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def run_sources_step(tmp_path: Path, codename: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "os-release").write_text(f"ID=debian\nVERSION_CODENAME={codename}\n")
    env = {**os.environ, "PYTHON": sys.executable,
           "NITRO_HARNESS_APT_ETC": str(tmp_path / "apt"),
           "NITRO_HARNESS_OS_RELEASE": str(tmp_path / "os-release")}
    return subprocess.run(["bash", str(SETUP), "--only", "sources", *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def apt_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_setup_adds_backports_once_and_nothing_else(tmp_path: Path) -> None:
    apt = apt_tree(tmp_path, {"sources.list.d/debian.sources": MAIN_SOURCES})
    first = run_sources_step(tmp_path, "bookworm")
    assert first.returncode == 0, first.stderr
    added = apt / "sources.list.d" / "nitro-harness-bookworm-backports.sources"
    text = added.read_text()
    assert "Types: deb deb-src\n" in text and "Suites: bookworm-backports\n" in text
    # Never another release: the only suite named anywhere new is bookworm-backports.
    suites = [ln for ln in text.splitlines() if ln.startswith("Suites:")]
    assert suites == ["Suites: bookworm-backports"] and "trixie" not in text
    assert sorted(p.name for p in (apt / "sources.list.d").iterdir()) == [
        "debian.sources", "nitro-harness-bookworm-backports.sources"]
    again = run_sources_step(tmp_path, "bookworm")
    assert again.returncode == 0 and "cached: bookworm-backports" in again.stderr
    assert added.read_text() == text


def test_setup_adds_only_the_missing_deb_src(tmp_path: Path) -> None:
    apt = apt_tree(tmp_path, {
        "sources.list": "deb http://deb.debian.org/debian bookworm main\n"
                        "deb http://deb.debian.org/debian bookworm-backports main\n",
    })
    out = run_sources_step(tmp_path, "bookworm")
    assert out.returncode == 0, out.stderr
    text = (apt / "sources.list.d" / "nitro-harness-bookworm-backports.sources").read_text()
    assert "Types: deb-src\n" in text


def test_setup_ignores_disabled_stanza_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    apt = apt_tree(tmp_path, {"sources.list.d/bp.sources": (
        "Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n"
        "Components: main\nEnabled: no\n")})
    out = run_sources_step(tmp_path, "bookworm", "--dry-run")
    assert out.returncode == 0
    assert "would add bookworm-backports (deb deb-src)" in out.stderr
    assert [p.name for p in (apt / "sources.list.d").iterdir()] == ["bp.sources"]


def test_setup_adds_no_sources_off_bookworm(tmp_path: Path) -> None:
    apt = apt_tree(tmp_path, {})
    out = run_sources_step(tmp_path, "trixie")
    assert out.returncode == 0 and "not bookworm" in out.stderr
    assert list((apt / "sources.list.d").iterdir()) == []


def test_setup_rejects_unknown_step(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SETUP), "--only", "qemu,bogus"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 3, out.stderr
    assert out.stderr.splitlines() == [
        "[ E03 ] InvalidArgument: nitro-harness setup: argument --only: unknown step 'bogus' "
        "(steps: sources packages qemu python kernel doctor images)"]


# --- the kernel step builds both kernels; build-kernel.sh's KERNEL_ARCH ----------------------

BUILD_KERNEL = REPO / "harness" / "data" / "build" / "build-kernel.sh"


def test_kernel_step_builds_x86_64_then_aarch64(monkeypatch: pytest.MonkeyPatch) -> None:
    out = setup_cli("--dry-run", "--only", "kernel", env={"SKIP_KERNEL": "0"})
    assert out.returncode == 0, out.stderr
    would = [ln for ln in out.stderr.splitlines() if ln.startswith("setup: would run")]
    script = assets.build_script("build-kernel.sh")
    assert would == [f"setup: would run KERNEL_ARCH={arch} bash {script} (reuses a cached build "
                     "of the same configuration)" for arch in ("x86_64", "aarch64")]
    # Each run gets its architecture and that architecture's shipped fragment, whatever the
    # caller's environment says.
    runs: list[tuple[list[str], dict[str, str]]] = []
    ctx = Context(log=lambda _: None,
                  env={**os.environ, "KERNEL_ARCH": "bogus", "SKIP_KERNEL": "0"})
    monkeypatch.setattr(ctx, "need_apt", lambda: None)
    monkeypatch.setattr(ctx, "run",
                        lambda argv, what, env=None: runs.append((list(argv), env or {})))
    from harness.setup.builds import step_kernel
    step_kernel(ctx)
    kernel_dir = assets.kernel_config().parent
    assert [(argv, e["KERNEL_ARCH"], e["NITRO_HARNESS_KERNEL_CONFIG"]) for argv, e in runs] == [
        (["bash", str(script)], "x86_64", str(kernel_dir / "nitro.config")),
        (["bash", str(script)], "aarch64", str(kernel_dir / "nitro-arm64.config"))]
    assert (kernel_dir / "nitro-arm64.config").read_text().startswith("#")


def run_build_kernel(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """build-kernel.sh against an empty cache in tmp_path, with an apt-cache that offers one
    linux-source version (no real apt state, nothing built)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apt-cache").write_text("#!/bin/sh\necho '  Candidate: 6.12.99-1~deb12u1'\n")
    (bin_dir / "apt-cache").chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if k not in ("KERNEL_ARCH", "CROSS_COMPILE", "NITRO_HARNESS_KERNEL_CONFIG")}
    return subprocess.run(["bash", str(BUILD_KERNEL)], capture_output=True, text=True, timeout=60,
                          env={**base, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                               "NITRO_HARNESS_CACHE": str(tmp_path / "cache"), **env})


def test_build_kernel_names_each_architecture_s_build(tmp_path: Path) -> None:
    """x86_64 (the default) keeps kernel-<ver>-<hash> and kernel-current; aarch64 has its own
    fragment, kernel-arm64-<ver>-<hash> and kernel-arm64-current. A complete build is reused."""
    import hashlib

    kernel_dir = assets.kernel_config().parent
    for arch, fragment, name in (("", "nitro.config", "kernel"),
                                 ("aarch64", "nitro-arm64.config", "kernel-arm64")):
        chash = hashlib.sha256((kernel_dir / fragment).read_bytes() + b"6.12.99-1~deb12u1\n")
        build = tmp_path / "cache" / f"{name}-6.12.99-{chash.hexdigest()[:12]}"
        build.mkdir(parents=True)
        (build / ".complete").write_text("done\n")
        out = run_build_kernel(tmp_path, **({"KERNEL_ARCH": arch} if arch else {}))
        assert out.returncode == 0, out.stderr
        assert out.stderr == f"build-kernel: cached: {build}\n"
        assert os.readlink(tmp_path / "cache" / f"{name}-current") == build.name


def test_build_kernel_refuses_unknown_arch_and_names_the_cross_compiler(tmp_path: Path) -> None:
    out = run_build_kernel(tmp_path, KERNEL_ARCH="sparc")
    assert (out.returncode, out.stderr) == (
        1, "build-kernel: error: KERNEL_ARCH=sparc: unknown (x86_64 or aarch64)\n")
    out = run_build_kernel(tmp_path, KERNEL_ARCH="aarch64", CROSS_COMPILE="no-such-")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "build-kernel: error: no-such-gcc is missing: apt-get install gcc-aarch64-linux-gnu "
        "('nitro-harness setup --only packages' installs it)"]
    assert not (tmp_path / "cache").exists()
