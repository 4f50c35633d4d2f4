#!/usr/bin/env python3
"""Fault storm: run-enclave again and again, each enclave ended by a fault; count what is left.

Each round starts ``nitro-harness run-enclave`` (the CLI, detached as a user runs it: hello,
256 MiB, one CPU, debug mode, its own enclave name) in a private runtime directory, then at a
seeded random moment (``--max-delay`` seconds after the start, drawn per round and printed)
injects one fault:

- ``kill-qemu``: SIGKILL to the enclave's QEMU;
- ``guest-panic``: the guest kernel panics. The enclave runs hello's image with its application
  replaced by ``sleep D; echo c > /proc/sysrq-trigger`` (D in 0.5 s steps), or, for the draw
  "during boot", an image whose ramdisk has no init (the kernel panics before the heartbeat).
  With ``panic=30`` on the command line (AWS's) the VM reboots, so QEMU exits, 30 s later;
- ``kill-supervisor``: SIGKILL to the enclave process (``python -m harness.enclave_process``);
- ``sigint-supervisor``: SIGINT to the enclave process;
- ``terminate-during-boot``: ``nitro-harness terminate-enclave --enclave-name`` at a moment
  within ``--boot-window`` seconds of the start (the run-enclave JSON says whether the
  heartbeat came first);
- ``close-vhost-user``: the enclave process's end of the vsock or NSM vhost-user connection
  (drawn) is shut down (``shutdown(SHUT_RDWR)`` on a copy of its fd taken with
  ``pidfd_getfd``), as when the connection breaks.

A fault whose target does not exist yet at its moment (QEMU not started, QEMU not connected) is
injected as soon as the target appears; the printed moment is the real one. Then the round
waits for run-enclave to return, for every process of the enclave to end by itself (up to
``--settle`` seconds), runs ``describe-enclaves`` as a user would (it must print ``[]``), and
counts what is left in the runtime directory and on the host:

- processes: live processes that are the storm's descendants or whose command line or
  environment names the runtime directory (enclave processes, QEMUs, anything else);
- sockets: Unix sockets still open whose path is under the runtime directory, and socket fds
  of leftover processes;
- memfds: ``memfd:`` fds and mappings of leftover processes (guest RAM);
- runtime entries: everything under the runtime directory except its lock, the (empty)
  ``enclaves`` folder and the ended-enclave records (``ended/``, kept by design, at most 16,
  counted apart);
- CIDs and CPUs: reserved by the records ``describe-enclaves`` still reads.

Everything must be 0. Whatever a round leaves is cleaned by the storm (processes it can tie to
the round, by PID verified by start time; files) so the next round starts clean, and is
reported. The storm makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) and reaps the
enclave processes and QEMUs orphaned to it, as a host's init does; ``--no-reap`` leaves them to
PID 1 (in some containers, this CI machine kind's among them, PID 1 reaps nobody, so they stay
zombies: the harness must then still see them as gone).

Output: one line per round on stderr; at the end a table on stdout (fault kind, rounds,
rounds whose fault found no target, leftovers of each kind, run-enclave exit statuses) and the
wall time; ``--json FILE`` writes the rounds. Exit status 0 when every fault was injected and
nothing was left by any round, 1 otherwise, 2 when the storm could not start, 130 when
interrupted.

The /proc and runtime-directory reading lives in ``benchmarks/storm_leftovers.py``.

Usage::

    nice -n 10 python benchmarks/fault_storm.py [--rounds 100] [--seed S] [--kinds K,K]
        [--max-delay 10] [--boot-window 4] [--settle 120] [--json FILE] [--no-reap]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storm_leftovers import (become_subreaper, children, connection_fds, count_memfds,
                             count_sockets, describe, live, pidfd_getfd, proc_stat, processes_of,
                             read_bytes, reap_orphans, runtime_entries)

from harness import cpio, eif
from harness.images.recipes import build_image
from harness.registry import Registry

KINDS = ("kill-qemu", "guest-panic", "kill-supervisor", "sigint-supervisor",
         "terminate-during-boot", "close-vhost-user")
LEFTOVERS = ("processes", "sockets", "memfds", "runtime_entries", "cids", "cpus")


# ------------------------------------------------------------------------------------------
# images


def own_copy(eif_path: Path, folder: Path, name: str) -> Path:
    """A copy of ``eif_path`` in the storm's folder: the image cache is shared, and another
    user's build may replace its files during a storm."""
    out = folder / name
    if not out.exists():
        shutil.copyfile(eif_path, folder / f".{name}.tmp")
        os.replace(folder / f".{name}.tmp", out)
    return out


def panic_eif(folder: Path, delay: float | None) -> Path:
    """hello whose application panics the kernel after ``delay`` s, or (None) hello's kernel
    with a ramdisk without init, which panics during boot."""
    if delay is not None:
        name = f"panic-{delay:g}.eif"
        if (folder / name).exists():
            return folder / name
        built = build_image("hello", cmd=["/bin/sh", "-c", f"sleep {delay:g}; echo c > /proc/sysrq-trigger"])
        return own_copy(built, folder, name)
    out = folder / "no-init.eif"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            boot = eif.extract_boot_files(folder / "hello.eif", tmp)
            ramdisk = Path(tmp) / "ramdisk"
            cpio.write_cpio_file(ramdisk, [cpio.Entry.directory("dev")])
            eif.write_eif(out, boot.kernel, boot.cmdline, [ramdisk], None)
    return out


# ------------------------------------------------------------------------------------------
# one round


@dataclass
class Round:
    index: int
    kind: str
    delay: float
    detail: str = ""
    moment: float | None = None
    injected: str = ""
    heartbeat_first: bool | None = None
    run_status: int | None = None
    run_error: str = ""
    ended: str = ""
    describe_ok: bool = True
    seconds: float = 0.0
    leftovers: dict = field(default_factory=lambda: dict.fromkeys(LEFTOVERS, 0))
    leftover_detail: list = field(default_factory=list)


class Storm:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.runtime = Path(args.runtime_dir or tempfile.mkdtemp(prefix="nh-storm-"))
        self.images = Path(tempfile.mkdtemp(prefix="nh-storm-img-"))
        self.env = dict(os.environ, NITRO_HARNESS_RUNTIME_DIR=str(self.runtime))
        self.env.pop("NITRO_HARNESS_VRING_JOURNAL", None)
        self.hello = own_copy(build_image("hello"), self.images, "hello.eif")
        self.cli_pids: set[int] = set()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def plan(self, index: int, kind: str) -> Round:
        rng = self.rng
        if kind == "guest-panic":
            steps = int(self.args.max_delay * 2)
            slot = rng.randint(-1, steps)  # -1: during boot (no init)
            return Round(index, kind, slot / 2 if slot >= 0 else 0.0,
                         "no init: panics during boot" if slot < 0 else f"sysrq-c {slot / 2:g} s after the application starts")
        if kind == "terminate-during-boot":
            return Round(index, kind, round(rng.uniform(0, self.args.boot_window), 2))
        r = Round(index, kind, round(rng.uniform(0, self.args.max_delay), 2))
        if kind == "close-vhost-user":
            r.detail = rng.choice(["vsock", "nsm"]) + ".sock"
        return r

    def run_round(self, r: Round) -> None:
        started = time.monotonic()
        image = self.hello
        if r.kind == "guest-panic":
            image = panic_eif(self.images, None if r.detail.startswith("no init") else r.delay)
        name = f"storm-{r.index}"
        run = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "run-enclave", "--eif-path", str(image),
             "--memory", "256", "--cpu-count", "1", "--debug-mode", "--enclave-name", name],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.cli_pids.add(run.pid)
        targets: dict[str, tuple[int, int]] = {}
        try:
            self._inject(r, run, name, started, targets)
            out, err = run.communicate(timeout=self.args.settle + 300)
        except BaseException:
            run.kill()
            run.wait()
            raise
        finally:
            self.cli_pids.discard(run.pid)
        r.run_status = run.returncode
        if run.returncode:
            lines = err.strip().splitlines() or [""]
            r.run_error = next((x for x in lines if x.startswith("[ E")), lines[-1])[:200]
        if r.heartbeat_first is None and r.kind == "terminate-during-boot":
            r.heartbeat_first = run.returncode == 0
        self._settle(r, targets)
        r.seconds = time.monotonic() - started

    def _watch(self, run: subprocess.Popen, targets: dict[str, tuple[int, int]]) -> None:
        """Note the enclave process (the CLI's child) and its QEMU (the enclave process's
        child) with their start times, once each exists."""
        if "supervisor" not in targets:
            for pid in children(run.pid):
                st = proc_stat(pid)
                if st and b"harness.enclave_process" in read_bytes(f"/proc/{pid}/cmdline"):
                    targets["supervisor"] = (pid, st[2])
        if "supervisor" in targets and "qemu" not in targets:
            sup = targets["supervisor"][0]
            for pid in children(sup):
                st = proc_stat(pid)
                if st and b"qemu-system" in read_bytes(f"/proc/{pid}/cmdline"):
                    targets["qemu"] = (pid, st[2])

    def _inject(self, r: Round, run: subprocess.Popen, name: str, started: float,
                targets: dict[str, tuple[int, int]]) -> None:
        due = started + r.delay
        limit = started + r.delay + 120
        while True:
            self._watch(run, targets)
            now = time.monotonic()
            if r.kind == "guest-panic":
                r.moment, r.injected = r.delay, "image"
                return
            if now >= due:
                done = self._try_fault(r, run, name, targets)
                if done:
                    r.moment = round(time.monotonic() - started, 2)
                    if r.heartbeat_first is None:
                        r.heartbeat_first = run.poll() == 0
                    return
                if run.poll() is not None and not live(*targets.get("supervisor", (0, 0))):
                    r.injected = "no target: the enclave ended first"
                    return
                if now > limit:
                    r.injected = "no target within 120 s"
                    return
            time.sleep(0.02)

    def _try_fault(self, r: Round, run: subprocess.Popen, name: str,
                   targets: dict[str, tuple[int, int]]) -> bool:
        """Inject ``r``'s fault if its target exists now; True once injected."""
        sup = targets.get("supervisor")
        if r.kind == "terminate-during-boot":
            r.heartbeat_first = run.poll() == 0
            term = self.cli("terminate-enclave", "--enclave-name", name, timeout=300)
            if term.returncode != 0 and "no running enclave has it" in term.stderr and run.poll() is None:
                return False  # not recorded yet: try again
            r.injected = f"terminate-enclave exit {term.returncode}" + (
                f": {term.stderr.strip().splitlines()[-1][:120]}" if term.returncode else "")
            return True
        if sup is None or not live(*sup):
            return False
        if r.kind in ("kill-supervisor", "sigint-supervisor"):
            sig = signal.SIGKILL if r.kind == "kill-supervisor" else signal.SIGINT
            os.kill(sup[0], sig)
            r.injected = f"{sig.name} to enclave process {sup[0]}"
            return True
        if r.kind == "kill-qemu":
            qemu = targets.get("qemu")
            if qemu is None or not live(*qemu):
                return False
            os.kill(qemu[0], signal.SIGKILL)
            r.injected = f"SIGKILL to QEMU {qemu[0]}"
            return True
        if r.kind == "close-vhost-user":
            state = self._state_dir(name)
            if state is None:
                return False
            fds = connection_fds(sup[0], str(state / r.detail))
            if not fds:
                return False
            with contextlib.suppress(OSError):
                copy = pidfd_getfd(sup[0], fds[0])
                with socket.socket(fileno=copy) as s:
                    s.shutdown(socket.SHUT_RDWR)
                r.injected = f"shutdown of {r.detail} connection (fd {fds[0]} of {sup[0]})"
                return True
            return False
        raise ValueError(r.kind)

    def _state_dir(self, name: str) -> Path | None:
        for path in (self.runtime / "enclaves").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if data.get("name") == name:
                    return Path(data["state_dir"])
        return None

    def _settle(self, r: Round, targets: dict[str, tuple[int, int]]) -> None:
        deadline = time.monotonic() + self.args.settle
        while time.monotonic() < deadline:
            reap_orphans(self.cli_pids)
            if not processes_of(self.runtime, self.cli_pids):
                break
            time.sleep(0.2)
        reap_orphans(self.cli_pids)
        desc = self.cli("describe-enclaves", timeout=60)
        with contextlib.suppress(ValueError):
            r.describe_ok = desc.returncode == 0 and json.loads(desc.stdout) == []
        if not r.describe_ok:
            r.leftover_detail.append(f"describe-enclaves: {desc.stdout.strip()[:200]}")
        newest = sorted((self.runtime / "ended").glob("*.json"))
        if newest:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(newest[-1].read_text())
                if data.get("name") == f"storm-{r.index}":
                    r.ended = data.get("reason", "")[:160]
        self._count(r)
        self._clean(r, targets)

    def _count(self, r: Round) -> None:
        pids = processes_of(self.runtime, self.cli_pids)
        sockets = count_sockets(self.runtime, pids)
        memfds = count_memfds(pids + [os.getpid()])
        entries, _ = runtime_entries(self.runtime)
        records = Registry(self.runtime).records()
        r.leftovers = {
            "processes": len(pids), "sockets": len(sockets), "memfds": len(memfds),
            "runtime_entries": len(entries), "cids": len({x.cid for x in records}),
            "cpus": len({c for x in records if not x.shared_cpus for c in x.cpu_ids}),
        }
        r.leftover_detail += [f"process {describe(p)}" for p in pids]
        r.leftover_detail += [f"runtime entry {e}" for e in entries]
        r.leftover_detail += [f"memfd {m}" for m in sorted(memfds)][:8]

    def _clean(self, r: Round, targets: dict[str, tuple[int, int]]) -> None:
        """End what the round left so the next one starts clean: its processes (the PIDs the
        storm noted, verified by start time, then the others it can tie to the runtime
        directory) and its files."""
        if not any(r.leftovers.values()):
            return
        for pid, start in targets.values():
            if live(pid, start):
                os.kill(pid, signal.SIGKILL)
        for pid in processes_of(self.runtime, self.cli_pids):
            st = proc_stat(pid)
            if st and live(pid, st[2]):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        reap_orphans(self.cli_pids)
        entries, _ = runtime_entries(self.runtime)
        for rel in entries:
            path = self.runtime / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> None:
        shutil.rmtree(self.images, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# report


def table(rounds: list[Round]) -> str:
    by_kind: dict[str, list[Round]] = collections.defaultdict(list)
    for r in rounds:
        by_kind[r.kind].append(r)
    head = ["fault", "rounds", "not injected", *LEFTOVERS, "describe not []",
            "run-enclave exit statuses"]
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |",
             "|" + "---|" * len(head)]
    for kind in [k for k in KINDS if k in by_kind] + ["all"]:
        rs = rounds if kind == "all" else by_kind[kind]
        statuses = collections.Counter(r.run_status for r in rs)
        missed = sum(r.injected.startswith("no target") for r in rs)
        cells = [kind, str(len(rs)), str(missed)] + [str(sum(r.leftovers[k] for r in rs)) for k in LEFTOVERS]
        cells.append(str(sum(not r.describe_ok for r in rs)))
        cells.append(", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_line(r: Round) -> str:
    left = ", ".join(f"{k} {v}" for k, v in r.leftovers.items() if v) or "nothing left"
    when = ("after the heartbeat" if r.heartbeat_first else "during boot") \
        if r.kind != "guest-panic" else "in the guest"
    return (f"round {r.index:3d} {r.kind:22s} delay {r.delay:5.2f} s moment {r.moment} s "
            f"({when}) {r.detail} | {r.injected} | run-enclave {r.run_status}"
            f"{': ' + r.run_error if r.run_error else ''} | ended: {r.ended or '-'} | "
            f"{r.seconds:.1f} s | {left}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--max-delay", type=float, default=10.0,
                        help="fault moments are drawn in [0, this] seconds after run-enclave starts")
    parser.add_argument("--boot-window", type=float, default=4.0,
                        help="terminate-during-boot moments are drawn in [0, this] seconds")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds a round waits for the enclave's processes to end by themselves")
    parser.add_argument("--runtime-dir", help="default: a new temporary folder")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-reap", action="store_true",
                        help="do not reap orphaned enclave processes (leave them to PID 1)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"fault_storm: unknown kind {unknown[0]} (known: {', '.join(KINDS)})", file=sys.stderr)
        return 2
    if not args.no_reap:
        become_subreaper()
    storm = Storm(args)
    print(f"fault storm: {args.rounds} rounds, seed {args.seed}, runtime {storm.runtime}",
          file=sys.stderr)
    rounds: list[Round] = []
    started = time.monotonic()
    status = 0
    try:
        order: list[str] = []
        for index in range(args.rounds):
            if not order:  # every kind once per cycle, in a seeded order
                order = list(kinds)
                storm.rng.shuffle(order)
            r = storm.plan(index, order.pop())
            storm.run_round(r)
            rounds.append(r)
            print(round_line(r), file=sys.stderr, flush=True)
            for line in r.leftover_detail:
                print(f"    {line}", file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    finally:
        storm.close()
    wall = time.monotonic() - started
    final = Round(-1, "end", 0)
    storm._settle(final, {})
    _, ended = runtime_entries(storm.runtime)
    print(table(rounds))
    print(f"\n{len(rounds)} rounds, seed {args.seed}, wall time {wall:.0f} s "
          f"({wall / max(1, len(rounds)):.1f} s a round); after the storm: "
          + (", ".join(f"{k} {v}" for k, v in final.leftovers.items() if v) or "nothing left")
          + f"; {ended} ended-enclave records kept (at most 16 by design)")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "wall_s": wall,
                                         "rounds": [asdict(r) for r in rounds],
                                         "after": final.leftovers}, indent=2))
    if status:
        return status
    left = any(any(r.leftovers.values()) or not r.describe_ok or r.injected.startswith("no target")
               for r in rounds + [final])
    if not args.runtime_dir and not left:
        shutil.rmtree(storm.runtime, ignore_errors=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
