"""Boot-to-heartbeat benchmark, side by side with its references, phase by phase.

Reports, in one run, alternating the contenders so host load hits them alike:

* ``harness``: ``Enclave.start`` of an image until its heartbeat arrives (vsock and NSM back
  ends, QMP, pinning, console capture included);
* ``bare``: the same QEMU booting the same kernel, command line and initrd on the same machine
  shape (memfd RAM preallocated and locked, as the harness reserves enclave memory up front)
  with no harness devices, timed until init reaches the heartbeat step (its console line
  ``nitro-init: loaded /nsm.ko``, printed right before it connects), so the ratio is the
  harness's overhead. The bare QEMU preallocates its RAM itself, as a plain QEMU command line
  does; the harness fills its memfd on the enclave's CPUs while it prepares the rest
  (docs/boot.md#guest-ram), which is why the ratio can be below 1;
* with ``--compare-debian``: the ``hello-debian`` image (Debian's cloud kernel, ACPI layout)
  against ``hello`` (the Nitro-style kernel);
* with ``--compare-arch``: the ``hello-arm64`` image (Graviton: the arm64 Nitro-style kernel on
  ``qemu-system-aarch64``'s virt machine, docs/boot.md#aarch64-machine) against ``hello``, both
  under TCG here.

Then the boot timeline's phases (docs/boot.md#boot-timeline) side by side: the median host
time of each phase, in seconds since ``Enclave.start`` began (harness) or since QEMU was spawned
(bare), and the median guest clock of the guest's phases, read from the console the same way for
both (:mod:`harness.console_timestamps`).

Usage: ``python benchmarks/bench_boot.py [--rounds N] [--image hello] [--compare-debian]
[--compare-arch]``.
Prints medians and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import eif, qemu
from harness.boot_timeline import BootTimeline, Phase
from harness.console_timestamps import LineClock, parse_console
from harness.enclave import Enclave, EnclaveConfig
from harness.images.recipes import build_image
from harness.layout import choose_layout
from harness.machine import MachineSpec, build_command

MARK = b"nitro-init: loaded /nsm.ko"

# One boot's phases: key (the phase name, or an init step's label) -> (host s, guest s).
Phases = dict[str, tuple[float | None, float | None]]


def _keyed(phases: list[Phase]) -> Phases:
    out: Phases = {}
    for p in phases:
        out.setdefault(p.label if p.name.startswith("init_") else p.name, (p.host_s, p.guest_s))
    return out


def harness_boot(image: Path) -> tuple[float, Phases, list[Phase]]:
    start = time.monotonic()
    with Enclave.start(EnclaveConfig(eif_path=image, memory_mib=512, cpu_count=1, debug_mode=True)) as enclave:
        took = time.monotonic() - start
        phases = enclave.timeline.phases()
    return took, _keyed(phases), phases


def bare_boot(image: Path, work: Path) -> tuple[float, Phases]:
    boot = eif.extract_boot_files(image, work)
    layout = choose_layout(boot.kernel, arch=boot.arch)
    spec = MachineSpec(
        qemu=qemu.find_qemu(boot.arch), accel="tcg", kernel=boot.kernel, initrd=boot.initrd,
        cmdline=boot.cmdline, memory_mib=512, vcpu_cpus=(0,), other_cpus=(), state_dir=work,
        firmware=qemu.find_firmware(), acpi=layout.acpi, arch=boot.arch,
    )
    cmd = [a for a in build_command(spec) if a != "-S"]
    # Plain QEMU: serial on stdio instead of the harness's console socket, no QMP.
    cmd = _replace_serial(cmd)
    timeline = BootTimeline(str(image))
    start = timeline.origin
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timeline.mark("qemu_spawned")
    clock, seen = LineClock(), bytearray()
    try:
        while MARK not in seen[-(4096 + len(MARK)):]:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError("bare QEMU ended before init's heartbeat step")
            clock.feed(chunk, time.monotonic())
            seen += chunk
        took = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    timeline.add_console(parse_console(bytes(seen), clock), clock)
    return took, _keyed(timeline.phases())


def _replace_serial(cmd: list[str]) -> list[str]:
    out, skip = [], 0
    for i, arg in enumerate(cmd):
        if skip:
            skip -= 1
            continue
        if arg in ("-chardev", "-serial", "-qmp") and i + 1 < len(cmd):
            skip = 1
            continue
        out.append(arg)
    return out + ["-serial", "stdio"]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cell(value: float | None, guest: bool = False) -> str:
    if value is None:
        return f"{'-':>9}" if guest else f"{'-':>8}"
    return f"[{value:7.3f}]" if guest else f"{value:8.3f}"


def print_phases(name: str, harness_runs: list[Phases], bare_runs: list[Phases],
                 labels: dict[str, str]) -> None:
    """The side-by-side phase table of ``name``: rows in the harness's order, medians."""
    print(f"\nphases of {name} (median s since the start; [guest clock])")
    print(f"{'phase':<62} {'harness':>8} {'[guest]':>9}  {'bare':>8} {'[guest]':>9}")
    keys = list(dict.fromkeys(k for run in harness_runs + bare_runs for k in run))
    for key in keys:
        h = [r.get(key, (None, None)) for r in harness_runs]
        b = [r.get(key, (None, None)) for r in bare_runs]
        print(f"{labels.get(key, key)[:62]:<62} {_cell(_median([x[0] for x in h]))} "
              f"{_cell(_median([x[1] for x in h]), True)}  {_cell(_median([x[0] for x in b]))} "
              f"{_cell(_median([x[1] for x in b]), True)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="hello")
    parser.add_argument("--compare-debian", action="store_true")
    parser.add_argument("--compare-arch", action="store_true")
    args = parser.parse_args()
    images = {args.image: build_image(args.image)}
    if args.compare_debian:
        images["hello-debian"] = build_image("hello-debian")
    if args.compare_arch:
        images["hello-arm64"] = build_image("hello-arm64")
    results: dict[str, list[float]] = {}
    phases: dict[str, list[Phases]] = {}
    labels: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, image in images.items():
            with tempfile.TemporaryDirectory() as tmp:
                took, bare = bare_boot(image, Path(tmp))
            results.setdefault(f"bare {name}", []).append(took)
            phases.setdefault(f"bare {name}", []).append(bare)
            took, keyed, raw = harness_boot(image)
            results.setdefault(f"harness {name}", []).append(took)
            phases.setdefault(f"harness {name}", []).append(keyed)
            labels.update({(p.label if p.name.startswith("init_") else p.name): p.label for p in raw})
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"{'run':<28} {'median s':>9}  samples")
    for key, value in medians.items():
        print(f"{key:<28} {value:9.2f}  {', '.join(f'{x:.2f}' for x in results[key])}")
    ratio = medians[f"harness {args.image}"] / medians[f"bare {args.image}"]
    print(f"harness / bare QEMU ({args.image}): {ratio:.2f}x (overhead {100 * (ratio - 1):.0f} %)")
    if args.compare_debian:
        print(
            "Nitro-style kernel / Debian cloud kernel (harness boot-to-heartbeat): "
            f"{medians[f'harness {args.image}'] / medians['harness hello-debian']:.2f}x"
        )
    if args.compare_arch:
        print(
            "aarch64 / x86_64 under TCG (harness boot-to-heartbeat, hello-arm64 / hello): "
            f"{medians['harness hello-arm64'] / medians['harness hello']:.2f}x; harness / bare "
            f"QEMU (hello-arm64): {medians['harness hello-arm64'] / medians['bare hello-arm64']:.2f}x"
        )
    labels["qemu_spawned"] = "QEMU process started"
    for name in images:
        print_phases(name, phases[f"harness {name}"], phases[f"bare {name}"], labels)


if __name__ == "__main__":
    main()
