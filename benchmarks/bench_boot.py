"""Boot-to-heartbeat benchmark, side by side with its references.

Reports, in one run, alternating the contenders so host load hits them alike:

* ``harness``: ``Enclave.start`` of an image until its heartbeat arrives (vsock and NSM back
  ends, QMP, pinning, console capture included);
* ``bare``: the same QEMU booting the same kernel, command line and initrd on the same machine
  shape (memfd RAM preallocated and locked, as the harness reserves enclave memory up front)
  with no harness devices, timed until init reaches the heartbeat step (its console line
  ``nitro-init: loaded /nsm.ko``, printed right before it connects), so the ratio is the
  harness's overhead;
* with ``--compare-debian``: the ``hello-debian`` image (Debian's cloud kernel, ACPI layout)
  against ``hello`` (the Nitro-style kernel).

Usage: ``python benchmarks/bench_boot.py [--rounds N] [--image hello] [--compare-debian]``.
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
from harness.enclave import Enclave, EnclaveConfig
from harness.images.recipes import build_image
from harness.layout import choose_layout
from harness.machine import MachineSpec, build_command

MARK = b"nitro-init: loaded /nsm.ko"


def harness_boot(image: Path) -> float:
    start = time.monotonic()
    with Enclave.start(EnclaveConfig(eif_path=image, memory_mib=512, cpu_count=1, debug_mode=True)):
        return time.monotonic() - start


def bare_boot(image: Path, qemu_path: Path, work: Path) -> float:
    boot = eif.extract_boot_files(image, work)
    layout = choose_layout(boot.kernel)
    spec = MachineSpec(
        qemu=qemu_path, accel="tcg", kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline,
        memory_mib=512, vcpu_cpus=(0,), other_cpus=(), state_dir=work, firmware=qemu.find_firmware(),
        acpi=layout.acpi,
    )
    cmd = [a for a in build_command(spec) if a != "-S"]
    # Plain QEMU: serial on stdio instead of the harness's console socket, no QMP.
    cmd = _replace_serial(cmd)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        while MARK not in seen:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError("bare QEMU ended before init's heartbeat step")
            seen = seen[-200:] + chunk
        return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="hello")
    parser.add_argument("--compare-debian", action="store_true")
    args = parser.parse_args()
    qemu_path = qemu.find_qemu()
    images = {args.image: build_image(args.image)}
    if args.compare_debian:
        images["hello-debian"] = build_image("hello-debian")
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, image in images.items():
            with tempfile.TemporaryDirectory() as tmp:
                results.setdefault(f"bare {name}", []).append(bare_boot(image, qemu_path, Path(tmp)))
            results.setdefault(f"harness {name}", []).append(harness_boot(image))
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


if __name__ == "__main__":
    main()
