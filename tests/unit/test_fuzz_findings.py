"""Inputs the fuzzer found that crashed a parser (docs/fuzzing.md), each now refused with the
error its module declares; one test per finding, on the smallest input that shows it.

The fuzzer's own reproducers are replayed by tests/unit/test_fuzz_replay.py; these tests state
each rule in words and check the message the user sees.
"""

from __future__ import annotations

import io
from pathlib import Path
import json
import socket
import tarfile

import pytest

import cbor2

from harness import attestation
from harness import scenario as scn
from harness.cli.eif_commands import describe
from harness.cpio import CpioError, Entry, read_cpio, write_cpio
from harness.eif import read_eif, write_eif
from harness.errors import ErrorCode, NitroError
from harness.images import docker_archive as da
from harness.kms.cms import CmsError, ber_structure
from harness.kms.server import KmsServer
from helpers.eif_files import assemble


def _tar(members: dict[str, bytes | tuple[str, str]]) -> bytes:
    """A ustar archive: name -> data, or name -> ("sym", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[1]
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _docker_save(config: object, layer: bytes = b"", manifest: object = None) -> bytes:
    if manifest is None:
        manifest = [{"Config": "c.json", "Layers": ["l.tar"]}]
    return _tar({"manifest.json": json.dumps(manifest).encode(),
                 "c.json": json.dumps(config).encode(), "l.tar": layer or _tar({"f": b"x"})})


def _oci(index: object, blobs: dict[str, object]) -> bytes:
    return _tar({"oci-layout": b"{}", "index.json": json.dumps(index).encode(),
                 **{f"blobs/sha256/{k}": json.dumps(v).encode() for k, v in blobs.items()}})


def _open_e48(tmp_path, raw: bytes) -> str:
    """The E48 message (after the path) of :func:`da.open_image_archive` on ``raw``."""
    path = tmp_path / "img.tar"
    path.write_bytes(raw)
    with pytest.raises(NitroError) as info:
        da.open_image_archive(path)
    assert info.value.code == ErrorCode.EifBuildingError
    assert info.value.message.startswith(f"{path}: ")
    return info.value.message[len(f"{path}: "):]


def _e48(tmp_path, raw: bytes) -> str:
    path = tmp_path / "img.tar"
    path.write_bytes(raw)
    with pytest.raises(NitroError) as info:
        da.load_docker_archive(path, tmp_path / "work")
    assert info.value.code == ErrorCode.EifBuildingError
    prefix = f"{path}: "
    assert info.value.message.startswith(prefix)
    return info.value.message[len(prefix):]


# -- attestation documents ------------------------------------------------------------------------


@pytest.mark.parametrize("timestamp", [attestation.MAX_TIMESTAMP_MS + 1, 10**30])
def test_document_timestamp_past_year_9999_is_a_fields_error(timestamp):
    # datetime cannot hold it: decoding used to fail with ValueError / OverflowError.
    payload = attestation.encode_payload(
        module_id="i-0-enc0", timestamp_ms=timestamp, pcrs={0: bytes(48)}, certificate=b"c",
        cabundle=[b"r"], public_key=None, user_data=None, nonce=None)
    document = cbor2.dumps([attestation.PROTECTED_ES384, {}, payload, bytes(96)])
    with pytest.raises(attestation.AttestationError) as info:
        attestation.decode_document(document)
    assert (info.value.check, str(info.value)) == (
        "fields", "fields: timestamp must be a positive integer (ms) before year 10000")


# -- EIF files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["2025", [1]])
def test_describe_eif_with_build_metadata_not_an_object_is_e35(tmp_path, build):
    path = tmp_path / "x.eif"
    write_eif(path, b"kernel", "console=ttyS0", [b"ramdisk"], {"BuildMetadata": build})
    with pytest.raises(NitroError) as info:
        describe(path)
    assert (info.value.code, info.value.message) == (
        ErrorCode.EifParsingError, f"{path}: metadata.BuildMetadata: must be a JSON object")


def test_eif_metadata_nested_past_the_parser_is_e35(tmp_path):
    # json.loads raised RecursionError from read_eif.
    data, _ = assemble([(1, b"k"), (2, b"c"), (5, b"[" * 3000 + b"]" * 3000), (3, b"r")])
    path = tmp_path / "x.eif"
    path.write_bytes(data)
    with pytest.raises(NitroError) as info:
        read_eif(path)
    assert (info.value.code, info.value.message) == (
        ErrorCode.EifParsingError, f"{path}: metadata: is not valid JSON (arrays or objects nest "
                                   "deeper than 128 levels)")


# -- docker save / OCI archives -------------------------------------------------------------------


def test_docker_archive_truncated_inside_a_member_is_e48(tmp_path):
    # tarfile reads members lazily, so the archive opens and fails while listing its names.
    raw = _tar({"manifest.json": b"[]", "blob": b"x" * 5000})
    assert _open_e48(tmp_path, raw[:512 * 4]) == "archive: is truncated or corrupt (unexpected end of data)"


def test_truncated_gzip_archive_is_e48(tmp_path):
    import gzip

    raw = gzip.compress(_docker_save({"config": {"Cmd": ["/a"]}}))
    assert _open_e48(tmp_path, raw[:len(raw) // 2]) == (
        "archive: is truncated or corrupt (Compressed file ended before the end-of-stream marker "
        "was reached)")


def test_manifest_that_links_to_a_missing_member_is_e48(tmp_path):
    raw = _tar({"manifest.json": ("sym", "nowhere")})
    assert _e48(tmp_path, raw) == "manifest.json: links to 'nowhere', which is not in the archive"


def test_layer_that_links_to_a_missing_member_is_e48(tmp_path):
    raw = _tar({"manifest.json": json.dumps([{"Config": "c.json", "Layers": ["l.tar"]}]).encode(),
                "c.json": b'{"config": {"Cmd": ["/a"]}}', "l.tar": ("sym", "blobs/sha256/0")})
    assert _e48(tmp_path, raw) == ("layer l.tar: links to 'blobs/sha256/0', which is not in "
                                   "the archive")


def test_layer_that_links_to_another_layer_is_read(tmp_path):
    # `docker save` writes a layer that two images share once and links the second name to it.
    raw = _tar({"manifest.json": json.dumps(
                    [{"Config": "c.json", "Layers": ["a/layer.tar", "b/layer.tar"]}]).encode(),
                "c.json": b'{"config": {"Cmd": ["/a"]}}', "a/layer.tar": _tar({"f": b"x"}),
                "b/layer.tar": ("sym", "../a/layer.tar")})
    path = tmp_path / "img.tar"
    path.write_bytes(raw)
    _archive, rootfs = da.load_docker_archive(path, tmp_path / "work")
    assert [e.name for e in rootfs if e.name == "f"] == ["f"]


def test_oci_index_entry_without_a_digest_is_e48(tmp_path):
    assert _e48(tmp_path, _oci({"manifests": [{"mediaType": "x"}]}, {})) == \
        "digest: must be a string"


def test_oci_manifest_config_without_a_digest_is_e48(tmp_path):
    index = {"manifests": [{"digest": "sha256:m"}]}
    assert _e48(tmp_path, _oci(index, {"m": {"config": {}, "layers": []}})) == \
        "manifest: config.digest: must be a string"


def test_oci_index_that_names_itself_stops_at_the_nesting_limit(tmp_path):
    index = {"manifests": [{"digest": "sha256:i"}]}
    nested = {"mediaType": "application/vnd.oci.image.index.v1+json", **index}
    assert _e48(tmp_path, _oci(index, {"i": nested})) == \
        "blobs/sha256/i: image indexes nest more than 4 deep"


def test_image_config_that_is_not_an_object_is_e48(tmp_path):
    assert _e48(tmp_path, _docker_save([])) == "c.json: must be a JSON object"


def test_image_cmd_that_is_not_strings_is_e48(tmp_path):
    assert _e48(tmp_path, _docker_save({"config": {"Cmd": ["/bin/sh", 1]}})) == \
        "c.json: config.Cmd: must be an array of strings"


def test_docker_save_config_name_that_is_not_a_string_is_e48(tmp_path):
    raw = _docker_save({}, manifest=[{"Config": 7, "Layers": []}])
    assert _e48(tmp_path, raw) == "manifest.json: Config: must be a string"


def test_layer_symlink_with_an_empty_target_is_e48(tmp_path):
    raw = _docker_save({}, layer=_tar({"bin/sh": ("sym", "")}))
    assert _e48(tmp_path, raw) == "layer l.tar: entry 'bin/sh': symlink target is empty"


def test_image_config_nested_past_the_parser_is_e48(tmp_path):
    raw = _tar({"manifest.json": json.dumps([{"Config": "c.json", "Layers": []}]).encode(),
                "c.json": b"[" * 3000 + b"]" * 3000})
    assert _e48(tmp_path, raw) == \
        "c.json: is not valid JSON (arrays or objects nest deeper than 128 levels)"


def test_layer_member_of_negative_size_is_e48(tmp_path):
    # tar's base-256 size field can say -1; tarfile lists the member and fails reading it.
    raw = bytearray(_docker_save({}))
    at = raw.index(b"l.tar\0")
    raw[at + 124:at + 136] = b"\xff" * 12
    header = raw[at:at + 512]
    total = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
    raw[at + 148:at + 156] = b"%06o\0 " % total
    assert _e48(tmp_path, bytes(raw)).startswith("layer l.tar: is truncated or corrupt (")


def _with_size_field(raw: bytes, at: int, field: bytes) -> bytes:
    """``raw`` with the 12-byte size field of the tar header at ``at`` replaced, checksum fixed."""
    out = bytearray(raw)
    out[at + 124:at + 136] = field
    header = out[at:at + 512]
    total = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
    out[at + 148:at + 156] = b"%06o\0 " % total
    return bytes(out)


def test_layer_member_declaring_more_than_the_layer_holds_is_e48_at_once(tmp_path):
    # tarfile skips a member's data by reading to its declared end, a read per 10 KiB even past
    # the stream's end: 2**80 bytes declared kept the fuzzer's input busy past its time limit.
    layer = _tar({"f": b"x"})
    raw = _docker_save({}, layer=_with_size_field(layer, 0, b"\x80" + (1 << 80).to_bytes(11, "big")))
    assert _e48(tmp_path, raw) == (f"layer l.tar: member 'f' declares {1 << 80} bytes, more than "
                                   "the layer can hold")


def test_archive_header_whose_size_does_not_fit_an_integer_is_e48(tmp_path):
    # A GNU long-name header of 2**84 bytes: tarfile's read of it raises OverflowError.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("x" * 120)  # over 100 bytes: a GNU long-name header first
        info.size = 4
        tf.addfile(info, io.BytesIO(b"data"))
    raw = buf.getvalue()
    assert raw[156:157] == b"L"
    message = _open_e48(tmp_path, _with_size_field(raw, 0, b"\x80" + (1 << 84).to_bytes(11, "big")))
    assert message.startswith("archive: is truncated or corrupt (")


# -- cpio writing -------------------------------------------------------------------------------


def test_names_and_link_targets_that_are_not_utf8_are_written_as_their_bytes():
    # tarfile and read_cpio keep undecodable bytes as surrogate escapes; the writer puts the
    # very bytes back (docker layers with Latin-1 file names).
    name, target = b"etc/caf\xe9".decode("utf-8", "surrogateescape"), "\udcff"
    out = io.BytesIO()
    write_cpio(out, [Entry.directory("etc"), Entry.file(name, b"x"), Entry.symlink("l", target)])
    records = {r.name: r for r in read_cpio(out.getvalue())}
    assert name in records and records["l"].data == b"\xff"


def test_a_lone_surrogate_in_a_name_is_a_cpio_error():
    with pytest.raises(CpioError, match=r"entry name 'a\\ud800': not representable as bytes"):
        write_cpio(io.BytesIO(), [Entry.file("a\ud800", b"")])
    with pytest.raises(CpioError, match="symlink target '\\\\ud800': not representable"):
        Entry.symlink("l", "\ud800")


# -- scenario files -------------------------------------------------------------------------------


def test_scenario_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "case.yaml"
    path.write_bytes(b"image: hello\nsteps:\n  - sleep: 1 # caf\xe9\n")
    with pytest.raises(scn.ScenarioError) as info:
        scn.load_scenarios(path)
    assert info.value.code == ErrorCode.InvalidArgument
    assert info.value.line == 3
    assert info.value.message.endswith(":3: not UTF-8 text (byte 38: 0xe9)")


def _scenario_error(tmp_path, text: str) -> scn.ScenarioError:
    path = tmp_path / "case.yaml"
    path.write_text(text)
    with pytest.raises(scn.ScenarioError) as info:
        scn.load_scenarios(path)
    return info.value


def test_matrix_of_aliased_lists_is_refused_before_expanding(tmp_path):
    # 10 values in 5 keys: 100,000 cases, each copied and validated; it used to run for minutes.
    err = _scenario_error(tmp_path, "image: hello\nmatrix: {enclave.cpu_count: &x [1,2,3,4,5,6,7,8,"
                          "9,10], enclave.memory_mib: *x, enclave.cid: *x, timeout: *x, "
                          "step_timeout: *x}\nsteps: [{sleep: 1}]\n")
    assert err.line == 2
    assert err.message.endswith(":2: matrix: 100000 cases, more than the 256 one document may "
                                "expand to")


def test_matrix_of_256_cases_still_expands(tmp_path):
    path = tmp_path / "case.yaml"
    path.write_text("image: hello\nmatrix: {enclave.cpu_count: [1, 2], enclave.memory_mib: "
                    f"{list(range(512, 512 + 128))}}}\nsteps: [{{sleep: 1}}]\n")
    assert len(scn.load_scenarios(path)) == 256


def test_billion_laughs_is_refused(tmp_path):
    # Eight aliased levels of ten: 10^8 strings that the placeholder check walked one by one.
    levels = ["a: &a [" + ", ".join(["x"] * 10) + "]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    body = "\n".join("        " + line for line in levels)
    err = _scenario_error(tmp_path, "image: hello\nsteps:\n  - cli:\n      args: [x]\n"
                                    f"      json:\n{body}\n")
    assert err.message.endswith(":1: the document expands to more than 100000 values (YAML "
                                "aliases repeat what their anchor names)")


def test_yaml_nested_past_the_recursion_limit_is_a_yaml_error(tmp_path):
    err = _scenario_error(tmp_path, "image: hello\nsteps: " + "[" * 3000 + "]" * 3000 + "\n")
    assert err.line is None and err.message.endswith(": YAML: collections nest too deeply")


def test_collections_nested_deeper_than_64_levels_are_refused(tmp_path):
    err = _scenario_error(tmp_path, "image: hello\nsteps: [{cli: {args: [x], json: "
                          + "[" * 70 + "]" * 70 + "}}]\n")
    assert err.message.endswith(": collections nest deeper than 64 levels")


# -- CMS (CiphertextForRecipient) ----------------------------------------------------------------


def test_ber_nested_1000_levels_is_a_cms_error():
    # Each level was a recursive call: 1000 levels raised RecursionError.
    with pytest.raises(CmsError, match=r"^BER: nesting deeper than 32 levels at offset 66$"):
        ber_structure(b"\x30\x80" * 1000 + b"\x00\x00" * 1000)


def test_ber_nested_32_levels_is_walked():
    node = ber_structure(b"\x30\x80" * 32 + b"\x00\x00" * 32)
    depth = 0
    while node.children:
        node, depth = node.children[0], depth + 1
    assert depth == 31 and node.indefinite


# -- the KMS emulator's HTTP handler -------------------------------------------------------------


@pytest.fixture(scope="module")
def kms():
    with KmsServer() as server:  # no Recipient requests here: the default roots are never read
        yield server


def _exchange(server: KmsServer, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; everything the server writes until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("length", ["2x", "-1", "1_0", "\u0661"])
def test_get_with_a_malformed_content_length_is_answered(kms, length):
    # It used to raise ValueError in the handler: the client got a closed socket, no answer.
    out = _exchange(kms, f"GET / HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.endswith(b'{"__type":"UnknownOperationException",'
                        b'"message":"KMS accepts only POST / with X-Amz-Target"}')


@pytest.mark.parametrize("length", ["-1", "1_0", " +2"])
def test_post_with_a_malformed_content_length_is_a_serialization_error(kms, length):
    out = _exchange(kms, (f"POST / HTTP/1.1\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                          f"Content-Length: {length}\r\n\r\n{{}}").encode())
    assert out.startswith(b"HTTP/1.1 400 ")
    text = length.strip()
    assert out.endswith(b'{"__type":"SerializationException","message":"Content-Length '
                        + repr(text).encode() + b' is not a number"}')


def test_http_0_9_get_is_answered_with_the_body_alone(kms):
    # A request line without a version is HTTP/0.9: no status line or headers in the answer.
    # The reply used to fail on the missing header buffer, leaving a closed socket.
    out = _exchange(kms, b"GET /\r\n")
    assert out == (b'{"__type":"UnknownOperationException",'
                   b'"message":"KMS accepts only POST / with X-Amz-Target"}')


def _post(server: KmsServer, target: str, body: bytes) -> bytes:
    return _exchange(server, (f"POST / HTTP/1.1\r\nX-Amz-Target: TrentService.{target}\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)


def test_request_body_nested_past_the_parser_is_a_serialization_error(kms):
    # json.loads raised RecursionError: the handler answered 500 KMSInternalException.
    out = _post(kms, "ListKeys", b"[" * 3000 + b"]" * 3000)
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.endswith(b'{"__type":"SerializationException","message":"request body is not '
                        b'valid JSON"}')


def test_key_policy_nested_past_the_parser_is_a_malformed_policy(kms):
    body = json.dumps({"Policy": "[" * 3000 + "]" * 3000}).encode()
    out = _post(kms, "CreateKey", body)
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.endswith(b'{"__type":"MalformedPolicyDocumentException","message":"policy: not '
                        b'valid JSON (arrays or objects nest deeper than 128 levels)"}')


def test_cms_field_of_another_asn1_type_is_a_cms_error():
    # The fuzzer's smallest such input: EncryptedContentInfo's IV is an INSTANCE OF, which
    # asn1crypto parses only when read (AttributeError before).
    from harness.kms.cms import parse_ciphertext_for_recipient

    from fuzz import verdict

    raw = (Path(verdict.__file__).parent / "crashes" / "cms" / "attributeerror-aca97d922055298f").read_bytes()
    with pytest.raises(CmsError, match=r"^CiphertextForRecipient: not a CMS EnvelopedData \(a field "
                                       r"holds another ASN\.1 type than CMS defines there\)$"):
        parse_ciphertext_for_recipient(raw)

