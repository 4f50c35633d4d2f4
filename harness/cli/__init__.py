"""The ``nitro-harness`` command: nitro-cli compatible commands plus the harness's own.

SPEC 9: JSON results on stdout (2-space indent), progress on stderr, exit status = the error
number. Each area keeps its commands in its own module here; a module exposes
``register(subparsers)`` which adds its sub-commands, each with ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from harness import __version__
from harness.errors import ErrorCode, NitroError

# Command modules, in the order their commands appear in --help, with the commands each owns.
# Only the module owning the command named on the command line is imported (a command's start-up
# should not pay for the KMS server or the scenario engine); --help imports them all.
COMMAND_MODULES = {
    "harness.cli.eif_commands": ("build-enclave", "describe-eif", "pcr", "sign-eif"),
    "harness.cli.enclave_commands": ("run-enclave", "describe-enclaves", "console", "terminate-enclave"),
    "harness.cli.attestation_commands": ("attest", "verify-attestation", "pki"),
    "harness.cli.kms_commands": ("kms", "vsock-proxy"),
    "harness.cli.image_commands": ("images",),
    "harness.cli.doctor_commands": ("doctor",),
    "harness.cli.scenario_commands": ("run",),
}


def print_json(value: Any) -> None:
    """Print ``value`` as nitro-cli does: JSON with 2-space indentation, then a newline."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    """Write a progress line to stderr (stdout is reserved for the JSON result)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become E01/E03 with nitro-cli's exit statuses."""

    def error(self, message: str) -> None:  # type: ignore[override]
        code = ErrorCode.MissingArgument if "required" in message else ErrorCode.InvalidArgument
        raise NitroError(code, f"{self.prog}: {message}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with the sub-commands registered.

    With ``command`` (the first word of the command line) only the module owning it is
    imported; otherwise, or for an unknown word, every module is.
    """
    parser = _Parser(prog="nitro-harness", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nitro-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    owners = [m for m, commands in COMMAND_MODULES.items() if command in commands]
    for name in owners or COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one command and return (and exit with) its status.

    A :class:`NitroError` prints ``[ Exx ] Name: message`` (plus its details) on stderr and
    exits with the code's number; Ctrl-C exits 130 after the command's own cleanup ran; any
    other exception is E00 with one line, and the traceback only when
    ``NITRO_HARNESS_DEBUG=1``.
    """
    try:
        words = sys.argv[1:] if argv is None else argv
        parser = build_parser(words[0] if words else None)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return ErrorCode.MissingArgument.value
        status = args.func(args)
        return int(status or 0)
    except NitroError as err:
        sys.stderr.write(str(err) + "\n")
        if err.details:
            sys.stderr.write(err.details.rstrip("\n") + "\n")
        return err.code.value
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - the one place that turns bugs into E00
        if os.environ.get("NITRO_HARNESS_DEBUG") == "1":
            raise
        sys.stderr.write(
            f"[ E00 ] UnspecifiedError: {type(err).__name__}: {err} "
            "(set NITRO_HARNESS_DEBUG=1 for the traceback)\n"
        )
        return ErrorCode.UnspecifiedError.value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
