"""Every CLI command's error paths: a non-zero exit status and one ``[ Exx ]`` line, no traceback.

The table below holds the documented error paths of every command the parser defines (bad
arguments, missing files, a corrupt EIF, a tampered real AWS attestation document, over-long
nonce / user data / public key, unknown enclaves, ...). Each row runs ``main()`` in-process and
checks the exit status, that stderr's last line is the only ``[ Exx ]`` line, with the expected
code, and that it names the file, field or rule. ``test_every_command_has_error_rows`` fails when
a command is added without rows. A few rows also run as ``python -m harness.cli`` to check the
status the shell really sees. Nothing here boots QEMU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.cli import as_nitro_error, build_parser, main
from harness.errors import UNSPECIFIED_EXIT_STATUS, ErrorCode, NitroError
from helpers import REPO

VECTORS = REPO / "tests" / "vectors" / "attestation"
AWS_DOC = VECTORS / "tempo_aws_attestation_2026_01_03.bin"
AWS_DEBUG_DOC = VECTORS / "evervault_beta_debug-mode-attestation-doc-bytes"
LINE = re.compile(r"^\[ E(\d\d) \] (\w+): (.+)$")
E = ErrorCode


@dataclass(frozen=True)
class Row:
    """One error path: ``argv`` ({name} is replaced by the ``files`` fixture's path), the
    expected code, and the texts the one-line message must contain."""

    argv: tuple[str, ...]
    code: ErrorCode
    names: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return " ".join(self.argv)[:70] or "(no command)"


def row(*argv: str, code: ErrorCode, names: tuple[str, ...] = ()) -> Row:
    return Row(tuple(argv), code, names)


OVERLONG = "ab" * 1025  # 1025 bytes: one more than a document's field may carry

ROWS = [
    # Top level.
    row(code=E.MissingArgument, names=("COMMAND", "build-enclave")),
    row("no-such-command", code=E.InvalidArgument, names=("invalid choice", "no-such-command")),
    # build-enclave
    row("build-enclave", code=E.MissingArgument, names=("--output-file",)),
    row("build-enclave", "--output-file", "{out_eif}", code=E.MissingArgument, names=("--docker-archive", "--rootfs")),
    row("build-enclave", "--rootfs", "{dir}", "--docker-archive", "{text}", "--output-file", "{out_eif}",
        code=E.ConflictingArgument, names=("--docker-archive", "--rootfs")),
    row("build-enclave", "--docker-archive", "{text}", "--cmd", "/bin/true", "--output-file", "{out_eif}",
        code=E.ConflictingArgument, names=("--cmd",)),
    row("build-enclave", "--rootfs", "{dir}", "--output-file", "{out_eif}",
        code=E.BlobsPathNotSet, names=("{no_blobs}", "NITRO_CLI_BLOBS")),
    row("build-enclave", "--rootfs", "{dir}", "--output-file", "{out_eif}", "--blobs", "{dir}",
        code=E.EifBuildingError, names=("{dir}/bzImage", "kernel blob")),
    # describe-eif
    row("describe-eif", code=E.MissingArgument, names=("--eif-path",)),
    row("describe-eif", "--eif-path", "{missing}", code=E.FileOperationFailure, names=("{missing}", "No such file")),
    row("describe-eif", "--eif-path", "{corrupt_eif}", code=E.EifParsingError, names=("{corrupt_eif}", "header")),
    row("describe-eif", "--eif-path", "{dir}", code=E.FileOperationFailure, names=("{dir}", "Is a directory")),
    # check-eif: findings are its report; an error among them ends it with that error's code.
    row("check-eif", code=E.MissingArgument, names=("--eif-path",)),
    row("check-eif", "--eif-path", "{missing}", code=E.FileOperationFailure, names=("{missing}", "not found")),
    row("check-eif", "--eif-path", "{corrupt_eif}", code=E.EifParsingError,
        names=("{corrupt_eif}", "eif-structure", "header")),
    row("check-eif", "--eif-path", "{eif}", code=E.EnclaveBootFailure, names=("{eif}", "kernel-format", "bzImage")),
    row("check-eif", "--eif-path", "{eif}", "--memory", "lots", code=E.InvalidArgument, names=("--memory", "'lots'")),
    # pcr
    row("pcr", code=E.MissingArgument, names=("--input", "--signing-certificate")),
    row("pcr", "--input", "{missing}", code=E.FileOperationFailure, names=("{missing}",)),
    row("pcr", "--signing-certificate", "{text}", code=E.InvalidArgument, names=("{text}", "PEM certificate")),
    row("pcr", "--input", "{text}", "--signing-certificate", "{cert}", code=E.ConflictingArgument,
        names=("--signing-certificate", "--input")),
    # sign-eif
    row("sign-eif", "--eif-path", "{eif}", code=E.MissingArgument, names=("--signing-certificate", "--private-key")),
    row("sign-eif", "--eif-path", "{eif}", "--signing-certificate", "{missing}", "--private-key", "{key}",
        code=E.EIFSigningError, names=("{missing}", "open")),
    row("sign-eif", "--eif-path", "{eif}", "--signing-certificate", "{cert}", "--private-key", "{text}",
        code=E.EIFSigningError, names=("private key", "PEM")),
    row("sign-eif", "--eif-path", "{corrupt_eif}", "--signing-certificate", "{cert}", "--private-key", "{key}",
        "--output-file", "{out_eif}", code=E.EifParsingError, names=("{corrupt_eif}", "header")),
    # run-enclave: only the paths that fail before anything boots.
    row("run-enclave", "--memory", "512", "--cpu-count", "2", code=E.MissingArgument, names=("--eif-path",)),
    row("run-enclave", "--eif-path", "{missing}", "--memory", "512", "--cpu-count", "2",
        code=E.FileOperationFailure, names=("{missing}", "EIF file not found")),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "lots", "--cpu-count", "2",
        code=E.InvalidArgument, names=("--memory", "'lots'")),
    row("run-enclave", "--eif-path", "{eif}", "--cpu-count", "2", code=E.MissingArgument, names=("--memory",)),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "512", "--cpu-count", "two",
        code=E.InvalidArgument, names=("--cpu-count", "'two'")),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "512", code=E.MissingArgument,
        names=("--cpu-count", "--cpu-ids")),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "512", "--cpu-count", "2", "--cpu-ids", "1",
        code=E.ConflictingArgument, names=("--cpu-count", "--cpu-ids")),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "512", "--cpu-count", "2", "--attach-console",
        code=E.EnclaveConsoleConnectionFailure, names=("--attach-console", "--debug-mode")),
    row("run-enclave", "--config", "{bad_json}", code=E.InvalidArgument, names=("{bad_json}", "not valid JSON")),
    row("run-enclave", "--config", "{missing}", code=E.FileOperationFailure, names=("{missing}",)),
    row("run-enclave", "--eif-path", "{eif}", "--memory", "512", "--cpu-count", "2", "--layout", "weird",
        code=E.InvalidArgument, names=("--layout", "'weird'")),
    # describe-enclaves has no failure of its own but its arguments.
    row("describe-enclaves", "--all", code=E.InvalidArgument, names=("unrecognized arguments: --all",)),
    # console / terminate-enclave: an unknown enclave.
    row("console", "--enclave-id", "i-0123456789abcdef0-enc1", code=E.InvalidArgument,
        names=("--enclave-id i-0123456789abcdef0-enc1", "no running enclave")),
    row("console", "--enclave-name", "nope", code=E.InvalidArgument, names=("--enclave-name nope",)),
    row("console", code=E.MissingArgument, names=("--enclave-id",)),
    row("console", "--enclave-id", "a", "--enclave-name", "b", code=E.ConflictingArgument,
        names=("--enclave-name", "--enclave-id")),
    row("console", "--enclave-id", "a", "--disconnect-timeout", "soon", code=E.InvalidArgument,
        names=("--disconnect-timeout", "'soon'")),
    row("terminate-enclave", "--enclave-id", "i-0123456789abcdef0-enc1", code=E.InvalidArgument,
        names=("--enclave-id i-0123456789abcdef0-enc1", "no running enclave")),
    row("terminate-enclave", "--enclave-name", "nope", code=E.InvalidArgument, names=("--enclave-name nope",)),
    row("terminate-enclave", code=E.MissingArgument, names=("--enclave-id",)),
    row("terminate-enclave", "--all", "--enclave-id", "a", code=E.ConflictingArgument, names=("--enclave-id", "--all")),
    # attest
    row("attest", "--eif-path", "{eif}", code=E.MissingArgument, names=("--output",)),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--nonce", OVERLONG,
        code=E.InvalidArgument, names=("--nonce", "1025 bytes", "1024 bytes", "nonce may carry")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--user-data", OVERLONG,
        code=E.InvalidArgument, names=("--user-data", "1025 bytes", "1024 bytes", "user_data may carry")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--public-key", "{big_key}",
        code=E.InvalidArgument, names=("--public-key {big_key}", "1025 bytes", "1024 bytes", "public_key may carry")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--public-key", "{missing}",
        code=E.FileOperationFailure, names=("{missing}", "public key")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--nonce", "xyz",
        code=E.InvalidArgument, names=("--nonce 'xyz'", "not hexadecimal")),
    row("attest", "--eif-path", "{missing}", "--output", "{out_doc}", code=E.FileOperationFailure, names=("{missing}",)),
    row("attest", "--eif-path", "{corrupt_eif}", "--output", "{out_doc}", code=E.EifParsingError,
        names=("{corrupt_eif}", "header")),
    row("attest", "--eif-path", "{eif}", "--output", "{dir}/no/such/dir/doc.cbor", code=E.FileOperationFailure,
        names=("{dir}/no/such/dir/doc.cbor", "cannot write")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--timestamp", "1e30",
        code=E.InvalidArgument, names=("--timestamp '1e30'", "out of range")),
    row("attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--timestamp", "yesterday",
        code=E.InvalidArgument, names=("--timestamp 'yesterday'",)),
    # verify-attestation: a real AWS document with one byte of a certificate changed.
    row("verify-attestation", "{tampered_cabundle1}", "--at", "document", code=E.EIFSignatureCheckerError,
        names=("{tampered_cabundle1}", ": certificate: ", "cabundle[1]", "issuer")),
    row("verify-attestation", "{tampered_leaf}", "--at", "document", code=E.EIFSignatureCheckerError,
        names=("{tampered_leaf}", ": certificate: certificate ", "issuer")),
    row("verify-attestation", "{tampered_serial}", "--at", "document", code=E.EIFSignatureCheckerError,
        names=("{tampered_serial}", ": certificate: ", "cabundle[2]", "serial")),
    row("verify-attestation", "{aws_doc}", code=E.EIFSignatureCheckerError,
        names=("{aws_doc}", ": certificate-expired: ")),
    row("verify-attestation", "{aws_debug_doc}", "--at", "document", code=E.EIFSignatureCheckerError,
        names=(": debug-mode: ",)),
    row("verify-attestation", "{text}", code=E.EIFSignatureCheckerError, names=("{text}", ": structure: ")),
    row("verify-attestation", "{missing}", code=E.FileOperationFailure, names=("{missing}", "attestation document")),
    row("verify-attestation", "{aws_doc}", "--at", "document", "--nonce", OVERLONG, code=E.InvalidArgument,
        names=("--nonce", "1025 bytes", "1024 bytes", "nonce may carry")),
    row("verify-attestation", "{aws_doc}", "--at", "document", "--user-data", OVERLONG, code=E.InvalidArgument,
        names=("--user-data", "1025 bytes")),
    row("verify-attestation", "{aws_doc}", "--at", "document", "--public-key", "{big_key}", code=E.InvalidArgument,
        names=("--public-key {big_key}", "1025 bytes")),
    row("verify-attestation", "{aws_doc}", "--at", "document", "--expect-pcr", "0=abcd", code=E.InvalidArgument,
        names=("--expect-pcr", "48 bytes")),
    row("verify-attestation", "{aws_doc}", "--at", "document", "--nonce", "00", code=E.EIFSignatureCheckerError,
        names=(": nonce: ",)),
    row("verify-attestation", "{aws_doc}", "--root", "{text}", code=E.InvalidArgument, names=("{text}", "certificate")),
    row("verify-attestation", "{aws_doc}", "--root", "{missing}", code=E.FileOperationFailure, names=("{missing}",)),
    row("verify-attestation", "{aws_doc}", "--at", "inf", code=E.InvalidArgument, names=("--at 'inf'",)),
    # pki
    row("pki", code=E.MissingArgument, names=("COMMAND", "init", "show", "export-root")),
    row("pki", "rotate", code=E.InvalidArgument, names=("invalid choice", "rotate")),
    row("pki", "init", "--pki-dir", "{text}", code=E.FileOperationFailure, names=("{text}",)),
    row("pki", "show", "--pki-dir", "{dir}", code=E.FileOperationFailure, names=("{dir}/root.pem",)),
    row("pki", "export-root", "--pki-dir", "{dir}", code=E.FileOperationFailure, names=("{dir}/root.pem",)),
    # kms: every row fails before the server would serve.
    row("kms", code=E.MissingArgument, names=("COMMAND", "serve")),
    row("kms", "serve", "--port", "99999", code=E.InvalidArgument, names=("--port", "99999")),
    row("kms", "serve", "--port", "x", code=E.InvalidArgument, names=("--port", "'x'")),
    row("kms", "serve", "--tls-cert", "{cert}", code=E.MissingArgument, names=("--tls-cert", "--tls-key")),
    row("kms", "serve", "--credentials", "{missing}", code=E.FileOperationFailure, names=("{missing}",)),
    row("kms", "serve", "--credentials", "{bad_yaml}", code=E.InvalidArgument, names=("{bad_yaml}", "YAML")),
    row("kms", "serve", "--state", "{bad_json}", code=E.FileOperationFailure, names=("{bad_json}", "not valid JSON")),
    row("kms", "serve", "--attestation-root", "{text}", code=E.InvalidArgument, names=("{text}", "certificate")),
    row("kms", "tls", code=E.MissingArgument, names=("--tls-dir",)),
    row("kms", "tls", "--tls-dir", "{text}", code=E.FileOperationFailure, names=("{text}", "KMS TLS identity")),
    # vsock-proxy
    row("vsock-proxy", code=E.MissingArgument, names=("local_port", "remote_addr", "remote_port")),
    row("vsock-proxy", "0", "kms.us-east-1.amazonaws.com", "443", code=E.InvalidArgument, names=("local port 0",)),
    row("vsock-proxy", "8000", "kms.us-east-1.amazonaws.com", "70000", code=E.InvalidArgument,
        names=("remote port 70000",)),
    row("vsock-proxy", "8000", "kms.us-east-1.amazonaws.com", "443", "--config", "{missing}",
        code=E.FileOperationFailure, names=("{missing}",)),
    row("vsock-proxy", "8000", "kms.us-east-1.amazonaws.com", "443", "--config", "{bad_yaml}",
        code=E.InvalidArgument, names=("{bad_yaml}", "YAML")),
    row("vsock-proxy", "8000", "kms.us-east-1.amazonaws.com", "443", "-4", "-6", code=E.ConflictingArgument,
        names=("--ipv6", "--ipv4")),
    # images
    row("images", code=E.MissingArgument, names=("COMMAND", "build", "list")),
    row("images", "build", code=E.MissingArgument, names=("NAME",)),
    row("images", "build", "no-such-recipe", code=E.EifBuildingError, names=("no-such-recipe", "recipe")),
    row("images", "build", "{bad_yaml}", code=E.EifBuildingError, names=("{bad_yaml}", "YAML")),
    row("images", "list", "--all", code=E.InvalidArgument, names=("unrecognized arguments: --all",)),
    # blobs: the harness's own kernel is not built in the test's empty cache.
    row("blobs", code=E.MissingArgument, names=("COMMAND", "export")),
    row("blobs", "export", code=E.MissingArgument, names=("DIR",)),
    row("blobs", "export", "{dir}/out", code=E.BlobsPathNotSet, names=("{root}/cache/kernel-current", "not built")),
    # doctor's findings are its report (exit 1); its arguments fail as any command's.
    row("doctor", "--yaml", code=E.InvalidArgument, names=("unrecognized arguments: --yaml",)),
    row("images", "list", "--recipes", "{missing}", code=E.FileOperationFailure,
        names=("{missing}", "recipes folder not found")),
    # setup: a step's failure is its "setup: FAILED at step" line (exit 1); its arguments fail
    # as any command's.
    row("setup", "--only", "qemu,bogus", code=E.InvalidArgument, names=("unknown step 'bogus'",)),
    row("setup", "--fast", code=E.InvalidArgument, names=("unrecognized arguments: --fast",)),
    # run (YAML scenarios): everything is validated before anything boots.
    row("run", code=E.MissingArgument, names=("PATH",)),
    row("run", "{missing}", code=E.FileOperationFailure, names=("{missing}", "no such scenario")),
    row("run", "{dir}", code=E.InvalidArgument, names=("{dir}", "no *.yaml scenario")),
    row("run", "{bad_yaml}", code=E.InvalidArgument, names=("bad.yaml:", "YAML")),
]


def _flip_issuer_tag(der: bytes) -> bytes:
    """``der`` with the string tag of the issuer's first commonName changed (UTF8String 0x0c
    -> 0x0d, no such type): the certificate still loads, its issuer does not decode."""
    at = der.index(b"\x06\x03\x55\x04\x03") + 5  # OID 2.5.4.3; the issuer comes before the subject
    assert der[at] == 0x0C
    return der[:at] + bytes([der[at] ^ 0x01]) + der[at + 1:]


def _negative_serial(der: bytes) -> bytes:
    """``der`` with the sign bit of its serial number set (RFC 5280 wants it positive)."""
    at = der.index(b"\xa0\x03\x02\x01\x02\x02") + 7  # version v3, then INTEGER serial: length, value
    return der[:at] + bytes([der[at] ^ 0x80]) + der[at + 1:]


def _tampered_aws_document(where: str) -> bytes:
    """The real AWS document with the certificate ``where`` ("certificate" or "cabundle[i]")
    damaged in place: its issuer name, or (``where`` + "/serial") its serial number's sign."""
    data = AWS_DOC.read_bytes()
    payload = cbor2.loads(cbor2.loads(data)[2])
    field, _, part = where.partition("/")
    der = payload["certificate"] if field == "certificate" else payload["cabundle"][int(field[9:-1])]
    assert data.count(der) == 1
    if part == "serial":
        return data.replace(der, _negative_serial(der))
    tampered = _flip_issuer_tag(der)
    # The regression this guards: cryptography loads the certificate and fails only when the
    # issuer is read, which used to escape the verifier as a bare ValueError (E00, exit 0).
    lazy = x509.load_der_x509_certificate(tampered)
    with pytest.raises(ValueError):
        lazy.issuer  # noqa: B018
    return data.replace(der, tampered)


def _certificate_and_key(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cli-errors")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The inputs the rows name, made once: a valid and a corrupt EIF, damaged documents, ..."""
    from harness.eif import write_eif

    d = tmp_path_factory.mktemp("cli-errors")
    write_eif(d / "good.eif", b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap" * 50, b"customer" * 70], None)
    (d / "corrupt.eif").write_bytes((d / "good.eif").read_bytes()[:300])
    (d / "cabundle1.cbor").write_bytes(_tampered_aws_document("cabundle[1]"))
    (d / "leaf.cbor").write_bytes(_tampered_aws_document("certificate"))
    (d / "serial.cbor").write_bytes(_tampered_aws_document("cabundle[2]/serial"))
    (d / "text.txt").write_text("not what any command expects\n")
    (d / "big.key").write_bytes(b"k" * 1025)
    (d / "bad.json").write_text("{nope")
    (d / "bad.yaml").write_text("name: [\n")
    (d / "empty").mkdir()
    cert, key = _certificate_and_key(d)
    return {
        "eif": str(d / "good.eif"), "corrupt_eif": str(d / "corrupt.eif"), "out_eif": str(d / "out.eif"),
        "out_doc": str(d / "doc.cbor"), "missing": str(d / "missing.file"), "dir": str(d / "empty"),
        "text": str(d / "text.txt"), "big_key": str(d / "big.key"), "bad_json": str(d / "bad.json"),
        "bad_yaml": str(d / "bad.yaml"), "cert": str(cert), "key": str(key),
        "tampered_cabundle1": str(d / "cabundle1.cbor"), "tampered_leaf": str(d / "leaf.cbor"),
        "tampered_serial": str(d / "serial.cbor"),
        "aws_doc": str(AWS_DOC), "aws_debug_doc": str(AWS_DEBUG_DOC), "no_blobs": str(d / "no-blobs"),
        "root": str(d),
    }


def _environment(files: dict[str, str]) -> dict[str, str]:
    """Runtime, PKI and blob locations inside the test's folder: no row sees the host's."""
    root = Path(files["root"])
    return {
        "NITRO_HARNESS_RUNTIME_DIR": str(root / "runtime"),
        "NITRO_HARNESS_PKI_DIR": str(root / "pki"),
        "NITRO_CLI_BLOBS": files["no_blobs"],
        "NITRO_HARNESS_CACHE": str(root / "cache"),
    }


@pytest.fixture()
def isolated(monkeypatch, files):
    for name, value in _environment(files).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NITRO_HARNESS_DEBUG", raising=False)
    return files


def _check_one_error_line(stderr: str, code: ErrorCode) -> str:
    """Assert stderr ends with the single ``[ Exx ]`` line for ``code``; return its message."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert [line for line in lines if line.startswith("[ E")] == [lines[-1]], stderr
    match = LINE.match(lines[-1])
    assert match, lines[-1]
    assert (int(match.group(1)), match.group(2)) == (code.value, code.name), lines[-1]
    return match.group(3)


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += _command_paths(sub, prefix + (name,))
    return paths


def test_every_command_has_error_rows():
    paths = _command_paths(build_parser())
    # The commands this table was written for, so a parser that lost its sub-commands fails too.
    assert {p[0] for p in paths} >= {"build-enclave", "describe-eif", "pcr", "sign-eif", "run-enclave",
                                     "describe-enclaves", "console", "terminate-enclave", "attest",
                                     "verify-attestation", "pki", "kms", "vsock-proxy", "images", "doctor", "run",
                                     "check-eif", "blobs"}
    assert ("pki", "export-root") in paths and ("kms", "serve") in paths and ("images", "build") in paths
    missing = [" ".join(p) for p in paths if not any(r.argv[: len(p)] == p for r in ROWS)]
    assert missing == [], f"commands without an error row in ROWS: {missing}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_error_path_exits_non_zero_with_one_line(case: Row, isolated, capsys):
    argv = [arg.format(**isolated) for arg in case.argv]
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == case.code.value != 0, err
    message = _check_one_error_line(err, case.code)
    for name in case.names:
        assert name.format(**isolated) in message, message
    # A failed attest never leaves a document behind.
    assert not Path(isolated["out_doc"]).exists()


def test_unexpected_exception_is_e00_with_a_non_zero_status(isolated, capsys, monkeypatch):
    import harness.cli.eif_commands as eif_commands

    def broken(path):
        raise RuntimeError("describe is broken\nsecond line")

    monkeypatch.setattr(eif_commands, "describe", broken)
    status = main(["describe-eif", "--eif-path", isolated["eif"]])
    _, err = capsys.readouterr()
    assert status == UNSPECIFIED_EXIT_STATUS == 101
    message = _check_one_error_line(err, E.UnspecifiedError)
    assert message.startswith("RuntimeError: describe is broken second line")


def test_nitro_error_e00_exits_non_zero(isolated, capsys, monkeypatch):
    import harness.cli.eif_commands as eif_commands

    def broken(path):
        raise NitroError(E.UnspecifiedError, f"{path}: vhost-user backend stopped")

    monkeypatch.setattr(eif_commands, "describe", broken)
    assert main(["describe-eif", "--eif-path", isolated["eif"]]) == 101
    assert _check_one_error_line(capsys.readouterr().err, E.UnspecifiedError).endswith("vhost-user backend stopped")


def test_library_exceptions_map_to_their_codes():
    from harness.attestation import AttestationError

    err = as_nitro_error(AttestationError("chain", "'leaf' is not signed by 'zonal'"))
    assert (err.code, err.message) == (E.EIFSignatureCheckerError, "chain: 'leaf' is not signed by 'zonal'")
    err = as_nitro_error(PermissionError(13, "Permission denied", "/run/nitro-harness/lock"))
    assert (err.code, err.message) == (E.FileOperationFailure, "/run/nitro-harness/lock: Permission denied")
    err = as_nitro_error(ConnectionResetError(104, "Connection reset by peer"))
    assert (err.code, err.message) == (E.SocketError, "ConnectionResetError: Connection reset by peer")
    assert as_nitro_error(KeyError("x")) is None
    assert [c.exit_status for c in (E.UnspecifiedError, E.MissingArgument, E.EIFSigningError)] == [101, 1, 60]


def test_broken_pipe_on_a_socket_is_an_error_not_a_closed_stdout(isolated, capsys, monkeypatch):
    import harness.cli.eif_commands as eif_commands

    def broken(path):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(eif_commands, "describe", broken)
    assert main(["describe-eif", "--eif-path", isolated["eif"]]) == E.SocketError.value
    assert _check_one_error_line(capsys.readouterr().err, E.SocketError) == "BrokenPipeError: Broken pipe"


def test_stdout_reader_gone_tells_a_closed_pipe(monkeypatch):
    from harness import cli

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli._stdout_reader_gone() is False
        os.close(read_end)
        assert cli._stdout_reader_gone() is True


def _subprocess(argv: list[str], files: dict[str, str], code: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **_environment(files))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NITRO_HARNESS_DEBUG", None)
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "harness.cli", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["verify-attestation", "{tampered_cabundle1}", "--at", "document"], E.EIFSignatureCheckerError),
        (["attest", "--eif-path", "{eif}", "--output", "{out_doc}", "--nonce", OVERLONG], E.InvalidArgument),
        (["run-enclave", "--eif-path", "{missing}", "--memory", "512", "--cpu-count", "2"], E.FileOperationFailure),
        (["terminate-enclave", "--enclave-name", "nope"], E.InvalidArgument),
        ([], E.MissingArgument),
    ],
    ids=["tampered-document", "overlong-nonce", "missing-eif", "unknown-enclave", "no-command"],
)
def test_shell_sees_the_error_number(argv, code, files):
    result = _subprocess([a.format(**files) for a in argv], files)
    # Non-zero, so `nitro-harness verify-attestation doc && deploy` does not deploy.
    assert result.returncode == code.value != 0, result.stderr
    _check_one_error_line(result.stderr, code)
    assert result.stdout == ""


def test_shell_sees_e00_as_101(files):
    script = (
        "import sys\n"
        "import harness.cli.eif_commands as m\n"
        "def broken(path):\n"
        "    raise RuntimeError('boom')\n"
        "m.describe = broken\n"
        "from harness.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = _subprocess(["describe-eif", "--eif-path", files["eif"]], files, code=script)
    assert result.returncode == 101, result.stderr
    assert _check_one_error_line(result.stderr, E.UnspecifiedError).startswith("RuntimeError: boom")
