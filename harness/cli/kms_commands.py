"""``kms serve`` (the KMS emulator, standalone), ``kms tls`` and ``vsock-proxy`` (nitro-cli's arguments).

docs/kms.md. ``kms serve`` prints one JSON object (EndpointUrl, Region, AccountId, StateFile)
on stdout once it listens, then serves until interrupted; keys persist in ``--state``.
``kms tls --tls-dir DIR`` makes (or keeps) the CA and certificate and prints the CA's path.
``vsock-proxy [-4|-6] [-w N] [--config FILE] <local_port> <remote_addr> <remote_port>`` checks
the allowlist and refuses an off-list destination before listening.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import yaml

from harness.cli import print_json, progress
from harness.errors import ErrorCode, NitroError


def register(subparsers) -> None:
    """Add ``kms`` (with ``serve`` and ``tls``) and ``vsock-proxy`` to the top-level sub-commands."""
    kms = subparsers.add_parser("kms", help="KMS emulator with attestation-aware key policies")
    kms_sub = kms.add_subparsers(dest="kms_command", metavar="COMMAND", parser_class=type(kms), required=True)
    serve = kms_sub.add_parser("serve", help="serve the KMS emulator (AWS JSON 1.1) until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="listening address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="listening port (default 0: ephemeral, printed)")
    serve.add_argument(
        "--tls-cert", help="PEM certificate (chain) for HTTPS, e.g. for kms.<region>.amazonaws.com"
    )
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-dir",
        help="use (creating if needed) a CA and a certificate for kms.<region>.amazonaws.com in this "
        "directory; the CA's path is printed as TlsCaFile",
    )
    serve.add_argument("--state", help="JSON file that keeps keys, aliases and policies across restarts")
    serve.add_argument("--region", default="us-east-1", help="Region in key ARNs and the SigV4 scope")
    serve.add_argument("--account-id", default="111122223333", help="12-digit account in ARNs")
    serve.add_argument(
        "--credentials",
        help="YAML/JSON list of {access_key_id, secret_access_key, principal_arn}; "
        "when given, every request must be SigV4-signed with one of them",
    )
    serve.add_argument("--default-principal", help="caller ARN for unsigned requests (no --credentials)")
    serve.add_argument(
        "--attestation-root",
        action="append",
        default=[],
        metavar="PEM",
        help="trust anchor for Recipient attestation documents (repeatable)",
    )
    serve.add_argument("--aws-root", action="store_true", help="also trust the AWS Nitro Enclaves root G1")
    serve.add_argument(
        "--pki-dir", help="harness PKI directory whose root is trusted (default: the harness PKI)"
    )
    serve.add_argument(
        "--bad-attestation-exception",
        default="ValidationException",
        choices=["ValidationException", "AccessDeniedException"],
        help="error for a bad, unsigned or expired attestation document (docs/kms.md: AWS's is undocumented)",
    )
    serve.set_defaults(func=_serve)
    tls = kms_sub.add_parser(
        "tls", help="create (or keep) the emulator's CA and certificate in a directory, print the CA's path")
    tls.add_argument("--tls-dir", required=True, help="directory of the CA and the server certificate")
    tls.add_argument("--region", default="us-east-1", help="Region of kms.<region>.amazonaws.com")
    tls.set_defaults(func=_tls)

    proxy = subparsers.add_parser(
        "vsock-proxy", help="forward vsock connections to an allowlisted TCP server"
    )
    family = proxy.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true", help="use IPv4 addresses only")
    family.add_argument("-6", "--ipv6", action="store_true", help="use IPv6 addresses only")
    proxy.add_argument(
        "-w", "--num_workers", type=int, default=4, help="simultaneous connections (default 4)"
    )
    proxy.add_argument(
        "--config", default=None, help="allowlist YAML (default /etc/nitro_enclaves/vsock-proxy.yaml)"
    )
    proxy.add_argument("local_port", type=int, help="vsock port to listen on")
    proxy.add_argument("remote_addr", help="server to forward to (host name or IP)")
    proxy.add_argument("remote_port", type=int, help="TCP port of the server")
    listen = proxy.add_mutually_exclusive_group()
    listen.add_argument(
        "--listen-tcp", metavar="HOST:PORT", help="harness extension: listen on TCP instead of vsock"
    )
    listen.add_argument(
        "--listen-unix", metavar="PATH", help="harness extension: listen on a Unix socket instead of vsock"
    )
    proxy.set_defaults(func=_vsock_proxy)


def _load_credentials(path: str) -> list[Any]:
    from harness.kms import KmsCredential

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"credentials file {path}: cannot read ({err.strerror})"
        ) from None
    except yaml.YAMLError as err:
        raise NitroError(
            ErrorCode.InvalidArgument, f"credentials file {path}: bad YAML/JSON ({err})".replace("\n", " ")
        ) from None
    if not isinstance(doc, list) or not doc:
        raise NitroError(ErrorCode.InvalidArgument, f"credentials file {path}: must be a non-empty list")
    out = []
    for index, item in enumerate(doc):
        fields = ("access_key_id", "secret_access_key", "principal_arn")
        if not isinstance(item, dict) or any(
            not isinstance(item.get(f), str) or not item.get(f) for f in fields
        ):
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"credentials file {path}: entry [{index}] needs string access_key_id, secret_access_key and principal_arn",
            )
        out.append(KmsCredential(item["access_key_id"], item["secret_access_key"], item["principal_arn"]))
    return out


def _serve(args: argparse.Namespace) -> int:
    from harness.kms import KmsServer, ensure_tls_identity

    if bool(args.tls_cert) != bool(args.tls_key):
        raise NitroError(ErrorCode.MissingArgument, "kms serve: --tls-cert and --tls-key go together")
    if args.tls_cert and args.tls_dir:
        raise NitroError(
            ErrorCode.ConflictingArgument, "kms serve: --tls-dir conflicts with --tls-cert/--tls-key"
        )
    tls: Any = (args.tls_cert, args.tls_key) if args.tls_cert else None
    ca_file = None
    if args.tls_dir:
        identity = ensure_tls_identity(args.tls_dir, region=args.region)
        tls, ca_file = identity, str(identity.ca_certificate.resolve())
    if not 0 <= args.port < 65536:
        raise NitroError(ErrorCode.InvalidArgument, f"kms serve: --port must be 0..65535, got {args.port}")
    roots: list[Any] = list(args.attestation_root)
    if args.aws_root:
        from harness.attestation import aws_root_g1

        roots.append(aws_root_g1())
    if args.pki_dir or not roots:
        from harness.pki import Pki

        roots.append(Pki.load_or_create(args.pki_dir).root_certificate)
    server = KmsServer(
        args.state,
        host=args.host,
        port=args.port,
        tls=tls,
        attestation_roots=roots,
        bad_attestation_exception=args.bad_attestation_exception,
        credentials=_load_credentials(args.credentials) if args.credentials else None,
        region=args.region,
        account_id=args.account_id,
        default_principal=args.default_principal,
    )
    server.start()
    print_json(
        {
            "EndpointUrl": server.endpoint_url,
            "Region": server.region,
            "AccountId": args.account_id,
            "StateFile": str(Path(args.state).resolve()) if args.state else None,
            "TlsCaFile": ca_file,
        }
    )
    progress(f"kms: serving on {server.endpoint_url} (Ctrl-C to stop)")
    server.serve_forever()
    return 0


def _tls(args: argparse.Namespace) -> int:
    """``kms tls``: the TLS identity a scenario's ``services.kms.tls_dir`` (or ``kms serve
    --tls-dir``) serves with, made before the EIF that must trust its CA is built
    (``build-enclave --ca-bundle``, docs/kms.md#tls). Prints {"TlsCaFile", "Names"}."""
    from harness.kms import ensure_tls_identity

    identity = ensure_tls_identity(Path(args.tls_dir), region=args.region)
    print_json({"TlsCaFile": str(identity.ca_certificate), "Names": list(identity.names)})
    return 0


def _listener(args: argparse.Namespace) -> tuple[socket.socket, str]:
    """The socket vsock-proxy accepts on: vsock by default, TCP or Unix for host testing."""
    try:
        if args.listen_tcp:
            host, _, port = args.listen_tcp.rpartition(":")
            sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)))
            return sock, f"tcp {sock.getsockname()[0]}:{sock.getsockname()[1]}"
        if args.listen_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(args.listen_unix)
            sock.listen(16)
            return sock, f"unix {args.listen_unix}"
        if not hasattr(socket, "AF_VSOCK"):
            raise OSError("this Python has no AF_VSOCK")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, args.local_port))
        sock.listen(16)
        return sock, f"vsock port {args.local_port}"
    except (OSError, ValueError) as err:
        where = args.listen_tcp or args.listen_unix or f"vsock port {args.local_port}"
        hint = (
            ""
            if (args.listen_tcp or args.listen_unix)
            else (
                "; this host has no usable vsock: use --listen-tcp/--listen-unix, or run the proxy "
                "inside the harness (harness.proxy.VsockProxy.on_vsock)"
            )
        )
        raise NitroError(
            ErrorCode.SocketError, f"vsock-proxy: cannot listen on {where} ({err}){hint}"
        ) from None


def _vsock_proxy(args: argparse.Namespace) -> int:
    from harness.proxy import DEFAULT_CONFIG, VsockProxy, load_allowlist

    if not 0 < args.local_port < 2**32:
        raise NitroError(ErrorCode.InvalidArgument, f"vsock-proxy: local port {args.local_port} is not valid")
    if not 0 < args.remote_port < 65536:
        raise NitroError(
            ErrorCode.InvalidArgument, f"vsock-proxy: remote port {args.remote_port} is not valid"
        )
    ip_version = 4 if args.ipv4 else 6 if args.ipv6 else None
    entries = load_allowlist(args.config or DEFAULT_CONFIG)
    # Check before listening: an off-list destination never opens a port (nitro-cli).
    from harness.proxy import check_allowlist

    check_allowlist(args.remote_addr, args.remote_port, entries, ip_version)
    sock, where = _listener(args)
    proxy = VsockProxy(
        sock,
        args.remote_addr,
        args.remote_port,
        allowlist=entries,
        ip_version=ip_version,
        num_workers=args.num_workers,
        owns_listener=True,
    )
    progress(f"vsock-proxy: {where} -> {args.remote_addr}:{args.remote_port} ({args.num_workers} workers)")
    try:
        proxy.serve_forever()
    finally:
        if args.listen_unix:
            try:
                Path(args.listen_unix).unlink()
            except OSError:
                pass
    return 0
