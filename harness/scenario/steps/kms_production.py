"""The production-mode enclave of ``kms`` steps with ``from: production``.

Outside debug mode an enclave has no console (docs/nitro-cli.md), so the step boots the
``python`` image with an application of its own, :data:`KMS_RUNNER`: it connects to the
parent's vsock port :data:`KMS_RUNNER_PORT`, receives the KMS CA and a command line, runs the
guest's kms_client with them and sends back its exit status and output.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError
from harness.scenario.errors import StepFailed
from harness.scenario.twins import image_for

if TYPE_CHECKING:
    from harness.console import ExecResult
    from harness.enclave_factory import RunningEnclave
    from harness.scenario.runner import ScenarioRunner

#: vsock port the production-mode kms runner connects to on the parent (CID 3).
KMS_RUNNER_PORT = 7200

#: Application of the production-mode enclave: it connects to the parent's vsock port, reads
#: {"ca": PEM, "argv": [...]} until EOF, writes the CA to /tmp/nitro-harness-kms-ca.pem, runs
#: argv and answers {"status": n, "output": text}.
KMS_RUNNER = (
    "import json, socket, subprocess, time\n"
    "while True:\n"
    "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
    "    try:\n"
    f"        s.connect((3, {KMS_RUNNER_PORT}))\n"
    "    except OSError:\n"
    "        s.close(); time.sleep(0.2); continue\n"
    "    data = b''\n"
    "    while True:\n"
    "        chunk = s.recv(65536)\n"
    "        if not chunk: break\n"
    "        data += chunk\n"
    "    job = json.loads(data)\n"
    "    open('/tmp/nitro-harness-kms-ca.pem', 'w').write(job['ca'])\n"
    "    p = subprocess.run(job['argv'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
    "    s.sendall(json.dumps({'status': p.returncode, 'output': p.stdout.decode('utf-8', 'replace')}).encode())\n"
    "    s.close()\n"
)


def start_production_enclave(runner: ScenarioRunner, within: float) -> RunningEnclave:
    """Boot a production-mode (not debug) enclave of the python image (for the scenario's
    kernel) whose application is :data:`KMS_RUNNER`; the heartbeat wait is at most ``within`` s
    unless the scenario sets one. Raises the engine's NitroError when it cannot start."""
    app = f"python3 -c \"exec(bytes.fromhex('{KMS_RUNNER.encode().hex()}').decode())\"; sleep 3600"
    from harness.images.recipes import build_image

    image = image_for("python", runner.scenario.kernel, runner.scenario.arch)
    eif = Path(build_image(image, cmd=["/bin/sh", "-c", app]))
    settings: dict[str, Any] = {k: v for k, v in runner.settings().items() if k not in ("cid", "name", "cpu_ids")}
    settings["debug_mode"] = False
    settings.setdefault("heartbeat_timeout", max(1.0, within))
    return runner.factory.start(runner.factory.config(eif=eif, **settings))


def run_in_production(enclave: RunningEnclave, ca: bytes, argv: list[str], deadline: float) -> ExecResult:
    """Run ``argv`` in the production enclave's runner before ``deadline`` (``time.monotonic()``).

    Returns its (status, output) as an ExecResult; StepFailed when the runner does not connect,
    the exchange fails or the reply is not JSON.
    """
    from harness.console import ExecResult

    listener = enclave.vsock_listen(KMS_RUNNER_PORT)
    try:
        conn: Any = listener.accept(timeout=max(1.0, deadline - time.monotonic()))
        if isinstance(conn, tuple):
            conn = conn[0]
        with contextlib.closing(conn):
            conn.sendall(json.dumps({"ca": ca.decode(), "argv": argv}).encode())
            conn.shutdown(socket.SHUT_WR)
            data = b""
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            while chunk := conn.recv(65536):
                data += chunk
    except (OSError, NitroError, TimeoutError) as exc:
        raise StepFailed(f"the production enclave's kms runner (vsock port {KMS_RUNNER_PORT}): {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            listener.close()
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise StepFailed(f"the kms runner's reply is not JSON: {data[:300]!r}") from None
    return ExecResult(status=int(reply["status"]), output=reply["output"])
