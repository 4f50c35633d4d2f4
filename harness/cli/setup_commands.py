"""``nitro-harness setup``: install what the harness needs on this host (:mod:`harness.setup`).

Progress lines (``setup: ...``) go to stderr, each step's time after it; the exit status is 0
when every chosen step finished, 1 when one failed (``setup: FAILED at step "STEP": reason``).
A usage error (an unknown ``--only`` step) is E03 InvalidArgument, as for every command.
``scripts/setup.sh`` in a clone runs this command before the package is installed.
"""

from __future__ import annotations

import argparse


def _steps(value: str) -> str:
    """argparse type of ``--only``: a comma-separated list of known steps."""
    from harness.setup import StepFailed, parse_only

    try:
        parse_only([value])
    except StepFailed as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--only: ")) from None
    return value


def register(subparsers) -> None:
    """Add ``setup`` to ``subparsers``."""
    from harness.setup import STEPS

    parser = subparsers.add_parser(
        "setup",
        help="install what the harness needs: apt sources and packages, QEMU, kernel, images",
        description=(
            "Install, idempotently, what running enclaves needs: bookworm-backports sources, "
            "apt packages, the patched QEMU, the harness itself (from a checkout), the "
            "Nitro-style kernel, a doctor check and the hello image. Builds are cached under "
            "$NITRO_HARNESS_CACHE or ~/.cache/nitro-harness; a second run only checks. "
            f"Steps, in order: {', '.join(STEPS)}."
        ),
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="say what each step would do; change nothing")
    parser.add_argument("--only", action="append", metavar="STEP[,STEP]", type=_steps,
                        help=f"run only these steps (of {', '.join(STEPS)}); repeatable")
    parser.add_argument("--image", action="append", metavar="NAME", dest="images",
                        help="recipe the images step builds (repeatable; default hello)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the set-up; return its exit status."""
    from harness.setup import Context, run_setup

    ctx = Context(dry_run=args.dry_run, images=args.images or ["hello"])
    return run_setup(ctx, args.only)
