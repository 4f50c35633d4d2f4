"""``nitro-harness check-eif``: will this EIF boot, and boot as on Nitro? (docs/nitro-cli.md#check-eif)

Prints one line per finding (``<severity> <rule>: <what>; fix: <what to change>``) on stdout, or
with ``--json`` one object ``{"EifPath", "Findings": [{"Severity", "Rule", "Message", "Fix"}],
"Errors", "Warnings"}``. Exits 0 without errors; with errors it ends with one ``[ Exx ]`` line
naming the first, and exits with its code: E35 for the file's structure or CRC, E59 for its
signature, E26 for too little ``--memory``, E36 for anything that would stop the boot.
"""

from __future__ import annotations

from pathlib import Path

from harness.cli import print_json, progress
from harness.errors import NitroError


def register(subparsers) -> None:
    """Add check-eif."""
    c = subparsers.add_parser("check-eif", help="check an EIF before booting it: structure, "
                                                "kernel, init, command, memory")
    c.add_argument("--eif-path", required=True, type=Path)
    c.add_argument("--memory", help="the run's memory (MiB, or with suffix M, G, T): checked "
                                    "against nitro-cli's 4x rule")
    c.add_argument("--debug-mode", action="store_true",
                   help="say what debug mode means for this run's attestation")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.set_defaults(func=check_eif_cmd)


def check_eif_cmd(args) -> int:
    """``check-eif``: run :func:`harness.preflight.check_eif` and report (see the module doc)."""
    from harness.allocator import parse_memory
    from harness.preflight import ERROR, WARNING, check_eif, counts, first_error

    memory = parse_memory(args.memory) if args.memory is not None else None
    if not args.eif_path.is_file():
        from harness.errors import ErrorCode
        raise NitroError(ErrorCode.FileOperationFailure, f"{args.eif_path}: EIF file not found")
    findings = check_eif(args.eif_path, memory_mib=memory,
                         debug_mode=True if args.debug_mode else None)
    n = counts(findings)
    if args.json:
        print_json({"EifPath": str(args.eif_path), "Findings": [f.to_json() for f in findings],
                    "Errors": n[ERROR], "Warnings": n[WARNING]})
    else:
        for f in findings:
            print(f.line(), flush=True)
        progress(f"check-eif: {n[ERROR]} error(s), {n[WARNING]} warning(s)")
    first = first_error(findings)
    if first is not None:
        assert first.code is not None
        raise NitroError(first.code, f"{args.eif_path}: {n[ERROR]} error(s) found; the first: "
                                     f"{first.rule}: {first.message}")
    return 0
