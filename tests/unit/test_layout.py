"""Machine layout per kernel: embedded configuration read from a bzImage
(docs/boot.md#choosing-a-layout)."""

import gzip

import pytest

from harness.errors import NitroError
from harness.layout import choose_layout, embedded_config


def fake_bzimage(config_text: str | None) -> bytes:
    # A setup header, then the compressed payload holding vmlinux with IKCONFIG inside, the
    # way a real bzImage nests them.
    vmlinux = b"\x7fELF" + b"\0" * 64
    if config_text is not None:
        vmlinux += b"IKCFG_ST" + gzip.compress(config_text.encode()) + b"IKCFG_ED"
    return b"MZ" + b"\0" * 510 + b"HdrS" + b"\0" * 100 + gzip.compress(vmlinux + b"\0" * 32)


def test_reads_the_config_inside_the_compressed_payload(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage("CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n# CONFIG_ACPI is not set\n"))
    assert embedded_config(kernel) == {"CONFIG_VIRTIO_MMIO": "y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y"}
    layout = choose_layout(kernel)
    assert layout.name == "nitro" and not layout.acpi


def test_kernel_without_cmdline_devices_gets_acpi(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage("CONFIG_VIRTIO_MMIO=m\nCONFIG_ACPI=y\n"))
    assert choose_layout(kernel).name == "acpi"
    kernel.write_bytes(fake_bzimage(None))
    assert embedded_config(kernel) is None
    assert choose_layout(kernel).acpi


def test_explicit_layout_wins_and_bad_names_fail(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(None))
    assert choose_layout(kernel, "nitro").name == "nitro"
    with pytest.raises(NitroError):
        choose_layout(kernel, "pc")


def test_explicit_layout_reaches_the_engine_from_cli_and_scenarios(tmp_path):
    # The layout is chosen per EIF, or by an explicit option (docs/boot.md#choosing-a-layout:
    # run-enclave --layout, a scenario's enclave.layout, EnclaveConfig(layout=...)).
    from harness import scenario as scn
    from harness.cli import build_parser
    from harness.cli.enclave_commands import _config_from_args

    eif = tmp_path / "x.eif"
    eif.write_bytes(b"")
    args = build_parser("run-enclave").parse_args(
        ["run-enclave", "--eif-path", str(eif), "--memory", "512", "--cpu-count", "2", "--layout", "nitro"])
    config, _ = _config_from_args(args)
    assert config.layout == "nitro"
    args = build_parser("run-enclave").parse_args(
        ["run-enclave", "--eif-path", str(eif), "--memory", "512", "--cpu-count", "2"])
    assert _config_from_args(args)[0].layout == "auto"

    path = tmp_path / "s.yaml"
    path.write_text("image: hello\nenclave: {layout: acpi}\nsteps: [{sleep: 1}]\n")
    assert scn.load_scenarios(path)[0].enclave["layout"] == "acpi"
    path.write_text("image: hello\nenclave:\n  layout: pci\nsteps: [{sleep: 1}]\n")
    with pytest.raises(scn.ScenarioError) as info:
        scn.load_scenarios(path)
    assert info.value.line == 3 and "enclave.layout" in info.value.message
