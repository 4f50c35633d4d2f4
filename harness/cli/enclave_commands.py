"""nitro-cli's enclave lifecycle commands: run-enclave, describe-enclaves, console, terminate-enclave.

docs/nitro-cli.md. ``run-enclave`` hands the enclave to a supervising process (:mod:`harness.enclave_process`)
and returns once the heartbeat arrived, so later commands find the enclave through the runtime
directory (:mod:`harness.registry`). An enclave that ended by itself leaves a record
(:mod:`harness.ended_enclaves`): ``console`` then prints its kept log and why it ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from harness import allocator, ended_enclaves, processes
from harness.cli import print_json, progress
from harness.control_socket import control_request
from harness.errors import ErrorCode, NitroError
from harness.layout import LAYOUTS
from harness.registry import Registry

if TYPE_CHECKING:
    from harness.enclave import EnclaveConfig

# nitro-cli's --config JSON keys (snake_case) -> EnclaveConfig fields.
_CONFIG_KEYS = {
    "eif_path", "cpu_count", "cpu_ids", "memory_mib", "enclave_cid", "debug_mode", "enclave_name",
    "attach_console",
}


def register(subparsers) -> None:
    """Add run-enclave, describe-enclaves, console and terminate-enclave."""
    run = subparsers.add_parser("run-enclave", help="boot an EIF as an enclave (returns after the heartbeat)")
    run.add_argument("--eif-path")
    run.add_argument("--cpu-count", type=_int_arg("--cpu-count"))
    run.add_argument("--cpu-ids", nargs="+", type=_int_arg("--cpu-ids"))
    run.add_argument("--memory", help="MiB, or with suffix M, G, T")
    run.add_argument("--enclave-cid", type=_int_arg("--enclave-cid"))
    run.add_argument("--debug-mode", action="store_true")
    run.add_argument("--attach-console", action="store_true")
    run.add_argument("--enclave-name")
    run.add_argument("--config", help="JSON file with nitro-cli's snake_case keys")
    run.add_argument("--parent-role", help="IAM role ARN measured into PCR3 (harness extension)")
    run.add_argument("--instance-id", help="parent instance ID measured into PCR4 (harness extension)")
    run.add_argument("--cpu-mode", choices=allocator.CPU_MODES, default=os.environ.get("NITRO_HARNESS_CPU_MODE", "auto"))
    run.add_argument("--nsm", choices=("auto", "harness", "qemu", "none"), default="auto")
    run.add_argument("--heartbeat-timeout", type=float, help="seconds (default: nitro-cli's formula)")
    run.add_argument("--layout", choices=LAYOUTS, default="auto",
                     help="machine layout (harness extension): nitro = no ACPI, devices on the kernel "
                          "command line; acpi = ACPI discovery; auto = from what the kernel can do "
                          "(docs/boot.md#choosing-a-layout)")
    run.add_argument("--accel", choices=("kvm", "tcg"), help="default: the doctor's choice")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="print the boot timeline on stderr, one line per phase (harness "
                          "extension; docs/boot.md#boot-timeline)")
    run.set_defaults(func=run_enclave)

    describe = subparsers.add_parser("describe-enclaves", help="list running enclaves as JSON")
    describe.set_defaults(func=describe_enclaves)

    console = subparsers.add_parser("console", help="attach to a debug-mode enclave's console")
    who = console.add_mutually_exclusive_group()
    who.add_argument("--enclave-id")
    who.add_argument("--enclave-name")
    console.add_argument("--disconnect-timeout", type=_int_arg("--disconnect-timeout"), help="seconds")
    console.set_defaults(func=console_cmd)

    terminate = subparsers.add_parser("terminate-enclave", help="terminate enclaves")
    who = terminate.add_mutually_exclusive_group()
    who.add_argument("--enclave-id")
    who.add_argument("--enclave-name")
    who.add_argument("--all", action="store_true")
    terminate.set_defaults(func=terminate_enclave)


def _int_arg(flag: str):
    def parse(text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise NitroError(ErrorCode.InvalidArgument, f"{flag} {text!r}: not a valid integer") from None

    return parse


def _config_from_args(args) -> tuple[EnclaveConfig, bool]:
    """Merge --config JSON and flags into an EnclaveConfig; returns it and attach_console."""
    # Imported here: the enclave engine's modules would slow every other command's start
    # (describe-enclaves is polled by scripts).
    from harness.enclave import EnclaveConfig

    values: dict = {}
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text())
        except OSError as err:
            raise NitroError(ErrorCode.FileOperationFailure, f"{args.config}: {err.strerror}") from None
        except ValueError as err:
            raise NitroError(ErrorCode.InvalidArgument, f"{args.config}: not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise NitroError(ErrorCode.InvalidArgument, f"{args.config}: must be a JSON object")
        unknown = sorted(set(data) - _CONFIG_KEYS)
        if unknown:
            raise NitroError(ErrorCode.InvalidArgument, f"{args.config}: unknown key {unknown[0]!r}")
        flags = [f for f in ("eif_path", "cpu_count", "cpu_ids", "memory", "enclave_cid", "enclave_name") if getattr(args, f)]
        if flags:
            raise NitroError(
                ErrorCode.ConflictingArgument, f"--config and --{flags[0].replace('_', '-')} were both given"
            )
        values = data
    eif = values.get("eif_path", args.eif_path)
    if not eif:
        raise NitroError(ErrorCode.MissingArgument, "the --eif-path argument is required")
    memory = values.get("memory_mib", args.memory)
    if memory is None:
        raise NitroError(ErrorCode.MissingArgument, "the --memory argument is required")
    config = EnclaveConfig(
        eif_path=Path(eif).resolve(),
        memory_mib=allocator.parse_memory(str(memory)),
        cpu_count=values.get("cpu_count", args.cpu_count),
        cpu_ids=values.get("cpu_ids", args.cpu_ids),
        cid=values.get("enclave_cid", args.enclave_cid),
        debug_mode=bool(values.get("debug_mode", args.debug_mode)),
        name=values.get("enclave_name", args.enclave_name),
        parent_role_arn=args.parent_role,
        instance_id=args.instance_id,
        nsm=args.nsm,
        cpu_mode=args.cpu_mode,
        heartbeat_timeout=args.heartbeat_timeout,
        layout=args.layout,
    )
    if config.cpu_count is not None and config.cpu_ids:
        raise NitroError(ErrorCode.ConflictingArgument, "both --cpu-count and --cpu-ids were given")
    if config.cpu_count is None and not config.cpu_ids:
        raise NitroError(ErrorCode.MissingArgument, "one of --cpu-count or --cpu-ids is required")
    attach = bool(values.get("attach_console", args.attach_console))
    if attach and not config.debug_mode:
        raise NitroError(
            ErrorCode.EnclaveConsoleConnectionFailure,
            "--attach-console needs --debug-mode (a Nitro enclave has no console otherwise)",
        )
    return config, attach


def run_enclave(args) -> int:
    """run-enclave: start the supervising process and print nitro-cli's JSON after the heartbeat."""
    config, attach = _config_from_args(args)
    if not config.eif_path.is_file():
        raise NitroError(ErrorCode.FileOperationFailure, f"{config.eif_path}: EIF file not found")
    data = asdict(config)
    data["eif_path"] = str(config.eif_path)
    request = {"config": data, "accel": args.accel}
    progress(f"Start allocating memory and booting {config.eif_path.name} ...")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.enclave_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.close()
        line = proc.stdout.readline()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    if not line:
        proc.wait()
        raise NitroError(
            ErrorCode.EnclaveProcessConnectionFailure,
            f"the enclave process exited with status {proc.returncode} without an answer",
        )
    answer = json.loads(line)
    if args.verbose:
        _print_timeline(answer, answer.get("state_dir"))
    if "error" in answer:
        proc.wait()
        err = answer["error"]
        raise NitroError(ErrorCode(err["code"]), err["message"], err.get("details"))
    info = answer["ok"]
    for line in answer.get("preflight", []):
        progress(f"warning: preflight: {line}")
    progress(f"Started enclave with enclave-cid: {info['EnclaveCID']}, memory: {info['MemoryMiB']} MiB, cpu-ids: {info['CPUIDs']}")
    print_json(info)
    if attach:
        # The supervisor's own socket: an enclave that already ended is then E39, not "unknown ID".
        if _stream_console(answer["control_socket"], None):
            _say_how_it_ended(Registry(), info["EnclaveID"], time.time())
    return 0


def _print_timeline(answer: dict, state_dir: str | None) -> None:
    """The supervisor's boot timeline lines on stderr (``--verbose``), under a heading that names
    the running enclave's boot-timeline.json."""
    lines = answer.get("timeline") or []
    if not lines:
        return
    where = f", also in {state_dir}/boot-timeline.json while it runs" if state_dir else ""
    progress(f"boot timeline (seconds since the start; [guest clock]{where}):")
    for line in lines:
        progress(f"  {line}")


def describe_enclaves(args) -> int:
    """describe-enclaves: a JSON array of every running enclave (docs/nitro-cli.md#describe-enclaves);
    an enclave whose EIF would not boot on Nitro gets a warning line on stderr (the JSON keeps
    nitro-cli's shape). Enclaves whose enclave process died are reclaimed first
    (docs/nitro-cli.md#stale-enclaves)."""
    registry = Registry()
    registry.reclaim()
    records = [r for r in registry.records() if r.state in ("RUNNING", "TERMINATING")]
    for r in records:
        if r.nitro_warning:
            progress(f"warning: enclave {r.enclave_id}: {r.nitro_warning}")
    print_json([r.describe() for r in records])
    return 0


def _find(args, registry: Registry | None = None):
    registry = registry or Registry()
    if args.enclave_id:
        return registry.find(enclave_id=args.enclave_id)
    if args.enclave_name:
        return registry.find(name=args.enclave_name)
    records = [r for r in registry.records() if r.state == "RUNNING"]
    if len(records) == 1:
        return records[0]
    raise NitroError(ErrorCode.MissingArgument, "the --enclave-id argument is required")


def _ended(args, registry: Registry, err: NitroError):
    """The ended record ``args`` names when ``err`` says no running enclave matched (with
    neither ID nor name: the newest, when nothing runs), else None."""
    if err.code == ErrorCode.InvalidArgument and (args.enclave_id or args.enclave_name):
        return ended_enclaves.find_ended(registry, enclave_id=args.enclave_id, name=args.enclave_name)
    if err.code == ErrorCode.MissingArgument and not args.enclave_id and not args.enclave_name \
            and not [r for r in registry.records() if r.state == "RUNNING"]:
        return ended_enclaves.find_ended(registry)
    return None


def _post_mortem(ended) -> int:
    """Print an ended enclave's kept console log on stdout and one line on when and why it ended
    (E44 for an enclave without debug mode: it had no console, but the line says why it ended)."""
    if not ended.debug_mode:
        raise NitroError(ErrorCode.EnclaveConsoleConnectionFailure,
                         f"{ended.line()}; it was not started with --debug-mode, so it had no console")
    log = Path(ended.console_log) if ended.console_log else None
    if log is not None and log.is_file():
        sys.stdout.buffer.write(log.read_bytes())
        sys.stdout.flush()
    else:
        progress("(no console log was kept)")
    progress(ended.line())
    return 0


def _say_how_it_ended(registry: Registry, enclave_id: str, since: float) -> None:
    """After a console stream closed: print the ended line of ``enclave_id`` when it ended by
    itself (its record appears within 3 s, the supervisor writing it while it releases)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        ended = ended_enclaves.find_ended(registry, enclave_id=enclave_id)
        if ended is not None and ended_enclaves.ended_after(ended, since):
            progress(ended.line())
            return
        time.sleep(0.1)


def console_cmd(args) -> int:
    """console: stream a debug-mode enclave's console (docs/nitro-cli.md#console: E44 without
    debug mode); for an enclave that ended by itself, its kept log and why it ended."""
    registry = Registry()
    registry.reclaim()  # an enclave whose enclave process died gets its ended record first
    try:
        record = _find(args, registry)
    except NitroError as err:
        ended = _ended(args, registry, err)
        if ended is None:
            raise
        return _post_mortem(ended)
    if not record.debug_mode:
        raise NitroError(
            ErrorCode.EnclaveConsoleConnectionFailure,
            f"enclave {record.enclave_id} was not started with --debug-mode: it has no console",
        )
    if not record.control_socket:
        raise NitroError(
            ErrorCode.EnclaveConsoleConnectionFailure,
            f"enclave {record.enclave_id} belongs to process {record.pid} (a test run), which "
            f"serves no console socket; read {record.state_dir}/console.log",
        )
    progress(f"Connecting to the console for enclave {record.enclave_id}...")
    since = time.time()
    if _stream_console(record.control_socket, args.disconnect_timeout):
        _say_how_it_ended(registry, record.enclave_id, since)
    return 0


def _stream_console(control_socket: str | None, disconnect_timeout: int | None) -> bool:
    """Copy the console to stdout until the enclave side closes (True) or the timeout passes
    (False)."""
    if not control_socket:
        raise NitroError(ErrorCode.EnclaveConsoleConnectionFailure, "the enclave serves no console")
    sock = control_request(control_socket, {"op": "console"})
    deadline = time.monotonic() + disconnect_timeout if disconnect_timeout else None
    out = sys.stdout.buffer
    with sock:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return False
            if not data:
                return True
            out.write(data)
            out.flush()
    return False


def terminate_enclave(args) -> int:
    """terminate-enclave: end one enclave (by ID or name) or ``--all``; prints nitro-cli's JSON.
    ``--all`` also removes the records of enclaves that ended by themselves."""
    registry = Registry()
    registry.reclaim()  # docs/nitro-cli.md#stale-enclaves
    # --all takes booting enclaves too: their enclave process ends the boot (harness.boot_control).
    records = [r for r in registry.records() if r.state in ("STARTING", "RUNNING", "TERMINATING")] \
        if args.all else [_find_running(args, registry)]
    results = []
    for record in records:
        if not record.control_socket:
            raise NitroError(
                ErrorCode.EnclaveProcessConnectionFailure,
                f"enclave {record.enclave_id} belongs to process {record.pid} (a test run, not "
                "run-enclave): terminate it from there",
            )
        sock = control_request(record.control_socket, {"op": "terminate"}, timeout=60)
        with sock:
            try:
                reply = sock.makefile("r").readline()
            except OSError as err:
                raise NitroError(
                    ErrorCode.EnclaveProcessConnectionFailure,
                    f"enclave {record.enclave_id}: the enclave process did not confirm: {err}",
                ) from None
        if not reply:
            raise NitroError(
                ErrorCode.EnclaveProcessConnectionFailure,
                f"enclave {record.enclave_id}: the enclave process closed without confirming",
            )
        answer = json.loads(reply) if reply.lstrip().startswith("{") else {}
        if isinstance(answer.get("error"), dict):
            err = answer["error"]
            raise NitroError(ErrorCode(err["code"]), err["message"], err.get("details"))
        _wait_gone(record.pid, 30, record.pid_start)
        results.append({"EnclaveName": record.name, "EnclaveID": record.enclave_id, "Terminated": True})
    if args.all:
        removed = ended_enclaves.clear_ended(registry)
        if removed:
            progress(f"Removed the records of {removed} enclave(s) that had ended by themselves.")
        print_json(results)
    else:
        print_json(results[0])
    return 0


def _find_running(args, registry: Registry):
    """:func:`_find`, whose unknown-enclave error also says when and why a matching enclave
    ended by itself."""
    try:
        return _find(args, registry)
    except NitroError as err:
        ended = _ended(args, registry, err) if err.code == ErrorCode.InvalidArgument else None
        if ended is not None:
            err.message += f" ({ended.line()})"
        raise


def _wait_gone(pid: int, timeout: float, start: int | None = None) -> bool:
    """Wait up to ``timeout`` s for the enclave process ``pid`` (started at ``start``, when
    known) to exit; True once it has. A zombie has exited: its parent, often init, reaps it
    when it will (harness.processes)."""
    deadline = time.monotonic() + timeout
    while processes.running(pid, start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
