"""Our EIFs read by QEMU's own EIF loader (machine ``nitro-enclave``, hw/core/eif.c): a reader
written by others that follows the section table and checks the CRC and the signature
section's CBOR (docs/eif-format.md)."""

import subprocess

import pytest

from harness import eif, qemu
from harness.errors import NitroError
from helpers.eif_files import CMDLINE, KERNEL, RAMDISK, assemble, make_signer, random_parts, write


@pytest.fixture
def parts():
    return random_parts()


def _qemu_nitro_loader():
    """``load(path)``: QEMU's stderr after its nitro-enclave machine loaded the EIF at ``path``
    (skips without a QEMU that has the machine)."""
    try:
        q = qemu.find_qemu()
    except NitroError:
        pytest.skip("no QEMU build (nitro-harness setup --only qemu builds one)")
    machines = subprocess.run([str(q), "-M", "help"], capture_output=True, text=True,
                              timeout=30).stdout
    if "nitro-enclave" not in machines:
        pytest.skip(f"{q} has no nitro-enclave machine")

    def load(path):
        r = subprocess.run([str(q), "-M", "nitro-enclave", "-kernel", str(path), "-m", "256",
                            "-display", "none", "-nographic", "-no-reboot"],
                           capture_output=True, text=True, timeout=60)
        return r.stderr

    return load


def test_qemu_nitro_enclave_loader_accepts_our_eifs(tmp_path, parts):
    load = _qemu_nitro_loader()
    # The test kernel is random bytes: QEMU parses and checks the EIF, extracts kernel and
    # initrd, and only then fails in its x86 Linux loader. That message proves the EIF passed.
    passed = "linux kernel too old to load a ram disk"
    plain = tmp_path / "plain.eif"
    eif.write_eif(plain, parts["kernel"], "console=ttyS0", [parts["boot"], parts["app"]],
                  eif.build_metadata(image_name="q"))
    assert passed in load(plain)
    pem, kpem, _ = make_signer()
    signed = tmp_path / "signed.eif"
    eif.sign_eif(plain, signed, pem, kpem)
    assert passed in load(signed)
    gap, _ = assemble([(KERNEL, parts["kernel"]), (CMDLINE, parts["cmdline"]),
                       (RAMDISK, parts["boot"])], gaps={2: b"\0" * 16})
    assert passed in load(write(tmp_path, gap, "gap.eif"))  # a table reader skips the gap
    bad = bytearray(plain.read_bytes())
    bad[-1] ^= 1
    err = load(write(tmp_path, bytes(bad), "bad.eif"))
    assert "CRC mismatch" in err
    assert eif.read_eif(tmp_path / "bad.eif").crc_ok is False  # we agree with QEMU
