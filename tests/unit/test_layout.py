"""Machine layout per kernel, decided from the bzImage itself (docs/boot.md#choosing-a-layout):
its embedded config when it has one, else the built-in ``virtio_mmio.device`` parameter."""

import pytest

from harness.bzimage import read_kernel_image
from harness.errors import NitroError
from harness.layout import choose_layout, cmdline_devices, embedded_config
from helpers.kernels import (FAKE_RELEASE, FAKE_VERMAGIC, cached_kernel, compress, fake_bzimage,
                             vmlinux, without_embedded_config)

NITRO_CONFIG = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n# CONFIG_ACPI is not set\n"

# The decision table: (embedded config, built-in parameter) -> layout, devices supported.
TABLE = [
    pytest.param(NITRO_CONFIG, False, "nitro", True, id="config-says-y"),
    pytest.param("CONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n", False, "acpi", False,
                 id="config-says-m"),
    pytest.param("CONFIG_VIRTIO_MMIO=y\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n", False, "acpi",
                 False, id="config-without-cmdline-devices"),
    pytest.param(None, True, "nitro", True, id="no-config-with-parameter"),
    pytest.param(None, False, "acpi", False, id="no-config-no-parameter"),
]


@pytest.mark.parametrize("config, param, layout, supported", TABLE)
def test_decision_table(config, param, layout, supported, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(vmlinux(config, param=param)))
    chosen = choose_layout(kernel)
    assert (chosen.name, chosen.acpi) == (layout, layout == "acpi")
    assert chosen.devices.supported is supported
    # Only a kernel shown to lack command-line devices is said not to boot on Nitro.
    assert (chosen.nitro_warning is not None) == (not supported)
    if not supported:
        assert "would not boot on Nitro" in chosen.nitro_warning


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"])
def test_every_payload_compression_is_read(kind):
    if compress(b"x", kind) is None:
        pytest.skip(f"no {kind} compressor on this machine (zstandard package or zstd command)")
    image = read_kernel_image(fake_bzimage(vmlinux(None, param=True), kind))
    assert (image.format, image.arch, image.compression) == ("bzImage", "x86_64", kind)
    assert image.release == FAKE_RELEASE and image.vermagic() == FAKE_VERMAGIC
    assert cmdline_devices(image).supported is True
    assert embedded_config(image) is None


def test_embedded_config_is_read_from_the_payload(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(vmlinux(NITRO_CONFIG), "xz"))
    assert embedded_config(kernel) == {"CONFIG_VIRTIO_MMIO": "y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y"}
    assert "embedded config" in choose_layout(kernel).reason


def test_unreadable_payload_is_assumed_nitro():
    # A payload no decompressor reads proves nothing: the Nitro layout, with the reason said.
    good = bytearray(fake_bzimage(vmlinux(None, param=True)))
    good[1024 + 0x80 + 20:1024 + 0x80 + 60] = b"\xff" * 40  # corrupt the deflate stream
    chosen = choose_layout(bytes(good))
    assert chosen.name == "nitro" and chosen.devices.supported is None
    assert "cannot read the kernel's payload" in chosen.reason and chosen.nitro_warning is None


def test_formats_and_architectures():
    assert read_kernel_image(fake_bzimage(vmlinux(), bits64=False)).arch == "i386"
    arm = b"\0" * 0x38 + b"ARM\x64" + b"\0" * 64
    assert (read_kernel_image(arm).format, read_kernel_image(arm).arch) == ("Image", "aarch64")
    assert read_kernel_image(b"\0" * 4096).format == "unknown"


def test_explicit_layout_wins_and_bad_names_fail(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage(vmlinux(None)))
    assert choose_layout(kernel).name == "acpi"
    explicit = choose_layout(kernel, "nitro")
    assert explicit.name == "nitro" and explicit.nitro_warning is None
    with pytest.raises(NitroError):
        choose_layout(kernel, "pc")


def test_the_harness_kernel_takes_cmdline_devices():
    kernel = cached_kernel("nitro")
    if kernel is None:
        pytest.skip("the harness's kernel is not built ({cache}/kernel-current; scripts/setup.sh)")
    image = read_kernel_image(kernel)
    assert image.format == "bzImage" and image.arch == "x86_64"
    assert image.vermagic().startswith(image.release + " ")
    assert b"\0virtio_mmio.device\0" in image.payload
    assert choose_layout(kernel).name == "nitro" and "embedded config" in choose_layout(kernel).reason
    # Decided by the parameter alone too, as for AWS's kernels, which embed no config.
    bare = without_embedded_config(kernel.read_bytes())
    assert bare is not None and len(bare) == len(kernel.read_bytes())
    assert embedded_config(bare) is None
    chosen = choose_layout(bare)
    assert chosen.name == "nitro" and chosen.devices.evidence == "built-in parameter virtio_mmio.device"


def test_debians_kernel_lacks_cmdline_devices():
    # Debian's cloud kernel: zstd payload, no IKCONFIG, virtio_mmio as a module.
    kernel = cached_kernel("debian")
    if kernel is None:
        pytest.skip("Debian's cloud kernel is not unpacked in the cache ({cache}/kernels)")
    image = read_kernel_image(kernel)
    if image.payload is None:
        pytest.skip(f"cannot decompress Debian's kernel here: {image.payload_note}")
    assert image.compression == "zstd" and embedded_config(image) is None
    assert b"virtio_mmio.device" not in image.payload
    chosen = choose_layout(image)
    assert chosen.name == "acpi" and "would not boot on Nitro" in chosen.nitro_warning


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


def test_lz4_payload_that_is_corrupt_or_too_large_is_not_read(monkeypatch):
    from harness import bzimage

    body = vmlinux(None, param=True) + bytes(5000)
    good = fake_bzimage(body, "lz4")
    assert read_kernel_image(good).payload == body
    bad = bytearray(good)
    bad[1024 + 0x80 + 8] ^= 0xFF  # the first block's token: its lengths no longer add up
    image = read_kernel_image(bytes(bad))
    assert image.payload is None and image.payload_note.startswith("the lz4 payload does not decompress")
    monkeypatch.setattr(bzimage, "MAX_PAYLOAD", 1000)
    image = read_kernel_image(good)
    assert image.payload is None and "decompresses to more than" in image.payload_note
