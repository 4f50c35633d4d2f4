"""Every fuzz seed and every crash reproducer the fuzzer kept (fuzz/seeds/<target>/,
fuzz/crashes/<target>/) goes through its target's one-input function again and gets no crash:
no exception other than the parser's declared ones, no hang (docs/fuzzing.md). Needs no
atheris: the targets are plain modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import targets, verdict

FUZZ = Path(verdict.__file__).resolve().parent


def _inputs() -> list:
    out = []
    for name in targets.TARGETS:
        for kind in ("seeds", "crashes"):
            folder = FUZZ / kind / name
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                out.append(pytest.param(name, path, id=f"{kind}/{name}/{path.name}"))
    return out


def test_every_target_has_seeds():
    for name in targets.TARGETS:
        seeds = FUZZ / "seeds" / name
        assert seeds.is_dir() and any(seeds.iterdir()), f"no seeds for {name}"
        module = targets.load(name)
        assert module.NAME == name and module.MAX_LEN >= max(
            p.stat().st_size for p in seeds.iterdir()), f"{name}: a seed is longer than MAX_LEN"


@pytest.mark.parametrize(("name", "path"), _inputs())
def test_input_does_not_crash(name, path):
    crash = verdict.run_one(targets.load(name), path.read_bytes())
    assert crash is None, f"{path.name}: {crash.signature}: {crash.message}\n{crash.traceback}"


def test_an_undeclared_exception_is_a_crash_and_a_declared_one_is_not():
    class Target:
        DECLARED = (KeyError,)

        @staticmethod
        def one_input(data: bytes) -> None:
            raise KeyError("declared") if data == b"k" else IndexError("list index out of range")

    assert verdict.run_one(Target, b"k") is None
    crash = verdict.run_one(Target, b"i")
    assert (crash.kind, crash.message) == ("IndexError", "list index out of range")
    assert "raise KeyError" in crash.traceback


def test_an_input_over_its_cpu_time_is_a_hang():
    class Target:
        DECLARED = ()

        @staticmethod
        def one_input(data: bytes) -> None:
            while True:
                pass

    crash = verdict.run_one(Target, b"", time_limit_s=0.2)
    assert crash.kind == "hang" and "0.2 s of CPU time" in crash.message
