#!/usr/bin/env python3
"""Benchmark: KMS emulator Recipient Decrypt requests per second on one core.

The server runs in its own process pinned to one CPU; the client (another CPU when there is
one) replays pre-built HTTP/1.1 requests on one keep-alive connection, so the figure is the
server's. Reported side by side, with ratios against a reference run of the same Python HTTP
stack answering ``{}`` (the floor any handler pays):

    reference  http.server answering {}                       (no KMS work)
    plain      Decrypt, unsigned, no Recipient                (model decode + AES-GCM + policy)
    recipient  Decrypt + Recipient, unsigned                  (+ attestation verify + CMS)
    sigv4      Decrypt + Recipient, SigV4-signed              (+ signature check)

A per-step breakdown (in-process, no HTTP) follows. Usage:
``python benchmarks/bench_kms.py [--requests N] [--rounds R] [--server-cpu C] [--client-cpu C]``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ACCOUNT = "111122223333"
CRED = ("AKIDBENCH", "bench-secret", f"arn:aws:iam::{ACCOUNT}:user/bench")


class _Empty(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n" + body)  # one write, as harness.kms does
        self.flush_headers()

    def log_message(self, *args):
        pass


def _serve(kind: str, root_pem: bytes, cpu: int | None, conn) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "reference":
        import socketserver

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        server = Server(("127.0.0.1", 0), _Empty)
        conn.send(server.server_address[1])
        server.serve_forever()
        return
    from cryptography import x509

    from harness.kms import KmsCredential, KmsServer

    roots = [x509.load_pem_x509_certificate(root_pem)]
    credentials = [KmsCredential(*CRED)] if kind == "sigv4" else None
    server = KmsServer(attestation_roots=roots, credentials=credentials, default_principal=CRED[2]).start()
    conn.send(server.port)
    while True:
        time.sleep(3600)


def _start(kind: str, root_pem: bytes, cpu: int | None):
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=_serve, args=(kind, root_pem, cpu, child), daemon=True)
    process.start()
    return process, parent.recv()


def _request(port: int, target: str, params: dict, signed: bool) -> bytes:
    body = json.dumps(params).encode()
    headers = {
        "Host": "kms.us-east-1.amazonaws.com",
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": f"TrentService.{target}",
    }
    if signed:
        from harness import assets

        sys.path.insert(0, str(assets.guest_dir()))
        from kms_client import sign_request

        sign_request(
            headers, body, access_key=CRED[0], secret_key=CRED[1], session_token=None, region="us-east-1"
        )
    head = "POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _call(sock: socket.socket, request: bytes, buffer: bytearray) -> tuple[int, bytes]:
    sock.sendall(request)
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    buffer[:] = rest[length:]
    return status, rest[:length]


def _rate(port: int, request: bytes, count: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        status, body = _call(sock, request, buffer)  # warm-up, and check it works
        if status != 200:
            raise SystemExit(f"benchmark request failed: {status} {body[:300]!r}")
        start = time.perf_counter()
        for _ in range(count):
            _call(sock, request, buffer)
        return count / (time.perf_counter() - start)


def _breakdown(pki, document: bytes, count: int) -> list[tuple[str, float]]:
    """Milliseconds per step, in-process."""
    from harness import attestation
    from harness.kms import cms
    from harness.kms import policy as kms_policy

    doc = attestation.verify_document(document, roots=[pki.root_certificate])
    policy = kms_policy.default_key_policy(ACCOUNT)
    parsed = kms_policy.parse_policy(policy)
    ctx = kms_policy.RequestContext(
        "kms:Decrypt",
        CRED[2],
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/x",
        {"kms:RecipientAttestation:ImageSha384": doc.pcrs[0].hex()},
    )
    # SigV4 verification on a request signed as the guest client signs it.
    import email.parser

    from harness.kms import KmsCredential, _SigV4

    from harness import assets

    sys.path.insert(0, str(assets.guest_dir()))
    from kms_client import sign_request

    body = b'{"CiphertextBlob": "AAAA"}'
    signed = sign_request(
        {
            "Host": "kms.us-east-1.amazonaws.com",
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Decrypt",
        },
        body,
        access_key=CRED[0],
        secret_key=CRED[1],
        session_token=None,
        region="us-east-1",
    )
    wire_headers = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
        "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n"
    )
    sigv4 = _SigV4({CRED[0]: KmsCredential(*CRED)}, "us-east-1")
    steps = [
        ("SigV4 verification (botocore signer)", lambda: sigv4.verify("POST", "/", wire_headers, body)),
        (
            "verify attestation document",
            lambda: attestation.verify_document(document, roots=[pki.root_certificate]),
        ),
        (
            "CiphertextForRecipient (RSA-OAEP + AES-CBC)",
            lambda: cms.build_ciphertext_for_recipient(b"k" * 32, doc.public_key),
        ),
        ("policy evaluation", lambda: kms_policy.evaluate(parsed, ctx)),
    ]
    out = []
    for name, step in steps:
        start = time.perf_counter()
        for _ in range(count):
            step()
        out.append((name, (time.perf_counter() - start) / count * 1000))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run; the best is reported")
    cpus = sorted(os.sched_getaffinity(0))
    parser.add_argument("--server-cpu", type=int, default=cpus[-1])
    parser.add_argument("--client-cpu", type=int, default=cpus[0])
    args = parser.parse_args()

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from harness import attestation
    from harness.pki import Pki

    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    pki = Pki.create()
    root_pem = pki.root_pem().encode()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pcrs = {i: bytes([i]) * 48 for i in range(16)}
    document = attestation.build_document(
        pki, module_id="i-0123456789abcdef0-enc0123456789abcdef", pcrs=pcrs, public_key=spki
    )
    recipient = {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": base64.b64encode(document).decode(),
    }

    results = []
    for kind in ("reference", "plain", "recipient", "sigv4"):
        process, port = _start(kind, root_pem, args.server_cpu)
        try:
            if kind == "reference":
                request = _request(port, "Decrypt", {}, False)
            else:
                signed = kind == "sigv4"
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    buffer = bytearray()
                    _, body = _call(sock, _request(port, "CreateKey", {}, signed), buffer)
                    key_id = json.loads(body)["KeyMetadata"]["KeyId"]
                    _, body = _call(
                        sock,
                        _request(
                            port,
                            "Encrypt",
                            {"KeyId": key_id, "Plaintext": base64.b64encode(b"k" * 32).decode()},
                            signed,
                        ),
                        buffer,
                    )
                    blob = json.loads(body)["CiphertextBlob"]
                params = {"CiphertextBlob": blob}
                if kind != "plain":
                    params["Recipient"] = recipient
                request = _request(port, "Decrypt", params, signed)
            # Best of --rounds (as timeit does): the host is shared, slower rounds are noise.
            results.append((kind, max(_rate(port, request, args.requests) for _ in range(args.rounds))))
        finally:
            process.terminate()
            process.join()

    reference = results[0][1]
    print(
        f"KMS emulator, server pinned to CPU {args.server_cpu}, client CPU {args.client_cpu}, "
        f"best of {args.rounds} x {args.requests} requests"
    )
    print(f"{'run':<11}{'requests/s':>12}{'ms/request':>12}{'vs reference':>14}")
    for kind, rate in results:
        print(f"{kind:<11}{rate:>12.1f}{1000 / rate:>12.2f}{rate / reference:>13.3f}x")
    rec, sig = results[2][1], results[3][1]
    print(
        f"SigV4 costs {1000 / sig - 1000 / rec:.2f} ms/request ({sig / rec:.3f}x the unsigned Recipient rate)"
    )
    print("per step (in-process):")
    for name, ms in _breakdown(pki, document, max(20, args.requests // 10)):
        print(f"  {name:<46}{ms:>8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
