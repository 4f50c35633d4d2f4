"""``nitro-harness setup``: everything a host needs to run enclaves, idempotent, step by step.

Steps, in order (``--only STEP[,STEP]`` picks some; ``--dry-run`` says what each would do and
changes nothing):

- ``sources``: on Debian bookworm, bookworm-backports (deb + deb-src) when missing
  (:mod:`harness.setup.apt`);
- ``packages``: host tools and the QEMU and kernel build dependencies, through apt;
- ``qemu``: the patched QEMU, built once into ``<cache>/qemu-<version>-<patch hash>/``
  (:mod:`harness.setup.builds`);
- ``python``: from a checkout, ``pip install -e '.[test]'`` (:mod:`harness.setup.python_env`);
  an installed package has nothing to do;
- ``kernel``: the Nitro-style kernel the shipped images boot, ``<cache>/kernel-<v>-<hash>/``;
- ``doctor``: ``nitro-harness doctor`` must report ready;
- ``images``: ``nitro-harness images build hello`` (``--image NAME`` picks others).

Each step prints ``setup: == N/M step``, then what it did (``cached: ...`` when nothing was to
do) and ``setup: -- step: N.N s``; the run ends with ``setup: done in N.N s (step N.Ns, ...)``. A
failure prints ``setup: FAILED at step "STEP": reason`` and exits 1. The cache root is
``$NITRO_HARNESS_CACHE`` or ``~/.cache/nitro-harness``. Environment: JOBS (2),
NITRO_HARNESS_QEMU (use that QEMU: no build), QEMU_VERSION (10.0.2), SKIP_KERNEL=1,
SKIP_IMAGES=1, NITRO_HARNESS_APT_ETC (/etc/apt) and NITRO_HARNESS_OS_RELEASE (/etc/os-release)
to run the sources step against other files. Standard library only, so that
``scripts/setup.sh`` can run it from a fresh clone before the dependencies are installed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from harness.setup.apt import step_packages, step_sources
from harness.setup.builds import step_kernel, step_qemu
from harness.setup.context import Context, StepFailed
from harness.setup.python_env import settle_interpreter, step_python

__all__ = ["STEPS", "Context", "StepFailed", "parse_only", "run_setup"]


def step_doctor(ctx: Context) -> None:
    """``nitro-harness doctor``, which must report ready (its fix lines say what to do)."""
    if ctx.dry_run:
        ctx.log("would run nitro-harness doctor")
        return
    ctx.run(ctx.harness_command("doctor"), "nitro-harness doctor reports a missing piece (see its "
            "fix lines above); nitro-harness doctor")


def step_images(ctx: Context) -> None:
    """Build (or find cached) the images of ``ctx.images`` (``hello`` by default); one line
    each: the EIF's path, whether it came from the cache, its PCR0."""
    if ctx.flag("SKIP_IMAGES"):
        ctx.log("skipped (SKIP_IMAGES=1)")
        return
    for name in ctx.images:
        if ctx.dry_run:
            ctx.log(f"would run nitro-harness images build {name}")
            continue
        # The build's progress lines reach stderr as they come; its JSON is summed up here.
        status, out = ctx.output(ctx.harness_command("images", "build", name), stderr=None)
        if status != 0:
            raise StepFailed(f"nitro-harness images build {name} failed (exit {status})")
        try:
            info = json.loads(out)
        except ValueError:
            info = {}
        ctx.log(f"image {name}: {info.get('EifPath', '?')} "
                f"({'cached' if info.get('Cached') else 'built'}; "
                f"PCR0 {str(info.get('Measurements', {}).get('PCR0', '?'))[:16]}...)")


#: Every step, in the order a full run takes them.
STEPS: dict[str, Callable[[Context], None]] = {
    "sources": step_sources,
    "packages": step_packages,
    "qemu": step_qemu,
    "python": step_python,
    "kernel": step_kernel,
    "doctor": step_doctor,
    "images": step_images,
}


def parse_only(values: Sequence[str] | None) -> list[str]:
    """The steps a run takes, in :data:`STEPS` order, from ``--only`` values (each a
    comma-separated list; none means all). Raises StepFailed naming an unknown step."""
    if not values:
        return list(STEPS)
    wanted = [s.strip() for v in values for s in v.split(",") if s.strip()]
    for s in wanted:
        if s not in STEPS:
            raise StepFailed(f"--only: unknown step '{s}' (steps: {' '.join(STEPS)})")
    if not wanted:
        raise StepFailed(f"--only needs a list: {' '.join(STEPS)}")
    return [s for s in STEPS if s in wanted]


def run_setup(ctx: Context, only: Sequence[str] | None = None) -> int:
    """Run the chosen steps with ``ctx``; return 0, or 1 after printing the FAILED line."""
    current = "start"
    started = time.monotonic()
    times: list[str] = []
    try:
        steps = parse_only(only)
        if "python" not in steps:
            settle_interpreter(ctx)
        for number, name in enumerate(steps, 1):
            current = name
            ctx.log(f"== {number}/{len(steps)} {name}{' (dry run)' if ctx.dry_run else ''}")
            t0 = time.monotonic()
            STEPS[name](ctx)
            took = time.monotonic() - t0
            ctx.log(f"-- {name}: {took:.1f} s")
            times.append(f"{name} {took:.1f}s")
    except StepFailed as err:
        ctx.log(f'FAILED at step "{current}": {err}')
        return 1
    except KeyboardInterrupt:
        ctx.log(f'FAILED at step "{current}": interrupted')
        return 130
    ctx.log(f"done in {time.monotonic() - started:.1f} s ({', '.join(times)})")
    return 0
