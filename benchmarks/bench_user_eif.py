"""An EIF as a nitro-cli user builds it, booted side by side with the shipped hello image.

The user's EIF is what ``build-enclave --blobs DIR --docker-archive app.tar`` makes from blobs
laid out as nitro-cli's: the harness's kernel with its embedded configuration removed (AWS's
enclave kernels embed none), nsm.ko, the static init and AWS's x86_64 command line, around an
OCI archive holding one static program. The harness must find from the kernel itself that it
takes ``virtio_mmio.device=`` entries and boot it in the Nitro layout (docs/boot.md#choosing-a-layout),
not the ACPI layout with ``-icount``, so it reaches its heartbeat as fast as the shipped images.

Reports, alternating the two so host load hits them alike, the median ``Enclave.start`` time
to the heartbeat of each, the user's EIF's layout and the ratio. Asserts nothing.

Usage: ``python benchmarks/bench_user_eif.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' kernel and archive helpers

from harness.enclave import Enclave, EnclaveConfig  # noqa: E402
from harness.images.recipes import build_image  # noqa: E402
from helpers.image_archives import oci_tarball  # noqa: E402
from helpers.kernels import aws_style_blobs  # noqa: E402

APP = '#include <stdio.h>\n#include <unistd.h>\nint main(void) { puts("user-app: up"); ' \
      'fflush(stdout); sleep(600); return 0; }\n'


def user_eif(work: Path) -> Path:
    """Build the user's EIF in ``work`` (see the module doc); exits when the kernel is missing."""
    blobs = work / "blobs"
    missing = aws_style_blobs(blobs)
    if missing:
        sys.exit(missing)
    (work / "app.c").write_text(APP)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(work / "app"), str(work / "app.c")], check=True)
    layer = [("app", "dir", None, {}), ("app/server", "file", (work / "app").read_bytes(), {"mode": 0o755})]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/app/server"], "WorkingDir": "/app"}}
    (work / "app.tar").write_bytes(oci_tarball(config=config, layers=(layer,)))
    eif = work / "user.eif"
    subprocess.run([sys.executable, "-m", "harness.cli", "build-enclave", "--blobs", str(blobs),
                    "--docker-archive", str(work / "app.tar"), "--output-file", str(eif)],
                   check=True, stdout=subprocess.DEVNULL)
    return eif


def boot(eif: Path) -> tuple[float, str]:
    """Seconds from ``Enclave.start`` to its return (the heartbeat), and the layout chosen."""
    start = time.monotonic()
    with Enclave.start(EnclaveConfig(eif_path=eif, memory_mib=512, cpu_count=1, debug_mode=True)) as enclave:
        return time.monotonic() - start, enclave.layout.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = {"hello (shipped)": build_image("hello"), "user EIF, no IKCONFIG": user_eif(Path(tmp))}
        times: dict[str, list[float]] = {name: [] for name in images}
        layouts: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, eif in images.items():
                took, layouts[name] = boot(eif)
                times[name].append(took)
    print(f"{'image':<24} {'layout':<7} {'median s':>9}  samples")
    for name, samples in times.items():
        print(f"{name:<24} {layouts[name]:<7} {statistics.median(samples):9.2f}  "
              f"{', '.join(f'{x:.2f}' for x in samples)}")
    ratio = statistics.median(times["user EIF, no IKCONFIG"]) / statistics.median(times["hello (shipped)"])
    print(f"user EIF / shipped hello (Enclave.start to heartbeat): {ratio:.2f}x")


if __name__ == "__main__":
    main()
