"""``build-enclave --ca-bundle`` (docs/nitro-cli.md#build-enclave): the CA lands in the image's
standard trust stores and CA variables, links are followed, the image's own choices keep
working, and only PCR0 and PCR2 change; an image built so verifies the KMS emulator's TLS
certificate for kms.us-east-1.amazonaws.com with its own bundle and nothing else."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import struct
import threading

import pytest

from harness.cli import main
from harness.cpio import Entry, read_cpio
from harness.errors import ErrorCode, NitroError
from harness.images.ca_bundle import CA_VARIABLES, add_ca_bundle, read_ca_pem, resolve_in_image
from harness.kms import ensure_tls_identity
from helpers.blob_dirs import fake_blobs, small_rootfs

SYSTEM = b"-----BEGIN CERTIFICATE-----\nc3lzdGVt\n-----END CERTIFICATE-----"  # no final newline


@pytest.fixture
def blobs(tmp_path):
    return fake_blobs(tmp_path / "blobs", cmdline="reboot=k console=ttyS0")


@pytest.fixture
def rootfs(tmp_path):
    return small_rootfs(tmp_path / "rootfs", hostname=False)


def build(capsys, *args):
    rc = main(["build-enclave", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def last_ramdisk(path) -> bytes:
    """The customer ramdisk: the last section of the EIF (a signature-less build)."""
    data = path.read_bytes()
    n = struct.unpack_from(">H", data, 0x1A)[0]
    offset = struct.unpack_from(">32Q", data, 0x1C)[n - 1]
    kind, _flags, size = struct.unpack_from(">HHQ", data, offset)
    assert kind == 3  # a ramdisk
    return data[offset + 12:offset + 12 + size]


@pytest.fixture
def tls(tmp_path):
    return ensure_tls_identity(tmp_path / "tls")


@pytest.fixture
def ca_pem(tls):
    return read_ca_pem(tls.ca_certificate)


def files(change) -> dict[str, bytes]:
    return {e.name: e.data for e in change.entries if stat.S_ISREG(e.mode)}


def test_a_debian_bundle_gains_the_ca_and_the_variables_point_at_it(ca_pem):
    image = [Entry.directory("etc"), Entry.directory("etc/ssl"), Entry.directory("etc/ssl/certs"),
             Entry.file("etc/ssl/certs/ca-certificates.crt", SYSTEM, mode=0o444, mtime=1234)]
    change = add_ca_bundle(image, ["PATH=/bin"], ca_pem)
    bundle = files(change)["etc/ssl/certs/ca-certificates.crt"]
    assert bundle == SYSTEM + b"\n" + ca_pem
    entry = next(e for e in change.entries if e.name == "etc/ssl/certs/ca-certificates.crt")
    assert (stat.S_IMODE(entry.mode), entry.mtime) == (0o444, 1234)  # metadata kept
    assert change.appended == ["etc/ssl/certs/ca-certificates.crt"] and change.created == []
    assert change.env == ["PATH=/bin"] + [f"{v}=/etc/ssl/certs/ca-certificates.crt" for v in CA_VARIABLES]
    assert change.variables == list(CA_VARIABLES)


def test_an_image_without_a_bundle_gets_one_with_its_folders(ca_pem):
    change = add_ca_bundle([Entry.directory("etc"), Entry.file("etc/hostname", b"x\n")], [], ca_pem)
    assert files(change)["etc/ssl/certs/ca-certificates.crt"] == ca_pem
    dirs = {e.name for e in change.entries if e.is_dir}
    assert {"etc", "etc/ssl", "etc/ssl/certs"} <= dirs
    assert change.created == ["etc/ssl/certs/ca-certificates.crt"]


def test_red_hat_links_are_followed_and_the_new_main_bundle_keeps_the_system_cas(ca_pem):
    extracted = "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
    image = [Entry.directory(d) for d in ("etc", "etc/ssl", "etc/pki", "etc/pki/tls", "etc/pki/tls/certs",
                                           "etc/pki/ca-trust", "etc/pki/ca-trust/extracted",
                                           "etc/pki/ca-trust/extracted/pem")]
    image += [Entry.symlink("etc/ssl/certs", "/etc/pki/tls/certs"),
              Entry.symlink("etc/pki/tls/certs/ca-bundle.crt", "../../ca-trust/extracted/pem/tls-ca-bundle.pem"),
              Entry.symlink("etc/pki/tls/cert.pem", f"/{extracted}"),
              Entry.file(extracted, SYSTEM + b"\n")]
    assert resolve_in_image({e.name: e for e in image}, "/etc/ssl/certs/ca-bundle.crt") == extracted
    change = add_ca_bundle(image, [], ca_pem)
    got = files(change)
    # /etc/ssl/certs/ca-certificates.crt lands in /etc/pki/tls/certs, seeded with the system CAs.
    assert got["etc/pki/tls/certs/ca-certificates.crt"] == SYSTEM + b"\n" + ca_pem
    assert got[extracted] == SYSTEM + b"\n" + ca_pem  # changed once, through either name
    assert change.created == ["etc/pki/tls/certs/ca-certificates.crt"] and change.appended == [extracted]


def test_a_bundle_the_image_names_in_its_environment_gains_the_ca_too(ca_pem):
    image = [Entry.directory("opt"), Entry.file("opt/app-ca.pem", SYSTEM + b"\n")]
    change = add_ca_bundle(image, ["AWS_CA_BUNDLE=/opt/app-ca.pem"], ca_pem)
    assert files(change)["opt/app-ca.pem"] == SYSTEM + b"\n" + ca_pem
    assert "AWS_CA_BUNDLE=/opt/app-ca.pem" in change.env
    assert change.variables == ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"]


def test_bad_inputs_are_one_line_errors(tmp_path, ca_pem):
    text = tmp_path / "x.pem"
    text.write_text("not a certificate\n")
    with pytest.raises(NitroError, match=r"--ca-bundle .*x.pem: no PEM certificate") as info:
        read_ca_pem(text)
    assert info.value.code == ErrorCode.EifBuildingError
    text.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(NitroError, match=r"certificate 1 does not parse"):
        read_ca_pem(text)
    with pytest.raises(NitroError, match=r"cannot read") as info:
        read_ca_pem(tmp_path / "missing.pem")
    assert info.value.code == ErrorCode.FileOperationFailure
    folder = [Entry.directory("etc/ssl/certs/ca-certificates.crt")]
    with pytest.raises(NitroError, match=r"/etc/ssl/certs/ca-certificates.crt: the image has a non-file there"):
        add_ca_bundle(folder, [], ca_pem)
    loop = [Entry.symlink("etc", "/etc2"), Entry.symlink("etc2", "/etc")]
    with pytest.raises(NitroError, match=r"too many symbolic links"):
        add_ca_bundle(loop, [], ca_pem)


def test_build_enclave_ca_bundle_changes_pcr0_and_pcr2_only_and_the_image_verifies_the_emulator(
        tmp_path, blobs, rootfs, capsys, tls):
    plain, trusted = tmp_path / "plain.eif", tmp_path / "trusted.eif"
    common = ["--rootfs", rootfs, "--cmd", "/bin/hello", "--blobs", blobs]
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        rc, out_plain, _ = build(capsys, *common, "--output-file", plain)
        assert rc == 0
        rc, out_trusted, err = build(capsys, *common, "--ca-bundle", tls.ca_certificate, "--output-file", trusted)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert rc == 0, err
    assert (f"--ca-bundle {tls.ca_certificate}: added to /etc/ssl/certs/ca-certificates.crt (created); "
            f"set {', '.join(CA_VARIABLES)}") in err
    m_plain, m_trusted = json.loads(out_plain)["Measurements"], json.loads(out_trusted)["Measurements"]
    assert m_plain["PCR1"] == m_trusted["PCR1"]
    assert m_plain["PCR0"] != m_trusted["PCR0"] and m_plain["PCR2"] != m_trusted["PCR2"]
    records = {r.name: r for r in read_cpio(last_ramdisk(trusted))}
    assert b"AWS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt\n" in records["env"].data
    bundle = tmp_path / "image-bundle.pem"
    bundle.write_bytes(records["rootfs/etc/ssl/certs/ca-certificates.crt"].data)
    # A TLS client trusting only the image's bundle accepts the emulator's certificate for
    # kms.us-east-1.amazonaws.com (and a client with the plain image's trust would not).
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.certificate, tls.private_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(bundle))
    with socket.create_connection(listener.getsockname()) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="kms.us-east-1.amazonaws.com") as conn:
        assert conn.recv(2) == b"ok"
    thread.join(5)
    listener.close()
    plain_records = {r.name for r in read_cpio(last_ramdisk(plain))}
    assert "rootfs/etc/ssl/certs/ca-certificates.crt" not in plain_records
