"""--shard-id K --num-shards N (harness.pytest_shard): every collected item in exactly one shard,
the same shard on every run; the scenario suite split in two, collected only."""

from __future__ import annotations

import re
import subprocess
import sys

from harness.pytest_shard import shard_of
from helpers import REPO


def collected(*args: str) -> list[str]:
    # Both kernels: the whole scenario suite, 37 cases.
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "--kernel", "nitro", "--kernel", "debian",
                          *args, "scenarios"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [ln for ln in out.stdout.splitlines() if re.match(r"^scenarios/\S+::", ln)]


def test_scenario_suite_in_two_shards_is_a_partition() -> None:
    whole = collected()
    first = collected("--shard-id", "0", "--num-shards", "2")
    second = collected("--shard-id", "1", "--num-shards", "2")
    assert len(whole) > 20 and first and second
    assert set(first) | set(second) == set(whole)
    assert set(first) & set(second) == set()
    assert len(first) + len(second) == len(whole)
    assert first == [n for n in whole if shard_of(n, 2) == 0]  # collection order kept


def test_shard_of_is_a_fixed_hash() -> None:
    # sha256("scenarios/hello.yaml::hello") begins 2c7ffb7773306630: its first 8 bytes, big-endian,
    # modulo N (the same on every machine and Python version, unlike hash()).
    assert shard_of("scenarios/hello.yaml::hello", 1000) == 0x2C7FFB7773306630 % 1000 == 224
    ids = [f"tests/test_x.py::test_{i}" for i in range(200)]
    counts = [sum(shard_of(i, 4) == k for i in ids) for k in range(4)]
    assert sum(counts) == 200 and min(counts) > 25  # spread over all four
    assert [shard_of(i, 4) for i in ids] == [shard_of(i, 4) for i in ids]
    assert shard_of("a", 1) == 0


def test_bad_shard_options_are_usage_errors() -> None:
    for args, text in ((["--shard-id", "2", "--num-shards", "2"], "must be in 0..1"),
                       (["--shard-id", "0"], "go together")):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider", *args, "scenarios/hello.yaml"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 4 and text in out.stderr, out.stderr
