"""The ``nitro-harness`` command: nitro-cli compatible commands plus the harness's own.

docs/nitro-cli.md: JSON results on stdout (2-space indent), progress on stderr, exit status =
the error number. Each area keeps its commands in its own module here; a module exposes
``register(subparsers)`` which adds its sub-commands, each with ``func(args) -> int``.

Every failure ends here as one line ``[ Exx ] Name: message`` on stderr and a non-zero exit
status: a :class:`NitroError` exits with its code's number; an exception from a library is
mapped to its nitro-cli code (:func:`as_nitro_error`); anything else is E00, which exits
:data:`harness.errors.UNSPECIFIED_EXIT_STATUS` (nitro-cli's E00 would exit 0).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import sys
import warnings
from typing import Any

from harness import __version__
from harness.errors import ErrorCode, NitroError

# Command modules, in the order their commands appear in --help, with the commands each owns.
# Only the module owning the command named on the command line is imported (a command's start-up
# should not pay for the KMS server or the scenario engine); --help imports them all.
COMMAND_MODULES = {
    "harness.cli.eif_commands": ("build-enclave", "describe-eif", "pcr", "sign-eif"),
    "harness.cli.check_commands": ("check-eif",),
    "harness.cli.enclave_commands": ("run-enclave", "describe-enclaves", "console", "terminate-enclave"),
    "harness.cli.attestation_commands": ("attest", "verify-attestation", "pki"),
    "harness.cli.kms_commands": ("kms", "vsock-proxy"),
    "harness.cli.image_commands": ("images",),
    "harness.cli.blobs_commands": ("blobs",),
    "harness.cli.doctor_commands": ("doctor",),
    "harness.cli.setup_commands": ("setup",),
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
    """argparse whose usage errors become E01/E02/E03 with nitro-cli's exit statuses."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "required" in message:
            code = ErrorCode.MissingArgument
            commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            if commands and "COMMAND" in message:
                message += f" (one of {', '.join(commands[0].choices)})"
        elif "not allowed with" in message:
            code = ErrorCode.ConflictingArgument
        else:
            code = ErrorCode.InvalidArgument
        raise NitroError(code, f"{self.prog}: {message}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with the sub-commands registered.

    With ``command`` (the first word of the command line) only the module owning it is
    imported; otherwise, or for an unknown word, every module is.
    """
    parser = _Parser(prog="nitro-harness", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nitro-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    owners = [m for m, commands in COMMAND_MODULES.items() if command in commands]
    for name in owners or COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def as_nitro_error(err: BaseException) -> NitroError | None:
    """The nitro-cli error a library exception stands for, or None when it is unexpected.

    :class:`harness.attestation.AttestationError` -> E59 EIFSignatureCheckerError naming the
    failed check (nitro-cli's code for a signature or certificate that does not check out);
    :class:`OSError` on a file -> E19 FileOperationFailure naming the file; a connection or
    timeout error -> E11 SocketError.
    """
    attestation = sys.modules.get("harness.attestation")  # never imported just to compare
    if attestation is not None and isinstance(err, attestation.AttestationError):
        return NitroError(ErrorCode.EIFSignatureCheckerError, f"{err.check}: {err.message}")
    if isinstance(err, OSError) and err.filename is not None:
        return NitroError(ErrorCode.FileOperationFailure, f"{err.filename}: {err.strerror or err}")
    if isinstance(err, (ConnectionError, TimeoutError)):
        return NitroError(ErrorCode.SocketError, f"{type(err).__name__}: {err.strerror or err}")
    return None


def _report(err: NitroError) -> int:
    """Print ``err`` as one line (plus its details) on stderr; return its exit status."""
    line = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    try:
        sys.stderr.write(line + "\n")
        if err.details:
            sys.stderr.write(err.details.rstrip("\n") + "\n")
        sys.stderr.flush()
    except OSError:
        pass  # stderr is gone too; the exit status still tells
    return err.code.exit_status


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (``nitro-harness ... | head``)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _one_line_warnings():
    """A ``warnings.showwarning`` that prints library warnings (cryptography's on odd
    certificates, ...) as one stderr line each, each text once."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"warning: {category.__name__}: {' '.join(str(message).split())}"
        if text not in seen:
            seen.add(text)
            try:
                sys.stderr.write(text + "\n")
            except OSError:
                pass

    return show


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one command and return (and exit with) its status.

    A :class:`NitroError` prints ``[ Exx ] Name: message`` (plus its details) on stderr and
    exits with the code's number; a library exception is mapped by :func:`as_nitro_error`;
    any other exception is E00 with one line, exit status
    :data:`harness.errors.UNSPECIFIED_EXIT_STATUS`, and the traceback only when
    ``NITRO_HARNESS_DEBUG=1``. Ctrl-C exits 130 after the command's own cleanup ran; a reader
    that closed stdout early ends the command quietly with 0.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings()
        try:
            words = sys.argv[1:] if argv is None else argv
            parser = build_parser(words[0] if words else None)
            args = parser.parse_args(argv)
            status = args.func(args)
            return int(status or 0)
        except NitroError as err:
            return _report(err)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            return 130
        except Exception as err:  # noqa: BLE001 - the one place that turns exceptions into Exx
            if isinstance(err, BrokenPipeError) and _stdout_reader_gone():
                # The reader stopped reading (| head): not a failure of the command. Point
                # stdout at /dev/null so the interpreter's final flush does not fail again.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                return 0
            mapped = as_nitro_error(err)
            if mapped is not None:
                return _report(mapped)
            if os.environ.get("NITRO_HARNESS_DEBUG") == "1":
                raise
            return _report(
                NitroError(
                    ErrorCode.UnspecifiedError,
                    f"{type(err).__name__}: {err} (set NITRO_HARNESS_DEBUG=1 for the traceback)",
                )
            )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
