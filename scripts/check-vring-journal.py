#!/usr/bin/env python3
"""Check a ``vring.journal`` (NITRO_HARNESS_VRING_JOURNAL) against the ring it ends with.

The journal holds, per virtqueue, a snapshot of the ring taken before the back end stopped and
the last N pops and pushes (docs/vhost-user.md#used-ring-invariant). This replays them and says
whether the device's record is consistent with guest memory:

- every used slot the journal last wrote holds that (id, len) in the snapshot: nothing else
  wrote the used ring after the device;
- every pop's avail slot still names the popped head, unless the driver has posted past it;
- with ``--id N`` (the id of a driver's "rx:id N is not a head!"), the used indices whose slot
  held N, now and one lap before, and the pop and push of each, which is where the driver read
  a value the device wrote (or did not write) for that index.

Usage: scripts/check-vring-journal.py ARTIFACTS/vring.journal [--queue "VsockDevice 0 (rx)"]
[--id 549]. Exit status 1 when the used ring disagrees with the journal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path, queue: str) -> tuple[dict, list[tuple]]:
    """(snapshot, operations) of ``queue`` ("<Device> <index> (<name>)") in the journal."""
    snapshot: dict = {}
    ops: list[tuple] = []
    for line in path.read_text().splitlines():
        if not line.startswith(queue + " "):
            continue
        rest = line[len(queue) + 1:]
        if rest.startswith("ring "):
            snapshot = json.loads(rest[5:])
            continue
        p = rest.split()
        if p[0] == "pop":  # pop t head avail_index slot avail_idx readable writable thread
            ops.append(("pop", float(p[1]), int(p[2]), int(p[3]), int(p[4])))
        elif p[0] == "push":  # push t head used_index slot length thread
            ops.append(("push", float(p[1]), int(p[2]), int(p[3]), int(p[4]), int(p[5])))
    return snapshot, ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal", type=Path)
    ap.add_argument("--queue", default="VsockDevice 0 (rx)")
    ap.add_argument("--id", type=int, help="the id a driver reported as not a head")
    args = ap.parse_args(argv)
    try:
        snap, ops = load(args.journal, args.queue)
    except (OSError, ValueError) as e:
        print(f"error: {args.journal}: {e}", file=sys.stderr)
        return 2
    if not snap or not ops:
        print(f"error: {args.journal}: no ring snapshot or no operations for {args.queue!r}",
              file=sys.stderr)
        return 2
    n = len(snap["used"])
    print(f"{args.queue}: ring size {n}, avail idx {snap['avail_idx']}, used idx "
          f"{snap['used_idx']}, device used idx {snap['device_used_idx']}, {len(ops)} operations "
          f"from t={ops[0][1]:.6f} to t={ops[-1][1]:.6f}")
    last_push: dict[int, tuple] = {}
    pushes: dict[int, tuple] = {}
    pops: dict[int, tuple] = {}
    for op in ops:
        if op[0] == "push":
            last_push[op[4]] = op
            pushes[op[3]] = op
        else:
            pops[op[3]] = op
    bad = [(slot, op) for slot, op in last_push.items() if snap["used"][slot] != [op[2], op[5]]]
    for slot, op in sorted(bad, key=lambda x: x[1][3])[:20]:
        print(f"  used slot {slot} (index {op[3]}): journal wrote id {op[2]} len {op[5]} at "
              f"t={op[1]:.6f}, guest memory holds {snap['used'][slot]}")
    print(f"used ring: {len(last_push) - len(bad)} of {len(last_push)} slots hold what the "
          f"device last wrote")
    posted_past = (snap["avail_idx"] - n) & 0xFFFF
    stale = [op for op in pops.values() if snap["avail"][op[4]] != op[2]
             and ((op[3] - posted_past) & 0xFFFF) < 0x8000]
    print(f"avail ring: {len(pops)} pops, {len(stale)} whose slot changed although the driver "
          "has not posted past it")
    if args.id is not None:
        print(f"id {args.id}:")
        for idx in sorted(pushes):
            op = pushes[idx]
            if op[2] == args.id:
                nxt = pushes.get((idx + n) & 0xFFFF)
                after = (f"overwritten by id {nxt[2]} (index {nxt[3]}) at t={nxt[1]:.6f}"
                         if nxt else "not overwritten in the journal")
                print(f"  pushed at used index {idx} (slot {op[4]}) t={op[1]:.6f}; slot {after}")
        for idx in sorted(pops):
            if pops[idx][2] == args.id:
                print(f"  popped from avail index {idx} (slot {pops[idx][4]}) "
                      f"t={pops[idx][1]:.6f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
