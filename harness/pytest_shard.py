"""Splitting a test run across CI machines: ``--shard-id K --num-shards N`` (pytest options).

Each collected item belongs to exactly one shard, ``K = sha256(node id) mod N`` (first 8 bytes,
big-endian): the same on every machine and every run, whatever the collection order, so N jobs
of a CI matrix, each given its own K in 0..N-1, run every item exactly once between them. An item
keeps its shard while other tests are added or removed; shards are balanced by count only on
average (hashing, not scheduling). Items of other shards are deselected (pytest reports them
as "deselected"). docs/ci.md shows a GitHub Actions matrix.
"""

from __future__ import annotations

import hashlib

import pytest


def add_options(group: pytest.OptionGroup) -> None:
    """Add ``--shard-id`` and ``--num-shards`` to the plugin's option group."""
    group.addoption("--shard-id", type=int, default=None, metavar="K",
                    help="run only shard K (0..N-1) of the collected items; with --num-shards")
    group.addoption("--num-shards", type=int, default=None, metavar="N",
                    help="split the collected items into N shards by a hash of their node ids")


def shard_of(nodeid: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) of the item with node id ``nodeid``."""
    digest = hashlib.sha256(nodeid.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def chosen_shard(config: pytest.Config) -> tuple[int, int] | None:
    """``(K, N)`` from the options, or None when the run is not sharded.

    Raises pytest.UsageError when only one of them is given, N < 1 or K is not in 0..N-1.
    """
    shard, count = config.getoption("--shard-id"), config.getoption("--num-shards")
    if shard is None and count is None:
        return None
    if shard is None or count is None:
        raise pytest.UsageError("--shard-id and --num-shards go together (e.g. --shard-id 0 "
                                "--num-shards 4)")
    if count < 1:
        raise pytest.UsageError(f"--num-shards {count}: must be at least 1")
    if not 0 <= shard < count:
        raise pytest.UsageError(f"--shard-id {shard}: must be in 0..{count - 1} "
                                f"(--num-shards {count})")
    return shard, count


def deselect_other_shards(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep in ``items`` (in place) only the items of the chosen shard; report the others as
    deselected. Does nothing when the run is not sharded."""
    chosen = chosen_shard(config)
    if chosen is None:
        return
    shard, count = chosen
    keep = [item for item in items if shard_of(item.nodeid, count) == shard]
    if len(keep) != len(items):
        dropped = [item for item in items if shard_of(item.nodeid, count) != shard]
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
