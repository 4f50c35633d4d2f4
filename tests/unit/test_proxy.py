"""vsock-proxy (docs/kms.md#vsock-proxy): allowlist rules, byte forwarding, worker limit, TLS end
to end, CLI."""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.errors import ErrorCode, NitroError
from harness.kms import KmsServer
from harness.pki import Pki
from harness.proxy import AllowlistEntry, VsockProxy, check_allowlist, load_allowlist
from helpers.kms import (ALICE, GUEST_CLIENT, GUEST_PYTHON, IMAGE_PCR0, REGION, document, enclave_policy,
                         make_tls)


class EchoServer:
    """TCP echo server on 127.0.0.1 that records how many connections were open at once."""

    def __init__(self, reply_prefix: bytes = b""):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.prefix = reply_prefix
        self.open = 0
        self.max_open = 0
        self.accepted = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            # Reply only after the client's half-close: proves SHUT_WR crosses the proxy.
            conn.sendall(self.prefix + received)
            # Counted closed before the close the proxy can see: a proxy worker freed by that close
            # may connect the next client at once, and must not find this one still counted.
            with self.lock:
                self.open -= 1

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer(b"echo:")
    yield server
    server.close()


def wait_for(condition, limit_s: float = 30.0) -> None:
    """Poll ``condition`` until true; fail (not a timing assertion: a hang guard) after limit_s."""
    import time

    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def tcp_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def exchange(port_or_path, payload: bytes) -> bytes:
    family = socket.AF_UNIX if isinstance(port_or_path, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(port_or_path if family == socket.AF_UNIX else ("127.0.0.1", port_or_path))
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        except (ConnectionError, OSError) as err:
            # A proxy that cannot reach its destination may close the client before it is done
            # sending: the exchange is over with nothing received.
            if err.errno not in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                raise
            return b""
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


# -- allowlist ---------------------------------------------------------------------------------------


def test_load_allowlist(tmp_path):
    path = tmp_path / "vsock-proxy.yaml"
    path.write_text(
        "allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n- {address: 127.0.0.1, port: 8443}\n"
    )
    assert load_allowlist(path) == [
        AllowlistEntry("kms.us-east-1.amazonaws.com", 443),
        AllowlistEntry("127.0.0.1", 8443),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("allowlist: [", "bad YAML"),
        ("other: []", "no 'allowlist' field"),
        ("allowlist: {address: x}", "'allowlist' must be a list"),
        ("allowlist:\n- {address: x, port: 70000}", r"allowlist\[0\]\.port: must be an integer 1..65535"),
        ("allowlist:\n- {port: 443}", r"allowlist\[0\]\.address"),
    ],
)
def test_bad_allowlist_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NitroError, match=message) as exc:
        load_allowlist(path)
    assert str(path) in exc.value.message and exc.value.code == ErrorCode.InvalidArgument


def test_allowlist_matching_follows_nitro_cli():
    entries = [AllowlistEntry("localhost", 443)]
    assert check_allowlist("localhost", 443, entries, 4) == "127.0.0.1"  # same name
    assert check_allowlist("127.0.0.1", 443, entries, 4) == "127.0.0.1"  # name resolves to the IP
    with pytest.raises(NitroError, match=r"127.0.0.1:444 is not in the allowlist \(localhost:443\)"):
        check_allowlist("127.0.0.1", 444, entries, 4)
    with pytest.raises(NitroError, match="not in the allowlist"):
        check_allowlist("127.0.0.2", 443, entries, 4)


def test_off_list_destination_refused_at_start(echo):
    listener = tcp_listener()
    try:
        with pytest.raises(NitroError, match="is not in the allowlist"):
            VsockProxy(
                listener, "127.0.0.1", echo.port, allowlist=[{"address": "127.0.0.1", "port": echo.port + 1}]
            )
    finally:
        listener.close()


# -- forwarding ---------------------------------------------------------------------------------------------


def test_forwards_bytes_both_ways_with_half_close(echo):
    listener = tcp_listener()
    port = listener.getsockname()[1]
    payload = os.urandom(3 * 1024 * 1024 + 7)
    with VsockProxy(
        listener,
        "127.0.0.1",
        echo.port,
        allowlist=[{"address": "127.0.0.1", "port": echo.port}],
        owns_listener=True,
    ) as proxy:
        assert exchange(port, payload) == b"echo:" + payload
        assert exchange(port, b"second") == b"echo:second"
        assert proxy.connections == 2


def test_unix_listener_source(echo, tmp_path):
    path = str(tmp_path / "proxy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    with VsockProxy(listener, "127.0.0.1", echo.port, owns_listener=True):
        assert exchange(path, b"over unix") == b"echo:over unix"


class TimeoutListener:
    """The vsock device's listener contract (harness.vsock.VsockListener): ``accept(timeout)``
    returns a connected socket or raises TimeoutError; after ``close()`` it raises OSError."""

    def __init__(self):
        self.inner = tcp_listener()
        self.port = self.inner.getsockname()[1]
        self.calls = 0

    def accept(self, timeout):
        self.calls += 1
        self.inner.settimeout(timeout)
        conn, _ = self.inner.accept()  # raises TimeoutError, like the vsock device
        conn.settimeout(None)
        return conn

    def close(self):
        self.inner.close()


def test_accept_timeout_source_like_the_vsock_device(echo):
    source = TimeoutListener()

    class Device:
        def listen(self, port):
            assert port == 8000
            return source

    proxy = VsockProxy.on_vsock(
        Device(), 8000, "127.0.0.1", echo.port, allowlist=[AllowlistEntry("127.0.0.1", echo.port)]
    )
    with proxy:
        assert exchange(source.port, b"from the enclave") == b"echo:from the enclave"
    assert source.inner.fileno() == -1  # the proxy owned and closed the device listener


@pytest.mark.parametrize("workers, expected_max", [(1, 1), (3, 3)])
def test_num_workers_bounds_simultaneous_connections(echo, workers, expected_max):
    listener = tcp_listener()
    port = listener.getsockname()[1]
    with VsockProxy(listener, "127.0.0.1", echo.port, num_workers=workers, owns_listener=True):
        clients = []
        for _ in range(3):
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(b"x")
            clients.append(conn)
        # Every allowed connection reaches the server before anyone closes (sync, not timing).
        wait_for(lambda: echo.accepted >= expected_max)
        results = []
        for conn in clients:  # closing in order lets queued connections through one by one
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(100):
                data += chunk
            results.append(data)
            conn.close()
    assert results == [b"echo:x"] * 3
    assert echo.max_open == expected_max


def test_unreachable_destination_closes_the_client():
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    listener = tcp_listener()
    with VsockProxy(listener, "127.0.0.1", dead_port, owns_listener=True):
        assert exchange(listener.getsockname()[1], b"anyone?") == b""


def test_tls_stays_end_to_end_to_kms(tmp_path):
    """boto3 speaks TLS to kms.<region>.amazonaws.com through the proxy, as an enclave does."""
    ca, cert, key = make_tls(tmp_path)
    with KmsServer(tls=(cert, key), credentials=[ALICE]) as kms:
        listener = tcp_listener()
        port = listener.getsockname()[1]
        with VsockProxy(
            listener,
            "127.0.0.1",
            kms.port,
            allowlist=[{"address": "127.0.0.1", "port": kms.port}],
            owns_listener=True,
        ):
            client = boto3.client(
                "kms",
                endpoint_url=f"https://localhost:{port}",
                region_name=REGION,
                verify=str(ca),
                aws_access_key_id=ALICE.access_key_id,
                aws_secret_access_key=ALICE.secret_access_key,
            )
            key_id = client.create_key()["KeyMetadata"]["KeyId"]
            blob = client.encrypt(KeyId=key_id, Plaintext=b"through the proxy")["CiphertextBlob"]
            assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"through the proxy"


# -- CLI ---------------------------------------------------------------------------------------------------


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_cli_refuses_off_list_destination(tmp_path):
    config = tmp_path / "vsock-proxy.yaml"
    config.write_text("allowlist:\n- {address: localhost, port: 443}\n")
    result = cli(
        "vsock-proxy", "8000", "127.0.0.1", "80", "--config", str(config), "--listen-tcp", "127.0.0.1:0"
    )
    assert result.returncode == ErrorCode.InvalidArgument.value
    assert result.stderr == (
        "[ E03 ] InvalidArgument: vsock-proxy: 127.0.0.1:80 is not in the allowlist "
        "(localhost:443); the given address and port are not allowed\n"
    )
    missing = cli("vsock-proxy", "8000", "127.0.0.1", "80", "--config", str(tmp_path / "none.yaml"))
    assert (
        missing.returncode == ErrorCode.FileOperationFailure.value
        and "none.yaml: cannot read" in missing.stderr
    )


# A command that does not end on Ctrl-C is a bug to find: with faulthandler on, SIGABRT makes it
# print every thread's stack on stderr, which the failure then shows.
_FAULTHANDLER_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def _sigint_default() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and an
    # ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt
    # handler): give the commands under test the Ctrl-C a terminal would deliver.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(process: subprocess.Popen) -> list[str]:
    """SIGINT ``process`` and wait 15 s; if it is still running, its thread stacks (as a
    one-item list; empty when it ended)."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
        return []
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            _, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        return [f"{' '.join(process.args[2:5])} did not end 15 s after SIGINT:\n{err[-6000:]}"]


def test_cli_kms_serve_and_proxy_carry_the_guest_client(tmp_path):
    """The whole parent side as commands: ``kms serve --tls-dir --credentials --state`` behind
    ``vsock-proxy``; the guest kms_client (TLS to kms.us-east-1.amazonaws.com, SigV4, Recipient
    with a document from the harness PKI) decrypts through them."""
    state = tmp_path / "state.json"
    creds = tmp_path / "credentials.yaml"
    creds.write_text(
        f"- {{access_key_id: {ALICE.access_key_id}, secret_access_key: {ALICE.secret_access_key}, "
        f"principal_arn: '{ALICE.principal_arn}'}}\n"
    )
    pki = Pki.load_or_create(tmp_path / "pki")
    serve = [
        sys.executable,
        "-m",
        "harness.cli",
        "kms",
        "serve",
        "--state",
        str(state),
        "--tls-dir",
        str(tmp_path / "tls"),
        "--credentials",
        str(creds),
        "--pki-dir",
        str(tmp_path / "pki"),
    ]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_FAULTHANDLER_ENV, preexec_fn=_sigint_default)
    proxy = None
    hung: list[str] = []
    try:
        info = json.loads("".join(iter(server.stdout.readline, "}\n")) + "}")
        assert info["StateFile"] == str(state.resolve()) and info["Region"] == REGION
        assert info["EndpointUrl"].startswith("https://127.0.0.1:")
        ca = info["TlsCaFile"]
        kms_port = int(info["EndpointUrl"].rsplit(":", 1)[1])
        config = tmp_path / "vsock-proxy.yaml"
        config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {kms_port}}}\n")
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "vsock-proxy",
                "-4",
                "-w",
                "2",
                "--config",
                str(config),
                "8000",
                "127.0.0.1",
                str(kms_port),
                "--listen-tcp",
                "127.0.0.1:0",
            ],
            env=_FAULTHANDLER_ENV,
            preexec_fn=_sigint_default,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proxy.stderr.readline()
        assert line.startswith("vsock-proxy: tcp 127.0.0.1:") and f"-> 127.0.0.1:{kms_port}" in line
        proxy_port = int(line.split()[2].rsplit(":", 1)[1])

        admin = boto3.client(
            "kms",
            endpoint_url=f"https://localhost:{kms_port}",
            region_name=REGION,
            verify=ca,
            aws_access_key_id=ALICE.access_key_id,
            aws_secret_access_key=ALICE.secret_access_key,
        )
        key_id = admin.create_key(Policy=enclave_policy(IMAGE_PCR0.hex()))["KeyMetadata"]["KeyId"]
        blob = base64.b64encode(
            admin.encrypt(KeyId=key_id, Plaintext=b"via the proxy")["CiphertextBlob"]
        ).decode()
        recipient_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (tmp_path / "doc.bin").write_bytes(document(pki, recipient_key))
        (tmp_path / "key.pem").write_bytes(
            recipient_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        guest = subprocess.run(
            [
                GUEST_PYTHON,
                str(GUEST_CLIENT),
                "decrypt",
                "--region",
                REGION,
                "--endpoint",
                f"127.0.0.1:{proxy_port}",
                "--ca-file",
                ca,
                "--aws-access-key-id",
                ALICE.access_key_id,
                "--aws-secret-access-key",
                ALICE.secret_access_key,
                "--ciphertext",
                blob,
                "--attestation-doc",
                str(tmp_path / "doc.bin"),
                "--private-key",
                str(tmp_path / "key.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (guest.returncode, guest.stdout) == (
            0,
            f"PLAINTEXT: {base64.b64encode(b'via the proxy').decode()}\n",
        ), guest.stderr
        assert key_id in json.loads(state.read_text())["keys"]
    finally:
        for process in (proxy, server):
            if process is not None:
                hung.extend(_interrupt(process))
    assert not hung, "\n".join(hung)
    assert server.returncode == 130 and proxy.returncode == 130
