"""EIF reading, measuring, writing, signing and unpacking (docs/eif-format.md, docs/pcrs.md),
with values computed independently in the test (struct + hashlib + zlib), never by the code
under test."""

import datetime
import hashlib
import json
import os
import struct
import zlib

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from harness import eif
from harness.cli import main
from harness.eif import measurement, reader
from harness.errors import ErrorCode, NitroError
from helpers.eif_files import (CMDLINE, KERNEL, METADATA, RAMDISK, SIGNATURE, assemble, ext, make_signer,
                               random_parts, sha, write)


@pytest.fixture
def parts():
    return random_parts()


def test_hand_assembled_pcrs_and_crc(tmp_path, parts):
    meta = json.dumps({"ImageName": "h"}).encode()
    data, crc = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                          (METADATA, meta), (RAMDISK, parts["boot"]), (RAMDISK, parts["app"])])
    p = write(tmp_path, data)
    m = eif.measure_eif(p)
    k, c, b, a = parts["kernel"], parts["cmdline"], parts["boot"], parts["app"]
    assert m.pcr0 == ext(sha(k, c, b, a))
    assert m.pcr1 == ext(sha(k, c, b))
    assert m.pcr2 == ext(sha(a))
    assert m.pcr8 is None
    e = eif.read_eif(p)
    assert e.crc_ok is True and e.crc_computed == crc
    # docs/eif-format.md: for a gapless file the CRC is crc32(file[0:544] + file[548:]).
    assert crc == zlib.crc32(data[:544] + data[548:])
    assert e.sequential_notes == [] and e.metadata == {"ImageName": "h"}
    m2, e2 = eif.measure_and_check(p)
    assert m2 == m and e2.crc_ok


def test_pcr2_without_customer_ramdisk(tmp_path, parts):
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"])])
    m = eif.measure_eif(write(tmp_path, data))
    empty = ext(hashlib.sha384(b"").digest())
    assert m.pcr2 == empty
    # The value real single-ramdisk enclaves publish as PCR2 (PCR0 == PCR1 there).
    assert m.pcr2.hex() == ("21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c"
                            "10edb30948c90ba67310f7b964fc500a")
    assert m.pcr1 == ext(sha(parts["kernel"], parts["cmdline"], parts["boot"]))
    assert m.pcr0 == m.pcr1


def test_multiple_application_ramdisks_and_chunk_boundaries(tmp_path, parts, monkeypatch):
    monkeypatch.setattr(measurement, "CHUNK_SIZE", 4096)  # many chunks, odd offsets for mmap
    monkeypatch.setattr(measurement, "_SLICE", 1000)  # slices that do not divide a window
    r2, r3 = os.urandom(40001), os.urandom(3)
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"]), (RAMDISK, parts["app"]), (RAMDISK, r2),
                        (RAMDISK, r3)])
    p = write(tmp_path, data)
    for no_mmap in ("0", "1"):
        monkeypatch.setenv("NITRO_HARNESS_EIF_NO_MMAP", no_mmap)
        m, e = eif.measure_and_check(p)
        assert m.pcr2 == ext(sha(parts["app"], r2, r3))
        assert m.pcr0 == ext(sha(parts["kernel"], parts["cmdline"], parts["boot"],
                                 parts["app"], r2, r3))
        assert e.crc_ok


def test_gap_between_sections_crc_both_ways(tmp_path, parts):
    secs = [(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]), (RAMDISK, parts["boot"]),
            (RAMDISK, parts["app"])]
    data, crc = assemble(secs, gaps={2: b"\0" * 16})
    p = write(tmp_path, data)
    e = eif.read_eif(p)
    # The table view (hypervisor, QEMU) skips the gap: the stored CRC matches.
    assert e.crc_ok is True and e.crc_computed == crc
    # The whole-file formula includes the gap bytes and so disagrees.
    assert zlib.crc32(data[:544] + data[548:]) != crc
    # nitro-cli's sequential walk reads the zero gap as a section header of type 0 and fails.
    assert any("sequential reader would fail" in n and "type 0" in n for n in e.sequential_notes)
    assert e.sequential_crc is None
    assert eif.measure_eif(p).pcr0 == ext(sha(*(d for _, d in secs)))


def test_gap_that_sequential_reader_misreads(tmp_path, parts):
    # A gap holding a well-formed but unlisted 0-byte ramdisk: nitro-cli would hash nothing
    # extra but its CRC covers 12 more bytes, so its CRC differs from the table's.
    ghost = struct.pack(">HHQ", RAMDISK, 0, 0)
    secs = [(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]), (RAMDISK, parts["boot"]),
            (RAMDISK, parts["app"])]
    data, crc = assemble(secs, gaps={3: ghost})
    e = eif.read_eif(write(tmp_path, data))
    assert e.crc_ok
    assert any("does not list" in n for n in e.sequential_notes)
    body = data[548:]
    assert e.sequential_crc == zlib.crc32(data[:544] + body) != crc


@pytest.mark.parametrize("mutate, rule", [
    (lambda d: d[:300], "truncated"),
    (lambda d: b"EIF!" + d[4:], "magic"),
    (lambda d: d[:548] + struct.pack(">H", 9) + d[550:], "unknown section type 9"),
    (lambda d: d[:-10], "overrun"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, parts, mutate, rule, capsys):
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"])])
    p = write(tmp_path, mutate(data))
    with pytest.raises(NitroError) as ei:
        eif.read_eif(p)
    assert ei.value.code == ErrorCode.EifParsingError
    assert str(p) in ei.value.message and rule in ei.value.message
    assert main(["describe-eif", "--eif-path", str(p)]) == 35
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("[ E35 ]") and "Traceback" not in err


def test_table_disagreeing_with_section_header(tmp_path, parts):
    secs = [(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]), (RAMDISK, parts["boot"])]
    good, _ = assemble(secs)
    offs = [548, 548 + 12 + len(parts["kernel"]),
            548 + 24 + len(parts["kernel"]) + len(parts["cmdline"])]
    bad, _ = assemble(secs, table=(offs, [len(parts["kernel"]), 3, len(parts["boot"])]))
    with pytest.raises(NitroError, match=r"section 1 size: table says 3 bytes but the section "
                                         r"header says 22"):
        eif.read_eif(write(tmp_path, bad))
    assert eif.read_eif(write(tmp_path, good, "g.eif")).crc_ok


def test_more_than_32_sections(tmp_path, parts):
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"])], num=33)
    with pytest.raises(NitroError, match="33 exceeds the maximum of 32"):
        eif.read_eif(write(tmp_path, data))


def test_structure_rules(tmp_path, parts):
    k, c, b = parts["kernel"], parts["cmdline"], parts["boot"]
    cases = [
        ([(CMDLINE, c), (RAMDISK, b)], "0 kernel sections"),
        ([(KERNEL, k), (KERNEL, k), (CMDLINE, c), (RAMDISK, b)], "2 kernel sections"),
        ([(KERNEL, k), (CMDLINE, c)], "no ramdisk"),
        ([(KERNEL, k), (CMDLINE, c), (RAMDISK, b), (METADATA, b"[1, 2]")],
         "metadata: must be a JSON object"),
        ([(KERNEL, k), (CMDLINE, c), (RAMDISK, b), (METADATA, b"{bad")],
         "metadata: is not valid JSON"),
    ]
    for secs, rule in cases:
        data, _ = assemble(secs)
        with pytest.raises(NitroError, match=rule):
            eif.read_eif(write(tmp_path, data))
    data, _ = assemble([(KERNEL, k), (CMDLINE, c), (RAMDISK, b)], version=9)
    with pytest.raises(NitroError, match="version: 9"):
        eif.read_eif(write(tmp_path, data))


def test_bad_crc_detected_and_boot_refused(tmp_path, parts):
    data, crc = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                          (RAMDISK, parts["boot"])], crc=0x12345678)
    p = write(tmp_path, data)
    assert eif.read_eif(p).crc_ok is False
    dest = tmp_path / "boot"
    with pytest.raises(NitroError, match="crc32: stored 0x12345678"):
        eif.extract_boot_files(p, dest)
    assert list(dest.iterdir()) == []  # nothing half-written is left


def test_write_eif_layout_and_round_trip(tmp_path, parts):
    meta = eif.build_metadata(image_name="app", image_version="2.1",
                              build_time="2024-05-01T00:00:00+00:00",
                              kernel_version="6.12.0", custom_metadata={"b": 1, "a": {"z": 0, "y": 1}})
    out = tmp_path / "w.eif"
    m = eif.write_eif(out, parts["kernel"], " console=ttyS0 reboot=k \n",
                      [parts["boot"], parts["app"]], meta)
    data = out.read_bytes()
    magic, version, flags, mem, cpus, _res, n = struct.unpack_from(">4sHHQQHH", data)
    assert (magic, version, flags, mem, cpus, n) == (b".eif", 4, 0, 1 << 30, 2, 5)
    offs = struct.unpack_from(">32Q", data, 0x1C)
    types = [struct.unpack_from(">H", data, o)[0] for o in offs[:n]]
    assert types == [KERNEL, CMDLINE, METADATA, RAMDISK, RAMDISK]  # nitro-cli's order
    cmd_off = offs[1]
    size = struct.unpack_from(">Q", data, cmd_off + 4)[0]
    assert data[cmd_off + 12: cmd_off + 12 + size] == b"console=ttyS0 reboot=k"  # no NUL
    meta_off = offs[2]
    msize = struct.unpack_from(">Q", data, meta_off + 4)[0]
    raw_meta = data[meta_off + 12: meta_off + 12 + msize]
    assert raw_meta.startswith(b'{"ImageName":"app","ImageVersion":"2.1","BuildMetadata":'
                               b'{"BuildTime":"2024-05-01T00:00:00+00:00"')
    assert b'"CustomMetadata":{"a":{"y":1,"z":0},"b":1}}' in raw_meta  # compact, sorted
    assert struct.unpack_from(">I", data, 0x220)[0] == zlib.crc32(data[:544] + data[548:])
    k, c, b, a = parts["kernel"], b"console=ttyS0 reboot=k", parts["boot"], parts["app"]
    assert m.pcr0 == ext(sha(k, c, b, a)) and m.pcr1 == ext(sha(k, c, b))
    assert eif.measure_eif(out) == m
    assert eif.eif_metadata(out)["ImageVersion"] == "2.1"


def test_write_eif_leaves_nothing_on_failure(tmp_path, parts):
    out = tmp_path / "fail.eif"
    with pytest.raises(NitroError) as ei:
        eif.write_eif(out, parts["kernel"], "x", [parts["boot"], tmp_path / "missing.cpio"], None)
    assert ei.value.code == ErrorCode.EifBuildingError and "missing.cpio" in ei.value.message
    assert list(tmp_path.iterdir()) == []


def test_extract_boot_files(tmp_path, parts):
    out = tmp_path / "w.eif"
    m = eif.write_eif(out, parts["kernel"], "console=ttyS0", [parts["boot"], parts["app"]],
                      eif.build_metadata(image_name="x"))
    bf = eif.extract_boot_files(out, tmp_path / "boot")
    assert bf.kernel.read_bytes() == parts["kernel"]
    assert bf.initrd.read_bytes() == parts["boot"] + parts["app"]  # concatenated, in order
    assert bf.cmdline == "console=ttyS0"
    assert bf.measurements == m


@pytest.mark.parametrize("curve, alg, hname, size", [
    (ec.SECP256R1(), -7, "SHA256", 32), (ec.SECP384R1(), -35, "SHA384", 48),
    (ec.SECP521R1(), -36, "SHA512", 66)])
def test_sign_then_verify(tmp_path, parts, curve, alg, hname, size):
    unsigned = tmp_path / "u.eif"
    m = eif.write_eif(unsigned, parts["kernel"], "c", [parts["boot"], parts["app"]],
                      eif.build_metadata(image_name="s"))
    pem, kpem, cert = make_signer(curve)
    signed = tmp_path / "s.eif"
    ms = eif.sign_eif(unsigned, signed, pem, kpem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ms.pcr8 == ext(hashlib.sha384(der).digest())
    assert (ms.pcr0, ms.pcr1, ms.pcr2) == (m.pcr0, m.pcr1, m.pcr2)
    e = eif.read_eif(signed)
    assert e.crc_ok and e.sections[-1].type == eif.SectionType.SIGNATURE
    # The signature section of docs/eif-format.md, decoded independently.
    sec = cbor2.loads(e.signature_raw)
    assert isinstance(sec, list) and len(sec) == 1
    assert bytes(sec[0]["signing_certificate"]) == pem
    assert isinstance(sec[0]["signature"], list)  # array of uints, not a byte string
    prot, unprot, payload, sig = cbor2.loads(bytes(sec[0]["signature"]))
    assert prot == cbor2.dumps({1: alg}) and unprot == {}
    if alg == -35:
        assert prot == bytes.fromhex("a1013822")
    assert cbor2.loads(payload) == {"register_index": 0, "register_value": list(m.pcr0)}
    assert len(sig) == 2 * size
    tbs = cbor2.dumps(["Signature1", prot, b"", payload])
    cert.public_key().verify(encode_dss_signature(int.from_bytes(sig[:size], "big"),
                                                  int.from_bytes(sig[size:], "big")),
                             tbs, ec.ECDSA(getattr(hashes, hname)()))
    check = eif.verify_eif_signature(signed)
    assert check.ok, check.reason
    assert eif.measure_eif(signed) == ms


def test_resign_replaces_signature(tmp_path, parts):
    p = tmp_path / "r.eif"
    eif.write_eif(p, parts["kernel"], "c", [parts["boot"]], eif.build_metadata(image_name="r"))
    pem1, k1, _ = make_signer()
    pem2, k2, cert2 = make_signer()
    eif.sign_eif(p, p, pem1, k1)
    m2 = eif.sign_eif(p, p, pem2, k2)
    e = eif.read_eif(p)
    assert [s.type for s in e.sections].count(eif.SectionType.SIGNATURE) == 1
    assert e.header.num_sections == 5 and e.crc_ok
    assert m2.pcr8 == ext(hashlib.sha384(cert2.public_bytes(serialization.Encoding.DER)).digest())
    assert eif.verify_eif_signature(p, pem2).ok
    assert not eif.verify_eif_signature(p, pem1).ok  # pinned certificate differs


def test_signature_failures(tmp_path, parts):
    p = tmp_path / "f.eif"
    eif.write_eif(p, parts["kernel"], "c", [parts["boot"]], None)
    pem, kpem, _ = make_signer(days=(-30, -1))  # expired
    eif.sign_eif(p, tmp_path / "expired.eif", pem, kpem)
    r = eif.verify_eif_signature(tmp_path / "expired.eif")
    assert not r.ok and "not valid at" in r.reason
    assert eif.verify_eif_signature(tmp_path / "expired.eif",
                                    at=datetime.datetime.now(datetime.timezone.utc)
                                    - datetime.timedelta(days=10)).ok
    # Signature over a different image: re-use the signature section on a modified kernel.
    pem, kpem, _ = make_signer()
    eif.sign_eif(p, tmp_path / "ok.eif", pem, kpem)
    e = eif.read_eif(tmp_path / "ok.eif")
    k2 = bytearray(parts["kernel"])
    k2[0] ^= 1
    data, _ = assemble([(KERNEL, bytes(k2)), (CMDLINE, b"c"), (RAMDISK, parts["boot"]),
                        (SIGNATURE, e.signature_raw)])
    r = eif.verify_eif_signature(write(tmp_path, data, "tampered.eif"))
    assert not r.ok and "PCR0" in r.reason
    with pytest.raises(NitroError) as ei:
        eif.verify_eif_signature(p)
    assert ei.value.code == ErrorCode.EIFSignatureCheckerError


def test_rsa_key_is_refused_without_output(tmp_path, parts):
    p = tmp_path / "f.eif"
    eif.write_eif(p, parts["kernel"], "c", [parts["boot"]], None)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem, kpem, _ = make_signer(key=rsa_key)
    out = tmp_path / "rsa.eif"
    with pytest.raises(NitroError) as ei:
        eif.sign_eif(p, out, pem, kpem)
    assert ei.value.code == ErrorCode.EIFSigningError
    assert "not an EC key" in ei.value.message
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["f.eif"]
    with pytest.raises(NitroError, match="not an EC key"):
        eif.write_eif(out, parts["kernel"], "c", [parts["boot"]], None, eif.Signer(pem, kpem))
    assert not out.exists()


def test_describe_eif_reports_an_aarch64_image_by_its_flag(tmp_path, parts, capsys):
    p = tmp_path / "arm.eif"
    x86 = eif.write_eif(tmp_path / "x86.eif", parts["kernel"], "c", [parts["boot"], parts["app"]], None)
    arm = eif.write_eif(p, parts["kernel"], "c", [parts["boot"], parts["app"]], None, aarch64=True)
    assert p.read_bytes()[6:8] == b"\x00\x01"  # flags, big-endian, bit 0
    assert main(["describe-eif", "--eif-path", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["Arch"] == "aarch64"
    # PCRs do not depend on the architecture: the same sections measure the same.
    assert doc["Measurements"] == arm.to_json() == x86.to_json()


def test_describe_eif_cli_fields(tmp_path, parts, capsys):
    p = tmp_path / "d.eif"
    m = eif.write_eif(p, parts["kernel"], "c", [parts["boot"], parts["app"]],
                      eif.build_metadata(image_name="d", image_version="3",
                                         custom_metadata={"team": "x"}))
    assert main(["describe-eif", "--eif-path", str(p)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    # nitro-cli's fields in nitro-cli's order, then the harness's Arch.
    assert list(doc) == ["EifVersion", "Measurements", "IsSigned", "CheckCRC", "ImageName",
                         "ImageVersion", "Metadata", "Arch"]
    assert doc["Arch"] == "x86_64"
    assert doc["Measurements"] == m.to_json() and doc["CheckCRC"] is True
    assert doc["Metadata"]["team"] == "x"  # custom metadata is flattened, as nitro-cli does
    assert out.startswith('{\n  "EifVersion": 4,\n  "Measurements": {\n    "HashAlgorithm"')
    pem, kpem, _ = make_signer()
    assert main(["sign-eif", "--eif-path", str(p), "--signing-certificate",
                 str(write(tmp_path, pem, "c.pem")), "--private-key",
                 str(write(tmp_path, kpem, "k.pem"))]) == 0
    capsys.readouterr()
    assert main(["describe-eif", "--eif-path", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc)[:6] == ["EifVersion", "Measurements", "IsSigned", "SigningCertificate",
                             "CheckCRC", "SignatureCheck"]
    assert doc["IsSigned"] and doc["SignatureCheck"] is True
    assert doc["SigningCertificate"]["IssuerName"] == {"commonName": "eif signer",
                                                       "organizationName": "Harness"}
    assert doc["SigningCertificate"]["Algorithm"] == "ecdsa-with-SHA256"


def test_pcr_command(tmp_path, capsys):
    f = write(tmp_path, b"hello", "in.bin")
    assert main(["pcr", "--input", str(f)]) == 0
    assert json.loads(capsys.readouterr().out) == {"PCR": ext(hashlib.sha384(b"hello").digest()).hex()}
    pem, _k, cert = make_signer()
    c = write(tmp_path, pem, "c.pem")
    assert main(["pcr", "--signing-certificate", str(c)]) == 0
    der = cert.public_bytes(serialization.Encoding.DER)
    assert json.loads(capsys.readouterr().out) == {"PCR8": ext(hashlib.sha384(der).digest()).hex()}
    assert main(["pcr", "--input", str(tmp_path / "nope")]) == 19


def test_describe_warns_where_nitro_cli_would_disagree(tmp_path, parts, capsys):
    secs = [(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]), (RAMDISK, parts["boot"])]
    data, _ = assemble(secs, gaps={1: b"\0" * 8})
    p = write(tmp_path, data)
    assert main(["describe-eif", "--eif-path", str(p)]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["CheckCRC"] is True
    assert "warning:" in cap.err and "sequential reader would fail" in cap.err


def test_oversized_metadata_section_refused(tmp_path, parts, monkeypatch):
    monkeypatch.setattr(reader, "MAX_METADATA_SIZE", 10)
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (METADATA, b'{"ImageName": "long"}'), (RAMDISK, parts["boot"])])
    with pytest.raises(NitroError, match=r"section 2 \(metadata\) size: 21 bytes exceeds"):
        eif.read_eif(write(tmp_path, data))


def test_writer_refuses_more_than_32_sections(tmp_path, parts):
    out = tmp_path / "many.eif"
    with pytest.raises(NitroError, match="more than 32 sections") as ei:
        eif.write_eif(out, parts["kernel"], "c", [b"r"] * 31, None)  # 33 sections
    assert ei.value.code == ErrorCode.EifBuildingError and not out.exists()
    m = eif.write_eif(out, parts["kernel"], "c", [b"r"] * 30, None)  # exactly 32
    assert eif.read_eif(out).header.num_sections == 32
    assert m.pcr2 == ext(sha(b"r" * 29))
    pem, kpem, _ = make_signer()
    with pytest.raises(NitroError, match="more than 32 sections") as ei:
        eif.sign_eif(out, tmp_path / "s.eif", pem, kpem)  # no slot left for the signature
    assert ei.value.code == ErrorCode.EIFSigningError and not (tmp_path / "s.eif").exists()


@pytest.mark.parametrize("order", [
    ("boot", "kernel", "cmdline", "app"),   # PCR1 still a prefix of PCR0
    ("kernel", "boot", "app", "cmdline"),   # cmdline after an app ramdisk: separate PCR1 chain
])
def test_unusual_table_order_measured_like_qemu(tmp_path, parts, order):
    # QEMU's loader (hw/core/eif.c) hashes in table order: PCR0 gets every measured section,
    # PCR1 kernel, cmdline and the first ramdisk, PCR2 the later ramdisks.
    kinds = {"kernel": KERNEL, "cmdline": CMDLINE, "boot": RAMDISK, "app": RAMDISK}
    data, _ = assemble([(kinds[n], parts[n]) for n in order])
    p = write(tmp_path, data)
    m, e = eif.measure_and_check(p)
    assert e.crc_ok
    assert m.pcr0 == ext(sha(*(parts[n] for n in order)))
    assert m.pcr1 == ext(sha(*(parts[n] for n in order if n != "app")))
    assert m.pcr2 == ext(sha(parts["app"]))
    bf = eif.extract_boot_files(p, tmp_path / "boot")
    assert bf.measurements == m
    assert bf.initrd.read_bytes() == parts["boot"] + parts["app"]
    pem, kpem, _ = make_signer()
    ms = eif.sign_eif(p, tmp_path / "s.eif", pem, kpem)  # re-packed in the same order
    assert (ms.pcr0, ms.pcr1, ms.pcr2) == (m.pcr0, m.pcr1, m.pcr2)
    assert eif.verify_eif_signature(tmp_path / "s.eif").ok


def test_unmappable_file_falls_back_to_reads(tmp_path, parts, monkeypatch):
    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"]), (RAMDISK, parts["app"])])
    p = write(tmp_path, data)

    def refuse(*_a, **_k):
        raise OSError(19, "No such device")  # what mmap says on files that cannot be mapped

    monkeypatch.setattr(measurement.mmap, "mmap", refuse)
    m, e = eif.measure_and_check(p)
    assert e.crc_ok and m.pcr2 == ext(sha(parts["app"]))


def test_describe_says_what_nitro_cli_would_measure(tmp_path, parts):
    # Table lists kernel, cmdline, boot; the file also holds an unlisted ramdisk in a gap that
    # nitro-cli's sequential reader would measure as its application ramdisk.
    ghost = b"ghost ramdisk"
    gap = struct.pack(">HHQ", RAMDISK, 0, len(ghost)) + ghost
    secs = [(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]), (RAMDISK, parts["boot"])]
    data, _ = assemble(secs, gaps={2: gap})
    p = write(tmp_path, data)
    m, e = eif.measure_and_check(p)
    assert m.pcr2 == ext(sha(b""))  # the table (hypervisor) view has no application ramdisk
    seen0 = ext(sha(parts["kernel"], parts["cmdline"], ghost, parts["boot"]))
    note = [n for n in e.sequential_notes if n.startswith("nitro-cli would report")]
    assert note and f"PCR0 {seen0.hex()}" in note[0]


def test_random_corruptions_never_escape_as_tracebacks(tmp_path, parts):
    # Header fields, section headers and lengths mutated at random (fixed seed): every outcome
    # is either a valid parse or a NitroError naming the file; never another exception.
    import random

    from harness.cli.eif_commands import describe

    pem, kpem, _ = make_signer()
    base = tmp_path / "base.eif"
    eif.write_eif(base, parts["kernel"][:600], "c", [parts["boot"][:300], b"app"],
                  eif.build_metadata(image_name="f"), eif.Signer(pem, kpem))
    good = base.read_bytes()
    offs = struct.unpack_from(">6Q", good, 0x1C)
    sizes = struct.unpack_from(">6Q", good, 0x11C)
    hot = list(range(0, 548)) + [o + i for o in offs for i in range(12)]
    for o, n in zip(offs, sizes):  # metadata and signature data are parsed, so fuzz them too
        if struct.unpack_from(">H", good, o)[0] in (METADATA, SIGNATURE):
            hot += range(o + 12, o + 12 + n)
    rng = random.Random(1234)
    p = tmp_path / "fuzz.eif"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.choice(hot)] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        p.write_bytes(bytes(data))
        try:
            describe(p)  # measure, CRC, metadata, signature check: all of describe-eif
            outcomes["ok"] += 1
        except NitroError as e:
            assert str(p) in e.message and "\n" not in e.message
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_read_failure_in_either_lane_is_one_error_and_no_thread_is_left(tmp_path, parts,
                                                                        monkeypatch):
    # The PCR0 lane (the caller's thread) and the CRC/PCR2 lane (thread "eif-crc-pcr2") read on
    # their own; end of file in either ends both and surfaces as one E35 line naming the section.
    import threading

    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"]), (RAMDISK, parts["app"])])
    p = write(tmp_path, data)
    monkeypatch.setenv("NITRO_HARNESS_EIF_NO_MMAP", "1")
    real = os.preadv
    for lane, section in (("MainThread", 0), ("eif-crc-pcr2", 3)):
        def eof(fd, bufs, pos, _lane=lane, _size=len(parts["kernel" if section == 0 else "app"])):
            if threading.current_thread().name == _lane and len(bufs[0]) == _size:
                return 0  # the file ends here for this reader
            return real(fd, bufs, pos)
        monkeypatch.setattr(measurement.os, "preadv", eof)
        before = threading.active_count()
        with pytest.raises(NitroError, match=rf"section {section}: read failed: file shrank") as ei:
            eif.measure_and_check(p)
        assert ei.value.code == ErrorCode.EifParsingError
        assert threading.active_count() == before


def test_short_reads_are_retried_not_reported(tmp_path, parts, monkeypatch):
    # Network and FUSE file systems may return less than asked before the end of the file.
    data, crc = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                          (RAMDISK, parts["boot"]), (RAMDISK, parts["app"])])
    p = write(tmp_path, data)
    monkeypatch.setenv("NITRO_HARNESS_EIF_NO_MMAP", "1")
    real = os.preadv

    def half(fd, bufs, pos):
        view = bufs[0]
        return real(fd, [view[:max(1, len(view) // 2)]], pos)

    monkeypatch.setattr(measurement.os, "preadv", half)
    m, e = eif.measure_and_check(p)
    assert e.crc_computed == crc and m.pcr2 == ext(sha(parts["app"]))


def test_worker_failure_outside_reading_is_raised_not_a_partial_result(tmp_path, parts,
                                                                       monkeypatch):
    # Anything that ends the CRC/PCR2 lane early must surface: a partial PCR2 or a missing CRC
    # returned as a result would be a wrong measurement.
    import threading

    data, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                        (RAMDISK, parts["boot"]), (RAMDISK, parts["app"])])
    p = write(tmp_path, data)
    real = eif.Section.header_bytes

    def fail_in_lane(self):
        if threading.current_thread().name == "eif-crc-pcr2" and self.index == 3:
            raise MemoryError("injected")
        return real(self)

    monkeypatch.setattr(eif.Section, "header_bytes", fail_in_lane)
    with pytest.raises(MemoryError, match="injected"):
        eif.measure_and_check(p)
