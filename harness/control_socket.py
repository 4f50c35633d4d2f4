"""The client side of a supervising process's control socket (:mod:`harness.enclave_process`).

Kept apart from the supervisor so that the CLI's light commands (``describe-enclaves``,
``terminate-enclave``, ``console``) do not import the enclave engine to talk to it.
"""

from __future__ import annotations

import json
import socket

from harness.errors import ErrorCode, NitroError

__all__ = ["control_request"]


def control_request(path: str, request: dict, timeout: float = 30.0) -> socket.socket:
    """Open the control socket at ``path`` and send ``request``; returns the connected socket.

    Raises NitroError E39 when the enclave process does not answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall((json.dumps(request) + "\n").encode())
    except OSError as err:
        sock.close()
        raise NitroError(
            ErrorCode.EnclaveProcessConnectionFailure, f"{path}: enclave process not reachable: {err}"
        ) from None
    return sock
